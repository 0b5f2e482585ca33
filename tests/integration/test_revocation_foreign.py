"""Revoking what the cluster did not issue (issue 9, item 3), against pebble.

- a certificate of an unrelated CA: refused without --provider before any
  request; with --provider the ways are tried in order and the CA's refusal
  comes back in plain words, nothing stored lost; for names DNS does not
  point at the cluster, fresh authorizations and a new order are refused
  locally (no order, nothing sent to the CA);
- a CA that refuses authorization-only revocation (a strict test double in
  front of pebble): the chain falls back to the appliance guide's way, a new
  order for the same names whose certificate is left pending, and the answer
  lists every way refused and the way used;
- the "reset" story: the cluster's state in etcd is wiped, the peer still
  holds the key, and ``revoke FILE --provider pebble`` succeeds by the
  certificate's own key.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusteracme.coordinator.store.etcd import EtcdStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.certinfo import spki_sha256
from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.localcluster.infra import Pebble
from tests.integration.conftest import ctl_json, keyspace, make_cluster, register_account
from tests.integration.revoke_double import RevokeDouble

pytestmark = pytest.mark.integration
PREFIX = "/clusteracme/local/"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    for c in make_cluster(tmp_path_factory, "revocation-foreign", peers=2):
        register_account(c)
        for i in (1, 2):
            c.ctl("peer", "enable", f"peer{i}")
        yield c


@pytest.fixture(scope="module")
def strict(cluster: LocalCluster) -> Iterator[RevokeDouble]:
    """Provider "strict": pebble behind a CA that revokes by account only
    what the account has just ordered."""
    with RevokeDouble(cluster.directory_url, cluster.ca_bundle) as double:
        cluster.ctl("provider", "add", "strict", "--directory", double.directory_url,
                    "--ca-bundle", str(double.bundle()))
        cluster.ctl("account", "register", "--provider", "strict", "--email", "strict@test.example", "--agree-tos")
        yield double


def pebble(cluster: LocalCluster) -> Pebble:
    assert cluster.infra is not None and cluster.infra.pebble is not None
    return cluster.infra.pebble


def revoked_reason(cluster: LocalCluster, serial: str) -> int | None:
    status = pebble(cluster).cert_status(serial)
    return status.get("Reason") if status.get("Status") == "Revoked" else None


def pebble_requests(cluster: LocalCluster) -> int:
    return (cluster.run_dir / "pebble.log").read_text().count("\n")


def records_under(cluster: LocalCluster, part: str) -> dict[str, bytes]:
    return {k: v for k, v, _ in keyspace(cluster) if k.startswith(PREFIX + part)}


def slot_record(cluster: LocalCluster, peer: int) -> dict[str, Any]:
    return json.loads(records_under(cluster, f"certs/peer{peer}/server")[PREFIX + f"certs/peer{peer}/server"])


def events(cluster: LocalCluster, peer: str) -> list[dict[str, Any]]:
    return [json.loads(v) for k, v in records_under(cluster, f"events/{peer}/").items()]


def sign(cluster: LocalCluster, peer: int, name: str, provider: str, tmp_path: Path) -> tuple[Path, str]:
    """A certificate for ``name`` on the peer's server slot, left pending; its PEM saved to a file."""
    cluster.set_dns(name, [1, 2])
    cluster.ctl("pending", "discard", f"peer{peer}", check=False)
    cluster.ctl("csr", "create", f"peer{peer}", "--cn", name)
    assert ctl_json(cluster, "sign", f"peer{peer}", "--wait", "--provider", provider)["succeeded"]
    pending = ctl_json(cluster, "pending", "show", f"peer{peer}")
    path = tmp_path / f"{name}.pem"
    path.write_text(pending["chain_pem"])
    return path, pending["certificate"]["serial_hex"]


def foreign_certificate(name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "An Unrelated CA")]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()))


