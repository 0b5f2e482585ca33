"""Scheduler state that replicas share: sign opportunities are drawn once and
persisted; a second coordinator instance finds the same ones."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from clusteracme.errors import FailedPrecondition, InvalidArgument
from coordinator import records
from coordinator.scheduler import RenewalScheduler
from coordinator.settings import RenewalSettings
from coordinator.store.keys import Keys
from coordinator.store.memory import MemoryStore

NOW = datetime.datetime(2026, 3, 28, 22, 30, tzinfo=datetime.UTC)  # the evening before Paris springs forward


class Counter:
    """A deterministic stand-in for secrets.randbelow, different per instance."""

    def __init__(self, seed: int) -> None:
        self.n = seed

    def __call__(self, bound: int) -> int:
        self.n = (self.n * 1103515245 + 12345) % (2**31)
        return self.n % bound


class Peers:
    async def get(self, peer_id: str) -> Any:
        return None


def scheduler(store: MemoryStore, seed: int) -> RenewalScheduler:
    return RenewalScheduler(store, Keys("/t/"), Peers(), None, None, None, RenewalSettings(), "coordinator:c",  # type: ignore[arg-type]
                            clock=lambda: NOW, randbelow=Counter(seed))


async def test_opportunities_are_drawn_once_and_shared() -> None:
    store = MemoryStore()
    first, second = scheduler(store, 1), scheduler(store, 99)
    schedule = {"tz": "Europe/Paris"}
    start, end = first._period(schedule, NOW)
    assert (start, end) == (datetime.datetime(2026, 3, 28, 23, 0, tzinfo=datetime.UTC) - datetime.timedelta(days=1),
                            datetime.datetime(2026, 3, 28, 23, 0, tzinfo=datetime.UTC))
    drawn = await first._opportunities("p1", start, end)
    again = await second._opportunities("p1", start, end)
    assert drawn == again and len(drawn) == 2 and drawn[0] != drawn[1]
    assert all(start <= t < end for t in drawn)
    # The next local day is 23 hours long (DST): its opportunities lie inside it.
    next_start, next_end = first._period(schedule, end)
    assert next_end - next_start == datetime.timedelta(hours=23)
    assert all(next_start <= t < next_end for t in await second._opportunities("p1", next_start, next_end))


async def test_schedule_settings_are_validated_and_need_a_csr() -> None:
    store = MemoryStore()
    keys = Keys("/t/")
    s = scheduler(store, 1)
    with pytest.raises(FailedPrecondition, match="no CSR yet"):
        await s.set_schedule("p1", "", {"auto": True})
    await store.put_if(keys.cert("p1", "server"), records.encode({"domain": "", "csr": {"names": ["a.example"]}}),
                       expect_mod_revision=0)
    for bad in ({"days": "funday"}, {"time": "25:00"}, {"tz": "Mars/Base"}, {"key_policy": "never"}):
        with pytest.raises(InvalidArgument):
            await s.set_schedule("p1", "", bad)
    slot = await s.set_schedule("p1", "", {"auto": True, "days": "weekdays", "time": "03:30", "tz": "Europe/Paris"})
    assert slot["schedule"] == {"auto": True, "days": "mon,tue,wed,thu,fri", "time": "03:30", "tz": "Europe/Paris",
                                "key_policy": "rotate"}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def discard_pending(self, peer_id: str, domain: str, who: str = "") -> None:
        self.calls.append(("discard", peer_id, domain, who))

    async def deploy(self, peer_id: str, domain: str, who: str) -> Any:
        self.calls.append(("deploy", peer_id, domain, who))
        raise AssertionError("must not deploy an expired certificate")


async def test_an_automatic_certificate_that_expired_before_its_slot_is_discarded_not_deployed() -> None:
    recorder = Recorder()
    s = RenewalScheduler(MemoryStore(), Keys("/t/"), Peers(), None, recorder, recorder,  # type: ignore[arg-type]
                         RenewalSettings(), "coordinator:c", clock=lambda: NOW)
    pending = {"serial_hex": "ab", "signed_at": (NOW - datetime.timedelta(hours=2)).isoformat(),
               "not_after": (NOW - datetime.timedelta(seconds=1)).isoformat(), "auto": True}
    schedule = {"auto": True, "days": "all", "time": "now", "tz": "UTC", "key_policy": "rotate"}
    await s._deploy_if_slot("p1", "", schedule, pending, {}, NOW)
    assert recorder.calls == [("discard", "p1", "", "coordinator:c")]
