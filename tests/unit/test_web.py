"""The web status page's parts (coordinator/web): who gets in (token,
session cookie, client certificate and the deny list), the pages with
hostile strings from peers and the CA (escaped, never markup), the methods
refused, the headers, and the SVG timeline builder. The pages run on
aiohttp's test server over a fake of the read methods."""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from clusteracme.coordinator.rpc.servicer import CoordinatorServicer
from clusteracme.coordinator.settings import CoordinatorSettings
from clusteracme.coordinator.web import auth
from clusteracme.coordinator.web.app import READS, ServicerReads, StatusPage
from clusteracme.coordinator.web.svg import Bar, timeline_svg
from clusteracme.coordinator.web.views import Site, days_class, days_left, timeline_bars
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clusteracme import certinfo, errors, pki
from clusteracme.ctl import status as ctl_status
from clusteracme.rpcutil import DeniedSet, ReloadingTLS, TLSFiles, rpc_method
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb

TOKEN = b"s3cret-token-0123456789abcdef"
NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
HOSTILE = '<script>alert("x")</script>'


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("webpki")
    pki.init_ca(directory)
    for identity in (pki.Identity(pki.Role.OPERATOR, "alice"), pki.Identity(pki.Role.AGENT, "peer1"),
                     pki.Identity(pki.Role.OPERATOR, "mallory")):
        pki.issue(directory, identity, out_dir=directory)
    return directory


