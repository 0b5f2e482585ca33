"""The status page's HTTP side: the pages (server-rendered Jinja2, autoescaped,
no script), the access check in front of them, the login form and the
headers every answer carries.

The data comes from the coordinator's read methods (``Reads``: Status,
ListOrders, GetOrder, ListEvents, ListAlarms), the answers acmectl gets;
nothing here writes. GET and HEAD only, but for the login form's POST (which
sets a cookie and changes no cluster state) and logout's."""

from __future__ import annotations

import asyncio
import datetime
import importlib.resources
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol

import jinja2
from aiohttp import web
from clusteracme.coordinator.web import auth
from clusteracme.coordinator.web.svg import Bar, timeline_svg

from clusteracme import certinfo, errors
from clusteracme.rpcutil import DenyList
from clusteracme.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)
UTC = datetime.UTC
ORDERS_SHOWN = 100
EVENTS_SHOWN = 100
INDEX_REFRESH = 30
ORDER_REFRESH = 2
MAX_NEXT = 2000
STATUS_CACHE_SECONDS = 5.0
"""A Status answer (a fan-out to every live agent) serves the pages that show it for this long."""
MAX_RENDERS = 4
"""Pages answered at once; one more is told 503 with Retry-After (the status page must not load the coordinator)."""
BUSY_RETRY_AFTER = 5

CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                           "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # not no-referrer: the login POST would carry "Origin: null"
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
PUBLIC = frozenset({"/healthz", "/login", "/logout", "/static/style.css"})
"""Paths served without credentials (the login form needs its stylesheet)."""
_visitor: ContextVar[auth.Visitor | None] = ContextVar("web_visitor", default=None)
"""Who the request being answered is from (set by the access check; each request runs in a task of its own)."""
POSTS = frozenset({"/login", "/logout"})
"""The only paths that take a POST; neither changes cluster state."""


class Reads(Protocol):
    """The coordinator's read methods: ``await reads("Status", pb.StatusRequest())``
    gives the answer acmectl gets; errors are our ``ClusterAcmeError``s
    (NotFound for an unknown peer or order, InvalidArgument for a bad id)."""

    def __call__(self, method: str, request: Any) -> Awaitable[Any]: ...


