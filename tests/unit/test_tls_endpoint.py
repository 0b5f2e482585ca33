"""The in-process TLS endpoint and the deployer over real TLS on 127.0.0.1:
hot reload keeps open connections, new connections get the new certificate,
SNI picks the slot, a refused deploy changes nothing, upstream proxying."""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from clusteracme.peer_agent.certs import CertStore, LivePair
from clusteracme.peer_agent.deployer import Deployer, DeployOutcome
from clusteracme.peer_agent.errors import CertificateNotCurrent, KeyNotHeld, NameMismatch, RollbackRefused, TLSLoadError
from clusteracme.peer_agent.keys import KeyStore
from clusteracme.peer_agent.reload import CommandHook
from clusteracme.peer_agent.tls_endpoint import TLSEndpoint, load_context
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.unit.test_cert_store import DAY, CertFactory, issue, pem, serial_of, snapshot

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
SERVER_NAMES = ["peer1.example.com", "www.example.com"]


class Connection:
    """One TLS connection to the endpoint speaking HTTP/1.1 with keep-alive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, sni: str | None, root: x509.Certificate) -> Connection:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # no-SNI and unknown-SNI handshakes are part of the tests
        context.load_verify_locations(cadata=pem(root))  # the served chain must lead to the test root
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, ssl=context, server_hostname=sni or ""), 10
        )
        return cls(reader, writer)

    @property
    def serial(self) -> str:
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return serial_of(x509.load_der_x509_certificate(der))

    async def request(self, method: str = "GET", path: str = "/", body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        lines = [f"{method} {path} HTTP/1.1", "Host: peer1.example.com", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parsed = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                parsed[name.strip().lower()] = value.strip()
        content = await asyncio.wait_for(self.reader.readexactly(int(parsed["content-length"])), 10)
        return int(status_line.split()[1]), parsed, content

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


@dataclass
class Rig:
    state: Path
    keys: KeyStore
    store: CertStore
    factory: CertFactory
    endpoint: TLSEndpoint
    deployer: Deployer

    async def deploy(self, domain: str = "", names: list[str] = SERVER_NAMES) -> tuple[DeployOutcome, str]:
        chain, leaf = issue(self.keys, self.factory, domain, names)
        return await self.deployer.deploy(domain, chain, names), serial_of(leaf)

    async def connect(self, sni: str | None) -> Connection:
        assert self.endpoint.port is not None
        return await Connection.open(self.endpoint.port, sni, self.factory.root)

    async def serial_for(self, sni: str | None) -> str:
        connection = await self.connect(sni)
        try:
            status, _, body = await connection.request()
            assert status == 200 and body.endswith(f"serial={connection.serial}\n".encode())
            return connection.serial
        finally:
            await connection.close()


def make_rig(state: Path, *, upstream: str = "", hooks: list[CommandHook] | None = None) -> Rig:
    keys = KeyStore(state)
    store = CertStore(state, keys)
    endpoint = TLSEndpoint(HOST, 0, peer_id="peer-1", upstream=upstream)
    return Rig(state, keys, store, CertFactory(), endpoint, Deployer(store, [endpoint], hooks or []))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    one = make_rig(tmp_path)
    await one.deployer.start()
    try:
        yield one
    finally:
        await one.deployer.stop()


async def test_the_first_deploy_opens_the_endpoint(rig: Rig) -> None:
    assert not rig.endpoint.listening and rig.endpoint.port is None
    assert await rig.endpoint.start() is False  # nothing to serve yet
    outcome, serial = await rig.deploy()
    assert (outcome.active_serial, outcome.previous_serial) == (serial, "")
    [tls] = outcome.reloads
    assert tls.ok and tls.target == f"tls {HOST}:{rig.endpoint.port}" and serial in tls.detail
    assert rig.endpoint.listening and rig.deployer.endpoints == [f"{HOST}:{rig.endpoint.port}"]
    assert await rig.serial_for(None) == serial


async def test_open_connections_survive_a_deploy_and_new_ones_get_the_new_certificate(rig: Rig) -> None:
    _, first = await rig.deploy()
    old = await rig.connect("peer1.example.com")
    assert old.serial == first
    assert (await old.request())[2] == f"ok peer-1 serial={first}\n".encode()

    outcome, second = await rig.deploy()
    assert (outcome.active_serial, outcome.previous_serial) == (second, first)
    assert rig.endpoint.served_serial("peer1.example.com") == second

    # The connection opened before the swap: same socket, same session, still answering.
    for _ in range(3):
        status, headers, body = await old.request()
        assert status == 200 and headers.get("connection", "keep-alive").lower() != "close"
        assert body == f"ok peer-1 serial={first}\n".encode()
    assert old.serial == first and not old.reader.at_eof()
    new = await rig.connect("peer1.example.com")
    assert new.serial == second
    assert (await new.request())[2] == f"ok peer-1 serial={second}\n".encode()
    await old.close()
    await new.close()


async def test_a_refused_deploy_leaves_new_handshakes_on_the_old_certificate(rig: Rig) -> None:
    _, first = await rig.deploy()
    now = rig.factory.root.not_valid_before_utc + 10 * DAY
    expired, _ = issue(rig.keys, rig.factory, "", SERVER_NAMES, not_before=now, not_after=now + DAY)
    good, _ = issue(rig.keys, rig.factory, "", SERVER_NAMES)
    foreign = rig.factory.chain(rig.factory.leaf(ec.generate_private_key(ec.SECP256R1()).public_key(), SERVER_NAMES))
    before = snapshot(rig.state)
    with pytest.raises(CertificateNotCurrent):
        await rig.deployer.deploy("", expired, SERVER_NAMES)
    with pytest.raises(NameMismatch):
        await rig.deployer.deploy("", good, ["other.example.com"])
    with pytest.raises(KeyNotHeld):
        await rig.deployer.deploy("", foreign, SERVER_NAMES)
    assert snapshot(rig.state) == before
    assert await rig.serial_for(None) == first
    assert [(s.active_serial, s.previous_serial) for s in rig.deployer.status()] == [(first, "")]


async def test_a_pair_the_tls_library_refuses_never_touches_the_live_contexts(rig: Rig, tmp_path: Path) -> None:
    _, first = await rig.deploy()
    active = rig.store.active("")
    assert active is not None
    other = tmp_path / "other.key"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    mismatched = LivePair("", "bad", active.fullchain, other, active.not_after, active.names)
    live = rig.endpoint.contexts
    with pytest.raises(TLSLoadError, match="cannot load certificate bad"):
        load_context(mismatched)
    assert rig.endpoint.contexts is live
    assert await rig.serial_for(None) == first


async def test_sni_picks_the_slot(rig: Rig) -> None:
    _, server = await rig.deploy()
    _, shop = await rig.deploy("shop.example.com", ["shop.example.com", "www.shop.example.com"])
    _, blog = await rig.deploy("blog.example.com", ["blog.example.com"])
    assert await rig.serial_for("shop.example.com") == shop
    assert await rig.serial_for("SHOP.Example.com.") == shop
    assert await rig.serial_for("blog.example.com") == blog
    assert await rig.serial_for(None) == server
    assert await rig.serial_for("unknown.example.com") == server
    # a name that only a domain certificate's SANs carry is not a slot: server certificate
    assert await rig.serial_for("www.shop.example.com") == server
    assert [(s.domain, s.active_serial) for s in rig.deployer.status()] == [
        ("", server), ("blog.example.com", blog), ("shop.example.com", shop)]


async def test_without_a_server_certificate_the_first_domain_answers(rig: Rig) -> None:
    _, blog = await rig.deploy("blog.example.com", ["blog.example.com"])
    _, shop = await rig.deploy("shop.example.com", ["shop.example.com"])
    assert await rig.serial_for("shop.example.com") == shop
    assert await rig.serial_for(None) == blog
    assert rig.endpoint.served_serial("nothing.example") == blog


async def test_each_domain_deploys_and_rolls_back_on_its_own(rig: Rig) -> None:
    shop_names, blog_names = ["shop.example.com"], ["blog.example.com"]
    _, shop1 = await rig.deploy("shop.example.com", shop_names)
    _, blog1 = await rig.deploy("blog.example.com", blog_names)
    _, shop2 = await rig.deploy("shop.example.com", shop_names)
    assert (await rig.serial_for("shop.example.com"), await rig.serial_for("blog.example.com")) == (shop2, blog1)

    with pytest.raises(RollbackRefused, match="no previous"):
        await rig.deployer.rollback("blog.example.com")
    with pytest.raises(RollbackRefused, match=f"is {shop2}, not {shop1}"):
        await rig.deployer.rollback("shop.example.com", expected_active_serial=shop1)
    assert await rig.serial_for("shop.example.com") == shop2

    outcome = await rig.deployer.rollback("shop.example.com", expected_active_serial=shop2)
    assert (outcome.active_serial, outcome.previous_serial) == (shop1, shop2)
    assert [r.ok for r in outcome.reloads] == [True]
    assert (await rig.serial_for("shop.example.com"), await rig.serial_for("blog.example.com")) == (shop1, blog1)

    _, blog2 = await rig.deploy("blog.example.com", blog_names)
    outcome = await rig.deployer.rollback("blog.example.com")
    assert (outcome.active_serial, outcome.previous_serial) == (blog1, blog2)
    assert (await rig.serial_for("shop.example.com"), await rig.serial_for("blog.example.com")) == (shop1, blog1)


async def test_a_restarted_agent_serves_what_is_on_disk_and_skips_a_broken_pair(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    await first.deployer.start()
    _, server = await first.deploy()
    _, shop = await first.deploy("shop.example.com", ["shop.example.com"])
    await first.deployer.stop()

    # the shop slot's pair breaks while the agent is down
    shop_pair = first.store.active("shop.example.com")
    assert shop_pair is not None
    shop_pair.privkey.write_text("not a key")
    again = make_rig(tmp_path)
    again.factory = first.factory
    await again.deployer.start()
    try:
        assert again.endpoint.listening
        assert await again.serial_for(None) == server
        assert await again.serial_for("shop.example.com") == server
        _, repaired = await again.deploy("shop.example.com", ["shop.example.com"])
        assert await again.serial_for("shop.example.com") == repaired != shop
    finally:
        await again.deployer.stop()


async def test_hooks_run_after_the_endpoints_in_order(tmp_path: Path) -> None:
    marker = tmp_path / "hook-ran"
    hooks = [
        CommandHook([sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker)!r}).touch(); print('reloaded')"]),
        CommandHook([sys.executable, "-c", "import sys; print('nope'); sys.exit(2)"]),
    ]
    (tmp_path / "state").mkdir()
    one = make_rig(tmp_path / "state", hooks=hooks)
    await one.deployer.start()
    try:
        outcome, serial = await one.deploy()
        assert [r.target.split()[0] for r in outcome.reloads] == ["tls", "command", "command"]
        assert [r.ok for r in outcome.reloads] == [True, True, False]
        assert outcome.reloads[1].detail == "reloaded" and marker.exists()
        assert "exit status 2" in outcome.reloads[2].detail
        assert outcome.active_serial == serial  # a failed hook does not undo the deploy
    finally:
        await one.deployer.stop()


async def _start_upstream() -> tuple[web.AppRunner, int]:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        text = (f"{request.method} {request.path_qs} body={body.decode()} host={request.host} "
                f"proto={request.headers.get('X-Forwarded-Proto')} xff={request.headers.get('X-Forwarded-For')} "
                f"hop={request.headers.get('X-Hop', '-')}")
        return web.Response(text=text, status=201, headers={"X-Upstream": "yes"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_upstream_mode_relays_requests_and_responses(tmp_path: Path) -> None:
    upstream, upstream_port = await _start_upstream()
    one = make_rig(tmp_path, upstream=f"http://{HOST}:{upstream_port}")
    await one.deployer.start()
    try:
        _, serial = await one.deploy()
        connection = await one.connect("peer1.example.com")
        assert connection.serial == serial
        status, headers, body = await connection.request(
            "POST", "/echo?x=1&y=%2F", b"hello", headers={"Connection": "keep-alive, X-Hop", "X-Hop": "drop me"})
        assert status == 201 and headers["x-upstream"] == "yes"
        assert body.decode() == (f"POST /echo?x=1&y=%2F body=hello host=peer1.example.com proto=https "
                                 f"xff={HOST} hop=-")
        status, _, body = await connection.request("GET", "/again")  # the same kept-alive connection
        assert status == 201 and body.startswith(b"GET /again body=")
        await connection.close()

        await upstream.cleanup()  # the upstream goes away: 502, the endpoint stays up
        connection = await one.connect(None)
        status, _, body = await connection.request()
        assert (status, body) == (502, b"bad gateway\n")
        await connection.close()
    finally:
        await one.deployer.stop()
        await upstream.cleanup()


async def test_a_bad_upstream_url_is_refused() -> None:
    for bad in ("ftp://127.0.0.1:21", "http://127.0.0.1:8080/path", "127.0.0.1:8080"):
        with pytest.raises(ValueError, match="upstream"):
            TLSEndpoint(HOST, 0, peer_id="p", upstream=bad)


async def test_an_endpoint_that_cannot_listen_is_reported(tmp_path: Path, rig: Rig) -> None:
    await rig.deploy()
    assert rig.endpoint.port is not None
    taken = TLSEndpoint(HOST, rig.endpoint.port, peer_id="peer-1")
    store = CertStore(rig.state, rig.keys)
    deployer = Deployer(store, [taken], [])
    outcome = await deployer.deploy("", issue(rig.keys, rig.factory, "", SERVER_NAMES)[0], SERVER_NAMES)
    [tls] = outcome.reloads
    assert not tls.ok and "cannot listen" in tls.detail and not taken.listening
