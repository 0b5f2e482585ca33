"""Retired private keys are deleted (issue 9 item 11), on the real daemons,
etcd and pebble: a key no pending, active or previous certificate and no
current CSR uses is retired by the leader's retention job, deleted after
``retention.key_retention_seconds`` (3 s here, on the third call that saw it
unused) with a tombstone left; the keys still in use stay; a revocation
signed with a deleted key is refused with a sentence that says when and what
to do instead. A peer holding keys of a slot etcd has no record of (etcd
wiped or restored) is left alone until that slot is accounted for.
"""

from __future__ import annotations

import datetime
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clusteracme import certinfo
from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.v1 import agent_pb2, agent_pb2_grpc
from tests.integration.conftest import agent_stub, ctl_json, make_cluster, register_account

pytestmark = pytest.mark.integration

RETENTION = 3.0
NAME = "keys.retention.example"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    for c in make_cluster(tmp_path_factory, "key-retention", peers=1, coordinator_settings={
            "retention": {"key_retention_seconds": RETENTION, "interval_seconds": 1}}):
        register_account(c)
        c.ctl("peer", "enable", "peer1")
        c.set_dns(NAME, [1])
        yield c


@pytest.fixture(scope="module")
def agent(cluster: LocalCluster) -> Iterator[agent_pb2_grpc.AgentServiceStub]:
    """Peer 1's AgentService as the coordinator calls it (coordinator identity)."""
    with agent_stub(cluster, 1) as stub:
        yield stub


def keys_dir(cluster: LocalCluster) -> Path:
    return cluster.agent(1).state_dir / "slots" / "server" / "keys"


def new_csr(cluster: LocalCluster) -> str:
    """A new key and CSR on peer1; the key's fingerprint."""
    csr_pem = ctl_json(cluster, "csr", "create", "peer1", "--cn", NAME)["csr_pem"]
    return certinfo.spki_sha256(certinfo.load_csr(csr_pem).public_key())


def sign(cluster: LocalCluster) -> str:
    order = ctl_json(cluster, "sign", "peer1", "--wait")
    assert order["succeeded"], order
    return ctl_json(cluster, "pending", "show", "peer1")["chain_pem"]


def wait_for(what: str, condition: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} not seen in {timeout:.0f}s"
        time.sleep(0.1)


