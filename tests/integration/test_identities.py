"""Cluster identities withdrawn and rotated, on the real daemons (issue 12, item 1).

One local cluster: two coordinator replicas (c1 leads, c2 stands by), three
agents, etcd, pebble. In order:

- rotation: peer1's agent and c1 get new certificates (same identities) by
  SIGHUP, without a restart; a new connection sees the new serial, calls keep
  working, and the coordinator records the agent's new certificate;
- ``peer block peer3``: its agent is refused at register and heartbeat by
  both replicas, it stays listed, dead after its lease;
- ``peer remove peer2 --force`` on a live peer: removed, and it cannot come back;
- ``pki revoke`` of an operator certificate: that operator's acmectl is refused
  by every replica, reads and commands;
- a denied coordinator certificate: agents refuse its calls, also from a
  replica started with it.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clusteracme import pki
from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.pki import Identity, Role, identity_fingerprint
from clusteracme.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from tests.integration.conftest import agent_log, ctl_json, make_cluster, record, wait_for

pytestmark = pytest.mark.integration
LEASE_TTL = 5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from make_cluster(tmp_path_factory, "identities", peers=3, coordinators=2,
                            coordinator_timing={"lease_ttl": LEASE_TTL, "heartbeat_interval": 1})


def sha256_of(cert: Path) -> str:
    """The deny list's fingerprint of a certificate file (over its to-be-signed part)."""
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    return identity_fingerprint(der)


