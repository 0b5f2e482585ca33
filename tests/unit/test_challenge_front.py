"""The challenge server and the port-80 front over real loopback sockets, in
both front modes.

Requests that a client library would normalize (``..``, percent-encoded
traversal, overlong paths) are written byte for byte on a raw socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from clusteracme.peer_agent.challenge_server import ChallengeServer
from clusteracme.peer_agent.challenges import EXPIRY_TASK_NAME, ChallengeService
from clusteracme.peer_agent.errors import FrontError, InvalidToken, NotStarted, TokenConflict
from clusteracme.peer_agent.front import Front, FrontMode
from clusteracme.peer_agent.tokens import TokenStore

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
THUMB = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTH = f"{TOKEN}.{THUMB}"
PATH = f"/.well-known/acme-challenge/{TOKEN}"
MODES = [FrontMode.CLOSED, FrontMode.REDIRECT]

Response = tuple[int, dict[str, str], bytes]
Factory = Callable[..., Awaitable[tuple[ChallengeService, int]]]


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def raw_request(port: int, data: bytes, host: str = HOST) -> Response:
    """Send bytes as they are; read the response up to the closed connection."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def request(
    port: int, target: str, method: str = "GET", host_header: str | None = "example.com:80",
    http: str = "HTTP/1.1",
) -> Response:
    lines = [f"{method} {target} {http}", "Connection: close"]
    if host_header is not None:
        lines.append(f"Host: {host_header}")
    if method in ("POST", "PUT"):
        lines.append("Content-Length: 0")
    return await raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


async def assert_refused(port: int, host: str = HOST) -> None:
    with pytest.raises(ConnectionRefusedError):
        _, writer = await asyncio.open_connection(host, port)
        writer.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def assert_not_a_file(body: bytes) -> None:
    assert b"root:" not in body
    assert KEY_AUTH.encode() not in body
    assert body in (b"", b"not found\n", b"method not allowed\n")


@pytest.fixture
async def make_service() -> AsyncIterator[Factory]:
    services: list[ChallengeService] = []

    async def make(mode: FrontMode, **kwargs: object) -> tuple[ChallengeService, int]:
        port = free_port()
        service = ChallengeService(HOST, port, mode, **kwargs)  # type: ignore[arg-type]
        services.append(service)
        await service.start()
        return service, port

    yield make
    for service in services:
        await service.stop()


@pytest.fixture(params=MODES, ids=lambda m: m.value)
async def opened(
    request: pytest.FixtureRequest, make_service: Factory
) -> tuple[ChallengeService, int]:
    """A service of either mode with TOKEN open for order o1."""
    service, port = await make_service(request.param)
    await service.present("o1", {TOKEN: KEY_AUTH}, 60)
    return service, port


# --- serving the token ------------------------------------------------------


