"""Revocation against pebble, every authorisation path (issue 5 acceptance 1-3, 6; SPEC R11)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.localcluster.infra import Pebble
from tests.integration.conftest import ctl_json, keyspace, make_cluster, register_account

pytestmark = pytest.mark.integration
REASON_CODES = {"superseded": 4, "keyCompromise": 1, "cessationOfOperation": 5}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    for c in make_cluster(tmp_path_factory, "revocation", peers=2):
        register_account(c)
        # A second account at the same CA: certificates it issued are "not
        # ours" for the first account.
        c.ctl("provider", "add", "other", "--directory", c.directory_url, "--ca-bundle", str(c.ca_bundle))
        c.ctl("account", "register", "--provider", "other", "--email", "other@test.example", "--agree-tos")
        for i in (1, 2):
            c.ctl("peer", "enable", f"peer{i}")
        yield c


def issue(cluster: LocalCluster, peer: int, name: str, provider: str, tmp_path: Path) -> tuple[Path, str]:
    cluster.set_dns(name, [1, 2])
    cluster.ctl("pending", "discard", f"peer{peer}", check=False)
    cluster.ctl("csr", "create", f"peer{peer}", "--cn", name)
    assert ctl_json(cluster, "sign", f"peer{peer}", "--wait", "--provider", provider)["succeeded"]
    pending = ctl_json(cluster, "pending", "show", f"peer{peer}")
    path = tmp_path / f"{name}.pem"
    path.write_text(pending["chain_pem"])
    return path, pending["certificate"]["serial_hex"]


def revoked_reason(pebble: Pebble, serial: str) -> int | None:
    status = pebble.cert_status(serial)
    return status.get("Reason") if status.get("Status") == "Revoked" else None


def pebble_requests(cluster: LocalCluster) -> int:
    return (cluster.run_dir / "pebble.log").read_text().count("\n")


def test_by_the_issuing_account(cluster: LocalCluster, tmp_path: Path) -> None:
    path, serial = issue(cluster, 1, "acct.revoke.example", "pebble", tmp_path)
    out = ctl_json(cluster, "revoke", str(path), "--reason", "superseded")
    assert "issuing account" in out["authorization"] and out["provider"] == "pebble"
    assert revoked_reason(cluster.infra.pebble, serial) == 4  # type: ignore[union-attr]
    # A second time: plain words, non-zero exit.
    again = cluster.ctl("revoke", str(path), check=False)
    assert again.returncode != 0 and "already revoked" in again.stderr and "Traceback" not in again.stderr
    # The copy kept in the history before sending.
    events = ctl_json(cluster, "events", "peer1")["events"]
    copies = [e for e in events if e["what"] == "revoke" and e["certificate_pem"]]
    assert copies and x509.load_pem_x509_certificate(copies[0]["certificate_pem"].encode()).serial_number == int(serial, 16)


def test_by_the_certificates_own_key(cluster: LocalCluster, tmp_path: Path) -> None:
    path, serial = issue(cluster, 2, "key.revoke.example", "other", tmp_path)
    out = ctl_json(cluster, "revoke", str(path), "--provider", "pebble", "--reason", "keyCompromise")
    assert "own key, signed on peer peer2" in out["authorization"]
    assert revoked_reason(cluster.infra.pebble, serial) == 1  # type: ignore[union-attr]


def test_by_fresh_authorizations(cluster: LocalCluster, tmp_path: Path) -> None:
    """The third way: the account validates every name afresh (all peers
    serving the challenges), then revokes. RFC 8555 7.6 allows it and Let's
    Encrypt (Boulder) implements it; pebble, in every version up to 2.9, does
    not ("TODO(@cpu): Allow an account to revoke another account's
    certificate if the revoker account has valid authorizations"), so here
    the authorizations are won and the CA's refusal must come back in plain
    words, with nothing else changed."""
    path, serial = issue(cluster, 1, "fresh.revoke.example", "other", tmp_path)
    # The peer no longer holds the key: only fresh authorizations remain.
    for key in cluster.agent(1).state_dir.glob("slots/server/keys/*.key"):
        key.unlink()
    result = cluster.ctl("revoke", str(path), "--provider", "pebble", "--reason", "cessationOfOperation", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not associated with account" in result.stderr, result.stderr
    orders = [json.loads(v) for k, v, _ in keyspace(cluster) if k.startswith("/clusteracme/local/orders/")]
    authz_only = [o for o in orders if o.get("authorize_only")]
    assert len(authz_only) == 1 and authz_only[0]["phase"] == "done" and authz_only[0]["cleaned"]
    assert [a["status"] for a in authz_only[0]["authorizations"]] == ["valid"]
    assert authz_only[0]["names"] == ["fresh.revoke.example"] and authz_only[0]["provider"] == "pebble"
    assert {p["peer_id"] for p in authz_only[0]["peers"] if p["self_checked"]} == {"peer1", "peer2"}
    assert revoked_reason(cluster.infra.pebble, serial) is None  # type: ignore[union-attr]


def test_active_certificate_needs_force(cluster: LocalCluster, tmp_path: Path) -> None:
    path, serial = issue(cluster, 2, "active.revoke.example", "pebble", tmp_path)
    cluster.ctl("deploy", "peer2")
    refused = cluster.ctl("revoke", str(path), check=False)
    assert refused.returncode != 0 and "active on peer2" in refused.stderr
    assert revoked_reason(cluster.infra.pebble, serial) is None  # type: ignore[union-attr]
    ctl_json(cluster, "revoke", str(path), "--force")
    assert revoked_reason(cluster.infra.pebble, serial) == 0  # type: ignore[union-attr]
    events = ctl_json(cluster, "events", "peer2")["events"]
    assert any(e["what"] == "revoke" and e["serial_hex"] == serial and e["certificate_pem"] for e in events)


def test_bad_files_are_refused_before_any_request(cluster: LocalCluster, tmp_path: Path) -> None:
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    foreign = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x.revoke.example")]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other CA")]))
               .public_key(key.public_key()).serial_number(12345)
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("x.revoke.example")]), critical=False)
               .sign(key, hashes.SHA256()))
    files = {"garbage": b"this is not a certificate\n", "empty": b"",
             "other CA": foreign.public_bytes(serialization.Encoding.PEM),
             "other CA (DER)": foreign.public_bytes(serialization.Encoding.DER)}
    for label, data in files.items():
        path = tmp_path / label.replace(" ", "_")
        path.write_bytes(data)
        before = pebble_requests(cluster)
        result = cluster.ctl("revoke", str(path), check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (label, result.stderr)
        assert any(w in result.stderr for w in ("not a certificate", "empty", "not a CA this cluster")), result.stderr
        assert pebble_requests(cluster) == before, f"{label}: a request reached pebble"
    json.dumps(files, default=str)