def serial_of(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def served_serial(cluster: LocalCluster, host: str, port: int) -> int:
    """The serial of the certificate a server presents to a new connection
    (an mTLS handshake as the operator, h2 as gRPC offers it)."""
    ctx = ssl.create_default_context(cafile=str(cluster.pki_dir / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(cluster.pki_dir / "operator-admin.pem", cluster.pki_dir / "operator-admin.key")
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=10) as sock, ctx.wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def issue(cluster: LocalCluster, identity: Identity, where: str, ips: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A new certificate for ``identity`` (another one if it has one), outside the pki directory."""
    return pki.issue(cluster.pki_dir, identity, out_dir=cluster.run_dir / where, ips=list(ips))


def coordinator_stub(cluster: LocalCluster, index: int, cert: Path, key: Path) -> tuple[grpc.Channel, coordinator_pb2_grpc.CoordinatorServiceStub]:
    creds = grpc.ssl_channel_credentials(root_certificates=(cluster.pki_dir / "ca.pem").read_bytes(),
                                         private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
    chan = grpc.secure_channel(cluster.replica(index).endpoint, creds,
                               options=[("grpc.ssl_target_name_override", pki.COORDINATOR_SERVER_NAME)])
    return chan, coordinator_pb2_grpc.CoordinatorServiceStub(chan)


def agent_call_as(cluster: LocalCluster, index: int, cert: Path, key: Path) -> grpc.RpcError | agent_pb2.AgentStatusResponse:
    """AgentService.Status of peer ``index`` with this certificate: the answer or the error."""
    creds = grpc.ssl_channel_credentials(root_certificates=(cluster.pki_dir / "ca.pem").read_bytes(),
                                         private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
    peer = cluster.agent(index)
    with grpc.secure_channel(f"{peer.address}:{peer.grpc_port}", creds) as chan:
        try:
            return agent_pb2_grpc.AgentServiceStub(chan).Status(agent_pb2.AgentStatusRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc


def acmectl_as(cluster: LocalCluster, cert: Path, key: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**cluster.ctl_env(), "ACMECTL_CERT": str(cert), "ACMECTL_KEY": str(key), "ACMECTL_COORDINATOR": endpoint}
    return subprocess.run([sys.executable, "-m", "clusteracme.ctl", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def peers(cluster: LocalCluster) -> dict[str, dict]:
    return {p["peer_id"]: p for p in ctl_json(cluster, "peer", "list")["peers"]}


def test_rotation_by_sighup_without_a_restart(cluster: LocalCluster) -> None:
    agent = cluster.agent(1)
    live_cert, live_key = cluster.pki_dir / "agent-peer1.pem", cluster.pki_dir / "agent-peer1.key"
    old_serial = serial_of(live_cert)
    assert served_serial(cluster, agent.address, agent.grpc_port) == old_serial
    assert record(cluster, "peers/peer1")["certificate"]["sha256"] == sha256_of(live_cert)
    pid = agent.process.pid if agent.process else None

    new_cert, new_key = issue(cluster, Identity(Role.AGENT, "peer1"), "rotated-peer1", ips=(agent.address,))
    shutil.copy(new_key, live_key)
    shutil.copy(new_cert, live_cert)
    assert agent.process is not None
    agent.process.signal(signal.SIGHUP)
    new_serial = serial_of(new_cert)
    wait_for("the agent to serve its new certificate",
             lambda: served_serial(cluster, agent.address, agent.grpc_port) == new_serial, timeout=20)
    assert agent.process.pid == pid and agent.process.alive  # no restart
    # It registered again with the new certificate, which the coordinator records; calls keep working.
    wait_for("the new certificate on record",
             lambda: record(cluster, "peers/peer1").get("certificate", {}).get("sha256") == sha256_of(new_cert),
             timeout=20)
    assert "TLS certificate and key reloaded" in agent_log(cluster, 1)
    time.sleep(3)  # a few heartbeats with the new certificate
    assert peers(cluster)["peer1"]["alive"]
    status = ctl_json(cluster, "status", "peer1")  # the leader calls the agent (its new handshake)
    assert status["peers"][0]["peer"]["alive"]

    # The leading coordinator too: its files replaced, SIGHUP; agents and acmectl keep working.
    leader = cluster.replica(cluster.wait_leader())
    live_cert, live_key = cluster.pki_dir / f"coordinator-{leader.name}.pem", cluster.pki_dir / f"coordinator-{leader.name}.key"
    fresh_cert, fresh_key = pki.issue(cluster.pki_dir, Identity(Role.COORDINATOR, leader.name),
                                      out_dir=cluster.run_dir / "rotated-leader", ips=["127.0.0.1"],
                                      dns_names=["localhost"])
    host, port = leader.endpoint.rsplit(":", 1)
    before = served_serial(cluster, host, int(port))
    shutil.copy(fresh_key, live_key)
    shutil.copy(fresh_cert, live_cert)
    assert leader.process is not None
    leader.process.signal(signal.SIGHUP)
    wait_for(f"{leader.name} to serve its new certificate",
             lambda: served_serial(cluster, host, int(port)) == serial_of(fresh_cert), timeout=20)
    assert before != serial_of(fresh_cert)
    assert cluster.leader_index() == leader.index  # no restart, still leading
    status = ctl_json(cluster, "status")  # the leader's new channels to the agents carry the new certificate
    assert all(p["peer"]["alive"] for p in status["peers"])


def test_a_blocked_peer_is_refused_everywhere_and_shown_dead(cluster: LocalCluster) -> None:
    peer3_cert, peer3_key = cluster.pki_dir / "agent-peer3.pem", cluster.pki_dir / "agent-peer3.key"
    out = cluster.ctl("peer", "block", "peer3", "--reason", "node retired").stdout
    assert f"sha256 {sha256_of(peer3_cert)}" in out and "agent:peer3" in out
    # Both replicas refuse its heartbeat and its registration (c2 once its view has the entry).
    for index in (1, 2):
        chan, stub = coordinator_stub(cluster, index, peer3_cert, peer3_key)
        with chan:
            def refused(stub: coordinator_pb2_grpc.CoordinatorServiceStub = stub) -> str | None:
                try:
                    stub.Heartbeat(coordinator_pb2.HeartbeatRequest(peer_id="peer3"), timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                        return exc.details()
                return None

            detail = wait_for(f"c{index} to refuse peer3", refused, timeout=10)
            assert detail.startswith(f"certificate {sha256_of(peer3_cert)} of agent:peer3 is denied (node retired")
            with pytest.raises(grpc.RpcError) as register:
                stub.RegisterPeer(coordinator_pb2.RegisterPeerRequest(
                    peer_id="peer3", addresses=[cluster.agent(3).address], grpc_endpoint="127.0.0.4:1",
                    http_front="127.0.0.4:80", front_mode="closed", version="x"), timeout=10)
            assert register.value.code() == grpc.StatusCode.PERMISSION_DENIED
    wait_for("peer3 dead after its lease", lambda: not peers(cluster)["peer3"]["alive"], timeout=LEASE_TTL + 10)
    assert "peer3" in peers(cluster)  # still listed
    assert "is denied (node retired" in agent_log(cluster, 3)
    time.sleep(2)
    assert not peers(cluster)["peer3"]["alive"]  # its agent, still running, does not come back
    denied = ctl_json(cluster, "pki", "denied")["identities"]
    assert [(d["common_name"], d["reason"], d["denied_by"]) for d in denied] == [
        ("agent:peer3", "node retired", "operator:admin")]


def test_force_remove_of_a_live_peer(cluster: LocalCluster) -> None:
    assert peers(cluster)["peer2"]["alive"]
    refused = cluster.ctl("peer", "remove", "peer2", check=False)
    assert refused.returncode == 4 and "--force" in refused.stderr
    cluster.ctl("peer", "remove", "peer2", "--force")
    assert "peer2" not in peers(cluster)
    time.sleep(4)  # several heartbeat intervals: the live agent tries to register again
    assert "peer2" not in peers(cluster)
    assert cluster.agent(2).process is not None and cluster.agent(2).process.alive
    assert "agent:peer2 is denied (peer peer2 removed with --force" in agent_log(cluster, 2)


def test_a_revoked_operator_is_refused_by_every_replica(cluster: LocalCluster) -> None:
    cert, key = issue(cluster, Identity(Role.OPERATOR, "mallory"), "mallory")
    for replica in cluster.replicas:
        ok = acmectl_as(cluster, cert, key, replica.endpoint, "peer", "list")
        assert ok.returncode == 0, ok.stderr
    out = cluster.ctl("pki", "revoke", str(cert), "--reason", "laptop stolen").stdout
    assert "operator:mallory" in out
    sha = sha256_of(cert)
    for replica in cluster.replicas:
        for args in (("peer", "list"), ("coordinators",), ("peer", "enable", "peer1")):  # reads, its own, a command
            def refused(args: tuple[str, ...] = args, endpoint: str = replica.endpoint) -> subprocess.CompletedProcess[str] | None:
                result = acmectl_as(cluster, cert, key, endpoint, *args)
                return result if result.returncode != 0 else None

            result = wait_for(f"{replica.name} to refuse mallory ({' '.join(args)})", refused, timeout=10)
            assert f"certificate {sha} of operator:mallory is denied (laptop stolen" in result.stderr, result.stderr
    # The administrator is not affected.
    assert {d["common_name"] for d in ctl_json(cluster, "pki", "denied")["identities"]} >= {"operator:mallory"}


def test_agents_refuse_a_denied_coordinator_certificate(cluster: LocalCluster) -> None:
    standby = next(r for r in cluster.replicas if r.index != cluster.wait_leader())
    # A second certificate of the standby's identity, issued then revoked.
    cert, key = issue(cluster, Identity(Role.COORDINATOR, standby.name), "second-standby", ips=("127.0.0.1",))
    answer = agent_call_as(cluster, 1, cert, key)
    assert isinstance(answer, agent_pb2.AgentStatusResponse)  # accepted before it is denied
    cluster.ctl("pki", "revoke", str(cert), "--reason", "replica decommissioned")

    def refused() -> str | None:  # once peer1's next heartbeat brought the list
        answer = agent_call_as(cluster, 1, cert, key)
        if isinstance(answer, grpc.RpcError) and answer.code() == grpc.StatusCode.PERMISSION_DENIED:
            return answer.details()
        return None

    detail = wait_for("peer1's agent to refuse the denied coordinator certificate", refused, timeout=15)
    assert detail.startswith(f"certificate {sha256_of(cert)} of coordinator:{standby.name} is denied")
    good = agent_call_as(cluster, 1, cluster.pki_dir / "operator-admin.pem", cluster.pki_dir / "operator-admin.key")
    assert isinstance(good, grpc.RpcError) and "may not call" in (good.details() or "")  # the role check is still there
    good = agent_call_as(cluster, 1, cluster.pki_dir / "coordinator-c1.pem", cluster.pki_dir / "coordinator-c1.key")
    assert isinstance(good, agent_pb2.AgentStatusResponse)

    # The standby started again with it: its calls to the agents are refused.
    # A standby serves status, which asks each agent about a slot's files.
    cluster.ctl("csr", "create", "peer1", "--cn", "www.identities.test")
    cluster.stop_coordinator(standby.index)
    shutil.copy(key, cluster.pki_dir / f"coordinator-{standby.name}.key")
    shutil.copy(cert, cluster.pki_dir / f"coordinator-{standby.name}.pem")
    cluster.start_coordinator(standby.index)
    leader = next(r for r in cluster.replicas if r.index != standby.index)
    admin = (cluster.pki_dir / "operator-admin.pem", cluster.pki_dir / "operator-admin.key")

    def states(endpoint: str) -> str:
        result = acmectl_as(cluster, *admin, endpoint, "--json", "status", "peer1")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["peers"][0]["slots"][0]["agent_state"]

    refused_state = states(standby.endpoint)
    assert f"of coordinator:{standby.name} is denied (on the cluster's deny list)" in refused_state, refused_state
    assert states(leader.endpoint) == ""  # the leader, with its good certificate, is answered