async def test_open_token_returns_exact_key_authorization(
    opened: tuple[ChallengeService, int],
) -> None:
    service, port = opened
    assert service.front_listening and service.challenge_listening
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"http://{HOST}:{port}{PATH}", headers={"Host": "example.com:80"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain"
            assert await resp.read() == KEY_AUTH.encode()


@pytest.mark.parametrize(
    "host_header",
    [
        "example.com:80", "example.com", "192.0.2.1:80", "[2001:db8::1]:80",
        "xn--bcher-kva.example:80",
    ],
)
async def test_host_header_with_or_without_port_works(
    opened: tuple[ChallengeService, int], host_header: str
) -> None:
    _, port = opened
    status, _, body = await request(port, PATH, host_header=host_header)
    assert (status, body) == (200, KEY_AUTH.encode())


async def test_query_string_does_not_matter(opened: tuple[ChallengeService, int]) -> None:
    _, port = opened
    status, _, body = await request(port, PATH + "?x=1&y=../../etc/passwd")
    assert (status, body) == (200, KEY_AUTH.encode())


def assert_404_closed_or_301_redirect(service: ChallengeService, response: Response, target: str) -> None:
    """Closed mode: 404 (405 for another method); redirect mode: the 301 any path gets."""
    status, headers, body = response
    assert_not_a_file(body)
    if service.front_mode is FrontMode.CLOSED:
        assert status in (404, 405)
        assert "location" not in headers
    else:
        assert (status, headers["location"]) == (301, f"https://example.com{target}")


async def test_unknown_token_is_404_closed_or_301_redirect(opened: tuple[ChallengeService, int]) -> None:
    service, port = opened
    target = "/.well-known/acme-challenge/unknownToken123"
    response = await request(port, target)
    assert_404_closed_or_301_redirect(service, response, target)
    if service.front_mode is FrontMode.CLOSED:
        assert response[0] == 404


@pytest.mark.parametrize(
    "target",
    [
        "/.well-known/acme-challenge/",
        PATH + "/",
        PATH + "x",
        PATH + "%20",
        PATH + "/..",
        "/.well-known/acme-challenge/" + TOKEN.replace("e", "%65", 1),  # decodes to TOKEN
        "/.well-known/acme-challenge/../../../../etc/passwd",
        "/.well-known/acme-challenge/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/.well-known/acme-challenge/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/.well-known/acme-challenge/..%2F..%2F..%2Fetc%2Fpasswd",
        f"/.well-known/acme-challenge/{TOKEN}%2F..%2F..%2Fetc%2Fpasswd",
        "/.well-known/acme-challenge/" + "A" * 129,
        "/.well-known/acme-challenge/" + "A" * 300,  # over the raw-path bound
    ],
)
async def test_malformed_challenge_paths_are_404_closed_or_301_redirect(
    opened: tuple[ChallengeService, int], target: str
) -> None:
    service, port = opened
    response = await request(port, target)
    assert_404_closed_or_301_redirect(service, response, target)
    if service.front_mode is FrontMode.CLOSED:
        assert response[0] == 404


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/index.html",
        "/.well-known/acme-challenge",
        f"//.well-known/acme-challenge/{TOKEN}",
        f"/.well-known/x/../acme-challenge/{TOKEN}",
        f"/x/../.well-known/acme-challenge/{TOKEN}",
        f"/.well-known/%61cme-challenge/{TOKEN}",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%2F..%2Fetc%2Fpasswd",
        "/" + "a" * 300,
    ],
)
async def test_other_paths_are_404_closed_or_301_redirect(
    opened: tuple[ChallengeService, int], target: str
) -> None:
    service, port = opened
    status, headers, body = await request(port, target)
    assert_not_a_file(body)
    if service.front_mode is FrontMode.CLOSED:
        assert status == 404
    else:
        assert status == 301
        assert headers["location"] == f"https://example.com{target}"


async def test_path_beyond_the_request_line_limit_is_rejected(
    opened: tuple[ChallengeService, int],
) -> None:
    # aiohttp's parser refuses the line (400) before any handler runs
    _, port = opened
    status, _, body = await request(port, PATH + "/" + "a" * 5000)
    assert status in (400, 414)
    assert KEY_AUTH.encode() not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
async def test_non_get_of_an_open_token_is_405_closed_or_301_redirect(
    opened: tuple[ChallengeService, int], method: str
) -> None:
    # Closed mode: the challenge path belongs to the challenge server, which
    # allows GET only. Redirect mode: only GET of an open token is excepted
    # from the redirect (the guide's rule), so every other method is a 301.
    service, port = opened
    status, headers, body = await request(port, PATH, method=method)
    assert KEY_AUTH.encode() not in body
    if service.front_mode is FrontMode.CLOSED:
        assert status == 405
        assert headers["allow"] == "GET"
    else:
        assert (status, headers["location"]) == (301, f"https://example.com{PATH}")
        assert "allow" not in headers


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_non_get_elsewhere_is_404_closed_or_301_redirect(
    opened: tuple[ChallengeService, int], method: str
) -> None:
    service, port = opened
    status, headers, _ = await request(port, "/login", method=method)
    if service.front_mode is FrontMode.CLOSED:
        assert status == 404
    else:
        assert (status, headers["location"]) == (301, "https://example.com/login")


# --- the challenge server itself ---------------------------------------------


