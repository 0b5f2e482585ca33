"""The agent's listeners on real daemons (issue 12 items 2 and 3).

No squatting: in ``external`` front mode the challenge server's address is
the agent's from start to stop. Peer 2 runs behind a real nginx configured
with the shipped snippet (``deploy/nginx-acme-challenge.conf``), proxying to
the agent's Unix socket, and signs through pebble; another user cannot put a
socket in its directory; an agent whose address (a loopback port or the
socket) is taken by another process exits 2 with one clear line.

Bounded: 2,000 idle connections to peer 1's port-80 front and 2,000 to its
TLS endpoint. The agent was started with the usual soft limit of 1024 open
files (systemd's default): it holds no more than its caps, resets the rest at
once, closes the idle ones within the idle and handshake timeouts, and a
challenge (a sign through pebble) and a deploy still succeed.
"""

from __future__ import annotations

import errno
import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusteracme.peer_agent.front import IDLE_TIMEOUT
from clusteracme.peer_agent.listening import MAX_HANDSHAKE_TIMEOUT, open_files_needed
from clusteracme.peer_agent.settings import AgentSettings

from clusteracme.config import build
from clusteracme.localcluster.cluster import LocalCluster, peer_address, served_serial, write_toml
from clusteracme.localcluster.infra import free_port, tcp_check
from tests.integration.conftest import agent_log, ctl_json, register_account

pytestmark = pytest.mark.integration

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SNIPPET = Path(__file__).resolve().parents[2] / "deploy" / "nginx-acme-challenge.conf"
SHIPPED_SOCKET = "/run/clusteracme/challenge.sock"
FLOOD = 2000
AGENT_SOFT_NOFILE = 1024  # what an agent gets from systemd unless its unit says otherwise

NGINX_CONF = """\
user {user};
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen {address}:{port};
        include {dir}/acme-challenge.conf;
        location / {{ return 301 https://$host$request_uri; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Path]]:
    """Peer 1: a redirect front (always listening) and a TLS endpoint. Peer 2:
    external mode on a Unix socket, behind nginx on its address."""
    run_dir = tmp_path_factory.mktemp("agentbounds")
    socket_path = run_dir / "peer2-run" / "challenge.sock"
    settings = {1: {"front": {"mode": "redirect"}},
                2: {"front": {"mode": "external"}, "challenge": {"socket": str(socket_path)}}}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * FLOOD + 512:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) is too low for {2 * FLOOD} client connections")
    # The daemons inherit systemd's usual soft limit; this process raises its
    # own again once they run, for the client side of the flood.
    resource.setrlimit(resource.RLIMIT_NOFILE, (AGENT_SOFT_NOFILE, hard))
    try:
        cluster = LocalCluster(run_dir, peers=2, agent_settings=settings).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2 * FLOOD + 512), hard))
    nginx_dir = run_dir / "nginx"
    (nginx_dir / "tmp").mkdir(parents=True)
    proc = None
    try:
        register_account(cluster)
        for peer in ("peer1", "peer2"):
            cluster.ctl("peer", "enable", peer)
        # The shipped snippet, as it is, but for the socket's place.
        snippet = SNIPPET.read_text()
        assert SHIPPED_SOCKET in snippet
        (nginx_dir / "acme-challenge.conf").write_text(snippet.replace(SHIPPED_SOCKET, str(socket_path)))
        conf = nginx_dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=nginx_dir, address=peer_address(2), port=cluster.front_port,
                                          user=pwd.getpwuid(os.getuid()).pw_name))
        proc = subprocess.Popen([NGINX, "-p", str(nginx_dir), "-c", str(conf), "-g", "daemon off;"],
                                stdout=open(nginx_dir / "stdout.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not tcp_check(peer_address(2), cluster.front_port)():
            assert proc.poll() is None, (nginx_dir / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not listen"
            time.sleep(0.05)
        yield cluster, nginx_dir
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        cluster.stop()


def sign(cluster: LocalCluster, peer: int, name: str) -> str:
    cluster.set_dns(name, [peer])
    cluster.ctl("csr", "create", f"peer{peer}", "--cn", name)
    order = ctl_json(cluster, "sign", f"peer{peer}", "--wait")
    assert order["succeeded"], order
    return ctl_json(cluster, "pending", "show", f"peer{peer}")["certificate"]["serial_hex"]


def deploy(cluster: LocalCluster, peer: int, serial: str) -> None:
    deployed = ctl_json(cluster, "deploy", f"peer{peer}")
    assert deployed["ok"] and deployed["active_serial_hex"] == serial, deployed


# --- no squatting ---------------------------------------------------------------------------
def test_an_external_agent_signs_through_nginx_and_its_unix_socket(setup: tuple[LocalCluster, Path]) -> None:
    cluster, nginx_dir = setup
    socket_path = Path(cluster.agent_settings[2]["challenge"]["socket"])
    # held from the start, with no challenge open
    assert socket_path.is_socket()
    assert oct(socket_path.parent.stat().st_mode & 0o777) == oct(0o750)
    sign(cluster, 2, "www.external.example")
    access = (nginx_dir / "access.log").read_text()
    assert any("/.well-known/acme-challenge/" in line and '" 200 ' in line and "Pebble" in line
               for line in access.splitlines()), access
    # between challenges the agent still holds it and answers 404
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(str(socket_path))
    probe.sendall(b"GET /.well-known/acme-challenge/gone HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert probe.recv(4096).startswith(b"HTTP/1.1 404 ")
    probe.close()


SQUAT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
try:
    sock.bind(sys.argv[1])
except OSError as exc:
    print(exc.errno)
else:
    print("bound")
"""


