"""The agent's listeners are bounded and their addresses are the agent's
(issue 12 items 2 and 3), over real sockets: a connection cap per listener
(the next connection is reset at once), a TLS handshake timeout, idle
connections closed, slots given back whatever way a connection ends, the
open-file budget, and the Unix socket of the challenge server in
``external`` mode (only the agent can take it).
"""

from __future__ import annotations

import asyncio
import datetime
import grp
import os
import resource
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from clusteracme.peer_agent.challenges import ChallengeService
from clusteracme.peer_agent.errors import FrontError
from clusteracme.peer_agent.front import IDLE_TIMEOUT, Front, FrontMode
from clusteracme.peer_agent.listening import (
    FORWARD_CONNECTIONS,
    RESERVED_FILES,
    ensure_open_files,
    open_files_needed,
    unix_socket,
)
from clusteracme.peer_agent.settings import AgentSettings
from clusteracme.peer_agent.tls_endpoint import TLSEndpoint, build_contexts
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.config import build
from clusteracme.errors import FailedPrecondition, InvalidArgument

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
THUMB = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
TOKEN = "boundsToken_0123456789"
KEY_AUTH = f"{TOKEN}.{THUMB}"
PATH = f"/.well-known/acme-challenge/{TOKEN}"


# --- helpers ----------------------------------------------------------------------
def connect(port: int, host: str = HOST) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """How long until the server closed ``sock`` (EOF or reset), or None when
    it is still open after ``seconds``."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 1024), seconds)
    except TimeoutError:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - start
    assert data == b"", f"the server sent {data!r} to a connection that sent nothing"
    return time.monotonic() - start


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def http_get(port: int, target: str = "/") -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: www.example.com:80\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


@dataclass
class Pair:
    serial_hex: str
    fullchain: Path
    privkey: Path


def self_signed(directory: Path, name: str = "www.example.com") -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    chain, privkey = directory / "fullchain.pem", directory / "privkey.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    privkey.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return Pair(format(cert.serial_number, "x"), chain, privkey)


async def tls_hello(port: int) -> str:
    """A full handshake and one request; the page the endpoint answers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, ssl=context, server_hostname="www.example.com"), 5)
    writer.write(b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data.decode()


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[TLSEndpoint]:
    one = TLSEndpoint(HOST, 0, peer_id="peer-1", max_connections=8, handshake_timeout=1.0)
    one.swap(build_contexts({"": self_signed(tmp_path)}))
    assert await one.start()
    try:
        yield one
    finally:
        await one.stop()


@pytest.fixture
async def front() -> AsyncIterator[Front]:
    one = Front(HOST, 0, FrontMode.REDIRECT, upstream_port=lambda: None, max_connections=8)
    await one.start()
    try:
        yield one
    finally:
        await one.stop()


# --- the cap -----------------------------------------------------------------------------
async def test_past_the_cap_the_front_resets_new_connections_at_once_and_takes_them_again_later(front: Front) -> None:
    assert front.port is not None
    held = [connect(front.port) for _ in range(8)]
    try:
        await wait_until(lambda: front.connections == 8)
        extra = [connect(front.port) for _ in range(20)]
        for sock in extra:
            elapsed = await closed_within(sock, 2.0)
            assert elapsed is not None and elapsed < 1.0, "a connection past the cap was kept"
            sock.close()
        assert front.connections == 8
        # the held ones are still served
        held[0].sendall(b"GET /x HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        held[0].setblocking(False)
        answer = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(held[0], 4096), 5)
        assert answer.startswith(b"HTTP/1.1 301 ")
        # a slot given back is taken again
        held.pop().close()
        await wait_until(lambda: front.connections == 7)
        assert b"301 Moved Permanently" in await http_get(front.port, "/y")
    finally:
        for sock in held:
            sock.close()
    await wait_until(lambda: front.connections == 0)


async def test_the_front_closes_a_connection_that_sends_no_complete_request(front: Front) -> None:
    assert front.port is not None
    silent, partial = connect(front.port), connect(front.port)
    partial.sendall(b"GET / HTTP/1.1\r\nHost: www.exa")  # and then nothing: slowloris
    try:
        for sock in (silent, partial):
            elapsed = await closed_within(sock, IDLE_TIMEOUT + 3)
            assert elapsed is not None, "an idle front connection was kept"
    finally:
        silent.close()
        partial.close()
    await wait_until(lambda: front.connections == 0)


async def test_a_tls_connection_that_never_handshakes_is_closed_within_the_timeout(endpoint: TLSEndpoint) -> None:
    assert endpoint.port is not None
    started = time.monotonic()
    sock = connect(endpoint.port)
    try:
        elapsed = await closed_within(sock, 5.0)
    finally:
        sock.close()
    assert elapsed is not None, "a connection that never handshakes was kept"
    assert time.monotonic() - started < 1.0 + 1.5
    await wait_until(lambda: endpoint.connections == 0)


async def test_the_tls_cap_counts_handshakes_and_every_kind_of_end_gives_the_slot_back(
        endpoint: TLSEndpoint) -> None:
    port = endpoint.port
    assert port is not None
    # handshakes in progress take the slots: the next connection is reset at once
    waiting = [connect(port) for _ in range(8)]
    await wait_until(lambda: endpoint.connections == 8)
    extra = connect(port)
    elapsed = await closed_within(extra, 2.0)
    extra.close()
    assert elapsed is not None and elapsed < 0.5
    # the handshake timeout gives them back
    for sock in waiting:
        assert await closed_within(sock, 3.0) is not None
        sock.close()
    await wait_until(lambda: endpoint.connections == 0)
    # failed handshakes (garbage), clients that go away mid-handshake, and
    # completed connections: all give their slot back, many times the cap over
    for _ in range(3):
        garbage = [connect(port) for _ in range(8)]
        for sock in garbage:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        for sock in garbage:
            assert await closed_within(sock, 3.0) is not None
            sock.close()
        gone = [connect(port) for _ in range(8)]
        await wait_until(lambda: endpoint.connections == 8)  # accepted, handshaking
        for sock in gone:
            sock.close()
        await wait_until(lambda: endpoint.connections == 0)
        for _ in range(8):
            assert "ok peer-1 serial=" in await tls_hello(port)
    await wait_until(lambda: endpoint.connections == 0)
    assert "ok peer-1 serial=" in await tls_hello(port)


async def test_a_stopped_endpoint_closes_connections_still_handshaking(endpoint: TLSEndpoint) -> None:
    assert endpoint.port is not None
    sock = connect(endpoint.port)
    await wait_until(lambda: endpoint.connections == 1)
    await endpoint.stop()
    assert await closed_within(sock, 1.0) is not None
    sock.close()


async def test_the_default_handshake_timeout_is_at_most_ten_seconds() -> None:
    assert TLSEndpoint(HOST, 0, peer_id="p").bounds.handshake_timeout <= 10.0
    settings = build(AgentSettings, {"endpoints": [{"listen": "127.0.0.1:443"}]})
    assert settings.endpoints[0].handshake_timeout <= 10.0 and settings.endpoints[0].max_connections > 0
    assert settings.front.max_connections > 0 and settings.challenge.max_connections > 0


@pytest.mark.parametrize(("data", "fragment"), [
    ({"endpoints": [{"listen": "127.0.0.1:443", "handshake_timeout": 30}]}, "handshake_timeout"),
    ({"endpoints": [{"listen": "127.0.0.1:443", "handshake_timeout": 0}]}, "handshake_timeout"),
    ({"endpoints": [{"listen": "127.0.0.1:443", "max_connections": 0}]}, "max_connections"),
    ({"front": {"max_connections": -5}}, "front.max_connections"),
    ({"front": {"max_connections": True}}, "front.max_connections"),
    ({"challenge": {"max_connections": 0}}, "challenge.max_connections"),
])
def test_bad_bounds_are_refused_with_the_setting_named(data: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        build(AgentSettings, data)


# --- the open-file budget ----------------------------------------------------------------
def test_the_budget_adds_up_every_listener_and_the_agents_own() -> None:
    settings = build(AgentSettings, {
        "front": {"mode": "redirect", "max_connections": 100},
        "challenge": {"max_connections": 10},
        "endpoints": [{"listen": "127.0.0.1:443", "max_connections": 50},
                      {"listen": "127.0.0.1:8443", "max_connections": 20, "upstream": "http://127.0.0.1:8080"}],
    })
    needed, detail = open_files_needed(settings)
    assert needed == 100 + FORWARD_CONNECTIONS + 10 + 50 + 20 + 100 + RESERVED_FILES
    assert "front" in detail and "TLS endpoints" in detail
    external = build(AgentSettings, {"front": {"mode": "external"}, "challenge": {"port": 8402}})
    assert open_files_needed(external)[0] == 256 + RESERVED_FILES  # no front


def test_the_open_file_limit_is_raised_to_the_budget_or_the_agent_refuses() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2000:
        pytest.skip(f"needs a finite hard RLIMIT_NOFILE of 2000 or more, not {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert ensure_open_files(1500, "test") == 1500
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (1500, hard)
        assert ensure_open_files(1000, "test") == 1500  # never lowered
        with pytest.raises(FailedPrecondition, match=f"need {hard + 1} open files.*LimitNOFILE"):
            ensure_open_files(hard + 1, "front 1")
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (1500, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- external mode: the challenge server's address is the agent's --------------------------
def test_external_mode_needs_one_address_for_the_web_server(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="challenge.socket .recommended. or a fixed challenge.port"):
        ChallengeService(HOST, 80, FrontMode.EXTERNAL)
    with pytest.raises(ValueError, match="not both"):
        ChallengeService(HOST, 80, FrontMode.EXTERNAL, challenge_port=8402, challenge_socket=tmp_path / "c.sock")
    with pytest.raises(ValueError, match="challenge.socket is for"):
        ChallengeService(HOST, 80, FrontMode.REDIRECT, challenge_socket=tmp_path / "c.sock")


async def test_external_mode_does_not_start_when_its_port_is_taken() -> None:
    with socket.socket() as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        service = ChallengeService(HOST, 0, FrontMode.EXTERNAL, challenge_port=port)
        with pytest.raises(FrontError, match=f"cannot listen for the challenge server on 127.0.0.1:{port}"):
            await service.start()
        assert not service.challenge_listening


async def unix_get(path: Path, target: str = PATH) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_external_mode_on_a_unix_socket_serves_from_start_to_stop(tmp_path: Path) -> None:
    path = tmp_path / "run" / "challenge.sock"
    service = ChallengeService(HOST, 80, FrontMode.EXTERNAL, challenge_socket=path)
    await service.start()
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750  # made by the agent
        assert (await unix_get(path)).startswith(b"HTTP/1.1 404 ")
        await service.present("o1", {TOKEN: KEY_AUTH}, 60)
        answer = await unix_get(path)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(KEY_AUTH.encode())
        await service.remove("o1")
        assert service.challenge_listening and (await unix_get(path)).startswith(b"HTTP/1.1 404 ")
    finally:
        await service.stop()
    assert not path.exists()


def private_dir(tmp_path: Path, mode: int = 0o750) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(mode)
    return directory


@pytest.mark.parametrize(("mode", "fragment"), [
    (0o755, "open to every user .mode 0755."), (0o751, "open to every user"), (0o770, "writable by others"),
    (0o777, "writable by others"),
])
def test_a_socket_directory_others_can_reach_or_write_is_refused(tmp_path: Path, mode: int, fragment: str) -> None:
    directory = private_dir(tmp_path, mode)
    with pytest.raises(FrontError, match=fragment):
        unix_socket(directory / "challenge.sock")
    assert not (directory / "challenge.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_socket_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    directory = private_dir(tmp_path)
    os.chown(directory, 65534, -1)
    with pytest.raises(FrontError, match="belongs to uid 65534, not to the agent"):
        unix_socket(directory / "challenge.sock")


def test_a_socket_in_a_directory_others_could_replace_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by all, not sticky
    (shared / "run").mkdir(mode=0o750)
    with pytest.raises(FrontError, match="another user could replace"):
        unix_socket(shared / "run" / "challenge.sock")


def test_a_socket_someone_listens_on_is_not_taken_over_and_a_stale_one_is(tmp_path: Path) -> None:
    directory = private_dir(tmp_path)
    path = directory / "challenge.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    other.listen()
    try:
        with pytest.raises(FrontError, match="another process is listening on it"):
            unix_socket(path)
    finally:
        other.close()
    # the listener is gone, its file stays: a stale socket, replaced
    assert path.exists()
    sock = unix_socket(path)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(path))
        probe.close()
    finally:
        sock.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(FrontError, match="exists and is not a socket"):
        unix_socket(path)


def test_the_socket_directory_goes_to_the_web_servers_group(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgroups()[-1] if os.getgroups() else os.getegid())
    directory = private_dir(tmp_path)
    sock = unix_socket(directory / "challenge.sock", group.gr_name)
    sock.close()
    assert os.stat(directory).st_gid == group.gr_gid
    with pytest.raises(FrontError, match="no group named"):
        unix_socket(directory / "other.sock", "no-such-group-here")


OUT_OF_FILES = """
import asyncio, resource, socket
from clusteracme.peer_agent.front import Front, FrontMode

async def main():
    front = Front("127.0.0.1", 0, FrontMode.REDIRECT, upstream_port=lambda: None, max_connections=1000)
    await front.start()
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(80):  # clients and server share the table: it fills up
        try:
            sock = socket.socket()
        except OSError:
            break
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", front.port))
        except OSError:
            sock.close()
            break
        clients.append(sock)
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)
    print("held", front.connections)
    for sock in clients:
        sock.close()
    await asyncio.sleep(1.5)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    writer.write(b"GET /a HTTP/1.1\\r\\nHost: x.example\\r\\nConnection: close\\r\\n\\r\\n")
    print("answer", (await asyncio.wait_for(reader.read(), 10)).split(b"\\r\\n")[0].decode())
    writer.close()
    await front.stop()

asyncio.run(main())
"""


def test_an_accept_loop_out_of_descriptors_pauses_and_serves_again() -> None:
    """Should the process run out of descriptors anyway (a cap above the
    limit), the accept loop waits instead of spinning or dying."""
    result = subprocess.run([sys.executable, "-c", OUT_OF_FILES], capture_output=True, text=True, timeout=50,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    held = int(lines[0].split()[1])
    assert 0 < held < 64 and lines[1] == "answer HTTP/1.1 301 Moved Permanently", result.stdout
    assert "cannot accept: Too many open files; pausing" in result.stderr