# --- times as the tables show them ----------------------------------------------------------
def days_left(not_after: str, now: datetime.datetime) -> int | None:
    """Whole days until ``not_after`` (0 once expired); None without a certificate."""
    end = certinfo.iso_time(not_after) if not_after else None
    return None if end is None else max(0, int((end - now).total_seconds() // 86400))


def days_class(slot: Any, now: datetime.datetime) -> str:
    """CSS class of a slot's days left: "bad" within a week, "warn" past 2/3
    of the lifetime (the rule of ``acmectl status``: ``certinfo.two_thirds_point``)."""
    days = days_left(slot.active_not_after, now)
    if days is None:
        return ""
    if days < 7:
        return "bad"
    point = certinfo.two_thirds_point(slot.active_not_before, slot.active_not_after, slot.schedule.renewal_due_at,
                                      slot.schedule.renewal_reason)
    return "warn" if point is not None and now >= point else "ok"


class SharedStatus:
    """The whole-cluster Status answer for ``/``, ``/timeline`` and the peer
    pages: kept ``ttl`` seconds (from when it was asked for), and asked for
    once however many pages want it meanwhile (they share the call in
    flight). A failed call is not kept: the next page asks again. A page
    that goes away does not cancel the call the others wait for."""

    def __init__(self, reads: Reads, *, ttl: float = STATUS_CACHE_SECONDS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._reads = reads
        self._ttl = ttl
        self._monotonic = monotonic
        self._answer: Any = None
        self._asked_at = 0.0
        self._pending: asyncio.Future[Any] | None = None

    async def get(self) -> Any:
        if self._answer is not None and self._monotonic() - self._asked_at < self._ttl:
            return self._answer
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._ask())
            self._pending.add_done_callback(_retrieve)
        return await asyncio.shield(self._pending)

    async def _ask(self) -> Any:
        asked_at = self._monotonic()
        try:
            answer = await self._reads("Status", pb.StatusRequest())
        finally:
            self._pending = None
        self._answer, self._asked_at = answer, asked_at
        return answer


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark the shared call's error seen (every page waiting for it may have gone)."""
    if not future.cancelled():
        future.exception()


class Clock(Protocol):
    def __call__(self) -> datetime.datetime: ...


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


# --- the site -------------------------------------------------------------------------------
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("clusteracme.coordinator.web", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env


class Site:
    """The pages of one replica. ``token`` gives the bearer token in force
    (None: no token file); ``client_der`` the verified client certificate of
    a request (None without one)."""

    def __init__(self, reads: Reads, *, replica: str, token: Callable[[], bytes | None],
                 deny_list: DenyList | None, client_der: Callable[[web.Request], bytes | None],
                 fraction: float = 2 / 3, clock: Clock = utc_now, max_renders: int = MAX_RENDERS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._reads = reads
        self._status = SharedStatus(reads, monotonic=monotonic)
        self._max_renders = max_renders
        self._rendering = 0
        self._monotonic = monotonic
        self._login_failures = auth.LoginFailures()
        self._replica = replica
        self._token = token
        self._deny_list = deny_list
        self._client_der = client_der
        self._fraction = fraction
        self._clock = clock
        self._env = _environment()
        self._css = importlib.resources.files("clusteracme.coordinator.web").joinpath("static/style.css").read_bytes()

    @property
    def rendering(self) -> int:
        """Pages being answered now (at most ``max_renders``)."""
        return self._rendering

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=8192)
        app.on_response_prepare.append(_security_headers)
        app.router.add_get("/", self.index)
        app.router.add_get("/peers/{peer_id}", self.peer)
        app.router.add_get("/orders", self.orders)
        app.router.add_get("/orders/{order_id}", self.order)
        app.router.add_get("/timeline", self.timeline)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/static/style.css", self.style)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        return app

    # --- rendering ---------------------------------------------------------------------------
    def render(self, template: str, *, status: int = 200, refresh: int = 0, **context: Any) -> web.Response:
        now = self._clock()
        html = self._env.get_template(template).render(
            replica=self._replica, now=now, refresh=refresh, visitor=_visitor.get(),
            days_left=lambda text: days_left(text, now), days_class=lambda s: days_class(s, now),
            ago=lambda text: (certinfo.age((now - at).total_seconds()) + " ago")
            if (at := certinfo.iso_time(text)) else (text or "-"),
            until=lambda text: ("now" if at <= now else "in " + certinfo.age((at - now).total_seconds()))
            if (at := certinfo.iso_time(text)) else (text or "-"),
            **context)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    def _error(self, request: web.Request, exc: errors.ClusterAcmeError) -> web.Response:
        status = 404 if isinstance(exc, errors.NotFound) else 400 if isinstance(exc, errors.InvalidArgument) else 503
        return self.render("error.html", status=status, title=f"{status}", message=exc.message)

    async def _read(self, method: str, request: Any) -> Any:
        return await self._reads(method, request)

    # --- access ----------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD") and not (request.method == "POST" and request.path in POSTS):
            return web.Response(status=405, text="405: the status page is read-only\n",
                                headers={"Allow": "GET, HEAD, POST" if request.path in POSTS else "GET, HEAD"})
        _visitor.set(None)  # requests on one kept-alive connection may share a task: nothing carried over
        if request.path not in PUBLIC:
            try:
                _visitor.set(auth.decide(
                    client_der=self._client_der(request), authorization=request.headers.get("Authorization", ""),
                    cookie=request.cookies.get(auth.COOKIE, ""), token=self._token(),
                    deny_list=self._deny_list, now=self._clock().timestamp()))
            except errors.PermissionDenied as exc:
                return self._refused(request, exc)
            if self._rendering >= self._max_renders:
                return web.Response(status=503, text="503: the status page is busy; try again in a few seconds\n",
                                    headers={"Retry-After": str(BUSY_RETRY_AFTER)})
            self._rendering += 1
            try:
                return await self._answer(request, handler)
            finally:
                self._rendering -= 1
        return await self._answer(request, handler)

    async def _answer(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.ClusterAcmeError as exc:
            return self._error(request, exc)

    def _refused(self, request: web.Request, exc: errors.PermissionDenied) -> web.Response:
        """403 for a client certificate that may not read; else 401 with the login form."""
        if self._client_der(request) is not None:
            return self.render("error.html", status=403, title="403", message=exc.message)
        response = self.render("login.html", status=401, message=exc.message, next=request.path_qs,
                               token_login=self._token() is not None)
        response.headers["WWW-Authenticate"] = 'Bearer realm="clusteracme"'
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def style(self, request: web.Request) -> web.Response:
        return web.Response(body=self._css, content_type="text/css", charset="utf-8")

    async def login_form(self, request: web.Request) -> web.Response:
        return self.render("login.html", message="", next=_local(request.query.get("next", "/")),
                           token_login=self._token() is not None)

    async def login(self, request: web.Request) -> web.Response:
        if _foreign(request):
            return self.render("error.html", status=403, title="403", message="a login from another site")
        address = request.remote or "?"
        wait = self._login_failures.retry_after(address, self._monotonic())
        if wait:
            return web.Response(status=429, text=f"429: too many failed logins from {address}; try again in {wait} s\n",
                                headers={"Retry-After": str(wait)})
        form = await request.post()
        given, target = str(form.get("token", "")), _local(str(form.get("next", "/")))
        token = self._token()
        if token is None or not auth.token_matches(given, token):
            message = "wrong token" if token is not None else "token access is off on this coordinator"
            earlier = self._login_failures.failed(address, self._monotonic())
            if earlier is not None:
                log.warning("status page: refused a login from %s: %s%s", address, message,
                            f" (and {earlier} more from it in the minute before, not logged one by one)"
                            if earlier else "")
            return self.render("login.html", status=401, message=message, next=target, token_login=token is not None)
        response = web.Response(status=303, headers={"Location": target})
        response.set_cookie(auth.COOKIE, auth.session_value(token, self._clock().timestamp()), max_age=auth.SESSION_SECONDS,
                            path="/", secure=True, httponly=True, samesite="Strict")
        return response

    async def logout(self, request: web.Request) -> web.Response:
        if _foreign(request):
            return self.render("error.html", status=403, title="403", message="a logout from another site")
        response = web.Response(status=303, headers={"Location": "/login"})
        response.del_cookie(auth.COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return response

    # --- pages -----------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        status = await self._status.get()
        return self.render("index.html", refresh=INDEX_REFRESH, peers=status.peers)

    async def peer(self, request: web.Request) -> web.Response:
        peer_id = request.match_info["peer_id"]
        found = [p for p in (await self._status.get()).peers if p.peer.peer_id == peer_id]
        if not found:  # added since the shared answer, or unknown (NotFound): ask for this one
            found = list((await self._read("Status", pb.StatusRequest(peer_id=peer_id))).peers)
        events = await self._read("ListEvents", pb.ListEventsRequest(peer_id=peer_id, limit=EVENTS_SHOWN))
        alarms = await self._read("ListAlarms", pb.ListAlarmsRequest(peer_id=peer_id, all=True))
        orders = await self._read("ListOrders", pb.ListOrdersRequest(peer_id=peer_id, limit=20))
        return self.render("peer.html", refresh=INDEX_REFRESH, p=found[0], events=events.events,
                           alarms=alarms.alarms, orders=orders.orders)

    async def orders(self, request: web.Request) -> web.Response:
        found = await self._read("ListOrders", pb.ListOrdersRequest(limit=ORDERS_SHOWN))
        return self.render("orders.html", refresh=INDEX_REFRESH, orders=found.orders)

    async def order(self, request: web.Request) -> web.Response:
        o = await self._read("GetOrder", pb.GetOrderRequest(order_id=request.match_info["order_id"]))
        return self.render("order.html", refresh=0 if o.done else ORDER_REFRESH, o=o)

    async def timeline(self, request: web.Request) -> web.Response:
        status = await self._status.get()
        bars = timeline_bars(status)
        return self.render("timeline.html", refresh=INDEX_REFRESH, bars=bars,
                           svg=timeline_svg(bars, self._clock(), self._fraction))


def timeline_bars(status: Any) -> list[Bar]:
    """One bar per active certificate whose lifetime the status gives."""
    bars = []
    for p in status.peers:
        for s in p.slots:
            start, end = certinfo.iso_time(s.active_not_before), certinfo.iso_time(s.active_not_after)
            if s.active_serial and start is not None and end is not None:
                bars.append(Bar(f"{p.peer.peer_id} / {s.slot.domain or 'server'}", s.active_serial, start, end,
                                href=f"/peers/{p.peer.peer_id}"))
    return bars


def _local(target: str) -> str:
    """Where a login may send the browser: a path on this site in printable
    ASCII (a Location header holds nothing else), else "/"."""
    if (not target.startswith("/") or target.startswith("//") or "\\" in target or len(target) > MAX_NEXT
            or any(not 0x21 <= ord(c) <= 0x7E for c in target)):
        return "/"
    return target


def _foreign(request: web.Request) -> bool:
    """Does the request say it comes from a page of another site (its Origin)?"""
    origin = request.headers.get("Origin")
    return origin is not None and origin != f"{request.scheme}://{request.host}"


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