async def test_challenge_server_listens_on_127_0_0_1_only_and_closes_after_last_token(
    opened: tuple[ChallengeService, int],
) -> None:
    service, _ = opened
    cport = service.challenge_port
    assert cport is not None
    status, headers, body = await request(cport, PATH)
    assert (status, headers["content-type"], body) == (200, "text/plain", KEY_AUTH.encode())
    # bound to 127.0.0.1, not the whole loopback net nor the wildcard address
    await assert_refused(cport, host="127.0.0.2")
    assert await service.remove("o1", [TOKEN]) == 1
    assert not service.challenge_listening and service.challenge_port is None
    await assert_refused(cport)


async def test_challenge_server_answers_other_methods_405_and_paths_404() -> None:
    store = TokenStore()
    store.add("o1", {TOKEN: KEY_AUTH}, 60)
    server = ChallengeServer(store)
    port = await server.start()
    try:
        assert (await request(port, PATH, method="DELETE"))[0] == 405
        for target in ("/", "/.well-known/acme-challenge/%2e%2e/etc/passwd", PATH + "/"):
            status, _, body = await request(port, target)
            assert status == 404
            assert_not_a_file(body)
    finally:
        await server.stop()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "localhost"])
def test_challenge_server_refuses_non_loopback_addresses(host: str) -> None:
    with pytest.raises(ValueError):
        ChallengeServer(TokenStore(), host)


# --- closed mode: listening only during a challenge ---------------------------


async def test_closed_mode_listens_only_while_a_token_is_open(make_service: Factory) -> None:
    service, port = await make_service(FrontMode.CLOSED)
    await assert_refused(port)
    assert not service.front_listening and not service.challenge_listening
    for _ in range(2):  # the port rebinds at once (reuse_address)
        assert await service.present("o1", {TOKEN: KEY_AUTH}, 60) == 1
        assert service.front_listening and service.front_port == port
        assert (await request(port, PATH))[0] == 200
        cport = service.challenge_port
        assert cport is not None
        assert await service.remove("o1", None) == 1
        assert service.open_tokens == 0
        assert not service.front_listening and not service.challenge_listening
        await assert_refused(port)
        await assert_refused(cport)


async def test_closed_mode_stays_open_until_the_last_order_lets_go(make_service: Factory) -> None:
    service, port = await make_service(FrontMode.CLOSED)
    other = "secondToken"
    await service.present("o1", {TOKEN: KEY_AUTH}, 60)
    await service.present("o2", {other: f"{other}.{THUMB}", TOKEN: KEY_AUTH}, 60)
    await service.remove("o1")
    assert (await request(port, PATH))[0] == 200  # o2 still holds it
    await service.remove("o2", [TOKEN])
    assert (await request(port, PATH))[0] == 404
    assert service.front_listening
    await service.remove("o2", [other])
    await assert_refused(port)


async def test_closed_mode_closes_when_the_last_token_expires(make_service: Factory) -> None:
    service, port = await make_service(FrontMode.CLOSED)
    assert any(t.get_name() == EXPIRY_TASK_NAME for t in asyncio.all_tasks())
    await service.present("o1", {TOKEN: KEY_AUTH}, 0.3)
    assert (await request(port, PATH))[0] == 200
    await wait_for(lambda: not service.front_listening)
    assert service.open_tokens == 0 and not service.challenge_listening
    await assert_refused(port)


async def test_closed_mode_expiry_with_a_fake_clock(make_service: Factory) -> None:
    now = [5000.0]
    service, port = await make_service(FrontMode.CLOSED, clock=lambda: now[0])
    await service.present("o1", {TOKEN: KEY_AUTH}, 30)
    now[0] += 29
    assert await service.purge_expired() == 0
    assert (await request(port, PATH))[0] == 200
    now[0] += 1
    # expired tokens are never served, even before the purge closes the port
    assert (await request(port, PATH))[0] == 404
    assert await service.purge_expired() == 1
    await assert_refused(port)


# --- redirect mode ---------------------------------------------------------------


async def test_redirect_mode_redirects_the_challenge_path_when_nothing_is_open(
    make_service: Factory,
) -> None:
    service, port = await make_service(FrontMode.REDIRECT)
    assert service.front_listening and not service.challenge_listening
    status, headers, _ = await request(port, PATH)
    assert (status, headers["location"]) == (301, f"https://example.com{PATH}")
    await service.present("o1", {TOKEN: KEY_AUTH}, 60)
    assert (await request(port, PATH))[2] == KEY_AUTH.encode()
    await service.remove("o1")
    assert service.front_listening and not service.challenge_listening
    status, headers, _ = await request(port, PATH)
    assert (status, headers["location"]) == (301, f"https://example.com{PATH}")


