"""The alarm webhook: a JSON POST to ``alarms.webhook_url`` for every event of
an alarm (raised, updated, cleared).

The alarm job hands each :class:`~clusteracme.coordinator.alarms.Notification` over
(:meth:`WebhookNotifier.notify` never waits) and is told when the notifier is
done with it; the job then records it in the alarm's record (``notified``),
so what is not delivered yet is handed over again by the next evaluation or
by the next leader: delivery is **at least once**, and every POST of the same
event carries the same ``id``.

The notifications of one alarm go out in order, one at a time (a "cleared"
never overtakes its "raised"); different alarms go out independently, at
most ``webhook_concurrency`` POSTs at once. A POST fails on a network error,
``webhook_timeout`` (counted from when the POST starts, not while it waits
for a free sender) or any answer but 2xx; it is tried again after
``webhook_backoff_base`` seconds, doubling up to ``webhook_backoff_cap``,
each wait drawn at random between half and all of that (jitter: many alarms
failing together do not retry together), at most ``webhook_max_attempts``
times, then logged and dropped (recorded as such: not tried again).

Body (``alarm`` as ``acmectl --json alarms`` shows it: ``slot`` is absent for
an alarm of the peer itself, ``{"domain": ""}`` for the server slot)::

    {"id": "<kind>/<peer>/<slot>@<raised_at>/<event>[@<updated_at>]",
     "event": "raised" | "updated" | "cleared",
     "alarm": {"kind", "peer_id", ["slot": {"domain"}], "severity", "detail", "raised_at", "cleared_at",
               "active"},
     "cluster": "<etcd prefix>", "coordinator": "<name>", "sent_at": "<RFC 3339>"}

The URL is never logged whole: its user info and query are left out of
every message, aiohttp's error messages included.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import yarl
from clusteracme.coordinator import renewal
from clusteracme.coordinator.alarms import AlarmId, AlarmRecord, Notification, describe
from clusteracme.coordinator.metrics import ALARM_WEBHOOK_POSTS
from clusteracme.coordinator.settings import AlarmSettings

from clusteracme import errors

log = logging.getLogger(__name__)
MAX_QUEUED = 10000
"""Notifications waiting at once; past it ``notify`` refuses (the job offers
them again later): a receiver down for days must not grow the leader's
memory without bound."""

Done = Callable[[Notification, str], None]


def tls_context(settings: AlarmSettings) -> ssl.SSLContext:
    """Verified TLS for an https webhook: ``webhook_ca`` or the system's CAs."""
    try:
        return ssl.create_default_context(cafile=str(settings.webhook_ca) if settings.webhook_ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise errors.InvalidArgument(f"alarms.webhook_ca {settings.webhook_ca}: cannot be loaded ({exc})") from exc


def webhook_url(settings: AlarmSettings) -> yarl.URL:
    """The parsed URL; InvalidArgument (without the URL) when it is not usable."""
    if not settings.webhook_url:
        raise errors.InvalidArgument("alarms.webhook_url is not set")
    try:
        settings.webhook_target()
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc)) from None
    return yarl.URL(settings.webhook_url)


def safe_url(url: yarl.URL) -> str:
    """The URL as logs may show it: no user info, no query, no fragment."""
    bare = url.with_user(None).with_query(None).with_fragment(None)
    return str(bare) + ("?***" if url.raw_query_string else "")


class Redactor:
    """Removes the URL's secrets from a text (an exception's message)."""

    def __init__(self, url: yarl.URL) -> None:
        self._safe = safe_url(url)
        forms = {str(url), url.human_repr(), str(url.with_fragment(None)), url.with_fragment(None).human_repr()}
        self._urls = sorted((f for f in forms if f), key=len, reverse=True)
        secrets = [url.raw_user, url.user, url.raw_password, url.password, url.raw_query_string, url.query_string,
                   url.raw_fragment, url.fragment]
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self._urls:
            text = text.replace(form, self._safe)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def alarm_json(record: AlarmRecord) -> dict[str, Any]:
    """The alarm as the API's JSON shows it (``acmectl --json alarms``)."""
    out: dict[str, Any] = {"kind": record.kind, "peer_id": record.peer_id}
    if record.domain is not None:
        out["slot"] = {"domain": record.domain}
    out.update(severity=record.severity, detail=record.detail, raised_at=record.raised_at,
               cleared_at=record.cleared_at, active=record.active)
    return out


