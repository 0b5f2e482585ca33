"""Withdrawing cluster identities (issue 12, item 1 and 6): the deny list in
etcd and the copy every replica checks, blocking and force-removing a peer,
the refusal at every call (``rpcutil.rpc_method``'s deny hook, over real
mutual-TLS gRPC), TLS files reloaded without a restart, and ``pki issue``'s
refusals (names of another identity, the CA's directory).

(On the real daemons: tests/integration/test_identities.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from clusteracme.coordinator import records
from clusteracme.coordinator.identities import Denial, DenyListView, Identities, denial_for, load_certificate
from clusteracme.coordinator.peers import AgentCertificate, PeerInfo, Registry
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clusteracme import errors, pki
from clusteracme.pki import Identity, Role, identity_fingerprint
from clusteracme.rpcutil import DeniedSet, ReloadingTLS, TLSFiles, channel, rpc_method, server
from clusteracme.v1 import coordinator_pb2 as pb
from clusteracme.v1 import coordinator_pb2_grpc

pytestmark = pytest.mark.timeout(60)

KEYS = Keys("/clusteracme/test/")
HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster CA and, in ``issued/``, pairs for an operator, an agent and a coordinator."""
    directory = tmp_path_factory.mktemp("ca")
    pki.init_ca(directory)
    out = directory / "issued"
    for identity in (Identity(Role.OPERATOR, "alice"), Identity(Role.OPERATOR, "bob"), Identity(Role.AGENT, "peer1"),
                     Identity(Role.COORDINATOR, "c1")):
        pki.issue(directory, identity, out_dir=out, ips=[HOST])
    return directory


