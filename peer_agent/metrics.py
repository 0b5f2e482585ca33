"""Prometheus metrics of a peer agent, and the listener that serves them at
``/metrics`` on ``metrics_listen`` (off by default).

The agent's series live in a registry of their own (``REGISTRY``), never in
prometheus_client's global one. Who moves what:

- the challenge server counts the tokens it answers (``TOKENS_SERVED``);
- the port-80 front counts every request by what it did with it
  (``FRONT_REQUESTS``); in ``external`` mode, where the node's web server
  forwards the outside world's challenge requests, the challenge server does;
- the deployer counts each reload target's result after every deploy and
  rollback (``RELOADS``) and keeps the expiry of what each TLS endpoint
  serves, per SNI name (``CERTIFICATE_NOT_AFTER``).

Every label value comes from the configuration or from a closed set, never
from a request (no Host header, no path): the number of series is bounded by
the configuration.

The listener is the agent's own bounded kind (``Listener``): at most
``METRICS_MAX_CONNECTIONS`` connections at once, the next ones reset on
arrival, an idle one closed after ``IDLE_TIMEOUT``. Like the other listeners
it loads aiohttp only when it starts.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING

from clusteracme.peer_agent.listening import METRICS_MAX_CONNECTIONS, Bounds

from clusteracme import __version__, netaddr

if TYPE_CHECKING:
    from aiohttp import web

IDLE_TIMEOUT = 30.0
"""Seconds a scraper's connection may stay without a request (Prometheus keeps
one open between scrapes; past this it simply connects again)."""


class FrontOutcome(enum.Enum):
    """What the front (or, in ``external`` mode, the challenge server) did
    with a request: the ``outcome`` label of ``FRONT_REQUESTS``."""

    SERVED = "served"
    """200: the key authorization of an open token."""
    NOT_FOUND = "not_found"
    """404: no open token by that name, or (``closed`` mode, challenge
    server) a path that is not a challenge path."""
    REDIRECTED = "redirected"
    """301 to https (``redirect`` mode): every request but a GET of an open token."""
    METHOD_NOT_ALLOWED = "method_not_allowed"
    """405: another method than GET on the challenge path (``closed`` mode, challenge server)."""
    BAD_REQUEST = "bad_request"
    """400: nothing to redirect to (no usable Host header, or not an origin-form target)."""
    UNAVAILABLE = "unavailable"
    """502: the front could not reach the challenge server to forward a token request."""
    REFUSED = "refused"
    """No answer: the connection was reset on arrival, the listener being at
    its ``max_connections`` (a flood, or too low a cap)."""
    ERROR = "error"
    """Any other answer (an internal error: see the agent's log)."""


_BY_STATUS = {
    200: FrontOutcome.SERVED,
    301: FrontOutcome.REDIRECTED,
    400: FrontOutcome.BAD_REQUEST,
    404: FrontOutcome.NOT_FOUND,
    405: FrontOutcome.METHOD_NOT_ALLOWED,
    502: FrontOutcome.UNAVAILABLE,
}


class ReloadResult(enum.Enum):
    """The ``result`` label of ``RELOADS``."""

    OK = "ok"
    FAILED = "failed"


class _Metrics:
    """The registry and its families. Made on first use (:func:`_made`), not
    at import: prometheus_client brings http.server, wsgiref, urllib and email
    with it (about 1.3 MiB), which an idle agent without ``metrics_listen``
    never needs (SPEC R19's idle-agent budget)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

        # No <name>_created series beside each counter (as on the coordinator): the README lists every
        # exposed family, and a scrape of the agent shows only those.
        disable_created_metrics()
        self.REGISTRY = CollectorRegistry()
        self.TOKENS_SERVED = Counter(
            "clusteracme_agent_tokens_served_total",
            "Challenge requests the challenge server answered with an open token's key authorization",
            registry=self.REGISTRY)
        self.FRONT_REQUESTS = Counter(
            "clusteracme_agent_front_requests_total",
            "Requests to the port-80 front (in external mode: to the challenge server), by outcome: "
            "served, not_found, redirected, method_not_allowed, bad_request, unavailable, "
            "refused (reset at max_connections), error",
            ["outcome"], registry=self.REGISTRY)
        self.RELOADS = Counter(
            "clusteracme_agent_reloads_total",
            "Reload targets run after a deploy or rollback (tls <endpoint>, the hooks), by result: ok, failed",
            ["target", "result"], registry=self.REGISTRY)
        self.CERTIFICATE_NOT_AFTER = Gauge(
            "clusteracme_agent_certificate_not_after_seconds",
            "Expiry (unix time) of the certificate a TLS endpoint serves to a handshake with this "
            "SNI name (sni=\"\": without SNI or with an unknown name)",
            ["endpoint", "sni"], registry=self.REGISTRY)
        self.BUILD_INFO = Gauge("clusteracme_agent_build_info", "Always 1; the labels tell the version this agent runs",
                                ["version"], registry=self.REGISTRY)
        self.BUILD_INFO.labels(version=__version__).set(1)
        for outcome in FrontOutcome:  # every outcome exposed from the start: rate() needs the zero
            self.FRONT_REQUESTS.labels(outcome=outcome.value)


_metrics: _Metrics | None = None
_reload_targets: list[str] = []
_served: dict[tuple[str, str], float] = {}
_FAMILIES = ("REGISTRY", "TOKENS_SERVED", "FRONT_REQUESTS", "RELOADS", "CERTIFICATE_NOT_AFTER", "BUILD_INFO")


def _made() -> _Metrics:
    """The metrics, made now if they were not (with what was recorded before)."""
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
        _apply_reload_targets(_metrics)
        _apply_served(_metrics)
    return _metrics


def __getattr__(name: str) -> object:  # REGISTRY, TOKENS_SERVED, ...: made on first access
    if name in _FAMILIES:
        return getattr(_made(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def count_front_answer(status: int) -> None:
    """Count one answered request by its HTTP status."""
    _made().FRONT_REQUESTS.labels(outcome=_BY_STATUS.get(status, FrontOutcome.ERROR).value).inc()


def count_front_refused() -> None:
    """Count one connection reset on arrival at the front's cap."""
    _made().FRONT_REQUESTS.labels(outcome=FrontOutcome.REFUSED.value).inc()


def count_token_served() -> None:
    _made().TOKENS_SERVED.inc()


def expect_reload_targets(targets: list[str]) -> None:
    """Expose both results of every configured reload target at 0 (before
    the first deploy), so an increase is seen from the first one. Kept until
    the metrics are made, if they are not yet."""
    _reload_targets[:] = targets
    if _metrics is not None:
        _apply_reload_targets(_metrics)


def _apply_reload_targets(m: _Metrics) -> None:
    for target in _reload_targets:
        for result in ReloadResult:
            m.RELOADS.labels(target=target, result=result.value)


def count_reload(target: str, ok: bool) -> None:
    _made().RELOADS.labels(target=target, result=(ReloadResult.OK if ok else ReloadResult.FAILED).value).inc()


def show_served(expiry: Mapping[str, Mapping[str, float]]) -> None:
    """Make the certificate gauge exactly ``expiry``: endpoint -> SNI name
    ("" the default) -> not-after (unix time). Series of endpoints and names
    not in it (a slot no longer on disk) are removed. Kept until the metrics
    are made, if they are not yet."""
    global _served
    _served = {(endpoint, sni): value for endpoint, by_sni in expiry.items() for sni, value in by_sni.items()}
    if _metrics is not None:
        _apply_served(_metrics)


def _apply_served(m: _Metrics) -> None:
    gauge = m.CERTIFICATE_NOT_AFTER
    present = {(s.labels["endpoint"], s.labels["sni"]) for family in gauge.collect() for s in family.samples}
    for labels in present - _served.keys():
        gauge.remove(*labels)
    for (endpoint, sni), value in _served.items():
        gauge.labels(endpoint=endpoint, sni=sni).set(value)


async def _handle(request: web.BaseRequest) -> web.StreamResponse:
    from aiohttp import web  # loaded by Listener.start, which runs the handler
    from clusteracme.peer_agent.challenge_server import method_not_allowed, not_found, raw_path_only

    if raw_path_only(request) != "/metrics":
        return not_found()
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed()
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return web.Response(body=generate_latest(_made().REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


class MetricsServer:
    """``/metrics`` over plain HTTP on ``listen`` (host:port, checked as the
    coordinator's ``metrics_listen``: InvalidArgument)."""

    def __init__(self, listen: str, max_connections: int = METRICS_MAX_CONNECTIONS) -> None:
        # here, not at the top: the challenge server counts into this module
        from clusteracme.peer_agent.challenge_server import Listener

        _made()
        host, port = netaddr.split_bind(listen, "metrics_listen")
        self._listener = Listener(
            _handle, host, port, what="metrics listener",
            max_line_size=1024, max_field_size=4096, max_headers=32,
            bounds=Bounds(max_connections), idle_timeout=IDLE_TIMEOUT,
        )

    @property
    def port(self) -> int | None:
        return self._listener.port

    @property
    def listening(self) -> bool:
        return self._listener.listening

    @property
    def connections(self) -> int:
        """Connections held now."""
        return self._listener.connections

    async def start(self) -> int:
        """Listen; FrontError naming the address when it cannot."""
        return await self._listener.start()

    async def stop(self) -> None:
        await self._listener.stop()