def der(pki_dir: Path, name: str) -> bytes:
    cert = x509.load_pem_x509_certificate((pki_dir / f"{name}.pem").read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


# --- auth -------------------------------------------------------------------------------------
def test_the_token_compare_takes_the_token_only() -> None:
    assert auth.token_matches(TOKEN.decode(), TOKEN)
    for wrong in ("", TOKEN.decode()[:-1], TOKEN.decode() + "x", TOKEN.decode().upper(), "é" * 20):
        assert not auth.token_matches(wrong, TOKEN)
    assert auth.bearer("Bearer abc") == "abc" and auth.bearer("bearer  abc ") == "abc"
    assert auth.bearer("Basic abc") is None and auth.bearer("Bearer") is None


@pytest.mark.parametrize(("text", "fragment"), [
    ("short", "has 5 characters; give at least 16"),
    ("", "has 0 characters"),
    ("a b c d e f g h i j k l", "printable ASCII without spaces"),
    ("x" * 5000, "longer than 4096"),
])
def test_a_bad_token_file_is_refused_with_the_reason(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(errors.InvalidArgument, match=re.escape(fragment)):
        auth.TokenFile(path)
    with pytest.raises(errors.InvalidArgument, match="cannot read it"):
        auth.TokenFile(tmp_path / "missing")


def write_token(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)


def test_a_token_file_open_to_group_or_others_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "token"
    for mode in (0o644, 0o640, 0o604, 0o660):
        write_token(path, TOKEN.decode() + "\n", mode)
        with pytest.raises(errors.InvalidArgument, match=f"open to group or others \\(mode {mode:o}\\); chmod 600 it"):
            auth.TokenFile(path)
    write_token(path, TOKEN.decode() + "\n", 0o400)
    assert auth.TokenFile(path).token() == TOKEN


def test_a_missing_or_bad_token_file_turns_token_access_off_until_a_good_one_returns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=auth.__name__)
    path = tmp_path / "token"
    write_token(path, TOKEN.decode() + "\n")
    tokens = auth.TokenFile(path)
    assert tokens.token() == TOKEN
    write_token(path, "another-token-of-enough-length\n")
    assert tokens.token() == b"another-token-of-enough-length" and tokens.problem is None
    bad: list[tuple[Any, str]] = [(lambda: write_token(path, "short\n"), "at least 16"),
                                  (path.unlink, "cannot read it"),
                                  (lambda: write_token(path, TOKEN.decode() + "\n", 0o644), "chmod 600 it")]
    for spoil, reason in bad:
        caplog.clear()
        spoil()
        for _ in range(3):  # looked at on every request: logged once per change of the file
            assert tokens.token() is None
        assert tokens.problem is not None and reason in tokens.problem
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "token access is off" in warnings[0].getMessage(), caplog.text
        assert reason in warnings[0].getMessage()
        write_token(path, "another-token-of-enough-length\n")
        assert tokens.token() == b"another-token-of-enough-length" and tokens.problem is None
        assert "token access is on again" in caplog.text


def test_the_session_cookie_is_an_hmac_that_expires_not_the_token() -> None:
    now = 1_800_000_000.0
    value = auth.session_value(TOKEN, now)
    assert TOKEN.decode() not in value
    assert auth.session_valid(value, TOKEN, now + 60)
    assert not auth.session_valid(value, TOKEN, now + auth.SESSION_SECONDS + 1)  # expired
    assert not auth.session_valid(value, b"another-token-of-enough-length", now)  # the token changed
    expires, mac = value.split(".")
    assert not auth.session_valid(f"{int(expires) + 3600}.{mac}", TOKEN, now)  # a longer life, same MAC
    assert not auth.session_valid(f"{expires}.{mac[:-1]}0", TOKEN, now)
    far = auth.session_value(TOKEN, now + 10 * auth.SESSION_SECONDS)  # made "in the future": too long a life
    assert not auth.session_valid(far, TOKEN, now)
    for junk in ("", ".", "abc", "12.", "١٢٣.ab", f"{expires}"):
        assert not auth.session_valid(junk, TOKEN, now)
    # A replica whose clock runs ahead by up to CLOCK_SKEW (5 minutes) makes cookies the others take.
    assert auth.CLOCK_SKEW == 300
    assert auth.session_valid(auth.session_value(TOKEN, now + 290), TOKEN, now)
    assert not auth.session_valid(auth.session_value(TOKEN, now + 310), TOKEN, now)


def test_only_an_operator_certificate_not_denied_gets_in(pki_dir: Path) -> None:
    alice, agent, mallory = der(pki_dir, "operator-alice"), der(pki_dir, "agent-peer1"), der(pki_dir, "operator-mallory")
    denied = DeniedSet({pki.identity_fingerprint(mallory): "laptop stolen"})
    assert auth.certificate_visitor(alice, denied) == auth.Visitor("operator:alice", "certificate")
    with pytest.raises(errors.PermissionDenied, match="agent:peer1 may not read the status page"):
        auth.certificate_visitor(agent, denied)
    with pytest.raises(errors.PermissionDenied, match="laptop stolen"):
        auth.certificate_visitor(mallory, denied)
    # A refused certificate stays refused with the right token beside it.
    with pytest.raises(errors.PermissionDenied):
        auth.decide(client_der=mallory, authorization=f"Bearer {TOKEN.decode()}", cookie="", token=TOKEN,
                    deny_list=denied, now=0)


def test_decide_takes_a_token_or_a_session_and_nothing_else() -> None:
    now = 1_800_000_000.0
    kw: dict[str, Any] = {"client_der": None, "deny_list": None, "now": now}
    assert auth.decide(authorization=f"Bearer {TOKEN.decode()}", cookie="", token=TOKEN, **kw).how == "token"
    assert auth.decide(authorization="", cookie=auth.session_value(TOKEN, now), token=TOKEN, **kw).how == "session"
    for authorization, cookie, token in ((f"Bearer {TOKEN.decode()}", "", None),  # no token file: no token login
                                         ("Bearer wrong-wrong-wrong-wrong", "", TOKEN),
                                         (f"Basic {TOKEN.decode()}", "", TOKEN),
                                         ("", "", TOKEN), ("", "123.abc", TOKEN),
                                         ("", auth.session_value(TOKEN, now), None)):
        with pytest.raises(errors.PermissionDenied):
            auth.decide(authorization=authorization, cookie=cookie, token=token, **kw)


# --- the pages over a fake of the read methods ---------------------------------------------
def _alarm(detail: str) -> pb.Alarm:
    return pb.Alarm(kind="expiring", peer_id=HOSTILE, slot=common_pb2.Slot(domain=""), severity="warning",
                    detail=detail, raised_at="2026-05-31T12:00:00+00:00", active=True)


def _status() -> pb.StatusResponse:
    schedule = pb.ScheduleInfo(auto=True, renewal_due_at="2026-06-20T00:00:00+00:00", days="all", time="now",
                               tz="UTC", key_policy="rotate", warning=HOSTILE)
    good = pb.SlotStatus(slot=common_pb2.Slot(domain=""), active_serial="abc123", acme_enabled=True,
                         active_not_before="2026-04-01T00:00:00+00:00", active_not_after="2026-06-30T12:00:00+00:00",
                         last_sign_status="valid", last_sign_at="2026-04-01T00:00:00+00:00",
                         last_deploy_status="ok", last_deploy_at="2026-04-01T00:10:00+00:00", agent_matches=True,
                         schedule=schedule, alarms=[_alarm('<img src=x onerror="alert(1)">')])
    hostile = pb.SlotStatus(slot=common_pb2.Slot(domain=HOSTILE), active_serial="def456", acme_enabled=True,
                            active_not_before="2026-05-01T00:00:00+00:00",
                            active_not_after="2026-07-30T00:00:00+00:00", agent_matches=False,
                            agent_state=HOSTILE, last_sign_status="failed", last_sign_error=HOSTILE,
                            schedule=pb.ScheduleInfo())
    return pb.StatusResponse(peers=[
        pb.PeerStatus(peer=pb.Peer(peer_id="peer1", alive=True, enabled=True, addresses=["127.0.0.2"]), slots=[good]),
        pb.PeerStatus(peer=pb.Peer(peer_id=HOSTILE, alive=False, enabled=True, version=HOSTILE),
                      slots=[hostile], alarms=[_alarm(HOSTILE)]),
    ])


def _order(done: bool) -> pb.OrderInfo:
    return pb.OrderInfo(order_id="0123456789abcdef", peer_id="peer1", slot=common_pb2.Slot(domain=""),
                        phase="done" if done else "presented", done=done, succeeded=done, names=["a.example", HOSTILE],
                        authorizations=[pb.AuthorizationProgress(name="a.example", status="valid" if done else "pending")],
                        peers=[pb.PeerAck(peer_id="peer1", acknowledged=True, self_checked=done, required=True,
                                          error=HOSTILE)],
                        error=HOSTILE, created_at="2026-06-01T11:59:00+00:00", updated_at="2026-06-01T11:59:30+00:00")


class FakeReads:
    """The read methods' answers, and every call made."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.order_done = True

    async def __call__(self, method: str, request: Any) -> Any:
        self.calls.append((method, request))
        if method == "Status":
            status = _status()
            if request.peer_id:
                found = [p for p in status.peers if p.peer.peer_id == request.peer_id]
                if not found:
                    raise errors.NotFound(f"no peer {request.peer_id}")
                return pb.StatusResponse(peers=found)
            return status
        if method == "ListEvents":
            return pb.ListEventsResponse(events=[pb.HistoryEvent(at="2026-04-01T00:10:00+00:00", what="deploy",
                                                                 result="ok", serial_hex="abc123", detail=HOSTILE,
                                                                 who="operator:admin")])
        if method == "ListAlarms":
            return pb.ListAlarmsResponse(alarms=[_alarm(HOSTILE)])
        if method == "ListOrders":
            return pb.ListOrdersResponse(orders=[_order(True)])
        if method == "GetOrder":
            if request.order_id != "0123456789abcdef":
                raise errors.NotFound(f"no order {request.order_id}")
            return _order(self.order_done)
        raise AssertionError(method)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[TestClient, FakeReads, dict[str, bytes | None]]]:
    reads = FakeReads()
    presented: dict[str, bytes | None] = {"der": None}
    app = Site(reads, replica="c1", token=lambda: TOKEN, deny_list=DeniedSet(),
               client_der=lambda request: presented["der"], clock=lambda: NOW).app()
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, reads, presented
    finally:
        await client.close()


BEARER = {"Authorization": f"Bearer {TOKEN.decode()}"}


async def test_every_page_escapes_what_peers_and_the_ca_wrote(site: Any) -> None:
    client, reads, _ = site
    for path in ("/", "/peers/peer1", "/orders", "/orders/0123456789abcdef", "/timeline",
                 "/peers/%3Cscript%3Ealert(%22x%22)%3C%2Fscript%3E"):
        response = await client.get(path, headers=BEARER)
        body = await response.text()
        assert response.status == 200, (path, body)
        assert "<script" not in body and "<img" not in body, path
    body = await (await client.get("/", headers=BEARER)).text()
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in body
    assert 'href="/peers/%3Cscript%3Ealert%28%22x%22%29%3C/script%3E"' in body


async def test_the_cluster_table_shows_serials_days_left_and_alarms(site: Any) -> None:
    client, _, _ = site
    body = await (await client.get("/", headers=BEARER)).text()
    row = body[body.index('data-peer="peer1"'):body.index("</tr>", body.index('data-peer="peer1"'))]
    assert "abc123" in row and '<td class="days warn">29</td>' in row  # past 2/3 of April 1 .. June 30
    assert "auto" in row and "renew in 18d" in row and "expiring" in row and "valid" in row
    assert '<meta http-equiv="refresh" content="30">' in body
    assert days_left("2026-06-30T12:00:00+00:00", NOW) == 29


async def test_an_order_page_refreshes_while_the_order_runs(site: Any) -> None:
    client, reads, _ = site
    reads.order_done = False
    body = await (await client.get("/orders/0123456789abcdef", headers=BEARER)).text()
    assert '<meta http-equiv="refresh" content="2">' in body and "presented" in body and "pending" in body
    reads.order_done = True
    body = await (await client.get("/orders/0123456789abcdef", headers=BEARER)).text()
    assert 'http-equiv="refresh"' not in body and "valid" in body and "passed" in body
    response = await client.get("/orders/ffffffffffffffff", headers=BEARER)
    assert response.status == 404 and "no order ffffffffffffffff" in await response.text()


async def test_without_credentials_a_401_with_the_login_form(site: Any) -> None:
    client, reads, _ = site
    for path in ("/", "/peers/peer1", "/orders", "/timeline", "/orders/0123456789abcdef"):
        response = await client.get(path)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert 'name="token"' in await response.text()
    assert reads.calls == []  # nothing was read for them
    response = await client.get("/healthz")
    assert response.status == 200 and await response.text() == "ok\n"


async def test_the_login_sets_a_strict_session_cookie_and_it_opens_the_pages(site: Any) -> None:
    client, _, _ = site
    refused = await client.post("/login", data={"token": "wrong-wrong-wrong-wrong", "next": "/timeline"},
                                allow_redirects=False)
    assert refused.status == 401 and auth.COOKIE not in refused.cookies
    response = await client.post("/login", data={"token": TOKEN.decode(), "next": "//evil.example/"},
                                 allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/"  # only a local path
    header = response.headers["Set-Cookie"]
    assert "HttpOnly" in header and "Secure" in header and "SameSite=Strict" in header
    value = response.cookies[auth.COOKIE].value
    assert TOKEN.decode() not in value
    page = await client.get("/timeline", cookies={auth.COOKIE: value})
    assert page.status == 200
    other_site = await client.post("/login", data={"token": TOKEN.decode()}, headers={"Origin": "https://evil.example"},
                                   allow_redirects=False)
    assert other_site.status == 403


async def test_nothing_but_login_and_logout_takes_a_post(site: Any) -> None:
    client, reads, _ = site
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/", "/peers/peer1", "/orders", "/orders/0123456789abcdef", "/timeline", "/nowhere"):
            response = await client.request(method, path, headers=BEARER, data=b"x=1")
            assert response.status == 405, (method, path)
    assert (await client.put("/login", data=b"token=x")).status == 405
    assert reads.calls == []
    assert (await client.head("/", headers=BEARER)).status == 200


async def test_every_answer_carries_the_security_headers(site: Any) -> None:
    client, _, _ = site
    for response in (await client.get("/", headers=BEARER), await client.get("/"), await client.post("/"),
                     await client.get("/static/style.css"), await client.get("/nowhere", headers=BEARER)):
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"


async def test_a_client_certificate_decides_alone(site: Any, pki_dir: Path) -> None:
    client, _, presented = site
    presented["der"] = der(pki_dir, "operator-alice")
    response = await client.get("/")
    assert response.status == 200 and "operator:alice" in await response.text()
    presented["der"] = der(pki_dir, "agent-peer1")
    response = await client.get("/", headers=BEARER)
    assert response.status == 403 and "may not read the status page" in await response.text()


class GatedReads(FakeReads):
    """FakeReads whose whole-cluster Status waits for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def __call__(self, method: str, request: Any) -> Any:
        if method == "Status" and not request.peer_id:
            self.calls.append((method, request))
            await self.gate.wait()
            return _status()
        return await super().__call__(method, request)

    def status_calls(self) -> int:
        return sum(1 for method, _ in self.calls if method == "Status")


async def serve(site: Site) -> TestClient:
    client = TestClient(TestServer(site.app()))
    await client.start_server()
    return client


async def until(check: Any) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never")


async def test_the_pages_share_one_status_call_in_flight_and_keep_its_answer_5_seconds() -> None:
    reads, clock = GatedReads(), {"t": 1000.0}
    site = Site(reads, replica="c1", token=lambda: TOKEN, deny_list=None, client_der=lambda r: None, clock=lambda: NOW,
                monotonic=lambda: clock["t"])
    client = await serve(site)
    try:
        pages = [asyncio.ensure_future(client.get(path, headers=BEARER)) for path in ("/", "/timeline", "/peers/peer1")]
        await until(lambda: site.rendering == 3)
        assert reads.status_calls() == 1  # one fan-out to the agents for the three pages
        reads.gate.set()
        for page in pages:
            response = await page
            assert response.status == 200 and "abc123" in await response.text()
        for path in ("/", "/timeline", "/peers/peer1"):  # within 5 s: the answer kept
            assert (await client.get(path, headers=BEARER)).status == 200
        assert reads.status_calls() == 1
        clock["t"] += 5.1
        assert (await client.get("/", headers=BEARER)).status == 200
        assert reads.status_calls() == 2
        # An unknown peer is asked for by itself (a NotFound, not an empty page).
        response = await client.get("/peers/nobody", headers=BEARER)
        assert response.status == 404 and "no peer nobody" in await response.text()
    finally:
        await client.close()


async def test_a_failed_status_call_is_not_kept() -> None:
    calls: list[str] = []

    async def reads(method: str, request: Any) -> Any:
        calls.append(method)
        if len(calls) == 1:
            raise errors.Unavailable("etcd is away")
        return _status()

    client = await serve(Site(reads, replica="c1", token=lambda: TOKEN, deny_list=None, client_der=lambda r: None,
                              clock=lambda: NOW, monotonic=lambda: 1000.0))
    try:
        response = await client.get("/", headers=BEARER)
        assert response.status == 503 and "etcd is away" in await response.text()
        assert (await client.get("/", headers=BEARER)).status == 200
        assert calls == ["Status", "Status"]
    finally:
        await client.close()


async def test_more_pages_at_once_than_the_cap_are_told_503_with_retry_after() -> None:
    reads = GatedReads()
    site = Site(reads, replica="c1", token=lambda: TOKEN, deny_list=None, client_der=lambda r: None, clock=lambda: NOW,
                max_renders=4)
    client = await serve(site)
    try:
        pages = [asyncio.ensure_future(client.get("/", headers=BEARER)) for _ in range(4)]
        await until(lambda: site.rendering == 4)
        busy = await client.get("/timeline", headers=BEARER)
        assert busy.status == 503 and busy.headers["Retry-After"] == "5"
        assert "busy" in await busy.text()
        # Not counted: the health check, the stylesheet, the login form; a visitor without credentials gets the 401.
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/login")).status == 200
        assert (await client.get("/orders")).status == 401
        reads.gate.set()
        assert [(await page).status for page in pages] == [200] * 4
        assert site.rendering == 0
        assert (await client.get("/timeline", headers=BEARER)).status == 200
    finally:
        await client.close()


async def test_the_login_goes_only_to_a_printable_ascii_local_path(site: Any) -> None:
    client, _, _ = site
    for given, location in (("/\x7f", "/"), ("/é", "/"), ("/a b", "/"), ("/\u2028", "/"),
                            ("https://evil.example/", "/"), ("/orders?x=1&y=%7F", "/orders?x=1&y=%7F"),
                            ("/peers/peer1", "/peers/peer1")):
        response = await client.post("/login", data={"token": TOKEN.decode(), "next": given}, allow_redirects=False)
        assert response.status == 303 and response.headers["Location"] == location, given
    # Urlencoded as the form sends it: %7F decodes to DEL.
    response = await client.post("/login", data=f"token={TOKEN.decode()}&next=/%7F", allow_redirects=False,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 303 and response.headers["Location"] == "/"
    response = await client.get("/login?next=/%7F")
    assert response.status == 200 and 'name="next" value="/"' in await response.text()


async def test_failed_logins_are_logged_once_a_minute_and_limited_per_address(caplog: pytest.LogCaptureFixture) -> None:
    clock = {"t": 1000.0}
    client = await serve(Site(FakeReads(), replica="c1", token=lambda: TOKEN, deny_list=None,
                              client_der=lambda r: None, clock=lambda: NOW, monotonic=lambda: clock["t"]))

    async def log_in(token: str) -> aiohttp.ClientResponse:
        return await client.post("/login", data={"token": token, "next": "/"}, allow_redirects=False)

    try:
        for _ in range(10):
            assert (await log_in("wrong-wrong-wrong-wrong")).status == 401
            clock["t"] += 1
        refused = await log_in(TOKEN.decode())  # the 11th in the minute: refused, even with the token
        assert refused.status == 429 and refused.headers["Retry-After"] == "50"
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "refused a login from 127.0.0.1: wrong token" in warnings[0]
        clock["t"] += 50  # the minute is over
        assert (await log_in("wrong-wrong-wrong-wrong")).status == 401
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 2 and "and 10 more from it in the minute before" in warnings[1]
        assert (await log_in(TOKEN.decode())).status == 303
    finally:
        await client.close()


def test_login_failures_remember_a_bounded_number_of_addresses() -> None:
    failures = auth.LoginFailures(limit=2, window=60, max_addresses=3)
    for i in range(10):
        assert failures.failed(f"10.0.0.{i}", 0.0) == 0
    assert len(failures._by) == 3
    assert failures.failed("10.0.0.9", 1.0) is None and failures.retry_after("10.0.0.9", 1.0) == 59
    assert failures.retry_after("10.0.0.9", 60.0) == 0 and failures.retry_after("10.0.0.1", 1.0) == 0


async def test_a_logout_from_another_site_is_refused(site: Any) -> None:
    client, _, _ = site
    foreign = await client.post("/logout", headers={"Origin": "https://evil.example"}, allow_redirects=False)
    assert foreign.status == 403 and "Set-Cookie" not in foreign.headers
    own = await client.post("/logout", headers={"Origin": str(client.make_url("")).rstrip("/")}, allow_redirects=False)
    assert own.status == 303 and auth.COOKIE in own.headers["Set-Cookie"]
    assert (await client.post("/logout", allow_redirects=False)).status == 303  # no Origin: a same-site form


async def test_a_deleted_or_bad_token_file_refuses_the_old_token_and_its_cookies(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_token(path, TOKEN.decode() + "\n")
    tokens = auth.TokenFile(path)
    client = await serve(Site(FakeReads(), replica="c1", token=tokens.token, deny_list=None,
                              client_der=lambda r: None, clock=lambda: NOW))
    try:
        login = await client.post("/login", data={"token": TOKEN.decode()}, allow_redirects=False)
        cookie = {auth.COOKIE: login.cookies[auth.COOKIE].value}
        assert (await client.get("/", cookies=cookie)).status == 200
        for spoil in (path.unlink, lambda: write_token(path, "short\n"),
                      lambda: write_token(path, TOKEN.decode() + "\n", 0o644)):
            spoil()
            assert (await client.get("/", headers=BEARER)).status == 401
            refused = await client.get("/", cookies=cookie)
            assert refused.status == 401 and "token access is off" in await refused.text()
            login = await client.post("/login", data={"token": TOKEN.decode()}, allow_redirects=False)
            assert login.status == 401 and auth.COOKIE not in login.cookies
            write_token(path, TOKEN.decode() + "\n")  # good again: the same token, its cookies work again
            assert (await client.get("/", cookies=cookie)).status == 200
    finally:
        await client.close()


async def test_days_left_turn_yellow_past_two_thirds_of_the_lifetime_whatever_the_renewal_fraction() -> None:
    # April 1 .. June 30, now June 1: past 2/3 (May 31), before a 0.9 renewal point: yellow, as acmectl shows it.
    client = await serve(Site(FakeReads(), replica="c1", token=lambda: TOKEN, deny_list=None,
                              client_der=lambda r: None, clock=lambda: NOW, fraction=0.9))
    try:
        body = await (await client.get("/", headers=BEARER)).text()
        assert '<td class="days warn">29</td>' in body
        svg = await (await client.get("/timeline", headers=BEARER)).text()
        assert 'data-serial="abc123"' in svg and 'fill="#d4a017"' in svg.split('data-serial="abc123"')[1]
    finally:
        await client.close()
    slot = _status().peers[0].slots[0]
    assert certinfo.two_thirds_point(slot.active_not_before, slot.active_not_after) == ctl_status.two_thirds_point(slot) \
        == datetime.datetime(2026, 5, 31, 8, 0, tzinfo=datetime.UTC)
    assert (days_class(slot, NOW - datetime.timedelta(days=2)), days_class(slot, NOW)) == ("ok", "warn")


def test_the_status_page_reads_only_through_wrapped_read_methods() -> None:
    for method in READS:
        assert hasattr(getattr(CoordinatorServicer, method), "__wrapped__"), method

    reads = ServicerReads(lambda: None)
    with pytest.raises(ValueError, match="does not call Sign"):
        asyncio.run(reads("Sign", pb.SignRequest()))


# --- the SVG timeline ---------------------------------------------------------------------------
def test_the_timeline_has_a_bar_per_certificate_a_now_line_and_the_renewal_point() -> None:
    bars = timeline_bars(_status())
    assert [b.serial for b in bars] == ["abc123", "def456"] and bars[1].label == f"{HOSTILE} / {HOSTILE}"
    svg = str(timeline_svg(bars, NOW))
    root = ET.fromstring(svg)  # well-formed XML: every label escaped
    ns = {"s": "http://www.w3.org/2000/svg"}
    groups = root.findall("s:g", ns)
    assert [g.get("data-serial") for g in groups] == ["abc123", "def456"]
    assert "<script" not in svg and "&lt;script&gt;" in svg
    now_line = root.find("s:line[@class='now']", ns)
    assert now_line is not None
    rect = groups[0].find("s:rect", ns)
    renewal = groups[0].findall("s:line", ns)[0]
    assert rect is not None
    start, width = float(rect.get("x", 0)), float(rect.get("width", 0))
    # The renewal mark at 2/3 of the bar; "now" inside it (April 1 .. June 30, now June 1).
    assert abs(float(renewal.get("x1", 0)) - (start + width * 2 / 3)) < 1
    assert start < float(now_line.get("x1", 0)) < start + width
    assert rect.get("fill") == "#d4a017"  # past the renewal point
    assert groups[1].find("s:rect", ns).get("fill") == "#2e8b57"  # type: ignore[union-attr]
    assert "29 days left" in svg


def test_an_expired_or_near_certificate_is_red_and_no_certificate_says_so() -> None:
    start = NOW - datetime.timedelta(days=90)
    svg = str(timeline_svg([Bar("p / server", "1", start, NOW - datetime.timedelta(hours=1)),
                            Bar("q / server", "2", start, NOW + datetime.timedelta(days=3))], NOW))
    root = ET.fromstring(svg)
    fills = [r.get("fill") for r in root.iter("{http://www.w3.org/2000/svg}rect")]
    assert fills == ["#c0392b", "#c0392b"] and "expired" in svg
    assert "no active certificate" in str(timeline_svg([], NOW))


# --- served over TLS: the replica's pair, client certificates, a reload --------------------------
class _Servicer:
    """The read methods as the servicer has them: wrapped by ``rpc_method``."""

    @rpc_method(pki.Role.OPERATOR)
    async def Status(self, request: Any, context: Any, who: Any) -> Any:
        return _status()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_page_is_served_over_tls_with_the_replicas_pair_reloaded(pki_dir: Path, tmp_path: Path) -> None:
    server_dir = tmp_path / "server"
    cert, key = pki.issue(pki_dir, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=server_dir, ips=["127.0.0.1"])
    write_token(tmp_path / "token", TOKEN.decode() + "\n")
    port = _free_port()
    settings = CoordinatorSettings(name="c1", web_listen=f"127.0.0.1:{port}", web_token_file=tmp_path / "token")
    tls = ReloadingTLS(TLSFiles(pki_dir / "ca.pem", cert, key))
    runner = await StatusPage(settings).start(tls, DeniedSet(), _Servicer)
    url = f"https://127.0.0.1:{port}/"

    def client(with_cert: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
        if with_cert:
            ctx.load_cert_chain(pki_dir / f"{with_cert}.pem", pki_dir / f"{with_cert}.key")
        return ctx

    async def get(ctx: ssl.SSLContext, headers: dict[str, str] | None = None) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(url, ssl=ctx, headers=headers or {}) as response:
            return response.status, await response.text()

    async def served_serial() -> int:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client(None))
        der_bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der_bytes).serial_number

    try:
        first = await served_serial()
        status, body = await get(client("operator-alice"))
        assert status == 200 and "operator:alice" in body and "abc123" in body
        assert (await get(client(None)))[0] == 401
        assert (await get(client(None), BEARER))[0] == 200
        assert (await get(client("agent-peer1"), BEARER))[0] == 403
        # A renewed pair (the same paths) is served from the next connection on, without a restart.
        pki.issue(pki_dir, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=server_dir, ips=["127.0.0.1"])
        assert tls.reload(force=True)
        assert await served_serial() != first
        assert (await get(client("operator-alice")))[0] == 200
    finally:
        await runner.cleanup()


def test_a_bad_web_listen_or_token_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="web_listen"):
        StatusPage(CoordinatorSettings(web_listen="nowhere"))
    write_token(tmp_path / "token", "short\n")
    with pytest.raises(errors.InvalidArgument, match="at least 16"):
        StatusPage(CoordinatorSettings(web_listen="127.0.0.1:8443", web_token_file=tmp_path / "token"))