def der_of(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def sha_of(path: Path) -> str:
    return identity_fingerprint(der_of(path))


def peer_info(peer_id: str, cert: Path | None) -> PeerInfo:
    return PeerInfo(peer_id, ("127.0.0.2",), "127.0.0.2:7444", "127.0.0.2:80", "closed", "1", enabled=False,
                    registered_at="", certificate=AgentCertificate.of(der_of(cert)) if cert else None)


def denial(sha: str, name: str = "operator:alice") -> Denial:
    return Denial(sha, name, "1f", "2030-01-01T00:00:00+00:00", "leaked", "2025-01-01T00:00:00+00:00",
                  "operator:admin")


async def until(what: str, check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# --- the deny list and its in-memory copy ------------------------------------------------
async def test_the_view_follows_denials_written_by_another_replica() -> None:
    """A standby's view sees the leader's denial through the watch, without a
    full re-read (refresh is an hour here), and a key deleted by hand too."""
    store = MemoryStore()
    await store.put_if(KEYS.denied("a" * 64), records.encode(denial("a" * 64).to_record()), expect_mod_revision=0)
    view = DenyListView(store, KEYS)
    assert view.reason("a" * 64) is None  # nothing before the first load
    task = asyncio.create_task(view.run(refresh=3600))
    try:
        await until("the first load", lambda: view.reason("a" * 64) is not None)
        assert view.reason("a" * 64) == "leaked; denied 2025-01-01T00:00:00+00:00 by operator:admin"
        leader = Identities(store, KEYS, Registry(store, KEYS, lease_ttl=10), DenyListView(store, KEYS), Path("-"))
        await leader.deny(denial("b" * 64, "agent:peer3"))
        await until("the watched denial", lambda: view.reason("b" * 64) is not None)
        assert view.fingerprints() == ["a" * 64, "b" * 64]
        await store.delete_if(KEYS.denied("a" * 64), expect_mod_revision=None)
        await until("the deletion", lambda: view.reason("a" * 64) is None)
        assert view.reason("c" * 64) is None
    finally:
        task.cancel()


async def test_the_view_reads_again_after_the_store_failed() -> None:
    """A denial written while the watch could not follow (etcd unreachable,
    then compacted) is in the view after the fallback re-read."""
    store = MemoryStore()
    view = DenyListView(store, KEYS)
    task = asyncio.create_task(view.run(refresh=0.2))
    try:
        await asyncio.sleep(0.05)
        store.set_reachable(False)
        await asyncio.sleep(0.3)
        store.set_reachable(True)
        await store.put_if(KEYS.denied("d" * 64), records.encode(denial("d" * 64).to_record()),
                           expect_mod_revision=0)
        await store.compact(10**6)  # the watch's history is gone: only a read finds it
        await until("the re-read", lambda: view.reason("d" * 64) is not None, timeout=10)
    finally:
        task.cancel()


async def test_a_denial_is_written_once_and_kept(ca_dir: Path) -> None:
    store = MemoryStore()
    view = DenyListView(store, KEYS)
    ids = Identities(store, KEYS, Registry(store, KEYS, lease_ttl=10), view, ca_dir / "ca.pem",
                     clock=lambda: "2025-06-01T00:00:00+00:00")
    alice = ca_dir / "issued" / "operator-alice.pem"
    first = await ids.revoke_identity(alice.read_bytes(), "left the team", "operator:admin")
    assert first.sha256 == sha_of(alice) and first.common_name == "operator:alice"
    assert view.reason(first.sha256) == "left the team; denied 2025-06-01T00:00:00+00:00 by operator:admin"
    # DER works too; a second denial changes nothing (the first record stays).
    again = await ids.revoke_identity(der_of(alice), "another reason", "operator:bob")
    assert again == first
    assert [d.reason for d in await ids.list()] == ["left the team"]


async def test_revoke_identity_refuses_what_the_cluster_ca_did_not_issue(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.issue(other, Identity(Role.OPERATOR, "alice"), out_dir=other / "issued")
    store = MemoryStore()
    ids = Identities(store, KEYS, Registry(store, KEYS, lease_ttl=10), DenyListView(store, KEYS), ca_dir / "ca.pem")
    with pytest.raises(errors.InvalidArgument, match="not issued by the cluster CA"):
        await ids.revoke_identity((other / "issued" / "operator-alice.pem").read_bytes(), "", "operator:admin")
    with pytest.raises(errors.InvalidArgument, match="not a certificate"):
        await ids.revoke_identity(b"garbage", "", "operator:admin")
    both = (ca_dir / "issued" / "operator-alice.pem").read_bytes() + (ca_dir / "issued" / "operator-bob.pem").read_bytes()
    with pytest.raises(errors.InvalidArgument, match="holds 2 certificates"):
        await ids.revoke_identity(both, "", "operator:admin")
    with pytest.raises(errors.InvalidArgument, match="printable"):
        await ids.revoke_identity((ca_dir / "issued" / "operator-bob.pem").read_bytes(), "a\x1b[2Jb", "operator:admin")
    # The CA certificate itself names no identity.
    with pytest.raises(errors.InvalidArgument, match="does not name a cluster identity"):
        denial_for(load_certificate((ca_dir / "ca.pem").read_bytes()),
                   x509.load_pem_x509_certificates((ca_dir / "ca.pem").read_bytes()), reason="", by="x", now="y")
    assert await store.range(KEYS.denials()) == []  # nothing written by any refusal


async def test_block_peer_denies_its_certificate_and_keeps_it_out(ca_dir: Path) -> None:
    store = MemoryStore()
    registry = Registry(store, KEYS, lease_ttl=10)
    view = DenyListView(store, KEYS)
    ids = Identities(store, KEYS, registry, view, ca_dir / "ca.pem")
    agent_cert = ca_dir / "issued" / "agent-peer1.pem"
    await registry.register(peer_info("peer1", agent_cert))
    d = await ids.block_peer("peer1", "node retired", "operator:admin")
    assert d.sha256 == sha_of(agent_cert) and d.common_name == "agent:peer1"
    assert view.reason(d.sha256) is not None
    peer = await registry.get("peer1")
    assert "node retired" in peer.blocked and peer.alive  # still listed (dead once its lease runs out)
    # Blocked: another certificate of the same peer may not register nor heartbeat either.
    with pytest.raises(errors.PermissionDenied, match="peer peer1 is blocked: node retired"):
        await registry.register(peer_info("peer1", ca_dir / "issued" / "operator-bob.pem"))
    with pytest.raises(errors.PermissionDenied, match="is blocked"):
        await registry.heartbeat("peer1", "e" * 64)
    # Removed (dead), the peer may come back with a certificate that is not denied.
    with pytest.raises(errors.FailedPrecondition, match="--force"):
        await ids.remove_peer("peer1", force=False, by="operator:admin")
    await ids.remove_peer("peer1", force=True, by="operator:admin")
    with pytest.raises(errors.NotFound):
        await registry.get("peer1")
    with pytest.raises(errors.NotFound):
        await ids.block_peer("nope", "", "operator:admin")


async def test_force_remove_of_a_live_peer_denies_then_removes(ca_dir: Path) -> None:
    store = MemoryStore()
    registry = Registry(store, KEYS, lease_ttl=10)
    view = DenyListView(store, KEYS)
    ids = Identities(store, KEYS, registry, view, ca_dir / "ca.pem")
    agent_cert = ca_dir / "issued" / "agent-peer1.pem"
    await registry.register(peer_info("peer1", agent_cert))
    await ids.remove_peer("peer1", force=True, by="operator:admin")
    assert await store.get(KEYS.peer("peer1")) is None and await store.get(KEYS.peer_alive("peer1")) is None
    assert view.reason(sha_of(agent_cert)) == "peer peer1 removed with --force; denied " + \
        (await ids.list())[0].denied_at + " by operator:admin"
    # A live peer whose certificate is not on record cannot be force-removed (it would come back).
    await registry.register(peer_info("peer2", None))
    with pytest.raises(errors.FailedPrecondition, match="certificate is not recorded"):
        await ids.remove_peer("peer2", force=True, by="operator:admin")
    assert (await registry.get("peer2")).alive


async def test_a_heartbeat_with_another_certificate_registers_again(ca_dir: Path) -> None:
    """After a rotation the agent's record is brought up to date: its
    heartbeat with the new certificate is sent back to register."""
    store = MemoryStore()
    registry = Registry(store, KEYS, lease_ttl=10)
    await registry.register(peer_info("peer1", ca_dir / "issued" / "agent-peer1.pem"))
    await registry.heartbeat("peer1", sha_of(ca_dir / "issued" / "agent-peer1.pem"))
    with pytest.raises(errors.FailedPrecondition, match="registered with another certificate"):
        await registry.heartbeat("peer1", "f" * 64)


# --- the hook in rpc_method, over real mutual TLS ---------------------------------------------
class _Coordinator(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, deny_list: DeniedSet) -> None:
        self.deny_list = deny_list

    @rpc_method(Role.OPERATOR)
    async def ListDenied(self, request: Any, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        return pb.ListDeniedResponse(identities=[pb.DeniedIdentity(common_name=who.common_name)])


@pytest.fixture
async def coordinator(ca_dir: Path) -> AsyncIterator[tuple[str, DeniedSet]]:
    issued = ca_dir / "issued"
    denied = DeniedSet()
    srv, port = server(TLSFiles(ca_dir / "ca.pem", issued / "coordinator-c1.pem", issued / "coordinator-c1.key"),
                       f"{HOST}:0")
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(_Coordinator(denied), srv)
    await srv.start()
    yield f"{HOST}:{port}", denied
    await srv.stop(None)


async def _list_as(ca_dir: Path, name: str, target: str) -> pb.ListDeniedResponse:
    issued = ca_dir / "issued"
    tls = TLSFiles(ca_dir / "ca.pem", issued / f"operator-{name}.pem", issued / f"operator-{name}.key")
    async with channel(tls, target, pki.COORDINATOR_SERVER_NAME) as chan:
        return await coordinator_pb2_grpc.CoordinatorServiceStub(chan).ListDenied(pb.ListDeniedRequest(), timeout=10)


async def test_a_denied_certificate_is_refused_at_the_call(ca_dir: Path, coordinator: tuple[str, DeniedSet]) -> None:
    target, denied = coordinator
    assert (await _list_as(ca_dir, "alice", target)).identities[0].common_name == "operator:alice"
    alice = sha_of(ca_dir / "issued" / "operator-alice.pem")
    denied.replace([alice], "left the team")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _list_as(ca_dir, "alice", target)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == f"certificate {alice} of operator:alice is denied (left the team)"
    # Another identity is not affected; a list without the certificate lets it in again.
    assert (await _list_as(ca_dir, "bob", target)).identities[0].common_name == "operator:bob"
    denied.replace([])
    assert (await _list_as(ca_dir, "alice", target)).identities


# --- TLS files reloaded without a restart -------------------------------------------------------
def _served_serial(port: int, ca_dir: Path) -> int:
    """The serial of the certificate the server presents to a new connection."""
    ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(ca_dir / "issued" / "operator-alice.pem", ca_dir / "issued" / "operator-alice.key")
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((HOST, port), timeout=10) as sock, ctx.wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


async def test_a_server_serves_the_rotated_pair_to_new_connections(ca_dir: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    pki.issue(ca_dir, Identity(Role.COORDINATOR, "c1"), out_dir=live, ips=[HOST])
    cert, key = live / "coordinator-c1.pem", live / "coordinator-c1.key"
    tls = ReloadingTLS(TLSFiles(ca_dir / "ca.pem", cert, key))
    srv, port = server(tls, f"{HOST}:0")
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(_Coordinator(DeniedSet()), srv)
    await srv.start()
    try:
        first = _serial(cert)
        assert await asyncio.to_thread(_served_serial, port, ca_dir) == first
        assert not tls.reload()  # nothing changed
        # Half a rotation (the new certificate, the old key) is refused: the old pair stays.
        staging = tmp_path / "staging"
        pki.issue(ca_dir, Identity(Role.COORDINATOR, "c1"), out_dir=staging, ips=[HOST])
        shutil.copy(staging / "coordinator-c1.pem", cert)
        assert not tls.reload() and tls.generation == 0
        assert await asyncio.to_thread(_served_serial, port, ca_dir) == first
        shutil.copy(staging / "coordinator-c1.key", key)
        assert tls.reload() and tls.generation == 1
        second = _serial(cert)
        assert second != first
        assert await asyncio.to_thread(_served_serial, port, ca_dir) == second
        # Calls keep working over a channel opened after the reload.
        assert (await _list_as(ca_dir, "alice", f"{HOST}:{port}")).identities
    finally:
        await srv.stop(None)


def test_reloading_refuses_files_that_do_not_belong_together(ca_dir: Path, tmp_path: Path) -> None:
    issued = ca_dir / "issued"
    with pytest.raises(errors.InvalidArgument, match="the key is not the certificate's"):
        ReloadingTLS(TLSFiles(ca_dir / "ca.pem", issued / "operator-alice.pem", issued / "operator-bob.key"))
    other = tmp_path / "other"
    pki.init_ca(other)
    with pytest.raises(errors.InvalidArgument, match="not issued by the CA"):
        ReloadingTLS(TLSFiles(other / "ca.pem", issued / "operator-alice.pem", issued / "operator-alice.key"))


# --- pki issue ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("identity", "name"), [
    (Identity(Role.AGENT, "p1"), "coordinator.clusteracme"),
    (Identity(Role.OPERATOR, "alice"), "Coordinator.ClusterACME."),
    (Identity(Role.AGENT, "p1"), "p2.agent.clusteracme"),
    (Identity(Role.COORDINATOR, "c1"), "p1.agent.clusteracme"),
    (Identity(Role.OPERATOR, "alice"), "bob.operator.clusteracme"),
    (Identity(Role.AGENT, "p1"), "*.agent.clusteracme"),
    (Identity(Role.AGENT, "p1"), "clusteracme"),
])
def test_issue_refuses_a_name_of_another_identity(tmp_path: Path, identity: Identity, name: str) -> None:
    pki.init_ca(tmp_path / "ca")
    with pytest.raises(errors.InvalidArgument, match="belongs to"):
        pki.issue(tmp_path / "ca", identity, out_dir=tmp_path / "out", dns_names=["ok.example", name])
    assert not (tmp_path / "out").exists()  # nothing written


def test_issue_takes_its_own_name_and_others(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca")
    cert, _ = pki.issue(tmp_path / "ca", Identity(Role.AGENT, "p1"), out_dir=tmp_path / "out",
                        dns_names=["p1.agent.clusteracme", "edge-1.example"])
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["p1.agent.clusteracme", "edge-1.example"]


def _acmectl(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACMECTL_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "clusteracme.ctl", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def offline_ca(tmp_path: Path) -> Iterator[Path]:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    yield ca


def test_acmectl_pki_issue_never_writes_next_to_the_ca_key(offline_ca: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in offline_ca.iterdir())
    # Run from the CA's directory without --out: refused, nothing written.
    result = _acmectl(offline_ca, "pki", "issue", ".", "--role", "agent", "--name", "edge-1")
    assert result.returncode == 2, result.stderr
    assert "next to a CA key" in result.stderr and "--out" in result.stderr
    result = _acmectl(tmp_path, "pki", "issue", str(offline_ca), "--role", "agent", "--name", "edge-1",
                      "--out", str(offline_ca))
    assert result.returncode == 2 and "next to a CA key" in result.stderr
    assert sorted(p.name for p in offline_ca.iterdir()) == before
    # A name of another identity: refused, nothing written.
    result = _acmectl(tmp_path, "pki", "issue", str(offline_ca), "--role", "operator", "--name", "alice",
                      "--dns", "coordinator.clusteracme", "--out", "alice")
    assert result.returncode == 2 and "belongs to any coordinator" in result.stderr
    assert not (tmp_path / "alice").exists()
    # By default the pair goes to the current directory.
    work = tmp_path / "work"
    work.mkdir()
    result = _acmectl(work, "pki", "issue", str(offline_ca), "--role", "agent", "--name", "edge-1")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["agent-edge-1.key", "agent-edge-1.pem"]


async def test_reloading_follows_a_file_change_without_a_signal(ca_dir: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    pki.issue(ca_dir, Identity(Role.AGENT, "peer1"), out_dir=live)
    tls = ReloadingTLS(TLSFiles(ca_dir / "ca.pem", live / "agent-peer1.pem", live / "agent-peer1.key"))
    watching = asyncio.create_task(tls.watch(interval=0.05))
    try:
        await asyncio.sleep(0.2)
        assert tls.generation == 0
        pki.issue(ca_dir, Identity(Role.AGENT, "peer1"), out_dir=live)  # a new pair, same identity
        await until("the change to be seen", lambda: tls.generation == 1)
        assert x509.load_pem_x509_certificate(tls.read()[1]).serial_number == _serial(live / "agent-peer1.pem")
    finally:
        watching.cancel()


async def test_the_agents_copy_of_the_deny_list_survives_a_restart(tmp_path: Path) -> None:
    from clusteracme.peer_agent.denylist import AgentDenyList
    path = tmp_path / "denied-certificates"
    first = AgentDenyList(path)
    assert first.fingerprints() == [] and not path.exists()
    await first.update(["b" * 64, "a" * 64, "not a fingerprint"])
    assert path.read_text() == f"{'a' * 64}\n{'b' * 64}\n" and path.stat().st_mode & 0o777 == 0o600
    again = AgentDenyList(path)  # the next start refuses them before any registration
    assert again.reason("a" * 64) is not None and again.reason("c" * 64) is None
    await again.update([])  # a reply without them lifts nothing: a denial is final
    assert AgentDenyList(path).fingerprints() == ["a" * 64, "b" * 64]


class _Reloaded:
    """A TLS source whose generation the test moves (as ``ReloadingTLS.reload`` does)."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self.generation = 0

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.files.read()


async def test_the_agent_pool_opens_new_channels_after_a_reload(ca_dir: Path) -> None:
    from clusteracme.coordinator.peers import AgentPool
    issued = ca_dir / "issued"
    source = _Reloaded(TLSFiles(ca_dir / "ca.pem", issued / "coordinator-c1.pem", issued / "coordinator-c1.key"))
    pool = AgentPool(source, timeout=5)
    peer = peer_info("peer1", None)
    try:
        first = pool._channel(peer)
        assert pool._channel(peer) is first
        source.generation = 1
        second = pool._channel(peer)
        assert second is not first and second.generation == 1 and pool._channel(peer) is second
        await asyncio.sleep(0.1)  # the old one, idle, is closed
        with pytest.raises(grpc.aio.UsageError):
            await first.channel.unary_unary("/x/y")(b"", timeout=1)
    finally:
        await pool.close()


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def test_a_denied_certificate_keeps_its_fingerprint_under_the_other_ecdsa_signature(tmp_path: Path) -> None:
    """ECDSA's (r, n - s) is a second valid signature anyone can compute: the
    re-encoded certificate still verifies against the CA, and the deny list
    must still name it."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

    pki.init_ca(tmp_path, cluster="t")
    cert_path, _ = pki.issue(tmp_path, pki.Identity(pki.Role.OPERATOR, "mallory"), out_dir=tmp_path)
    der = der_of(cert_path)
    cert = x509.load_der_x509_certificate(der)
    ca = x509.load_pem_x509_certificate((tmp_path / pki.CA_CERT).read_bytes())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    order = {"secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
             "secp384r1": int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
                              "581A0DB248B0A77AECEC196ACCC52973", 16)}[ca.public_key().curve.name]
    r, sig_s = decode_dss_signature(cert.signature)
    other = encode_dss_signature(r, order - sig_s)
    # Certificate ::= SEQUENCE { tbs, signatureAlgorithm, signature BIT STRING }
    old_bits = b"\x03" + _der_length(len(cert.signature) + 1) + b"\x00" + cert.signature
    assert der.endswith(old_bits)
    algorithm = der[:-len(old_bits)].split(cert.tbs_certificate_bytes, 1)[1]
    body = cert.tbs_certificate_bytes + algorithm + b"\x03" + _der_length(len(other) + 1) + b"\x00" + other
    twin_der = b"\x30" + _der_length(len(body)) + body
    twin = x509.load_der_x509_certificate(twin_der)
    twin.verify_directly_issued_by(ca)  # a valid certificate of the same identity...
    assert hashlib.sha256(twin_der).digest() != hashlib.sha256(der).digest()  # ...with another DER hash
    assert identity_fingerprint(twin_der) == identity_fingerprint(der)


def test_pki_issue_refuses_names_that_differ_from_another_only_by_case(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, cluster="t")
    with pytest.raises(errors.InvalidArgument, match="lower case"):
        pki.issue(tmp_path, pki.Identity(pki.Role.AGENT, "Node1"), out_dir=tmp_path)
    assert not list(tmp_path.glob("agent-*"))