async def test_redirect_mode_excepts_only_get_of_an_open_token(make_service: Factory) -> None:
    """During a challenge: the open token's GET is served; the same path
    with another method, another (unknown, expired, closed) token, a sub-path
    or a malformed token is redirected like any other path."""
    now = [1000.0]
    service, port = await make_service(FrontMode.REDIRECT, clock=lambda: now[0])
    other = "otherOpenToken"
    await service.present("o1", {TOKEN: KEY_AUTH}, 60)
    await service.present("o2", {other: f"{other}.{THUMB}"}, 30)
    status, _, body = await request(port, PATH)
    assert (status, body) == (200, KEY_AUTH.encode())
    redirected = [
        ("HEAD", PATH), ("POST", PATH), ("PUT", PATH), ("OPTIONS", PATH),
        ("GET", "/.well-known/acme-challenge/neverOpened"), ("GET", PATH + "/"), ("GET", PATH + "/x"),
        ("GET", "/.well-known/acme-challenge/"), ("GET", "/.well-known/acme-challenge/%2e%2e/etc/passwd"),
        ("GET", "/.well-known/acme-challenge/" + TOKEN.replace("e", "%65", 1)), ("GET", "/"),
    ]
    for method, target in redirected:
        status, headers, body = await request(port, target, method=method)
        assert (method, target, status, headers.get("location")) == (
            method, target, 301, f"https://example.com{target}")
        assert KEY_AUTH.encode() not in body
    # an expired token (not purged yet) is closed: redirected, the other still served
    now[0] += 45
    other_path = f"/.well-known/acme-challenge/{other}"
    status, headers, _ = await request(port, other_path)
    assert (status, headers["location"]) == (301, f"https://example.com{other_path}")
    assert (await request(port, PATH))[2] == KEY_AUTH.encode()
    # a removed token, while another challenge keeps the challenge server up
    await service.present("o3", {other: f"{other}.{THUMB}"}, 60)
    await service.remove("o1")
    assert service.challenge_listening
    status, headers, _ = await request(port, PATH)
    assert (status, headers["location"]) == (301, f"https://example.com{PATH}")
    assert (await request(port, other_path))[0] == 200


async def test_redirect_front_without_is_open_redirects_what_the_server_does_not_serve() -> None:
    store = TokenStore()
    store.add("o1", {TOKEN: KEY_AUTH}, 60)
    server = ChallengeServer(store)
    await server.start()
    front = Front(HOST, 0, FrontMode.REDIRECT, lambda: server.port)
    port = await front.start()
    try:
        status, _, body = await request(port, PATH)
        assert (status, body) == (200, KEY_AUTH.encode())
        status, headers, _ = await request(port, "/.well-known/acme-challenge/unknown")
        assert (status, headers["location"]) == (301, "https://example.com/.well-known/acme-challenge/unknown")
    finally:
        await front.stop()
        await server.stop()


async def test_redirect_keeps_query_and_names_a_non_default_https_port(
    make_service: Factory,
) -> None:
    _, port = await make_service(FrontMode.REDIRECT, https_port=8443)
    status, headers, _ = await request(port, "/a/b?c=d", host_header="example.com:80")
    assert (status, headers["location"]) == (301, "https://example.com:8443/a/b?c=d")
    status, headers, _ = await request(port, "/", host_header="[2001:db8::1]:80")
    assert headers["location"] == "https://[2001:db8::1]:8443/"


@pytest.mark.parametrize("host_header", [None, "evil.com/x", "a b", "example.com:80:80", ""])
async def test_redirect_refuses_a_missing_or_malformed_host(
    make_service: Factory, host_header: str | None
) -> None:
    _, port = await make_service(FrontMode.REDIRECT)
    status, headers, _ = await request(port, "/", host_header=host_header, http="HTTP/1.0")
    assert status == 400
    assert "location" not in headers


async def test_redirect_mode_front_stops_with_the_service(make_service: Factory) -> None:
    service, port = await make_service(FrontMode.REDIRECT)
    await service.stop()
    await assert_refused(port)


