"""Trust store, External Account Binding and several providers against real
pebble instances (issue 5 acceptance 4-6; SPEC R1, R12)."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.localcluster.infra import Pebble
from tests.integration.conftest import ctl_json, make_cluster, register_account

pytestmark = pytest.mark.integration
# The MAC keys of Debian's example pebble EAB configuration.
EAB_KEYS = {"kid-1": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W",
            "kid-2": "b10lLJs8l1GPIzsLP0s6pMt8O0XVGnfTaCeROxQM0BIt2XrJMDHJZBM5NuQmQJQH"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    run_dir = tmp_path_factory.mktemp("trust")
    settings = {1: {"trust_bundle_file": str(run_dir / "peer1-trust.pem")}}
    with LocalCluster(run_dir, peers=2, agent_settings=settings) as c:
        register_account(c)
        for i in (1, 2):
            c.ctl("peer", "enable", f"peer{i}")
        yield c


def _write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_trust_store(cluster: LocalCluster, tmp_path: Path) -> None:
    assert cluster.infra is not None
    cluster.set_dns("trust.example", [1, 2])
    cluster.ctl("csr", "create", "peer1", "--cn", "trust.example")
    assert ctl_json(cluster, "sign", "peer1", "--wait")["succeeded"]
    root = cluster.infra.pebble.fetch_issuing_root()
    intermediate = cluster.infra.pebble.fetch_intermediate()
    added = ctl_json(cluster, "trust", "add", _write(tmp_path / "pebble.pem", root + intermediate))["certificates"]
    assert sorted(c["self_signed"] for c in added) == [False, True] and all(c["added"] for c in added)
    again = ctl_json(cluster, "trust", "add", _write(tmp_path / "root.pem", root))["certificates"]
    assert [c["added"] for c in again] == [False]
    listed = ctl_json(cluster, "trust", "list")["certificates"]
    assert len(listed) == 2
    ok = ctl_json(cluster, "trust", "verify", "peer1")
    assert ok["ok"] and ok["which"] == "pending" and len(ok["path"]) == 3
    # The agent with a trust_bundle_file received the bundle.
    bundle = (cluster.run_dir / "peer1-trust.pem").read_text()
    assert x509.load_pem_x509_certificates(bundle.encode()) and root.strip().splitlines()[1] in bundle

    root_sha = next(c["sha256"] for c in listed if c["self_signed"])
    cluster.ctl("trust", "remove", root_sha)
    failed = cluster.ctl("trust", "verify", "peer1", check=False)
    assert failed.returncode != 0 and "NOT VALID" in failed.stdout
    assert "no root certificate" in failed.stdout or "no trusted root" in failed.stdout
    assert root.strip().splitlines()[1] not in (cluster.run_dir / "peer1-trust.pem").read_text()

    # Refused on add, nothing stored: a leaf, an expired CA, a non-PEM file.
    leaf = ctl_json(cluster, "pending", "show", "peer1")["chain_pem"]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Old CA")])
    now = datetime.datetime.now(datetime.UTC)
    expired = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(now - datetime.timedelta(days=20))
               .not_valid_after(now - datetime.timedelta(days=10))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    for label, data, fragment in (("leaf", leaf.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n",
                                   "not a CA"), ("expired", expired, "expired"),
                                  ("text", b"hello, not a certificate\n", "certificate")):
        result = cluster.ctl("trust", "add", _write(tmp_path / label, data), check=False)
        assert result.returncode != 0 and fragment in result.stderr, (label, result.stderr)
    assert len(ctl_json(cluster, "trust", "list")["certificates"]) == 1


def test_two_providers_each_record_their_own(cluster: LocalCluster) -> None:
    assert cluster.infra is not None
    second = Pebble(cluster.run_dir, http01_port=cluster.front_port, dns_server=cluster.infra.challtestsrv.dns_address,
                    name="pebble2")
    second.start()
    try:
        cluster.ctl("provider", "add", "second", "--directory", second.directory_url,
                    "--ca-bundle", str(second.ca_bundle_path))
        cluster.ctl("account", "register", "--provider", "second", "--email", "ops@test.example", "--agree-tos")
        providers = {p["name"]: p for p in ctl_json(cluster, "provider", "list")["providers"]}
        assert providers["second"]["account_url"].startswith(second.directory_url.rsplit("/", 1)[0])
        assert providers["pebble"]["account_url"] != providers["second"]["account_url"]
        cluster.set_dns("two.example", [1, 2])
        cluster.ctl("csr", "create", "peer2", "--cn", "two.example")
        assert ctl_json(cluster, "sign", "peer2", "--wait", "--provider", "second")["succeeded"]
        pending = ctl_json(cluster, "pending", "show", "peer2")
        assert pending["provider"] == "second"
        path = cluster.run_dir / "two.pem"
        path.write_text(pending["chain_pem"])
        revoked = ctl_json(cluster, "revoke", str(path))
        assert revoked["provider"] == "second" and "issuing account" in revoked["authorization"]
        assert second.cert_status(pending["certificate"]["serial_hex"])["Status"] == "Revoked"
    finally:
        second.stop()


@pytest.fixture(scope="module")
def eab_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from make_cluster(tmp_path_factory, "eab", peers=1,
                            pebble_config={"externalAccountBindingRequired": True, "externalAccountMACKeys": EAB_KEYS})


def test_external_account_binding(eab_cluster: LocalCluster) -> None:
    c = eab_cluster
    c.ctl("provider", "add", "pebble", "--directory", c.directory_url, "--ca-bundle", str(c.ca_bundle))
    base = ["account", "register", "--provider", "pebble", "--email", "ops@test.example", "--agree-tos"]
    refused = c.ctl(*base, check=False)
    assert refused.returncode != 0 and "requires External Account Binding" in refused.stderr
    # The MAC key is read from a file (or ACMECTL_EAB_HMAC_KEY), never from the command line (ps shows it).
    on_command_line = c.ctl(*base, "--eab-kid", "kid-1", "--eab-hmac-key", EAB_KEYS["kid-1"], check=False)
    assert on_command_line.returncode == 2 and "--eab-hmac-key-file" in on_command_line.stderr
    keys = {}
    for kid, mac in EAB_KEYS.items():
        keys[kid] = c.run_dir / f"eab-{kid}.key"
        keys[kid].write_text(mac + "\n")  # as an editor saves it: the newline is stripped
        keys[kid].chmod(0o600)
    wrong = c.ctl(*base, "--eab-kid", "kid-1", "--eab-hmac-key-file", str(keys["kid-2"]), check=False)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr and "acmectl:" in wrong.stderr
    c.ctl(*base, "--eab-kid", "kid-1", "--eab-hmac-key-file", str(keys["kid-1"]))
    c.ctl("peer", "enable", "peer1")
    c.set_dns("eab.example", [1])
    c.ctl("csr", "create", "peer1", "--cn", "eab.example")
    assert ctl_json(c, "sign", "peer1", "--wait")["succeeded"]