class WebhookNotifier:
    def __init__(self, settings: AlarmSettings, *, cluster: str, coordinator: str,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, max_queued: int = MAX_QUEUED,
                 jitter: Callable[[], float] = random.random) -> None:
        """Checks the URL and builds the TLS context at once (InvalidArgument):
        the coordinator does so before it campaigns for leadership."""
        self._url = webhook_url(settings)
        self._redact = Redactor(self._url)
        self._tls = tls_context(settings)
        self._settings = settings
        self._cluster = cluster
        self._coordinator = coordinator
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter
        self._max_queued = max_queued
        self._senders = asyncio.Semaphore(settings.webhook_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._queues: dict[AlarmId, collections.deque[tuple[Notification, Done | None]]] = {}
        self._workers: dict[AlarmId, asyncio.Task[None]] = {}
        self._queued = 0
        self._closed = False

    @property
    def url(self) -> str:
        """The URL as logs show it."""
        return safe_url(self._url)

    @property
    def queued(self) -> int:
        """Notifications not done with yet."""
        return self._queued

    def notify(self, note: Notification, done: Done | None = None) -> bool:
        """Queue a notification (never waits); False when closed or full."""
        if self._closed:
            return False
        if self._queued >= self._max_queued:
            return False
        alarm = note.alarm
        self._queues.setdefault(alarm, collections.deque()).append((note, done))
        self._queued += 1
        if alarm not in self._workers:
            self._workers[alarm] = asyncio.create_task(self._drain(alarm), name=f"alarm-webhook {describe(alarm)}")
        return True

    async def _drain(self, alarm: AlarmId) -> None:
        queue = self._queues[alarm]
        try:
            while queue:
                note, done = queue[0]
                result = await self._deliver(note)
                queue.popleft()
                self._queued -= 1
                self._finish(note, done, result)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("alarm webhook: the worker of %s failed; its %d notification(s) are offered again later",
                          describe(alarm), len(queue))
        finally:
            # Whatever is left was not delivered: hand it back (the job offers it again).
            left = list(queue)
            queue.clear()
            self._queued -= len(left)
            del self._workers[alarm]
            del self._queues[alarm]
            for note, done in left:
                self._finish(note, done, "abandoned")

    @staticmethod
    def _finish(note: Notification, done: Done | None, result: str) -> None:
        if done is None:
            return
        try:
            done(note, result)
        except Exception:
            log.exception("alarm webhook: recording the %s of %s failed", result, note.id)

    def _body(self, note: Notification) -> dict[str, Any]:
        return {"id": note.id, "event": note.event, "alarm": alarm_json(note.record), "cluster": self._cluster,
                "coordinator": self._coordinator,
                "sent_at": self._clock().astimezone(datetime.UTC).isoformat(timespec="milliseconds")}

    async def _deliver(self, note: Notification) -> str:
        """POST until a 2xx answer (``delivered``) or ``webhook_max_attempts``
        failures (``dropped``)."""
        s = self._settings
        what = f"{note.event} {describe(note.alarm)}"
        error = ""
        for attempt in range(1, s.webhook_max_attempts + 1):
            error = await self._post(self._body(note))
            if not error:
                ALARM_WEBHOOK_POSTS.labels(result="delivered").inc()
                log.debug("alarm webhook: %s delivered (attempt %d)", what, attempt)
                return "delivered"
            ALARM_WEBHOOK_POSTS.labels(result="failed").inc()
            if attempt == s.webhook_max_attempts:
                break
            wait = self.backoff(attempt)
            log.warning("alarm webhook: %s not delivered to %s (%s); attempt %d of %d, next in %.1fs", what,
                        self.url, error, attempt, s.webhook_max_attempts, wait)
            await self._sleep(wait)
        ALARM_WEBHOOK_POSTS.labels(result="dropped").inc()
        log.error("alarm webhook: %s dropped after %d failed attempts (last: %s)", what, s.webhook_max_attempts,
                  error)
        return "dropped"

    def backoff(self, attempt: int) -> float:
        """The wait after ``attempt`` failures: the doubling backoff, drawn
        between half and all of it."""
        s = self._settings
        full = renewal.backoff(attempt, base_seconds=s.webhook_backoff_base, cap_seconds=s.webhook_backoff_cap)
        return full * (0.5 + 0.5 * self._jitter())

    async def _post(self, body: dict[str, Any]) -> str:
        """One POST; "" when delivered, else why not (redacted)."""
        try:
            async with self._senders:
                # The timeout starts once a sender is free: queueing behind a burst is not a failure.
                async with asyncio.timeout(self._settings.webhook_timeout):
                    async with self._client().post(self._url, json=body, allow_redirects=False) as response:
                        if 200 <= response.status < 300:
                            return ""
                        return f"HTTP {response.status} {response.reason or ''}".rstrip()
        except TimeoutError:
            return f"no answer within {self._settings.webhook_timeout:g}s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return self._redact(f"{exc.__class__.__name__}: {exc}".rstrip(": "))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            concurrency = self._settings.webhook_concurrency
            self._session = aiohttp.ClientSession(
                # As many connections as senders: a POST never waits for one.
                connector=aiohttp.TCPConnector(ssl=self._tls, limit=concurrency, limit_per_host=concurrency),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._settings.webhook_timeout,
                                              sock_read=self._settings.webhook_timeout),
                headers={"User-Agent": "clusteracme-coordinator"})
        return self._session

    async def run(self) -> None:
        """Hold the workers until cancelled (a supervised task), then close."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        self._closed = True
        workers = list(self._workers.values())
        waiting = self._queued
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if waiting:
            log.warning("alarm webhook: %d notification(s) not delivered at shutdown (the next leader sends them)",
                        waiting)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_idle(self, timeout: float) -> bool:
        """For tests and shutdown: wait until nothing is queued (False on timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._queued and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return not self._queued
