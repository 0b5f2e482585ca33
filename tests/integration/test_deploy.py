"""Deploy without restart, rollback, per-domain (SNI) certificates and history
on real daemons (issue 3 acceptance 1, 2, 5, 7; SPEC R8, R10, R13)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusteracme.coordinator import records
from clusteracme.coordinator.store.etcd import EtcdStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.localcluster.cluster import LocalCluster, served_serial
from tests.integration.conftest import ctl_json, keyspace, make_cluster, register_account, wait_for

pytestmark = pytest.mark.integration
PREFIX = "/clusteracme/local/"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # JSON logs (one object a line): test_json_logs_name_the_order_the_slot_and_who_asked reads them.
    for c in make_cluster(tmp_path_factory, "deploy", peers=3, log_format="json"):
        register_account(c)
        for i in (1, 2, 3):
            c.ctl("peer", "enable", f"peer{i}")
        yield c


def signed(cluster: LocalCluster, peer: int, names: list[str], domain: str = "") -> str:
    """Sign (CSR first when the names change) and return the pending serial."""
    for name in names:
        cluster.set_dns(name, [1, 2, 3])
    extra = ["--domain", domain] if domain else []
    csr = ctl_json(cluster, "status", f"peer{peer}")["peers"][0]["slots"]
    current = next((s["csr_names"] for s in csr if s["slot"]["domain"] == domain), "")
    if current != ",".join(names):
        cluster.ctl("csr", "create", f"peer{peer}", "--cn", names[0], *[a for n in names[1:] for a in ("--san", n)],
                    *extra)
    order = ctl_json(cluster, "sign", f"peer{peer}", "--wait", *extra)
    assert order["succeeded"], order
    return ctl_json(cluster, "pending", "show", f"peer{peer}", *extra)["certificate"]["serial_hex"]


class KeepAlive:
    """One TLS connection carrying several HTTP/1.1 requests."""

    def __init__(self, endpoint: str, sni: str) -> None:
        host, port = endpoint.rsplit(":", 1)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=5), server_hostname=sni)
        self.serial = format(x509.load_der_x509_certificate(self.sock.getpeercert(binary_form=True)).serial_number, "x")

    def get(self) -> bytes:
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            assert chunk, "connection closed"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += self.sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        return body

    def close(self) -> None:
        self.sock.close()


def test_deploy_goes_live_without_dropping_connections(cluster: LocalCluster) -> None:
    endpoint = cluster.agent(1).tls_endpoint
    names = ["www.one.example", "one.example"]
    first = signed(cluster, 1, names)
    deployed = ctl_json(cluster, "deploy", "peer1")
    assert deployed["ok"] and deployed["active_serial_hex"] == first
    assert any(r["target"].startswith("tls ") and r["ok"] for r in deployed["reloads"])
    assert served_serial(endpoint, names[0]) == first

    before = KeepAlive(endpoint, names[0])
    assert first.encode() in before.get()
    second = signed(cluster, 1, names)
    assert second != first
    deployed = ctl_json(cluster, "deploy", "peer1")
    assert (deployed["active_serial_hex"], deployed["previous_serial_hex"]) == (second, first)
    # The connection opened before the deploy still exchanges data (on its old session) ...
    assert first.encode() in before.get()
    # ... while a new connection gets the new certificate.
    assert served_serial(endpoint, names[0]) == second
    assert served_serial(endpoint, None) == second
    before.close()

    slot = ctl_json(cluster, "status", "peer1")["peers"][0]["slots"][0]
    assert (slot["active_serial"], slot["previous_serial"], slot["pending_serial"]) == (second, first, "")
    assert slot["agent_matches"] is True

    back = ctl_json(cluster, "rollback", "peer1")
    assert back["ok"] and (back["active_serial_hex"], back["previous_serial_hex"]) == (first, second)
    assert served_serial(endpoint, names[0]) == first

    events = ctl_json(cluster, "events", "peer1")["events"]
    summary = [(e["what"], e["result"], e["serial_hex"], e["previous_serial_hex"]) for e in events]
    assert summary[:3] == [("rollback", "ok", first, second), ("deploy", "ok", second, first), ("sign", "ok", second, "")]
    assert ("deploy", "ok", first, "") in summary
    assert all(e["who"] == "operator:admin" for e in events)


def _disk(cluster: LocalCluster, peer: int) -> dict[str, object]:
    root = cluster.agent(peer).state_dir
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = os.readlink(path) if path.is_symlink() else (path.read_bytes() if path.is_file() else "dir")
    return out


def _set_pending(cluster: LocalCluster, peer: int, chain_pem: str) -> None:
    """Test setup: put a (bad) pending certificate straight into etcd."""

    async def write() -> None:
        assert cluster.infra is not None
        store = EtcdStore([cluster.infra.etcd.endpoint])
        await store.connect()
        try:
            key = f"{PREFIX}certs/peer{peer}/server"
            entry = await store.get(key)
            assert entry is not None
            slot = records.decode(entry.value)
            slot["pending"] = {"chain_pem": chain_pem, "serial_hex": "bad", "names": slot["csr"]["names"],
                               "not_after": "2000-01-01T00:00:00+00:00", "provider": "pebble", "order_url": "",
                               "signed_at": "2000-01-01T00:00:00+00:00"}
            await store.put_if(key, records.encode(slot), expect_mod_revision=entry.mod_revision)
        finally:
            await store.close()

    asyncio.run(write())


def _expired_cert_for(key_path: Path, names: list[str]) -> str:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_a_bad_pair_is_refused_and_changes_nothing(cluster: LocalCluster) -> None:
    endpoint = cluster.agent(2).tls_endpoint
    names = ["www.two.example"]
    good = signed(cluster, 2, names)
    ctl_json(cluster, "deploy", "peer2")
    other_peer_chain = json.loads(cluster.ctl("--json", "pending", "show", "peer1", check=False).stdout or "{}")
    if not other_peer_chain:
        signed(cluster, 1, ["www.one.example", "one.example"])
        other_peer_chain = ctl_json(cluster, "pending", "show", "peer1")
    key_file = next(cluster.agent(2).state_dir.glob("slots/server/keys/*.key"))
    cases = {
        "does not hold the key": other_peer_chain["chain_pem"],
        "expired": _expired_cert_for(key_file, names),
        "does not parse": "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n",
    }
    for fragment, chain in cases.items():
        _set_pending(cluster, 2, chain)
        etcd_before, disk_before = keyspace(cluster), _disk(cluster, 2)
        result = cluster.ctl("deploy", "peer2", check=False)
        assert result.returncode != 0
        assert fragment in result.stderr.lower() or fragment in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        # Keys and values: the deploy intent written before the agent was asked and removed on its
        # refusal bumps the slot's revision, nothing else.
        assert [(k, v) for k, v, _ in keyspace(cluster)] == [(k, v) for k, v, _ in etcd_before], \
            f"etcd changed on a refused deploy ({fragment})"
        assert _disk(cluster, 2) == disk_before, f"the peer's disk changed on a refused deploy ({fragment})"
        assert served_serial(endpoint, names[0]) == good
    cluster.ctl("pending", "discard", "peer2")


def test_domain_certificates_by_sni(cluster: LocalCluster) -> None:
    endpoint = cluster.agent(3).tls_endpoint
    server = signed(cluster, 3, ["www.three.example"])
    cluster.ctl("deploy", "peer3")
    a1 = signed(cluster, 3, ["a.tenant.example"], domain="a.tenant.example")
    cluster.ctl("deploy", "peer3", "--domain", "a.tenant.example")
    b1 = signed(cluster, 3, ["b.tenant.example", "www.b.tenant.example"], domain="b.tenant.example")
    cluster.ctl("deploy", "peer3", "--domain", "b.tenant.example")
    assert served_serial(endpoint, "a.tenant.example") == a1
    assert served_serial(endpoint, "b.tenant.example") == b1
    assert served_serial(endpoint, None) == server
    assert served_serial(endpoint, "unknown.example") == server
    # Each slot deploys and reverts on its own.
    a2 = signed(cluster, 3, ["a.tenant.example"], domain="a.tenant.example")
    cluster.ctl("deploy", "peer3", "--domain", "a.tenant.example")
    assert served_serial(endpoint, "a.tenant.example") == a2
    assert served_serial(endpoint, "b.tenant.example") == b1
    cluster.ctl("rollback", "peer3", "--domain", "a.tenant.example")
    assert served_serial(endpoint, "a.tenant.example") == a1
    assert (served_serial(endpoint, "b.tenant.example"), served_serial(endpoint, None)) == (b1, server)
    slots = {s["slot"]["domain"]: s for s in ctl_json(cluster, "status", "peer3")["peers"][0]["slots"]}
    assert slots["a.tenant.example"]["active_serial"] == a1 and slots["a.tenant.example"]["previous_serial"] == a2
    assert all(s["agent_matches"] for s in slots.values())


def _json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_json_logs_name_the_order_the_slot_and_who_asked(cluster: LocalCluster) -> None:
    """Issue 13 point 5, on the real daemons of this module (``--log-format json``): the lines of an order
    carry its id, peer, slot, phase and provider as keys; a deploy's line says who asked (the operator's
    certificate), on the coordinator and on the agent, whose every line is its peer's."""
    domain = "logs.tenant.example"
    cluster.set_dns(domain, [1, 2, 3])
    cluster.ctl("csr", "create", "peer1", "--cn", domain, "--domain", domain)
    started = ctl_json(cluster, "sign", "peer1", "--domain", domain)
    order = wait_for("the order to end", lambda: (o := ctl_json(cluster, "order", "show", started["order_id"]))["done"]
                     and o)
    assert order["succeeded"], order
    serial = ctl_json(cluster, "pending", "show", "peer1", "--domain", domain)["certificate"]["serial_hex"]
    cluster.ctl("deploy", "peer1", "--domain", domain)

    replica = cluster.replica(1)
    coordinator = _json_lines(replica.log_path)
    assert coordinator and all(line["replica"] == replica.name for line in coordinator)
    phases = [line for line in coordinator if line.get("order_id") == order["order_id"]
              and line.get("event") == "order-phase"]
    assert [line["phase"] for line in phases][:2] == ["queued", "new"]
    assert {"issued", "done"} <= {line["phase"] for line in phases} and phases[-1]["phase"] == "done"
    for line in phases:
        assert (line["peer"], line["domain"], line["provider"], line["who"]) == \
            ("peer1", domain, "pebble", "operator:admin"), line
    deployed = [line for line in coordinator if line.get("event") == "deploy" and line.get("serial") == serial]
    assert len(deployed) == 1, deployed
    assert {k: deployed[0][k] for k in ("who", "rpc", "peer", "domain", "level")} == {
        "who": "operator:admin", "rpc": "Deploy", "peer": "peer1", "domain": domain, "level": "info"}

    agent = _json_lines(cluster.run_dir / "agent-peer1.log")
    assert agent and all(line["peer"] == "peer1" for line in agent)
    assert any(line.get("order_id") == order["order_id"] for line in agent)  # its challenge tokens
    installed = [line for line in agent if line.get("event") == "deploy" and line.get("serial") == serial]
    assert len(installed) == 1, installed
    assert (installed[0]["domain"], installed[0]["rpc"]) == (domain, "Deploy")
    assert installed[0]["who"].startswith("coordinator:")