# --- the façade's contract -----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
async def test_present_validates_before_opening_anything(
    make_service: Factory, mode: FrontMode
) -> None:
    service, port = await make_service(mode)
    with pytest.raises(InvalidToken):
        await service.present("o1", {TOKEN: KEY_AUTH, "../x": "../x." + THUMB}, 60)
    with pytest.raises(InvalidToken):
        await service.present("o1", {TOKEN: KEY_AUTH}, 10_000)
    assert service.open_tokens == 0 and not service.challenge_listening
    assert service.front_listening is (mode is FrontMode.REDIRECT)
    if mode is FrontMode.CLOSED:
        await assert_refused(port)


async def test_conflicting_present_leaves_the_open_token_alone(make_service: Factory) -> None:
    service, port = await make_service(FrontMode.CLOSED)
    await service.present("o1", {TOKEN: KEY_AUTH}, 60)
    with pytest.raises(TokenConflict):
        await service.present("o2", {TOKEN: f"{TOKEN}.otherThumb"}, 60)
    assert (await request(port, PATH))[2] == KEY_AUTH.encode()


async def test_present_before_start_is_refused() -> None:
    service = ChallengeService(HOST, free_port(), FrontMode.CLOSED)
    with pytest.raises(NotStarted):
        await service.present("o1", {TOKEN: KEY_AUTH}, 60)


async def test_concurrent_presents_and_removes(make_service: Factory) -> None:
    service, port = await make_service(FrontMode.CLOSED)
    tokens = {f"tok{i}": f"tok{i}.{THUMB}" for i in range(20)}
    await asyncio.gather(*(service.present(f"o{t}", {t: k}, 60) for t, k in tokens.items()))
    assert service.open_tokens == 20
    for token, key_auth in list(tokens.items())[:3]:
        status, _, body = await request(port, f"/.well-known/acme-challenge/{token}")
        assert (status, body) == (200, key_auth.encode())
    released = await asyncio.gather(*(service.remove(f"o{t}") for t in tokens))
    assert sum(released) == 20
    assert not service.front_listening and not service.challenge_listening
    await assert_refused(port)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
async def test_a_port_in_use_is_a_front_error_naming_the_address(mode: FrontMode) -> None:
    with socket.socket() as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        service = ChallengeService(HOST, port, mode)
        try:
            if mode is FrontMode.REDIRECT:
                with pytest.raises(FrontError, match=f"{HOST}:{port}"):
                    await service.start()
                return
            await service.start()
            with pytest.raises(FrontError, match=f"{HOST}:{port}") as info:
                await service.present("o1", {TOKEN: KEY_AUTH}, 60)
            assert info.value.retryable
            assert service.open_tokens == 0
            assert not service.challenge_listening and not service.front_listening
        finally:
            await service.stop()


async def test_front_forwards_to_an_ipv6_loopback_challenge_server() -> None:
    store = TokenStore()
    store.add("o1", {TOKEN: KEY_AUTH}, 60)
    server = ChallengeServer(store, "::1")
    try:
        await server.start()
    except FrontError:
        pytest.skip("no IPv6 loopback here")
    front = Front(HOST, 0, FrontMode.CLOSED, lambda: server.port, upstream_host="::1")
    port = await front.start()
    try:
        assert (await request(port, PATH))[2] == KEY_AUTH.encode()
    finally:
        await front.stop()
        await server.stop()


async def test_front_answers_502_when_the_challenge_server_is_gone() -> None:
    dead = free_port()
    front = Front(HOST, 0, FrontMode.CLOSED, upstream_port=lambda: dead)
    port = await front.start()
    try:
        status, _, body = await request(port, PATH)
        assert status == 502
        assert KEY_AUTH.encode() not in body
    finally:
        await front.stop()
    assert not front.listening
    await assert_refused(port)


# --- batches: the tokens of several orders in one call ------------------------------


def batch_tokens(n: int) -> dict[str, str]:
    return {f"batchTok{i}": f"batchTok{i}.{THUMB}" for i in range(n)}


def challenge_server_starts(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records
               if r.name == "clusteracme.peer_agent.challenge_server" and r.getMessage().startswith("challenge server listening"))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
