"""One leadership term of a coordinator replica: the tasks it runs, and how
it ends without ending the process.

A term starts when the election is won (``app``). Its tasks (the schedulers,
the alarm and retention jobs, the watch on the leadership) are spawned
through it under the process's supervisor, so a task that dies still stops
the process. Losing the leadership still ends the process (``app``): a
coordinator that might no longer lead must not act. But a restore
(``backup``) ends the term on purpose, after writing the whole state anew:

- ``pause`` stops the term's work (its tasks but the leadership watch, the
  order drivers, deploys in flight) and holds every other command at the
  router (``UNAVAILABLE``: clients try again), keeping the leadership and
  its fenced store for the restore's writes;
- ``end`` asks ``app`` to end the term: the router stops routing to this
  term, the rest of the work stops, the replica resigns (its lease revoked:
  the other replicas campaign at once) and campaigns again as a standby.
  Whoever wins starts a fresh term that reads everything from etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from clusteracme.daemon import Supervisor

log = logging.getLogger(__name__)

LEADERSHIP_WATCH = "leadership-watch"
"""The task that stops the process when the leadership is lost: kept through a pause."""
IDLE_TIMEOUTS = (5.0, 10.0)
"""How long a stop waits for revocations, then deploys, in flight to record their outcome."""


class Router(Protocol):
    def hold(self, detail: str) -> None: ...

    def block(self, detail: str) -> None: ...


class _Idle(Protocol):
    async def wait_idle(self) -> None: ...


class _Closing(Protocol):
    async def close(self) -> None: ...


class Work(Protocol):
    """The leader's parts a term stops (``app.Parts``)."""

    issuance: _Closing
    revocation: _Idle
    deployment: _Idle


class Term:
    """The term's tasks and its end (module docstring)."""

    def __init__(self, sup: Supervisor, router: Router) -> None:
        self._sup = sup
        self._router = router
        self._tasks: list[asyncio.Task[Any]] = []
        self._work: Work | None = None
        self._stopping = False
        self._work_stopped = False
        self.end_requested = asyncio.Event()
        self.ended = asyncio.Event()

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self._sup.spawn(name, self._run(coro))
        self._tasks.append(task)
        return task

    async def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        result = await coro
        if self._stopping:  # it swallowed the term's cancel: still a cancel, not a death the supervisor stops for
            raise asyncio.CancelledError
        return result

    def attach(self, work: Work) -> None:
        """The leader's parts, once built."""
        self._work = work

    def block(self, detail: str) -> None:
        """Refuse every command but a restore, for this whole term (a cut restore's marker stands)."""
        self._router.block(detail)

    async def pause(self, reason: str) -> None:
        self._router.hold(reason)
        await self._stop(keep=LEADERSHIP_WATCH)

    async def end(self) -> None:
        self.request_end()
        await self.ended.wait()

    def request_end(self) -> None:
        self.end_requested.set()

    async def close(self) -> None:
        """Stop every task of the term and its work (``app``, before it resigns)."""
        await self._stop(keep=None)

    async def _stop(self, keep: str | None) -> None:
        self._stopping = True
        tasks = [t for t in self._tasks if t.get_name() != keep and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._work is None or self._work_stopped:
            return
        self._work_stopped = True
        await self._work.issuance.close()
        for part, seconds in zip((self._work.revocation, self._work.deployment), IDLE_TIMEOUTS, strict=True):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(part.wait_idle(), timeout=seconds)