def test_unused_keys_are_retired_then_deleted_and_the_keys_in_use_stay(
        cluster: LocalCluster, agent: agent_pb2_grpc.AgentServiceStub, tmp_path: Path) -> None:
    directory = keys_dir(cluster)
    # A certificate whose key will be deleted: signed, then discarded.
    discarded_key = new_csr(cluster)
    discarded_chain = sign(cluster)
    cluster.ctl("pending", "discard", "peer1")
    # The active key: signed and deployed.
    active_key = new_csr(cluster)
    sign(cluster)
    cluster.ctl("deploy", "peer1")
    # The pending key: signed, kept pending.
    pending_key = new_csr(cluster)
    sign(cluster)
    # Rotation: a CSR replaced at once, then the current one.
    rotated_key = new_csr(cluster)
    current_key = new_csr(cluster)

    # The rotated key is retired first (marker with an RFC 3339 time, 0600) ...
    marker = directory / f"{rotated_key}.retired"
    wait_for("the retirement marker", marker.exists)
    retired_at = datetime.datetime.fromisoformat(json.loads(marker.read_text())["retired_at"])
    assert retired_at.tzinfo is not None and marker.stat().st_mode & 0o777 == 0o600
    assert (directory / f"{rotated_key}.key").exists()
    # ... then deleted after the retention, a tombstone left.
    wait_for("the deletion", lambda: not (directory / f"{rotated_key}.key").exists())
    tombstone = json.loads((directory / f"{rotated_key}.deleted").read_text())
    deleted_at = datetime.datetime.fromisoformat(tombstone["deleted_at"])
    assert datetime.datetime.fromisoformat(tombstone["retired_at"]) == retired_at
    assert (deleted_at - retired_at).total_seconds() >= RETENTION
    assert not marker.exists()
    wait_for("the discarded certificate's key deleted", lambda: not (directory / f"{discarded_key}.key").exists())

    # The keys still in use stay, with no marker: active, pending, current CSR.
    for key in (active_key, pending_key, current_key):
        assert (directory / f"{key}.key").exists(), key
        assert not (directory / f"{key}.retired").exists(), key
    status = agent.Status(agent_pb2.AgentStatusRequest(), timeout=10)
    [slot] = status.keys
    assert slot.public_key_sha256 == current_key
    assert set(slot.held_keys) == {active_key, pending_key, current_key}
    deleted = {k.public_key_sha256: k for k in status.retired_keys if k.deleted_at}
    assert set(deleted) == {rotated_key, discarded_key}
    assert deleted[rotated_key].retired_at and deleted[rotated_key].slot.domain == ""
    # etcd still names the pending certificate (and its key is on the peer: deployable)
    assert certinfo.spki_sha256(certinfo.leaf(ctl_json(cluster, "pending", "show", "peer1")["chain_pem"])
                                .public_key()) == pending_key

    # A revocation signed with the deleted key: refused, saying when and what to do instead.
    leaf = x509.load_pem_x509_certificates(discarded_chain.encode())[0]
    with pytest.raises(grpc.RpcError) as info:
        agent.SignRevocation(agent_pb2.SignRevocationRequest(
            certificate_der=leaf.public_bytes(serialization.Encoding.DER), reason=4, nonce="AAAA",
            url="https://ca.example/revoke-cert"), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    message = info.value.details()  # type: ignore[attr-defined]
    assert f"the key {discarded_key} of certificate {leaf.serial_number:x}" in message
    assert "was deleted on " in message and "after it was retired" in message
    assert "revoke it with the issuing account or by fresh authorizations instead" in message

    # A key the agent still holds signs as before (the active certificate's).
    active_chain = (cluster.agent(1).state_dir / "slots" / "server" / "active" / "fullchain.pem").read_bytes()
    active_cert = x509.load_pem_x509_certificates(active_chain)[0]
    assert certinfo.spki_sha256(active_cert.public_key()) == active_key
    signed = agent.SignRevocation(agent_pb2.SignRevocationRequest(
        certificate_der=active_cert.public_bytes(serialization.Encoding.DER), reason=4, nonce="AAAA",
        url="https://ca.example/revoke-cert"), timeout=10)
    assert json.loads(signed.jws_json)["signature"]


def skipped_warnings(cluster: LocalCluster) -> int:
    log = (cluster.run_dir / "coordinator.log").read_text(errors="replace")
    return log.count("peer peer1 not asked to prune its keys: the agent holds keys of slot(s) etcd has no record of "
                     "(domain stray.retention.example;")


def test_a_slot_etcd_does_not_know_keeps_the_peers_keys(
        cluster: LocalCluster, agent: agent_pb2_grpc.AgentServiceStub) -> None:
    directory = keys_dir(cluster)
    status = agent.Status(agent_pb2.AgentStatusRequest(), timeout=10)
    [server] = status.keys
    # A slot directory etcd has no record of (as after etcd was wiped and partly re-created).
    stray = cluster.agent(1).state_dir / "slots" / "domain-stray.retention.example"
    (stray / "keys").mkdir(parents=True)
    shutil.copy2(directory / f"{server.public_key_sha256}.key", stray / "keys")
    (stray / "current").write_text(server.public_key_sha256)
    stray.chmod(0o700)
    # The server slot's current key goes out of use ...
    unused = server.public_key_sha256
    new_csr(cluster)
    seen = skipped_warnings(cluster)
    # ... but the peer is not asked to prune while the stray slot is there (two runs after the new CSR).
    wait_for("two runs skipping peer1", lambda: skipped_warnings(cluster) >= seen + 2)
    assert not (directory / f"{unused}.retired").exists()
    assert (directory / f"{unused}.key").exists()
    # Once the slot is accounted for (here: removed), pruning resumes.
    shutil.rmtree(stray)
    wait_for("the retirement marker", (directory / f"{unused}.retired").exists)