async def test_a_batch_opens_the_listeners_once_and_serves_every_order(
    make_service: Factory, mode: FrontMode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    service, port = await make_service(mode)
    tokens = batch_tokens(6)
    items = list(tokens.items())
    orders = [(f"o{i}", dict(items[2 * i:2 * i + 2])) for i in range(3)]
    assert await service.present_batch(orders, 60) == 6
    assert challenge_server_starts(caplog) == 1
    assert service.front_listening and service.challenge_listening
    for token, key_auth in tokens.items():
        status, _, body = await request(port, f"/.well-known/acme-challenge/{token}")
        assert (status, body) == (200, key_auth.encode())
    # each order holds its own tokens, as if presented alone
    assert await service.remove("o1") == 2
    released = f"/.well-known/acme-challenge/{items[2][0]}"
    assert (await request(port, released))[0] == (404 if mode is FrontMode.CLOSED else 301)
    assert (await request(port, f"/.well-known/acme-challenge/{items[0][0]}"))[0] == 200


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
async def test_one_invalid_token_refuses_the_whole_batch_and_opens_nothing(
    make_service: Factory, mode: FrontMode
) -> None:
    service, port = await make_service(mode)
    with pytest.raises(InvalidToken):
        await service.present_batch(
            [("o1", {TOKEN: KEY_AUTH}), ("o2", {"../x": "../x." + THUMB})], 60)
    assert service.open_tokens == 0 and not service.challenge_listening
    assert service.front_listening is (mode is FrontMode.REDIRECT)
    if mode is FrontMode.CLOSED:
        await assert_refused(port)
    else:
        assert (await request(port, PATH))[0] == 301  # not served: redirected like any path


async def test_a_refused_batch_leaves_the_open_tokens_as_they_were(make_service: Factory) -> None:
    service, port = await make_service(FrontMode.CLOSED)
    await service.present("o0", {TOKEN: KEY_AUTH}, 60)
    other = "otherToken"
    with pytest.raises(TokenConflict):
        await service.present_batch([("o1", {other: f"{other}.{THUMB}"}), ("o2", {TOKEN: f"{TOKEN}.otherThumb"})], 60)
    assert service.open_tokens == 1
    assert (await request(port, PATH))[2] == KEY_AUTH.encode()
    assert (await request(port, f"/.well-known/acme-challenge/{other}"))[0] == 404
    assert await service.remove("o0") == 1
    await assert_refused(port)


async def test_remove_batch_closes_several_orders_and_the_port_once_empty(make_service: Factory) -> None:
    service, port = await make_service(FrontMode.CLOSED)
    tokens = batch_tokens(4)
    items = list(tokens.items())
    await service.present_batch([("o1", dict(items[:2])), ("o2", dict(items[2:3])), ("o3", dict(items[3:]))], 60)
    # o1 entirely, o2 entirely, only one token of o3 (the mixed form a request can carry)
    assert await service.remove_batch([("o3", ["nope"]), ("o1", None), ("o2", None)]) == 1
    assert service.front_listening
    assert (await request(port, f"/.well-known/acme-challenge/{items[3][0]}"))[2] == items[3][1].encode()
    for token, _ in items[:3]:
        assert (await request(port, f"/.well-known/acme-challenge/{token}"))[0] == 404
    assert await service.remove_batch([("o3", [items[3][0]]), ("o1", None)]) == 0
    assert not service.front_listening and not service.challenge_listening
    await assert_refused(port)
    assert await service.remove_batch([("o3", None)]) == 0  # repeatable


async def test_present_batch_before_start_is_refused() -> None:
    service = ChallengeService(HOST, free_port(), FrontMode.CLOSED)
    with pytest.raises(NotStarted):
        await service.present_batch([("o1", {TOKEN: KEY_AUTH})], 60)


# --- external mode: the node's web server owns port 80 -------------------------
async def test_external_mode_runs_no_front_and_holds_the_fixed_challenge_port_from_start_to_stop(
        make_service: Factory) -> None:
    """The web server proxies to a fixed address: the agent holds it all the
    time (404 without open tokens), so nobody else can take it between two
    challenges (issue 12 item 2)."""
    challenge_port = free_port()
    service, front_port = await make_service(FrontMode.EXTERNAL, challenge_port=challenge_port)
    await assert_refused(front_port)
    assert service.challenge_listening
    assert (await request(challenge_port, PATH))[0] == 404
    await service.present("o1", {TOKEN: KEY_AUTH}, 60)
    assert not service.front_listening
    await assert_refused(front_port)
    status, headers, body = await request(challenge_port, PATH)
    assert (status, body) == (200, KEY_AUTH.encode())
    await service.remove("o1")
    assert service.challenge_listening
    assert (await request(challenge_port, PATH))[0] == 404
    await service.stop()
    await assert_refused(challenge_port)


# --- every address of the node: front.hosts -------------------------------------
def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")


async def get_token_at(address: str, port: int) -> Response:
    data = f"GET {PATH} HTTP/1.1\r\nConnection: close\r\nHost: example.com:80\r\n\r\n".encode()
    return await raw_request(port, data, host=address)


async def open_service(hosts: tuple[str, ...], mode: FrontMode, port: int = 0) -> tuple[ChallengeService, int]:
    """A started service on ``hosts`` with TOKEN open; port 0: the first address picks one."""
    service = ChallengeService(hosts, port, mode)
    await service.start()
    await service.present("o1", {TOKEN: KEY_AUTH}, 60)
    assert service.front_port is not None
    return service, service.front_port


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
async def test_the_front_serves_on_every_address_with_one_port_and_closes_them_together(mode: FrontMode) -> None:
    hosts = ("127.0.0.1", "127.0.0.2", "::1") if has_ipv6_loopback() else ("127.0.0.1", "127.0.0.2")
    service, port = await open_service(hosts, mode)
    try:
        for address in hosts:
            assert (await get_token_at(address, port))[::2] == (200, KEY_AUTH.encode())
        await service.remove("o1")
        for address in hosts:
            if mode is FrontMode.CLOSED:
                await assert_refused(port, address)
            else:
                assert (await get_token_at(address, port))[0] == 301
    finally:
        await service.stop()
    for address in hosts:
        await assert_refused(port, address)


@needs_ipv6
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
async def test_ipv6_any_alone_is_dual_stack(mode: FrontMode) -> None:
    service, port = await open_service(("::",), mode)
    try:
        for address in ("127.0.0.1", "::1"):
            assert (await get_token_at(address, port))[::2] == (200, KEY_AUTH.encode())
    finally:
        await service.stop()


@needs_ipv6
async def test_ipv6_any_next_to_ipv4_addresses_is_ipv6_only_and_both_bind() -> None:
    service, port = await open_service(("0.0.0.0", "::"), FrontMode.CLOSED)
    try:
        for address in ("127.0.0.1", "::1"):
            assert (await get_token_at(address, port))[::2] == (200, KEY_AUTH.encode())
    finally:
        await service.stop()


@needs_ipv6
async def test_the_remote_address_of_an_ipv6_request_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "clusteracme.peer_agent.front")
    service, port = await open_service(("127.0.0.1", "::1"), FrontMode.CLOSED)
    try:
        await get_token_at("::1", port)
    finally:
        await service.stop()
    assert any(r.getMessage().startswith(f"challenge {TOKEN} requested by ::1 ") for r in caplog.records)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
