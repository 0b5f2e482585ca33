"""Integration fixtures: a real local cluster (etcd, pebble, challtestsrv,
coordinator and agents as separate processes) from the product's launcher."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clusteracme.coordinator.store.etcd import EtcdStore

from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.v1 import agent_pb2_grpc


def make_cluster(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: Any) -> Iterator[LocalCluster]:
    run_dir = tmp_path_factory.mktemp(name)
    with LocalCluster(run_dir, **kwargs) as cluster:
        yield cluster


def register_account(cluster: LocalCluster) -> None:
    cluster.ctl("provider", "add", "pebble", "--directory", cluster.directory_url, "--ca-bundle", str(cluster.ca_bundle))
    cluster.ctl("account", "register", "--provider", "pebble", "--email", "ops@test.example", "--agree-tos")


_KEYSPACE_SCRIPT = """
import asyncio, base64, json, sys
from clusteracme.coordinator.store.etcd import EtcdStore
async def read():
    store = EtcdStore(sys.argv[1].split(","))
    await store.connect()
    try:
        return [(e.key, base64.b64encode(e.value).decode(), e.mod_revision) for e in await store.range("/")]
    finally:
        await store.close()
print(json.dumps(asyncio.run(read())))
"""


def keyspace(cluster: LocalCluster) -> list[tuple[str, bytes, int]]:
    """Every key in etcd with its value and mod_revision. A dual-stack
    cluster's etcd is read by a subprocess inside its namespace (in-process
    gRPC would connect from outside: ``clusteracme.localcluster.netns``)."""
    assert cluster.infra is not None
    if cluster.netns is not None:
        out = cluster.inside(subprocess.run, [sys.executable, "-c", _KEYSPACE_SCRIPT, ",".join(cluster.infra.etcd_endpoints)],
                             capture_output=True, text=True, timeout=60, check=True)
        return [(key, base64.b64decode(value), revision) for key, value, revision in json.loads(out.stdout)]

    async def read() -> list[tuple[str, bytes, int]]:
        assert cluster.infra is not None
        store = EtcdStore(cluster.infra.etcd_endpoints)  # every member: one may be down
        await store.connect()
        try:
            return [(e.key, e.value, e.mod_revision) for e in await store.range("/")]
        finally:
            await store.close()

    return asyncio.run(read())


def record(cluster: LocalCluster, key_suffix: str) -> dict[str, Any]:
    """One JSON record under the cluster's prefix."""
    for key, value, _ in keyspace(cluster):
        if key == "/clusteracme/local/" + key_suffix:
            return json.loads(value)
    raise KeyError(key_suffix)


def ctl_json(cluster: LocalCluster, *args: str) -> Any:
    """acmectl's JSON answer; of JSON lines (``sign --wait`` prints the order at each change), the last one."""
    out = cluster.ctl("--json", *args).stdout
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.strip().splitlines()[-1])


def agent_log(cluster: LocalCluster, index: int) -> str:
    return Path(cluster.run_dir / f"agent-peer{index}.log").read_text()


@contextlib.contextmanager
def agent_stub(cluster: LocalCluster, index: int) -> Iterator[agent_pb2_grpc.AgentServiceStub]:
    """Peer ``index``'s AgentService as the coordinator calls it (the coordinator's identity)."""
    pki = cluster.pki_dir
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "coordinator-c1.key").read_bytes(),
        certificate_chain=(pki / "coordinator-c1.pem").read_bytes(),
    )
    peer = cluster.agent(index)
    with grpc.secure_channel(f"{peer.address}:{peer.grpc_port}", creds) as chan:
        yield agent_pb2_grpc.AgentServiceStub(chan)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something true (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