def test_another_user_cannot_put_a_socket_in_its_place(setup: tuple[LocalCluster, Path]) -> None:
    cluster, _ = setup
    if os.geteuid() != 0:
        pytest.skip("running as another user needs root")
    socket_path = Path(cluster.agent_settings[2]["challenge"]["socket"])
    cluster.stop_agent(2)
    try:
        assert not socket_path.exists()  # removed at stop
        squat = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                sys.executable, "-c", SQUAT, str(socket_path)],
                               capture_output=True, text=True, timeout=30)
        assert squat.stdout.strip() == str(errno.EACCES), squat.stdout + squat.stderr
    finally:
        cluster.start_agent(2)
    assert socket_path.is_socket()


def run_agent(cluster: LocalCluster, tmp_path: Path, overrides: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Peer 2's launcher defaults with ``overrides``, its own state directory,
    started as a new agent process (which must exit by itself)."""
    config: dict[str, Any] = dict(cluster.agent(2).defaults)
    config["state_dir"] = str(tmp_path / "state")
    # its own gRPC port: should it start after all, it must not share peer 2's
    config["listen"] = f"{peer_address(2)}:{free_port()}"
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value}
    path = tmp_path / "agent.toml"
    write_toml(path, config)
    try:
        return subprocess.run([sys.executable, "-m", "clusteracme.peer_agent.app", "--config", str(path)],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the agent did not exit: it runs without its challenge address ({exc.stderr!r})") from None


def assert_refused_in_one_line(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_an_agent_whose_challenge_port_is_taken_does_not_start(
        setup: tuple[LocalCluster, Path], tmp_path: Path) -> None:
    cluster, _ = setup
    port = free_port()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        result = run_agent(cluster, tmp_path, {"front": {"mode": "external"},
                                               "challenge": {"port": port}})
    assert_refused_in_one_line(result, f"cannot listen for the challenge server on 127.0.0.1:{port}: "
                                       "Address already in use")


def test_an_agent_whose_challenge_socket_is_taken_does_not_start(
        setup: tuple[LocalCluster, Path], tmp_path: Path) -> None:
    cluster, _ = setup
    directory = tmp_path / "run"
    directory.mkdir(mode=0o750)
    path = directory / "challenge.sock"
    with socket.socket(socket.AF_UNIX) as squatter:
        squatter.bind(str(path))
        squatter.listen()
        result = run_agent(cluster, tmp_path, {"front": {"mode": "external"}, "challenge": {"socket": str(path)}})
    assert_refused_in_one_line(result, f"challenge.socket {path}: another process is listening on it")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    result = run_agent(cluster, tmp_path, {"front": {"mode": "external"},
                                           "challenge": {"socket": str(open_dir / "challenge.sock")}})
    assert_refused_in_one_line(result, "is open to every user (mode 0755)")


# --- bounded -----------------------------------------------------------------------------
def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def flood(address: str, port: int, count: int) -> tuple[list[socket.socket], int]:
    """``count`` connections that send nothing; (those still open after the
    connect, how many were reset before the connect call even returned)."""
    socks, reset = [], 0
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(15)
        try:
            sock.connect((address, port))
        except ConnectionResetError:  # accepted and reset by the agent at once
            sock.close()
            reset += 1
            continue
        except TimeoutError:
            sock.close()
            raise AssertionError(f"connection {len(socks) + reset + 1} to {address}:{port} timed out: the agent "
                                 "no longer accepts (out of descriptors?)") from None
        socks.append(sock)
    return socks, reset


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def wait_all_closed(socks: list[socket.socket], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    left = list(socks)
    while left:
        left = [s for s in left if not closed_by_server(s)]
        assert not left or time.monotonic() < deadline, f"{len(left)} idle {what} connections still open"
        time.sleep(0.2)


def test_two_thousand_idle_connections_and_the_agent_still_signs_and_deploys(
        setup: tuple[LocalCluster, Path]) -> None:
    cluster, _ = setup
    agent = cluster.agent(1)
    assert agent.process is not None
    pid = agent.process.pid
    settings = build(AgentSettings, {"front": {"mode": "redirect"}, "endpoints": [{"listen": agent.tls_endpoint}]})
    budget, _ = open_files_needed(settings)
    # the TLS endpoint listens once it has a certificate
    first = sign(cluster, 1, "www.bounds.example")
    deploy(cluster, 1, first)
    baseline = open_fds(pid)
    limit = int(next(line.split()[3] for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                     if line.startswith("Max open files")))
    assert limit >= budget, f"the agent runs with a soft limit of {limit} open files, under its budget {budget}"

    front_flood, tls_flood = [], []
    try:
        front_cap, tls_cap = settings.front.max_connections, settings.endpoints[0].max_connections
        started = time.monotonic()
        front_flood, front_reset = flood(agent.address, cluster.front_port, FLOOD)
        front_opened_in = time.monotonic() - started
        tls_started = time.monotonic()
        tls_flood, tls_reset = flood(agent.address, agent.tls_port, FLOOD)
        tls_opened_in = time.monotonic() - tls_started
        time.sleep(0.5)
        held = open_fds(pid)
        assert held <= baseline + front_cap + tls_cap, \
            f"the agent holds {held} descriptors ({baseline} before {2 * FLOOD} connections)"
        # past the caps, connections are reset at once (unless opening them took
        # so long that the first ones were closed as idle before the last came)
        if tls_opened_in < MAX_HANDSHAKE_TIMEOUT - 1:
            reset = tls_reset + sum(closed_by_server(s) for s in tls_flood)
            assert reset >= FLOOD - tls_cap, f"only {reset} of {FLOOD} TLS connections past the cap were reset"
        if front_opened_in < IDLE_TIMEOUT - 1:
            reset = front_reset + sum(closed_by_server(s) for s in front_flood)
            assert reset >= FLOOD - front_cap, f"only {reset} of {FLOOD} front connections past the cap were reset"
        # the idle ones go: the front's idle timeout, the TLS handshake timeout
        wait_all_closed(front_flood, IDLE_TIMEOUT + 5, "front")
        wait_all_closed(tls_flood, MAX_HANDSHAKE_TIMEOUT + 5, "TLS endpoint")
        assert time.monotonic() - tls_started < tls_opened_in + MAX_HANDSHAKE_TIMEOUT + 5
        # the agent is itself: a challenge through its front and a deploy to its endpoint
        second = sign(cluster, 1, "www.bounds.example")
        deploy(cluster, 1, second)
        assert served_serial(agent.tls_endpoint, "www.bounds.example") == second
    finally:
        for sock in front_flood + tls_flood:
            sock.close()
    assert agent.process.alive
    log = agent_log(cluster, 1)
    assert "Too many open files" not in log
    assert "new one(s) reset" in log
    time.sleep(1)
    assert open_fds(pid) <= baseline + 16
