"""The alarm webhook: a JSON POST to ``alarms.webhook_url`` on every raise and clear.

The alarm loop hands each notification over (:meth:`WebhookNotifier.notify`
never waits); one worker per alarm delivers that alarm's notifications in
order, so a "cleared" never overtakes its "raised", while different alarms go
out independently. A POST fails on a network error, a timeout
(``webhook_timeout``) or any answer but 2xx; it is tried again after
``webhook_backoff_base`` seconds, doubling up to ``webhook_backoff_cap``, at
most ``webhook_max_attempts`` times, then logged and dropped. Notifications
live in the leader's memory only: a leader that stops loses the undelivered
ones (the records in etcd stay the truth).

Body::

    {"event": "raised" | "cleared",
     "alarm": {"kind", "peer_id", "domain", "severity", "detail", "raised_at", "cleared_at", "active"},
     "cluster": "<etcd prefix>", "coordinator": "<name>", "sent_at": "<RFC 3339>"}
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from clusteracme import errors
from coordinator import renewal
from coordinator.alarms import AlarmId, AlarmRecord, describe
from coordinator.metrics import ALARM_WEBHOOK_POSTS
from coordinator.settings import AlarmSettings

log = logging.getLogger(__name__)
MAX_QUEUED = 10000
"""Notifications waiting at once; past it new ones are dropped (and logged):
a receiver down for days must not grow the leader's memory without bound."""


def tls_context(settings: AlarmSettings) -> ssl.SSLContext:
    """Verified TLS for an https webhook: ``webhook_ca`` or the system's CAs."""
    try:
        return ssl.create_default_context(cafile=str(settings.webhook_ca) if settings.webhook_ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise errors.InvalidArgument(f"alarms.webhook_ca {settings.webhook_ca}: cannot be loaded ({exc})") from exc


class WebhookNotifier:
    def __init__(self, settings: AlarmSettings, *, cluster: str, coordinator: str,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, max_queued: int = MAX_QUEUED) -> None:
        if not settings.webhook_url:
            raise errors.InvalidArgument("alarms.webhook_url is not set")
        self._settings = settings
        self._cluster = cluster
        self._coordinator = coordinator
        self._clock = clock
        self._sleep = sleep
        self._max_queued = max_queued
        self._tls = tls_context(settings)
        self._session: aiohttp.ClientSession | None = None
        self._queues: dict[AlarmId, collections.deque[dict[str, Any]]] = {}
        self._workers: dict[AlarmId, asyncio.Task[None]] = {}
        self._queued = 0
        self._closed = False

    @property
    def queued(self) -> int:
        """Notifications not delivered (nor dropped) yet."""
        return self._queued

    def notify(self, event: str, record: AlarmRecord) -> None:
        """Queue a notification; never waits."""
        if self._closed:
            return
        if self._queued >= self._max_queued:
            ALARM_WEBHOOK_POSTS.labels(result="dropped").inc()
            log.error("alarm webhook: %d notifications already wait; dropping %s %s", self._queued, event,
                      describe(record.id))
            return
        payload = {"event": event, "alarm": record.to_json(), "cluster": self._cluster,
                   "coordinator": self._coordinator}
        self._queues.setdefault(record.id, collections.deque()).append(payload)
        self._queued += 1
        if record.id not in self._workers:
            self._workers[record.id] = asyncio.create_task(self._drain(record.id),
                                                           name=f"alarm-webhook {describe(record.id)}")

    async def _drain(self, alarm: AlarmId) -> None:
        queue = self._queues[alarm]
        try:
            while queue:
                await self._deliver(alarm, queue[0])
                queue.popleft()
                self._queued -= 1
        finally:
            del self._workers[alarm]
            if not queue:
                del self._queues[alarm]

    async def _deliver(self, alarm: AlarmId, payload: dict[str, Any]) -> bool:
        """POST until a 2xx answer or ``webhook_max_attempts`` failures."""
        s = self._settings
        what = f"{payload['event']} {describe(alarm)}"
        error = ""
        for attempt in range(1, s.webhook_max_attempts + 1):
            body = {**payload, "sent_at": self._clock().astimezone(datetime.UTC).isoformat(timespec="milliseconds")}
            try:
                async with self._client().post(s.webhook_url, json=body, allow_redirects=False) as response:
                    if 200 <= response.status < 300:
                        ALARM_WEBHOOK_POSTS.labels(result="delivered").inc()
                        log.debug("alarm webhook: %s delivered (attempt %d)", what, attempt)
                        return True
                    error = f"HTTP {response.status} {response.reason or ''}".rstrip()
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                error = f"{exc.__class__.__name__}: {exc}".rstrip(": ")
            ALARM_WEBHOOK_POSTS.labels(result="failed").inc()
            if attempt == s.webhook_max_attempts:
                break
            wait = renewal.backoff(attempt, base_seconds=s.webhook_backoff_base, cap_seconds=s.webhook_backoff_cap)
            log.warning("alarm webhook: %s not delivered (%s); attempt %d of %d, next in %.1fs", what, error,
                        attempt, s.webhook_max_attempts, wait)
            await self._sleep(wait)
        ALARM_WEBHOOK_POSTS.labels(result="dropped").inc()
        log.error("alarm webhook: %s dropped after %d failed attempts (last: %s)", what, s.webhook_max_attempts,
                  error)
        return False

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls),
                timeout=aiohttp.ClientTimeout(total=self._settings.webhook_timeout),
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
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if self._queued:
            log.warning("alarm webhook: %d notification(s) not delivered at shutdown", self._queued)
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
