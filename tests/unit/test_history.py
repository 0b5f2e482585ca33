"""Event history: append in the state change's transaction, newest first, bounded."""

from __future__ import annotations

from clusteracme.coordinator import history
from clusteracme.coordinator.history import Event, History
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore


async def test_events_are_listed_newest_first_and_trimmed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(history, "MAX_EVENTS", 5)
    store, keys = MemoryStore(), Keys("/t/")
    log = History(store, keys, clock_ns=lambda: 1000)  # a stuck clock: keys must still be unique and ordered
    for i in range(8):
        await store.txn(checks=[], ops=[log.put(Event(at=str(i), peer_id="p1", domain="", who="operator:a",
                                                       what="deploy", result="ok", serial_hex=f"{i:x}"))])
        await log.trim("p1")
    listed = await log.list("p1")
    assert [e.serial_hex for _, e in listed] == ["7", "6", "5", "4", "3"]
    assert [e.serial_hex for _, e in await log.list("p1", limit=2)] == ["7", "6"]
    assert await log.list("p2") == []
