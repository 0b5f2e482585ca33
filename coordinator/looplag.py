"""The coordinator's event-loop lag: how late its loop runs a timer.

Everything the leader does (orders, RPCs, etcd calls) shares one event loop.
A timer due every ``interval`` seconds measures how late it fires: the time
any ready work waited on top of its own, because something held the loop (a
blocking call, a CPU burst, too much ready work). Every sample goes to the
``clusteracme_event_loop_lag_seconds`` histogram. A lag past the warning
threshold logs one line, at most one per ``warn_every`` seconds; the lines
held back meanwhile are counted in the next one, with the worst of them, so a
storm does not flood the log.

Lag does not cost the leadership (its lease keep-alive has a thread of its
own, see ``election``), but it delays everything else: it is the number to
watch when the leader is slow. Only a loop that stands still for
``timing.leader_stuck_seconds`` (a stuck process, not a busy one) gives the
leadership up, so that a standby takes over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from clusteracme.coordinator import metrics

_log = logging.getLogger(__name__)


class LoopLagMonitor:
    """Measure the running loop's lag every ``interval`` seconds (run it as
    a supervised task); warn past ``warn_after`` seconds, at most once per
    ``warn_every`` seconds. ``observe`` receives every sample; ``clock`` is
    monotonic, in seconds."""

    def __init__(
        self,
        *,
        interval: float = 0.1,
        warn_after: float = 0.5,
        warn_every: float = 30.0,
        observe: Callable[[float], None] = metrics.LOOP_LAG.observe,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0 or warn_after <= 0 or warn_every < 0:
            raise ValueError("loop lag interval and warning threshold must be positive")
        self._interval = interval
        self._warn_after = warn_after
        self._warn_every = warn_every
        self._observe = observe
        self._clock = clock
        self._next_warning = float("-inf")
        self._held_back = 0
        self._worst_held_back = 0.0

    async def run(self) -> None:
        """Sample forever (until cancelled)."""
        while True:
            due = self._clock() + self._interval
            await asyncio.sleep(self._interval)
            self.record(self._clock() - due)

    def record(self, lag: float) -> None:
        """Account one sample: the metric, and a warning when it is due."""
        lag = max(0.0, lag)
        self._observe(lag)
        if lag < self._warn_after:
            return
        now = self._clock()
        if now < self._next_warning:
            self._held_back += 1
            self._worst_held_back = max(self._worst_held_back, lag)
            return
        more = ""
        if self._held_back:
            more = (f"; {self._held_back} more lag(s) past it since the last warning, "
                    f"the worst {self._worst_held_back:.2f} s")
        _log.warning("event loop ran %.2f s late (warning past %.2f s%s): something blocks the loop or it has "
                     "more work than it can run", lag, self._warn_after, more)
        self._next_warning = now + self._warn_every
        self._held_back = 0
        self._worst_held_back = 0.0
