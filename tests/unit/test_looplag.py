"""The event-loop lag monitor: samples, the metric, rate-limited warnings."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest
from clusteracme.coordinator import metrics
from clusteracme.coordinator.looplag import LoopLagMonitor

pytestmark = pytest.mark.timeout(20)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "clusteracme.coordinator.looplag" and r.levelno == logging.WARNING]


async def test_a_blocked_loop_shows_as_lag_in_the_histogram(caplog: pytest.LogCaptureFixture) -> None:
    count_before = metrics.REGISTRY.get_sample_value("clusteracme_event_loop_lag_seconds_count") or 0.0
    slow_before = metrics.REGISTRY.get_sample_value("clusteracme_event_loop_lag_seconds_bucket", {"le": "0.25"}) or 0.0
    samples: list[float] = []

    def observe(lag: float) -> None:
        samples.append(lag)
        metrics.LOOP_LAG.observe(lag)

    task = asyncio.create_task(LoopLagMonitor(interval=0.05, warn_after=0.5, observe=observe).run(), name="loop-lag")
    try:
        await asyncio.sleep(0.3)
        quiet = list(samples)
        time.sleep(0.8)  # hold the loop
        await asyncio.sleep(0.2)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(quiet) >= 3 and max(quiet) < 0.25  # an idle loop runs its timers on time
    assert 0.7 <= max(samples) < 2.0  # the block, as seen by the timer due during it
    count = metrics.REGISTRY.get_sample_value("clusteracme_event_loop_lag_seconds_count")
    slow = metrics.REGISTRY.get_sample_value("clusteracme_event_loop_lag_seconds_bucket", {"le": "0.25"})
    assert count == count_before + len(samples)
    assert (count - count_before) - (slow - slow_before) >= 1  # at least one sample above 0.25 s
    [line] = warnings(caplog)  # one line for the block
    late = re.search(r"event loop ran ([0-9.]+) s late", line)
    assert late is not None and float(late[1]) >= 0.7


def test_warnings_are_rate_limited_and_count_what_they_held_back(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    samples: list[float] = []
    monitor = LoopLagMonitor(warn_after=0.5, warn_every=30, observe=samples.append, clock=clock)
    caplog.set_level(logging.WARNING, logger="clusteracme.coordinator.looplag")

    monitor.record(0.2)
    monitor.record(-0.001)  # a timer may fire a hair early: no negative lag
    assert warnings(caplog) == []
    monitor.record(0.7)
    assert len(warnings(caplog)) == 1 and "ran 0.70 s late" in warnings(caplog)[0]
    for lag in (0.6, 3.2, 0.9):  # a storm within 30 s: counted, not logged
        clock.now += 5
        monitor.record(lag)
    assert len(warnings(caplog)) == 1
    clock.now += 16  # 31 s after the first line
    monitor.record(0.55)
    assert len(warnings(caplog)) == 2
    assert "ran 0.55 s late" in warnings(caplog)[1] and "3 more lag(s)" in warnings(caplog)[1]
    assert "the worst 3.20 s" in warnings(caplog)[1]
    clock.now += 31
    monitor.record(0.6)
    assert "more lag" not in warnings(caplog)[2]  # the count starts again
    assert samples == [0.2, 0.0, 0.7, 0.6, 3.2, 0.9, 0.55, 0.6]


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LoopLagMonitor(warn_after=0)
    with pytest.raises(ValueError):
        LoopLagMonitor(interval=0)
