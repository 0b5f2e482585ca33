"""A real nginx uses the deployed files; the command hook reloads it without
dropping connections (issue 3 acceptance 3; SPEC R8)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusteracme.localcluster.cluster import LocalCluster, peer_address, served_serial
from clusteracme.localcluster.infra import free_port, tcp_check
from tests.integration.conftest import ctl_json, register_account
from tests.integration.test_deploy import KeepAlive

pytestmark = pytest.mark.integration
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NAME = "www.nginx.example"
BIG = 32 * 1024 * 1024  # a download long enough to span the reload

CONF = """\
# Workers run as this test's user, so they can read its private temp dir.
user {user};
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    keepalive_timeout 120s;
    server {{
        listen {address}:{port} ssl;
        ssl_certificate {slot}/active/fullchain.pem;
        ssl_certificate_key {slot}/active/privkey.pem;
        location = /big {{ alias {dir}/big.bin; }}
        location / {{ return 200 "nginx ok\\n"; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, str, Path]]:
    run_dir = tmp_path_factory.mktemp("nginx")
    nginx_dir = run_dir / "nginx"
    (nginx_dir / "tmp").mkdir(parents=True)
    (nginx_dir / "big.bin").write_bytes(os.urandom(BIG))
    conf = nginx_dir / "nginx.conf"
    endpoint = f"{peer_address(1)}:{free_port()}"
    hooks = [{"kind": "command", "argv": [NGINX, "-p", str(nginx_dir), "-c", str(conf), "-s", "reload"], "timeout": 15}]
    settings = {1: {"hooks": hooks, "verify_endpoints": [endpoint]}}
    with LocalCluster(run_dir, peers=1, agent_settings=settings) as cluster:
        register_account(cluster)
        cluster.ctl("peer", "enable", "peer1")
        cluster.set_dns(NAME, [1])
        cluster.ctl("csr", "create", "peer1", "--cn", NAME)
        assert ctl_json(cluster, "sign", "peer1", "--wait")["succeeded"]
        # nginx needs a certificate before it starts; this first reload fails (no nginx yet).
        assert ctl_json(cluster, "status", "peer1")["peers"][0]["slots"][0]["pending_serial"]
        cluster.ctl("deploy", "peer1", check=False)
        host, port = endpoint.rsplit(":", 1)
        slot = cluster.agent(1).state_dir / "slots" / "server"
        conf.write_text(CONF.format(dir=nginx_dir, address=host, port=port, slot=slot,
                                    user=pwd.getpwuid(os.getuid()).pw_name))
        proc = subprocess.Popen([NGINX, "-p", str(nginx_dir), "-c", str(conf), "-g", "daemon off;"],
                                stdout=open(nginx_dir / "stdout.log", "wb"), stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while not tcp_check(host, int(port))():
                assert proc.poll() is None, (nginx_dir / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.05)
            yield cluster, endpoint, nginx_dir
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _open(endpoint: str) -> ssl.SSLSocket:
    host, port = endpoint.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=NAME)


def test_command_hook_reloads_nginx_without_dropping_connections(setup: tuple[LocalCluster, str, Path]) -> None:
    cluster, endpoint, nginx_dir = setup
    first = served_serial(endpoint, NAME)
    assert first == ctl_json(cluster, "status", "peer1")["peers"][0]["slots"][0]["active_serial"]
    idle = KeepAlive(endpoint, NAME)
    assert idle.get() == b"nginx ok\n"
    # A download in flight across the reload, read slowly on purpose.
    download = _open(endpoint)
    download.sendall(f"GET /big HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += download.recv(1024)
    head, _, start = head.partition(b"\r\n\r\n")
    received = bytearray(start)
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {BIG}".encode() in head

    assert ctl_json(cluster, "sign", "peer1", "--wait")["succeeded"]
    deployed = ctl_json(cluster, "deploy", "peer1")
    second = deployed["active_serial_hex"]
    assert second != first and deployed["ok"], deployed
    hook = [r for r in deployed["reloads"] if r["target"].startswith("command")]
    assert hook and hook[0]["ok"], deployed["reloads"]

    deadline = time.monotonic() + 10
    while served_serial(endpoint, NAME) != second:  # new workers take over within moments
        assert time.monotonic() < deadline, "nginx still serves the old certificate"
        time.sleep(0.1)
    assert "reconfiguring" in (nginx_dir / "error.log").read_text()
    # The download that started before the deploy completes, byte for byte.
    while len(received) < BIG:
        chunk = download.recv(1 << 16)
        assert chunk, f"download cut after {len(received)} of {BIG} bytes"
        received += chunk
    assert received == (nginx_dir / "big.bin").read_bytes()
    download.close()
    # The idle keep-alive connection is either still served or closed the
    # graceful way (nginx closes idle connections of its old workers with a
    # FIN, which HTTP clients retry on): never reset.
    try:
        assert idle.get() == b"nginx ok\n"
    except AssertionError as exc:
        assert "connection closed" in str(exc)
    idle.close()
    # And the rollout verification sees nginx serve the new certificate.
    peer = ctl_json(cluster, "peer", "list")["peers"][0]
    assert endpoint in peer["tls_endpoints"]