def test_a_certificate_from_an_unrelated_ca(cluster: LocalCluster, tmp_path: Path) -> None:
    name = "foreign.revoke.example"
    cluster.set_dns(name, [1, 2])
    cert = foreign_certificate(name)
    serial = format(cert.serial_number, "x")
    path = tmp_path / "foreign.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs_before = records_under(cluster, "certs/")

    # Without --provider: refused before any request, with the way out.
    before = pebble_requests(cluster)
    refused = cluster.ctl("revoke", str(path), check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "not a CA this cluster got certificates from" in refused.stderr, refused.stderr
    assert "use --provider to revoke a certificate from another CA" in refused.stderr
    assert pebble_requests(cluster) == before

    # With --provider: no record, no peer holds the key, fresh authorizations
    # are won, and pebble refuses a certificate it never issued.
    result = cluster.ctl("revoke", str(path), "--provider", "pebble", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    err = " ".join(result.stderr.split())
    assert f"certificate {serial} was not revoked: by fresh authorizations" in err, err
    assert "Unable to find specified certificate" in err
    assert "the issuing account: the cluster has no record of issuing this certificate" in err
    assert "the certificate's own key: no live peer holds it" in err
    orders = [json.loads(v) for v in records_under(cluster, "orders/").values()]
    authz = [o for o in orders if o.get("authorize_only") and o["names"] == [name]]
    assert len(authz) == 1 and authz[0]["phase"] == "done"
    # Nothing stored lost: the slots are as they were; the history holds the copy and the outcome.
    assert records_under(cluster, "certs/") == certs_before
    kept = [e for e in events(cluster, "_unattached") if e["serial_hex"] == serial]
    assert [e["result"] for e in kept] == ["requested", "failed"]
    assert x509.load_pem_x509_certificate(kept[0]["certificate_pem"].encode()) == cert
    assert "Unable to find specified certificate" in kept[1]["detail"]


@pytest.mark.parametrize("dns", ["elsewhere", "missing"])
def test_names_dns_does_not_point_at_the_cluster(cluster: LocalCluster, tmp_path: Path, dns: str) -> None:
    """Fresh authorizations and a new order need DNS to point every name at
    the cluster: otherwise both ways are refused locally, no order is opened
    and nothing reaches the CA, even with a CSR for the names on a peer."""
    name = f"{dns}.revoke.example"
    assert cluster.infra is not None
    if dns == "elsewhere":
        cluster.infra.challtestsrv.set_a(name, ["192.0.2.10"])
        why = f"{name}: resolves to 192.0.2.10 (IPv4, A), which is not a registered peer"
    else:
        cluster.infra.challtestsrv.clear_a(name)
        why = f"{name}: no A/AAAA record"
    cert = foreign_certificate(name)
    serial = format(cert.serial_number, "x")
    path = tmp_path / "foreign.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    orders_before = records_under(cluster, "orders/")
    before = pebble_requests(cluster)

    result = cluster.ctl("revoke", str(path), "--provider", "pebble", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    err = " ".join(result.stderr.split())
    assert f"certificate {serial} was not revoked: every way was refused" in err, err
    refusal = f"DNS does not point every name at the cluster, nothing was asked of the CA ({why})"
    assert f"fresh authorizations: {refusal}" in err and f"a new order for the same names: {refusal}" in err, err
    assert "--force skips" not in err
    # No order opened, no request to the CA.
    assert records_under(cluster, "orders/") == orders_before
    assert pebble_requests(cluster) == before
    kept = [e for e in events(cluster, "_unattached") if e["serial_hex"] == serial]
    assert [e["result"] for e in kept] == ["requested", "failed"]


def test_a_ca_that_refuses_authorization_only_revocation(cluster: LocalCluster, strict: RevokeDouble,
                                                         tmp_path: Path) -> None:
    name = "chain.revoke.example"
    path, serial = sign(cluster, 1, name, "strict", tmp_path)
    cluster.ctl("pending", "discard", "peer1")  # the history keeps it; the order record names provider strict
    # peer1 moves on to other names and loses the certificate's key: that key cannot sign.
    cluster.ctl("csr", "create", "peer1", "--cn", "elsewhere.revoke.example")
    leaf = x509.load_pem_x509_certificate(path.read_bytes())
    (cluster.agent(1).state_dir / "slots" / "server" / "keys" / f"{spki_sha256(leaf.public_key())}.key").unlink()
    # A CSR for the same names on peer2, with a key of its own: the slot for the guide's way.
    cluster.ctl("csr", "create", "peer2", "--cn", name)
    peer1_slot = slot_record(cluster, 1)
    strict.strict = True
    try:
        out = ctl_json(cluster, "revoke", str(path), "--reason", "superseded")
    finally:
        strict.strict = False
    assert out["provider"] == "strict" and out["serial_hex"] == serial
    refused = out["refused"]
    assert [r.split(":")[0] for r in refused] == [
        "the issuing account", "the certificate's own key", "fresh authorizations"], refused
    assert "names the account has just ordered" in refused[0] and "unauthorized" in refused[0]
    assert refused[1] == "the certificate's own key: no live peer holds it"
    assert "names the account has just ordered" in refused[2]
    how = out["authorization"]
    assert how.startswith("a new order for the same names (provider strict, order "), how
    assert ("is pending on peer peer2; discard or deploy it (until then no certificate is signed for that slot, "
            "automatic renewal included)") in how
    assert revoked_reason(cluster, serial) == 4
    # The CA refused the two account-signed requests without authority, then
    # accepted the one after the new order.
    assert [s for _, s in strict.refused] == [serial, serial]
    assert strict.forwarded == [("kid", serial)]
    # The new certificate is pending on peer2, not deployed.
    pending = ctl_json(cluster, "pending", "show", "peer2")
    fresh = pending["certificate"]["serial_hex"]
    assert f"a new certificate {fresh} for the same names" in how and fresh != serial
    assert revoked_reason(cluster, fresh) is None
    slot = slot_record(cluster, 2)
    assert not slot.get("active") and slot["pending"]["serial_hex"] == fresh
    assert slot["pending"]["for_revocation"] == serial and slot["current_order"] is None
    link = [e for e in events(cluster, "peer2") if e["what"] == "revoke" and e["result"] == "kept-pending"]
    assert len(link) == 1 and link[0]["serial_hex"] == fresh and link[0]["previous_serial_hex"] == serial
    # The authorization-only order (refused revocation) required only the peers DNS points at.
    orders = [json.loads(v) for v in records_under(cluster, "orders/").values()]
    authz = [o for o in orders if o.get("authorize_only") and o["names"] == [name]]
    assert len(authz) == 1 and authz[0]["dns"] == {name: ["peer1", "peer2"]}
    # peer1's slot untouched (its CSR stays), and the history keeps the copy.
    assert slot_record(cluster, 1) == peer1_slot
    kept = [e for e in events(cluster, "peer1") if e["what"] == "revoke" and e["serial_hex"] == serial]
    assert [e["result"] for e in kept] == ["requested", "ok"] and kept[0]["certificate_pem"]
    cluster.ctl("pending", "discard", "peer2")


def wipe(cluster: LocalCluster) -> list[str]:
    """A factory reset of the cluster's state: every key under the prefix
    goes but the leader key (the running coordinator's election). Returns
    what was kept."""

    async def run() -> list[str]:
        assert cluster.infra is not None
        store = EtcdStore([cluster.infra.etcd.endpoint])
        await store.connect()
        try:
            kept = []
            for entry in await store.range(PREFIX):
                if entry.key == PREFIX + "leader":
                    kept.append(entry.key)
                    continue
                await store.delete_if(entry.key, expect_mod_revision=None)
            return kept
        finally:
            await store.close()

    return asyncio.run(run())


def test_reset_story(cluster: LocalCluster, tmp_path: Path) -> None:
    """The cluster signs and deploys a certificate, then its state in etcd is
    wiped (providers, account, peers, slots, orders, history, everything but
    the leader key). The peer still holds the key and still serves the
    certificate; after re-adding the provider with a new account, the
    certificate is revoked by its own key."""
    name = "reset.revoke.example"
    path, serial = sign(cluster, 1, name, "pebble", tmp_path)
    assert ctl_json(cluster, "deploy", "peer1")["active_serial_hex"] == serial

    assert wipe(cluster) == [PREFIX + "leader"]
    cluster.wait_peers_alive(timeout=60)  # the agents register again by themselves
    assert not records_under(cluster, "certs/") and not records_under(cluster, "orders/")
    assert not records_under(cluster, "providers/") and not records_under(cluster, "events/")
    # The cluster knows nothing: without --provider, refused before any request.
    refused = cluster.ctl("revoke", str(path), check=False)
    assert refused.returncode != 0 and "use --provider" in refused.stderr, refused.stderr
    # The provider again, with a new account (pebble allows it).
    register_account(cluster)

    # peer1 still serves the certificate from its disk: --force is needed.
    active = cluster.ctl("revoke", str(path), "--provider", "pebble", check=False)
    assert active.returncode != 0 and "active on peer1, on its disk" in active.stderr, active.stderr
    assert revoked_reason(cluster, serial) is None

    # keyCompromise: the key itself is tried first (the CA then blocks the key).
    out = ctl_json(cluster, "revoke", str(path), "--provider", "pebble", "--reason", "keyCompromise", "--force")
    assert out["authorization"] == "the certificate's own key, signed on peer peer1", out
    assert out.get("refused", []) == []
    assert revoked_reason(cluster, serial) == 1
    # Pebble says so again when asked a second time.
    again = cluster.ctl("revoke", str(path), "--provider", "pebble", "--force", check=False)
    assert again.returncode != 0 and "already revoked" in again.stderr and "Traceback" not in again.stderr
    kept = [e for e in events(cluster, "_unattached") if e["serial_hex"] == serial]
    assert [e["result"] for e in kept] == ["requested", "ok", "requested", "failed"]
    assert x509.load_pem_x509_certificate(kept[0]["certificate_pem"].encode()).serial_number == int(serial, 16)