async def test_an_address_that_cannot_be_bound_is_an_error_naming_it_and_none_listens(mode: FrontMode) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.2", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        service = ChallengeService(("127.0.0.1", "127.0.0.2"), port, mode)
        try:
            if mode is FrontMode.REDIRECT:
                with pytest.raises(FrontError, match=f"127.0.0.2:{port}"):
                    await service.start()
            else:
                await service.start()
                with pytest.raises(FrontError, match=f"127.0.0.2:{port}"):
                    await service.present("o1", {TOKEN: KEY_AUTH}, 60)
                assert service.open_tokens == 0 and not service.challenge_listening
            assert not service.front_listening
            await assert_refused(port, "127.0.0.1")
        finally:
            await service.stop()


async def test_an_address_the_node_does_not_have_is_named_in_the_error() -> None:
    service = ChallengeService(("127.0.0.1", "192.0.2.77"), free_port(), FrontMode.REDIRECT)
    with pytest.raises(FrontError, match=r"192\.0\.2\.77:\d+: .*assign"):
        await service.start()
    assert not service.front_listening


@needs_ipv6
async def test_an_ipv6_address_in_use_is_named_in_brackets() -> None:
    with socket.socket(socket.AF_INET6) as squatter:
        squatter.bind(("::1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        service = ChallengeService(("127.0.0.1", "::1"), port, FrontMode.REDIRECT)
        with pytest.raises(FrontError, match=rf"\[::1\]:{port}"):
            await service.start()
        await assert_refused(port, "127.0.0.1")


def test_front_hosts_default_to_host_and_registration_announces_the_specific_ones() -> None:
    from clusteracme.peer_agent.app import registration
    from clusteracme.peer_agent.settings import AgentSettings

    from clusteracme.config import build
    from clusteracme.errors import InvalidArgument

    def settings(front: dict[str, object], **data: object) -> AgentSettings:
        return build(AgentSettings, {"peer_id": "p1", "listen": "10.0.0.5:7444", "front": front, **data})

    assert settings({"host": "203.0.113.5"}).front.bind_hosts == ("203.0.113.5",)
    both = registration(settings({"hosts": ["203.0.113.5", "2001:db8::5"], "port": 8080}), 7444)
    assert (list(both.addresses), both.http_front) == (["203.0.113.5", "2001:db8::5"], "203.0.113.5:8080")
    # a wildcard next to a specific address: the wildcard's addresses cannot be derived
    with pytest.raises(InvalidArgument, match=r"front binds 0.0.0.0 \(every address\): set addresses"):
        registration(settings({"hosts": ["0.0.0.0", "2001:db8::5"]}), 7444)
    mixed = registration(settings({"hosts": ["0.0.0.0", "2001:db8::5"]}, addresses=["203.0.113.5", "2001:db8::5"]),
                         7444)
    assert (list(mixed.addresses), mixed.http_front) == (["203.0.113.5", "2001:db8::5"], "[2001:db8::5]:80")
    # loopback and link-local stay out of the derived addresses unless they are all there is
    public = registration(settings({"hosts": ["127.0.0.1", "203.0.113.5", "fe80::1", "2001:db8::5"]}), 7444)
    assert (list(public.addresses), public.http_front) == (["203.0.113.5", "2001:db8::5"], "203.0.113.5:80")
    local = registration(settings({"hosts": ["127.0.0.2", "::1"], "port": 8080}), 7444)
    # combinations that can never all bind
    with pytest.raises(InvalidArgument, match=r"front.hosts lists 2001:db8::5 twice \(2001:db8:0::5\)"):
        registration(settings({"hosts": ["2001:db8::5", "2001:db8:0::5"]}, addresses=["2001:db8::5"]), 7444)
    with pytest.raises(InvalidArgument, match="0.0.0.0 already takes every IPv4 address, 203.0.113.5 cannot bind"):
        registration(settings({"hosts": ["0.0.0.0", "203.0.113.5"]}, addresses=["203.0.113.5"]), 7444)
    with pytest.raises(InvalidArgument, match=":: already takes every IPv6 address, 2001:db8::5 cannot bind"):
        registration(settings({"hosts": ["::", "2001:db8::5"]}, addresses=["2001:db8::5"]), 7444)
    # :: next to IPv4 addresses only is IPv6-only: fine
    assert registration(settings({"hosts": ["203.0.113.5", "::"]}, addresses=["203.0.113.5"]), 7444).addresses
    assert (list(local.addresses), local.http_front) == (["127.0.0.2", "::1"], "127.0.0.2:8080")
    explicit = registration(settings({"hosts": ["::"], "advertise": "203.0.113.5:80"},
                                     addresses=["203.0.113.5", "2001:db8::5"]), 7444)
    assert (list(explicit.addresses), explicit.http_front) == (["203.0.113.5", "2001:db8::5"], "203.0.113.5:80")
    with pytest.raises(InvalidArgument, match=r"front.hosts = \['::'\] binds every address"):
        registration(settings({"hosts": ["::"]}), 7444)
    with pytest.raises(InvalidArgument, match="set addresses"):
        registration(settings({"hosts": ["::", "0.0.0.0"], "advertise": "203.0.113.5:80"}), 7444)
