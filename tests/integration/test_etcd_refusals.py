"""Safe defaults for etcd and what an etcd writer can no longer do unseen
(issue 12 item 5), on the real daemons:

- the coordinator refuses at start (exit 2, one sentence, before connecting)
  plaintext to an etcd endpoint that is not loopback and a password without
  TLS; ``etcd.insecure = true`` starts it, with a WARNING at every start;
- a provider record whose directory URL was changed in etcd directly makes a
  sign fail naming the change (the sealed account key is bound to it), and
  signs again once restored;
- with only an unrelated CA in the trust store, an agent refuses to deploy
  pebble's chain (the agent keeps its copy of the store without
  ``trust_bundle_file``); trusting pebble's root lets the same chain through.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusteracme.coordinator import records
from clusteracme.coordinator.store.etcd import EtcdStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme import pki
from clusteracme.localcluster.cluster import LocalCluster, write_toml
from clusteracme.localcluster.infra import Etcd, free_port
from tests.conftest import start_etcd
from tests.integration.conftest import ctl_json, make_cluster, record, register_account

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-etcd"
REFUSED = "refusing to use etcd insecurely: "


# --- start-up refusals --------------------------------------------------------


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    """A loopback etcd with authentication on (user root): a password is what it takes to use it."""
    etcd = start_etcd(tmp_path_factory.mktemp("etcd-auth"))
    try:
        for path, body in (("auth/user/add", {"name": "root", "password": PASSWORD}),
                           ("auth/user/grant", {"user": "root", "role": "root"}), ("auth/enable", {})):
            request = urllib.request.Request(f"http://{etcd.endpoint}/v3/{path}", data=json.dumps(body).encode())
            with urllib.request.urlopen(request, timeout=10) as resp:
                resp.read()
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mTLS files, the account-key secret and the etcd password file of one coordinator."""
    base = tmp_path_factory.mktemp("coordinator")
    pki_dir = base / "pki"
    pki.init_ca(pki_dir, cluster="refusals")
    cert, key = pki.issue(pki_dir, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=base, ips=["127.0.0.1"])
    pki.create_secret(base / "account-key.secret")
    password = base / "etcd-password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    return {"base": base, "ca": pki_dir / "ca.pem", "cert": Path(cert), "key": Path(key),
            "secret": base / "account-key.secret", "password": password}


def coordinator(files: dict[str, Path], name: str, etcd: dict[str, object]) -> tuple[subprocess.Popen[str], Path]:
    """The coordinator daemon (``python -m clusteracme.coordinator.app``) on a config with this [etcd] table."""
    config = files["base"] / f"{name}.toml"
    write_toml(config, {
        "name": name, "listen": f"127.0.0.1:{free_port()}", "account_key_file": str(files["secret"]),
        "tls": {"ca": str(files["ca"]), "cert": str(files["cert"]), "key": str(files["key"])},
        "etcd": {"prefix": f"/clusteracme/{name}/", **etcd},
    })
    log = files["base"] / f"{name}.log"
    handle = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "clusteracme.coordinator.app", "--config", str(config)], cwd=ROOT,
                            stdout=handle, stderr=subprocess.STDOUT, text=True)
    handle.close()
    return proc, log


@pytest.mark.parametrize("endpoint", ["10.255.255.1:2379", "etcd.example:2379"])
def test_plaintext_to_a_remote_etcd_is_refused_before_connecting(files: dict[str, Path], endpoint: str) -> None:
    name = "remote-" + endpoint.split(":")[0].replace(".", "-")
    proc, log = coordinator(files, name, {"endpoints": [endpoint]})
    assert proc.wait(timeout=60) == 2
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines  # one sentence, no traceback
    assert f"ERROR acme-coordinator: {REFUSED}plaintext (no etcd.ca) to {endpoint}, not a loopback address" \
        in lines[0]
    assert "set etcd.insecure = true to accept the risk" in lines[0]


