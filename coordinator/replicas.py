"""The coordinator replicas of a cluster: which run, where, which one leads.

Every replica, leader or standby, keeps a member record
``coordinators/<name>`` (address, version, role, since when) attached to a
lease of its own, renewed every third of ``timing.leader_ttl`` on the main
loop: a replica that dies leaves the list within that TTL. The record is
information, not authority: who leads is the election key alone
(``election``); a record saying "leader" is written after the election is won
and its lease outlives nothing.

A standby uses it to tell a client where the leader is (the leader key holds
the leader's *name*; its record holds the address), and ``acmectl
coordinators`` lists it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from dataclasses import dataclass
from typing import Any

from clusteracme.coordinator import records
from clusteracme.coordinator.store.base import LeaseLost, Store, StoreUnavailable
from clusteracme.coordinator.store.keys import Keys

from clusteracme import errors

log = logging.getLogger(__name__)

LEADER, STANDBY = "leader", "standby"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Member:
    """One replica as its record (and the leader key) show it."""

    name: str
    address: str
    version: str
    started_at: str
    role: str
    role_since: str

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Member:
        return cls(str(data.get("name", "")), str(data.get("address", "")), str(data.get("version", "")),
                   str(data.get("started_at", "")), str(data.get("role", STANDBY)), str(data.get("role_since", "")))


@dataclass(frozen=True)
class LeaderView:
    """Who leads now: its name (None while nobody does) and its advertised
    address ("" when its record is missing, e.g. it is just starting)."""

    name: str | None
    address: str = ""


class Replicas:
    """This replica's member record, and the reads of everybody's."""

    def __init__(self, store: Store, keys: Keys, *, name: str, address: str, version: str, ttl: int) -> None:
        self._store = store
        self._keys = keys
        self._ttl = ttl
        started = _now()
        self._record = {"name": name, "address": address, "version": version, "started_at": started,
                        "role": STANDBY, "role_since": started}
        self._lease = 0
        self._writing = asyncio.Lock()  # run() and became_leader() may both (re)grant: one lease at a time

    @property
    def name(self) -> str:
        return str(self._record["name"])

    async def announce(self) -> None:
        """Write this replica's record. A live record of the same name at
        another address is another running replica with this name: refused
        (two replicas with one name could not be told apart, by the
        election either). One at this address is this replica's previous
        run (killed within the TTL): replaced."""
        delay = 0.2
        while True:  # etcd may be forming its quorum as the replicas start
            try:
                entry = await self._store.get(self._keys.coordinator(self.name))
                break
            except StoreUnavailable as exc:
                log.warning("coordinator %s: etcd not reachable yet (%s); retrying in %.1f s", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)
        try:
            other = Member.from_record(records.peek(entry.value, entry.key)) if entry is not None else None
        except ValueError:
            other = None  # unreadable: replaced by ours
        if other is not None:
            if other.address != self._record["address"]:
                raise errors.FailedPrecondition(
                    f"another coordinator named {self.name!r} is running at {other.address} (since "
                    f"{other.started_at}): give every replica a name of its own (setting name)")
        while True:
            try:
                await self._write()
                return
            except (StoreUnavailable, LeaseLost) as exc:
                log.warning("coordinator %s: cannot write its member record yet (%s); retrying", self.name, exc)
                await asyncio.sleep(1.0)

    async def became_leader(self) -> None:
        self._record = {**self._record, "role": LEADER, "role_since": _now()}
        await self._write()

    async def became_standby(self) -> None:
        """The term ended without the process ending (a restore: ``term``)."""
        self._record = {**self._record, "role": STANDBY, "role_since": _now()}
        await self._write()

    async def _write(self) -> None:
        async with self._writing:
            if not self._lease:
                self._lease = await self._store.grant_lease(self._ttl)
            try:
                await self._store.put_if(self._keys.coordinator(self.name), records.encode(self._record),
                                         expect_mod_revision=None, lease=self._lease)
            except LeaseLost:
                self._lease = 0
                raise

    async def run(self) -> None:
        """Keep the record's lease alive; write it again once it was lost
        (etcd unreachable for a whole TTL). Never ends by itself."""
        unreachable_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                if self._lease:
                    try:
                        await self._store.keepalive_once(self._lease)
                    except LeaseLost:
                        self._lease = 0
                if not self._lease:
                    await self._write()
                unreachable_since = None
            except (StoreUnavailable, LeaseLost) as exc:
                if unreachable_since is None:
                    unreachable_since = loop.time()
                    log.warning("coordinator %s: cannot renew its member record (%s); retrying", self.name, exc)

    async def withdraw(self) -> None:
        """Delete the record now (by revoking its lease), at a clean stop."""
        lease, self._lease = self._lease, 0
        if lease:
            with contextlib.suppress(StoreUnavailable, LeaseLost):
                await self._store.revoke_lease(lease)

    async def leader(self) -> LeaderView:
        entry = await self._store.get(self._keys.leader())
        if entry is None:
            return LeaderView(None)
        name = entry.value.decode(errors="replace")
        record = await self._store.get(self._keys.coordinator(name)) if name else None
        try:
            address = Member.from_record(records.peek(record.value, record.key)).address if record is not None else ""
        except ValueError:
            address = ""
        return LeaderView(name, address)

    async def members(self) -> tuple[list[Member], str | None]:
        """Every replica with a record (sorted by name, the role as the
        leader key says) and the leader's name."""
        leader = await self._store.get(self._keys.leader())
        leader_name = leader.value.decode(errors="replace") if leader is not None else None
        members = []
        for entry in await self._store.range(self._keys.coordinators()):
            try:
                member = Member.from_record(records.peek(entry.value, entry.key))
            except ValueError:
                log.warning("ignoring an unreadable member record %s", entry.key)
                continue
            role = LEADER if member.name == leader_name else STANDBY
            since = member.role_since if role == member.role else member.started_at
            members.append(Member(member.name, member.address, member.version, member.started_at, role, since))
        return sorted(members, key=lambda m: m.name), leader_name
