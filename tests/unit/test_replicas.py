"""Member records of coordinator replicas, the per-slot series clean-up, and sd_notify."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from clusteracme.coordinator import metrics
from clusteracme.coordinator.replicas import LEADER, STANDBY, Replicas
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from prometheus_client import Gauge

from clusteracme import daemon, errors

KEYS = Keys("/t/")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replica(store: MemoryStore, name: str, address: str) -> Replicas:
    return Replicas(store, KEYS, name=name, address=address, version="9.9", ttl=5)


async def test_members_and_leader_come_from_the_records_and_the_election_key() -> None:
    store = MemoryStore()
    one, two = replica(store, "c1", "10.0.0.1:7443"), replica(store, "c2", "10.0.0.2:7443")
    await one.announce()
    await two.announce()
    members, leader = await one.members()
    assert leader is None and [(m.name, m.role) for m in members] == [("c1", STANDBY), ("c2", STANDBY)]
    assert (await two.leader()).name is None

    await store.put_if(KEYS.leader(), b"c2", expect_mod_revision=0)  # c2 wins the election...
    view = await one.leader()
    assert (view.name, view.address) == ("c2", "10.0.0.2:7443")
    members, leader = await one.members()
    assert leader == "c2" and [(m.name, m.role) for m in members] == [("c1", STANDBY), ("c2", LEADER)]
    assert members[1].role_since == members[1].started_at  # ...its record not rewritten yet

    await two.became_leader()
    members, _ = await one.members()
    assert members[1].role == LEADER and members[1].version == "9.9"


async def test_a_second_replica_with_the_same_name_elsewhere_is_refused() -> None:
    store = MemoryStore()
    await replica(store, "c1", "10.0.0.1:7443").announce()
    with pytest.raises(errors.FailedPrecondition, match="another coordinator named 'c1' is running at 10.0.0.1:7443"):
        await replica(store, "c1", "10.0.0.9:7443").announce()
    # The same address is this replica's own previous run (killed within the TTL): taken over.
    again = replica(store, "c1", "10.0.0.1:7443")
    await again.announce()
    members, _ = await again.members()
    assert [m.address for m in members] == ["10.0.0.1:7443"]


async def test_a_record_goes_with_its_lease_and_withdraw() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    one, two = replica(store, "c1", "a:1"), replica(store, "c2", "b:1")
    await one.announce()
    await two.announce()
    await two.withdraw()
    assert [m.name for m in (await one.members())[0]] == ["c1"]
    clock.now += 6  # c1's process died: nothing renews its lease
    store.expire_leases()
    assert (await two.members())[0] == []
    # A leader whose record is gone is still named, without an address.
    await store.put_if(KEYS.leader(), b"c1", expect_mod_revision=0)
    view = await two.leader()
    assert (view.name, view.address) == ("c1", "")


def test_forget_slots_removes_only_the_series_not_kept() -> None:
    for gauge in metrics.SLOT_GAUGES:
        gauge.labels(peer="px", domain="server").set(1)
        gauge.labels(peer="px", domain="a.example").set(1)
        gauge.labels(peer="gone", domain="server").set(1)
    removed = metrics.forget_slots({("px", "server")})
    assert removed == 2 * len(metrics.SLOT_GAUGES)

    def labelled(gauge: Gauge) -> set[tuple[str, str]]:
        return {(s.labels["peer"], s.labels["domain"]) for m in gauge.collect() for s in m.samples}

    for gauge in metrics.SLOT_GAUGES:
        assert ("px", "server") in labelled(gauge)
        assert not labelled(gauge) & {("px", "a.example"), ("gone", "server")}
    metrics.forget_slots(set())


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_one_datagram_to_the_notify_socket(tmp_path: Path, monkeypatch: Any, abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        if abstract:
            name = f"clusteracme-test-{tmp_path.name}"
            listener.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            path = tmp_path / "notify"
            listener.bind(str(path))
            monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert daemon.notify(READY="1", STATUS="standby")
        assert listener.recv(4096) == b"READY=1\nSTATUS=standby"


def test_notify_without_systemd_does_nothing(monkeypatch: Any, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon.notify(READY="1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert daemon.notify(READY="1") is False  # logged, never raised