def test_a_password_without_tls_is_refused_and_insecure_starts_with_a_warning(
        files: dict[str, Path], auth_etcd: Etcd) -> None:
    auth = {"endpoints": [auth_etcd.endpoint], "user": "root", "password_file": str(files["password"])}
    proc, log = coordinator(files, "password", auth)
    assert proc.wait(timeout=60) == 2
    text = log.read_text()
    assert f"{REFUSED}a password (etcd.user/password_file) sent without TLS (no etcd.ca)" in text
    assert len(text.splitlines()) == 1, text

    # Accepted with etcd.insecure = true: it authenticates, leads, and says what is insecure; at every start.
    for start in (1, 2):
        proc, log = coordinator(files, "password", {**auth, "insecure": True})
        try:
            deadline = time.monotonic() + 90
            while "leads: serving every call" not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        warnings = [line for line in log.read_text().splitlines() if "etcd.insecure = true" in line]
        assert len(warnings) == 1, (start, warnings)
        assert " WARNING acme-coordinator: etcd.insecure = true: a password (etcd.user/password_file) sent without " \
               "TLS (no etcd.ca)" in warnings[0]


# --- what an etcd writer can no longer do unseen ------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One peer, no trust_bundle_file: the agent keeps its copy of the trust store anyway."""
    for c in make_cluster(tmp_path_factory, "etcdrefusals", peers=1):
        register_account(c)
        c.ctl("peer", "enable", "peer1")
        c.set_dns("refusals.example", [1])
        yield c


def unrelated_root() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Unrelated Root")])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_an_agent_refuses_a_chain_outside_the_trust_store(cluster: LocalCluster) -> None:
    assert cluster.infra is not None
    cluster.ctl("csr", "create", "peer1", "--cn", "refusals.example")
    assert ctl_json(cluster, "sign", "peer1", "--wait")["succeeded"]
    pending = record(cluster, "certs/peer1/server")["pending"]["serial_hex"]

    unrelated = cluster.run_dir / "unrelated-root.pem"
    unrelated.write_bytes(unrelated_root())
    cluster.ctl("trust", "add", str(unrelated))
    copy = cluster.agent(1).state_dir / "trust-bundle.pem"
    assert x509.load_pem_x509_certificates(copy.read_bytes())[0].subject.rfc4514_string() == "CN=Unrelated Root"
    refused = cluster.ctl("deploy", "peer1", check=False)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert f"certificate {pending}" in said and "does not validate against this peer's trust bundle" in said, said
    slot = record(cluster, "certs/peer1/server")
    assert not slot.get("active") and slot["pending"]["serial_hex"] == pending  # nothing changed

    root = cluster.infra.pebble.fetch_issuing_root()
    pebble_root = cluster.run_dir / "pebble-root.pem"
    pebble_root.write_text(root)
    cluster.ctl("trust", "add", str(pebble_root))
    deployed = ctl_json(cluster, "deploy", "peer1")
    assert deployed["active_serial_hex"] == pending
    assert record(cluster, "certs/peer1/server")["active"]["serial_hex"] == pending


def test_a_changed_provider_record_is_refused(cluster: LocalCluster) -> None:
    provider = record(cluster, "providers/pebble")
    assert provider["account_key"].startswith("v2:")  # sealed bound to its record
    moved = "https://127.0.0.1:1/dir"

    async def put(value: dict[str, object]) -> None:
        assert cluster.infra is not None
        async with EtcdStore(cluster.infra.etcd_endpoints) as store:
            await store.put_if("/clusteracme/local/providers/pebble", records.encode(value), expect_mod_revision=None)

    asyncio.run(put({**provider, "directory_url": moved}))  # an etcd writer, behind the coordinator's back
    try:
        cluster.ctl("csr", "create", "peer1", "--cn", "refusals.example")
        failed = cluster.ctl("--json", "sign", "peer1", "--wait", check=False)
        said = failed.stdout + failed.stderr
        assert failed.returncode != 0 or not json.loads(failed.stdout).get("succeeded"), said
        assert "provider pebble's record changed since its account was registered: directory URL was " \
               f"'{cluster.directory_url}', is now '{moved}'" in said, said
        assert "re-register" in said
    finally:
        asyncio.run(put(provider))
    # Restored: the account key opens again and the sign goes through.
    cluster.ctl("csr", "create", "peer1", "--cn", "refusals.example", check=False)
    assert ctl_json(cluster, "sign", "peer1", "--wait")["succeeded"]
