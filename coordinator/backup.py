"""Backup and restore of the cluster's state in etcd (issue 13).

A **backup** is every key under the cluster's prefix read at one etcd
revision (``Store.range_with_revision``: one snapshot, read in pages bounded
by bytes), except the keys bound to a lease: the election key, the replicas'
member records, the peers' liveness keys. Those describe running processes,
not state; they come back by themselves. Values are copied as stored: the
account keys stay sealed under the coordinator's key file. Any replica makes
one (it is a read); the RPC streams the manifest, then the entries in
chunks of at most ``CHUNK_BYTES``.

A **restore** loads a backup into an empty prefix; the leader does it:

1. One restore at a time: a second one is refused before a byte of it is
   read. The whole backup is received and checked before anything is
   written: each entry as it arrives against the manifest
   (``clusteracme.backupformat``: key, order, counts; keys and values
   together at most ``MAX_RESTORE_BYTES``), then the digest, the record
   schema against the one this coordinator knows, no lease-bound key among
   them. A replica older than this one listed under ``coordinators/``
   refuses the restore: it would ignore the marker below, and could lead a
   half-restored cluster if the restore were cut.
2. The prefix must be empty but for keys the running processes write by
   themselves into an empty prefix (``replaceable``): lease-bound keys, the
   peers' registrations (an agent whose heartbeat finds no record registers
   again, within seconds of a wipe), the schedule draws a status read makes,
   and ``meta/schema`` (each leader raises it). The backup's copy replaces
   those, compared on their revision; any other key refuses the restore,
   named.
3. The leader's work stops (its term is paused: the schedulers, the order
   drivers; other commands wait), the prefix is checked again, and the
   marker ``meta/restoring`` is written (create-only): the backup's SHA-256,
   who, when.
4. The entries are written in transactions of at most ``TXN_OPS`` keys and
   ``TXN_BYTES`` bytes, each key create-only (or replacing a replaceable key
   at the revision it was read at, read again and retried for up to
   ``REPLACE_DEADLINE`` while an agent or a status read keeps writing it),
   through the leader's fenced store.
5. The last transaction deletes the marker and sets ``meta/fence_epoch``
   (below). Then the leader ends its term (resigns) so that a fresh term, on
   this replica or another, reads everything anew: providers, accounts,
   trust store, schedules, slots, orders.

A restore cut halfway (client gone, leader lost) leaves the marker. A leader
that finds it at the start of its term resumes nothing and runs nothing,
refuses every command but a restore (``restore_pending``), and says so in
its log; ``acmectl restore`` of the same backup continues (keys already
written with the backup's value are skipped); a different backup is refused
until the prefix is emptied again.

**The agents' leader fence.** Agents refuse a deploy from a leader whose
fencing token is below the highest they have seen (``peer_agent.deployer``).
A leader's etcd fence is its election key's revision; a restore into a new
etcd cluster starts revisions low again. So the token sent to agents is
``fence_token(epoch, revision)`` = ``epoch * 2**32 + revision``, where the
epoch (``meta/fence_epoch``, 0 when absent) is set by every restore to the
seconds since 2025-01-01 UTC, and at least one more than the backup's, than
the prefix's, and than the epoch of the highest fence each live agent
reports (asked for up to ``AGENT_FENCE_TIMEOUT``). So a leader after a
restore outranks every leader the backup, the etcd and the agents that
answered had seen, whatever the new etcd's revisions, without touching the
agents; an agent that did not answer (named in the log) and saw a higher
epoch (a restore by a replica whose clock ran ahead) refuses this leader's
deploys until a restore asks it. Measured: advancing etcd's
revision instead costs one transaction per revision (about 6,500 per second
on a local etcd), so minutes to hours for a cluster that has run for years.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from clusteracme.coordinator import records
from clusteracme.coordinator.peers import AgentPool, PeerInfo, Registry, newer_release
from clusteracme.coordinator.replicas import Member
from clusteracme.coordinator.store.base import Check, Conflict, Delete, Entry, Op, Put, Store
from clusteracme.coordinator.store.keys import Keys

from clusteracme import errors
from clusteracme.backupformat import FORMAT, Digest, EntriesCheck, Manifest, check_entries, key_problem
from clusteracme.v1 import agent_pb2

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
"""Keys and values per backup chunk: a quarter of gRPC's 4 MiB message limit."""
TXN_OPS = 64
"""Keys per restore transaction: with a check each and the leader's fence,
well under etcd's default ``--max-txn-ops`` (128)."""
TXN_BYTES = 512 * 1024
"""Keys and values per restore transaction: a third of etcd's default
``--max-request-bytes`` (1.5 MiB); a larger value goes alone."""
MAX_RESTORE_BYTES = 512 * 1024 * 1024
"""The most key and value bytes a restore takes (it holds the whole backup
while it checks it): far above a cluster's state, far below etcd's 2 GiB quota."""
MAX_RESTORE_ENTRIES = 2_000_000
"""The most entries a restore takes: a fleet of a thousand peers keeps under a million keys."""
REPLACE_DEADLINE = 30.0
"""How long one replaceable key may keep changing under a restore's
transaction (an agent's registration, a status read's draw) before the
restore gives up; each conflict is tried again after REPLACE_PAUSE, doubled
up to REPLACE_PAUSE_MAX."""
REPLACE_PAUSE = 0.05
REPLACE_PAUSE_MAX = 1.0
AGENT_FENCE_TIMEOUT = 3.0
"""How long a restore's last step waits for the live agents to say the
highest leader fence they have seen; one that does not answer is named in
the log and the restore goes on."""
EPOCH_ORIGIN = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
EPOCH_SHIFT = 32
"""Revisions a fence epoch has room for (2**32): decades of a cluster's writes."""
SHOWN_KEYS = 5
LEADER_WAIT = 60.0
"""How long a restore waits, after its leader resigned, for a fresh term to take commands."""
LEADER_POLL = 0.2


def fence_token(epoch: int, revision: int) -> int:
    """The leader fence sent to agents: the restore epoch, then the election revision."""
    return (epoch << EPOCH_SHIFT) + revision


def clock_epoch(now: datetime.datetime) -> int:
    """The seconds since EPOCH_ORIGIN: the epoch a restore sets when the clocks agree."""
    return int((now - EPOCH_ORIGIN).total_seconds())


def next_epoch(now: datetime.datetime, after: int) -> int:
    """The epoch a restore sets: seconds since EPOCH_ORIGIN, and above ``after``."""
    return max(clock_epoch(now), after + 1)


AgentFences = Callable[[], Awaitable[tuple[dict[str, int], dict[str, str]]]]
"""Asks the live agents for the highest leader fence each has seen: ({peer:
fence}, {peer: why it did not answer}), within a short deadline; never
raises for an agent."""


class LiveAgentFences:
    """:data:`AgentFences` over the registry's live peers and the agent pool:
    ``Status`` with no fence of its own (it raises no agent's floor)."""

    def __init__(self, registry: Registry, pool: AgentPool, timeout: float = AGENT_FENCE_TIMEOUT) -> None:
        self._registry = registry
        self._pool = pool
        self._timeout = timeout

    async def __call__(self) -> tuple[dict[str, int], dict[str, str]]:
        peers = [p for p in await self._registry.list() if p.alive]
        request = agent_pb2.AgentStatusRequest()

        async def one(peer: PeerInfo) -> tuple[str, int | None, str]:
            try:
                status = await asyncio.wait_for(
                    self._pool.call(peer, "restore fence", lambda stub, kw: stub.Status(request, **kw),
                                    timeout=self._timeout), self._timeout)
            except TimeoutError:
                return peer.peer_id, None, f"no answer within {self._timeout:g} s"
            except errors.ClusterAcmeError as exc:
                return peer.peer_id, None, exc.message
            return peer.peer_id, status.leader_fence, ""

        fences: dict[str, int] = {}
        silent: dict[str, str] = {}
        for peer_id, fence, why in await asyncio.gather(*(one(p) for p in peers)):
            if fence is None:
                silent[peer_id] = why
            else:
                fences[peer_id] = fence
        return fences, silent


def _peer_key(keys: Keys, key: str) -> bool | None:
    """For a key under ``peers/``: whether it is a liveness key; None for any other key."""
    if not key.startswith(keys.peers()):
        return None
    try:
        return keys.parse_peer(key)[1]
    except errors.InvalidArgument:
        return None


def lease_bound(keys: Keys, key: str) -> bool:
    """Whether ``key`` (absolute) is one of the kinds that only ever exist
    bound to a lease: a restore never writes one (it would outlive every process)."""
    return key == keys.leader() or key.startswith(keys.coordinators()) or _peer_key(keys, key) is True


def replaceable(keys: Keys, key: str) -> bool:
    """Whether ``key`` (absolute) is one the running processes write by
    themselves into an emptied prefix, which a restore replaces: a peer's
    registration, a period's drawn sign times, the schema marker."""
    return key == keys.schema_marker() or key.startswith(keys.all_schedules()) or _peer_key(keys, key) is False


def _shown(keys: Sequence[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


@dataclass(frozen=True)
class Snapshot:
    """A backup: the manifest and the entries (key relative to the prefix, value), in key order."""

    manifest: Manifest
    entries: list[tuple[str, bytes]]


def chunks(entries: Sequence[tuple[str, bytes]], limit: int = CHUNK_BYTES) -> Iterator[Sequence[tuple[str, bytes]]]:
    """The entries in runs of at most ``limit`` key and value bytes (one
    larger entry alone): what one message carries."""
    start, size = 0, 0
    for i, (key, value) in enumerate(entries):
        weight = len(key) + len(value)
        if i > start and size + weight > limit:
            yield entries[start:i]
            start, size = i, 0
        size += weight
    if start < len(entries):
        yield entries[start:]


@dataclass(frozen=True)
class RestoreMarker:
    """``meta/restoring``: a restore started and not finished."""

    sha256: str
    entry_count: int
    started_at: str
    started_by: str
    backup_created_at: str

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "entry_count": self.entry_count, "started_at": self.started_at,
                "started_by": self.started_by, "backup_created_at": self.backup_created_at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RestoreMarker:
        count = data.get("entry_count")
        return cls(str(data.get("sha256", "")), count if type(count) is int else 0, str(data.get("started_at", "")),
                   str(data.get("started_by", "")), str(data.get("backup_created_at", "")))

    def describe(self) -> str:
        return (f"a restore of backup {self.sha256[:16]} ({self.entry_count} entries, made {self.backup_created_at}) "
                f"started {self.started_at} by {self.started_by} was cut before it ended")


async def read_marker(store: Store, keys: Keys) -> tuple[RestoreMarker | None, int]:
    """``meta/restoring`` and its mod_revision ((None, 0) when absent). A
    damaged one is still a cut restore, of a backup nobody can name."""
    entry = await store.get(keys.restoring())
    if entry is None:
        return None, 0
    return _marker_of(entry), entry.mod_revision


def _marker_of(entry: Entry) -> RestoreMarker:
    try:
        data = records.peek(entry.value, entry.key)
    except ValueError:  # damaged: still a cut restore, of a backup nobody can name
        data = {"sha256": "?" * 16, "started_by": "?", "started_at": "?", "backup_created_at": "?"}
    return RestoreMarker.from_json(data)


async def restore_pending(store: Store, keys: Keys) -> str | None:
    """The sentence a leader refuses commands with while a cut restore's
    marker stands, or None."""
    marker, _ = await read_marker(store, keys)
    if marker is None:
        return None
    return (f"{marker.describe()}: the cluster holds part of that backup; run acmectl restore again with the same "
            f"file to finish it (or empty the prefix {keys.prefix} and restore any backup)")


async def read_fence_epoch(store: Store, keys: Keys) -> int:
    """The agents' fence epoch (``meta/fence_epoch``; 0 when absent). A
    damaged one counts as 0 (logged): agents then refuse this leader's
    deploys, which is safe, and the next restore sets it again."""
    entry = await store.get(keys.fence_epoch())
    if entry is None:
        return 0
    try:
        return _epoch_of(entry.value, entry.key)
    except (ValueError, errors.ClusterAcmeError) as exc:
        log.error("%s is damaged (%s): agents' leader fence without an epoch; agents that saw a restore's epoch "
                  "refuse this leader's deploys", entry.key, exc)
        return 0


def _epoch_of(raw: bytes, key: str) -> int:
    epoch = records.peek(raw, key).get("epoch")
    if type(epoch) is not int or epoch < 0:
        raise errors.FailedPrecondition(f"{key} holds no valid epoch ({epoch!r}): it was damaged")
    return epoch


class TermControl(Protocol):
    """What a restore needs of the leader's term (``coordinator.term``)."""

    async def pause(self, reason: str) -> None:
        """Stop the term's work (schedulers, order drivers, deploys) and hold
        every other command; the leadership (and its fenced store) is kept."""
        ...

    async def end(self) -> None:
        """End the term (resign) and return once it has ended; the replica
        stays up and campaigns again."""
        ...

    def request_end(self) -> None:
        """End the term soon, without waiting."""
        ...


@dataclass(frozen=True)
class RestoreResult:
    entry_count: int
    written: int
    revision: int
    detail: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Backups:
    """Backup (any replica, any store view) and restore (the leader's fenced
    store and term) of the cluster under ``keys.prefix``."""

    def __init__(self, store: Store, keys: Keys, *, version: str, term: TermControl | None = None,
                 clock: Callable[[], datetime.datetime] = _now, agent_fences: AgentFences | None = None) -> None:
        """``agent_fences``: asked by a restore's last step (None: no agents to ask)."""
        self._store = store
        self._keys = keys
        self._version = version
        self._term = term
        self._clock = clock
        self._agent_fences = agent_fences
        self._restoring = False  # one restore at a time (the term pause holds other commands, not a second one)

    # --- backup ------------------------------------------------------------
    async def snapshot(self, who: str) -> Snapshot:
        """Every key but the lease-bound ones, at one revision, with its manifest."""
        found, revision = await self._store.range_with_revision(self._keys.prefix)
        entries: list[tuple[str, bytes]] = []
        skipped = size = 0
        digest = Digest()
        for entry in found:
            if entry.key == self._keys.restoring():
                marker = _marker_of(entry)
                raise errors.FailedPrecondition(f"{marker.describe()}: the cluster holds part of a backup; finish that "
                                                "restore before making a backup")
            if entry.lease:
                skipped += 1
                continue
            key = entry.key.removeprefix(self._keys.prefix)
            problem = key_problem(key)
            if problem is not None:
                raise errors.FailedPrecondition(f"cannot back up {self._keys.prefix}: {problem}, which clusteracme "
                                                "never writes; remove it")
            entries.append((key, entry.value))
            size += len(entry.value)
            digest.update(key, entry.value)
        manifest = Manifest(format=FORMAT, prefix=self._keys.prefix, revision=revision,
                            created_at=self._clock().isoformat(timespec="seconds"),
                            coordinator_version=self._version, record_schema=records.SCHEMA,
                            entry_count=len(entries), value_bytes=size, sha256=digest.hexdigest(),
                            skipped_leased=skipped, created_by=who)
        log.info("backup of %s at revision %d for %s: %d entries, %d value bytes, %d lease-bound keys left out",
                 self._keys.prefix, revision, who, len(entries), size, skipped)
        return Snapshot(manifest, entries)

    # --- restore -----------------------------------------------------------
    async def receive(self, stream: AsyncIterator[tuple[Manifest | None, Sequence[tuple[str, bytes]]]]) -> Snapshot:
        """The backup a client sends: the manifest in the first message only,
        entries after it, each checked as it arrives (``EntriesCheck``: key,
        order, counts) and the digest at the end; refused (InvalidArgument)
        at the first bad entry, past what the manifest announces, or past
        MAX_RESTORE_BYTES of keys and values, before more is read."""
        manifest: Manifest | None = None
        check: EntriesCheck | None = None
        entries: list[tuple[str, bytes]] = []
        size = 0
        async for header, batch in stream:
            if manifest is None:
                if header is None:
                    raise errors.InvalidArgument("the restore's first message carries no manifest")
                manifest = header
                if manifest.value_bytes > MAX_RESTORE_BYTES or manifest.entry_count > MAX_RESTORE_ENTRIES:
                    raise errors.InvalidArgument(
                        f"the backup holds {manifest.entry_count} entries and {manifest.value_bytes} value bytes, more "
                        f"than a restore takes ({MAX_RESTORE_ENTRIES} entries, {MAX_RESTORE_BYTES} bytes)")
                check = EntriesCheck(manifest)
            elif header is not None:
                raise errors.InvalidArgument("the restore sent a second manifest")
            assert check is not None
            for key, value in batch:
                size += len(key.encode()) + len(value)
                if size > MAX_RESTORE_BYTES:
                    raise errors.InvalidArgument(f"the backup's keys and values pass {MAX_RESTORE_BYTES} bytes, more "
                                                 "than a restore takes")
                check.add(key, value)
                entries.append((key, value))
        if manifest is None or check is None:
            raise errors.InvalidArgument("the restore sent nothing")
        check.finish()
        return Snapshot(manifest, entries)

    def check(self, backup: Snapshot) -> None:
        """InvalidArgument / FailedPrecondition unless the backup can be
        restored here (nothing is read from the store)."""
        check_entries(backup.manifest, backup.entries)
        self._check_content(backup)

    def _check_content(self, backup: Snapshot) -> None:
        """``check`` but the entries against the manifest (``receive`` checked those)."""
        manifest = backup.manifest
        schema = manifest.record_schema
        for key, value in backup.entries:
            absolute = self._keys.prefix + key
            if lease_bound(self._keys, absolute) or absolute == self._keys.restoring():
                raise errors.InvalidArgument(f"the backup holds {key}, a key a restore never writes (it belongs "
                                             "to a running process)")
            try:
                if absolute == self._keys.schema_marker():
                    schema = max(schema, int(records.peek(value, key).get("schema", 0)))
                elif absolute == self._keys.fence_epoch():
                    _epoch_of(value, key)
            except (ValueError, TypeError, errors.ClusterAcmeError):
                raise errors.InvalidArgument(f"the backup's {key} is damaged") from None
        if schema > records.SCHEMA:
            raise errors.FailedPrecondition(
                f"the backup holds records of schema {schema}, newer than this coordinator knows (schema "
                f"{records.SCHEMA}, clusteracme {self._version}; the backup was made by {manifest.coordinator_version}"
                "): restore it with a coordinator at least as new")

    async def restore(self, backup: Snapshot, who: str) -> RestoreResult:
        """Load a backup into the prefix (module docstring); the leader's
        term ends afterwards, whatever the outcome once it was paused."""
        term = self._claim()
        try:
            self.check(backup)
            return await self._restore(backup, who, term)
        finally:
            self._restoring = False

    async def restore_stream(self, stream: AsyncIterator[tuple[Manifest | None, Sequence[tuple[str, bytes]]]],
                             who: str, *, taken: Callable[[], Awaitable[None]] | None = None) -> RestoreResult:
        """``restore`` of the backup a client sends (``receive``). This
        leader's one restore slot is claimed first: a second restore is
        refused before ``taken`` (the client told to send) and before a byte
        of it is read."""
        term = self._claim()
        try:
            if taken is not None:
                await taken()
            backup = await self.receive(stream)
            self._check_content(backup)
            return await self._restore(backup, who, term)
        finally:
            self._restoring = False

    def _claim(self) -> TermControl:
        if self._term is None:
            raise errors.FailedPrecondition("only the leader restores a backup")
        if self._restoring:
            raise errors.FailedPrecondition("a restore is already under way on this leader: wait for it to end "
                                            "(the coordinator's log shows it)")
        self._restoring = True
        return self._term

    async def _restore(self, backup: Snapshot, who: str, term: TermControl) -> RestoreResult:
        m = backup.manifest
        wanted = dict(backup.entries)
        await self._refuse_older_replicas()
        await self._survey(m, wanted, values=False)  # refuse a non-empty prefix before stopping anything
        what = (f"backup {m.sha256[:16]} ({m.entry_count} entries, {m.value_bytes} value bytes, made {m.created_at} "
                f"at revision {m.revision} of {m.prefix} by {m.created_by})")
        log.warning("restore of %s into %s started by %s: stopping this leader's work", what, self._keys.prefix, who)
        started = time.monotonic()
        try:
            # Inside the try: a pause cut (client gone, deadline) or failed still ends the term, which
            # releases the commands it holds (``term``).
            await term.pause(f"a restore of {what} is under way")
            await self._refuse_older_replicas()  # one may have started meanwhile
            current, marker_revision = await self._survey(m, wanted, values=True)
            if not marker_revision:
                marker = RestoreMarker(m.sha256, m.entry_count, self._clock().isoformat(timespec="seconds"), who,
                                       m.created_at)
                marker_revision = await self._store.put_if(self._keys.restoring(), records.encode(marker.to_json()),
                                                           expect_mod_revision=0)
            todo = [(k, v) for k, v in backup.entries
                    if self._keys.prefix + k != self._keys.fence_epoch()
                    and not ((e := current.get(self._keys.prefix + k)) is not None and e.value == v)]
            for batch in _batches(todo):
                await self._write(batch, current)
            revision, epoch = await self._finish(wanted, marker_revision, who, m.sha256)
        except BaseException as exc:
            message = exc.message if isinstance(exc, errors.ClusterAcmeError) else repr(exc)
            log.error("restore of backup %s stopped: %s; if meta/restoring was written it stays, and the next "
                      "leader refuses commands until the same file is restored again", m.sha256[:16], message)
            term.request_end()  # a fresh term: it runs again, or refuses commands while the marker stands
            raise
        seconds = time.monotonic() - started
        detail = (f"restored {m.entry_count} entries ({len(todo)} written, the rest already there) into "
                  f"{self._keys.prefix} in {seconds:.1f} s; agents' fence epoch {epoch}; the leader ended its term "
                  "so that a fresh one reads the restored state")
        log.info("restore of backup %s done: %s", m.sha256[:16], detail)
        await term.end()
        leader = await self._serving_leader()
        detail += (f"; coordinator {leader} leads again" if leader else
                   f"; no coordinator leads yet after {LEADER_WAIT:g} s (acmectl coordinators shows the replicas)")
        return RestoreResult(m.entry_count, len(todo), revision, detail)

    async def _refuse_older_replicas(self) -> None:
        """FailedPrecondition while a replica older than this one runs: it
        does not know ``meta/restoring``, and leading after a cut restore it
        would take commands on a half-restored state."""
        older = []
        for entry in await self._store.range(self._keys.coordinators()):
            try:
                member = Member.from_record(records.peek(entry.value, entry.key))
            except ValueError:
                older.append(f"{entry.key.removeprefix(self._keys.coordinators())} (unreadable record)")
                continue
            if newer_release(self._version, member.version):
                older.append(f"{member.name} ({member.version})")
        if older:
            raise errors.FailedPrecondition(
                f"coordinator replicas older than this one ({self._version}) are running: {_shown(older)}; they do "
                "not know a cut restore's marker and could lead a half-restored cluster: upgrade them (or stop "
                "them) before restoring; nothing was done")

    async def _serving_leader(self) -> str | None:
        """Once a fresh term takes commands, its leader's name (None after
        LEADER_WAIT): the replica the election key names marks its member
        record "leader" only once it serves every call (``app``)."""
        deadline = time.monotonic() + LEADER_WAIT
        while True:
            try:
                elected = await self._store.get(self._keys.leader())
                name = elected.value.decode(errors="replace") if elected is not None else ""
                record = await self._store.get(self._keys.coordinator(name)) if name else None
                if record is not None and records.peek(record.value, record.key).get("role") == "leader":
                    return name
            except errors.ClusterAcmeError as exc:  # etcd busy, a record being rewritten: ask again
                log.debug("waiting for a leader after the restore: %s", exc.message)
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(LEADER_POLL)

    async def _survey(self, m: Manifest, wanted: dict[str, bytes], *,
                      values: bool) -> tuple[dict[str, Entry], int]:
        """The prefix as it stands ({absolute key: entry}) and the marker's
        revision (0: none); refused unless a restore of this backup may go
        into it. ``values``: read the values of the keys it holds too (to
        skip what a cut restore of the same backup already wrote)."""
        keys, prefix = self._keys, self._keys.prefix
        marker, marker_revision = await read_marker(self._store, keys)
        if marker is not None and marker.sha256 != m.sha256:
            raise errors.FailedPrecondition(
                f"{marker.describe()}; this is backup {m.sha256[:16]}: finish that restore with its own file, or "
                f"empty the prefix {prefix} and restore this one")
        current: dict[str, Entry] = {}
        async for page in self._store.range_pages(prefix, keys_only=not values):
            current.update((e.key, e) for e in page)
        blocking = []
        for key, entry in current.items():
            if entry.lease or replaceable(keys, key) or key == keys.restoring():
                continue
            rel = key.removeprefix(prefix)
            if marker is not None and rel in wanted and (not values or wanted[rel] == entry.value):
                continue  # written by the cut restore this one finishes
            blocking.append(rel)
        if blocking:
            if marker is not None:
                raise errors.FailedPrecondition(
                    f"{marker.describe()}, and the prefix {prefix} now also holds {len(blocking)} keys that are not "
                    f"that backup's ({_shown(blocking)}): empty the prefix and restore again")
            raise errors.FailedPrecondition(
                f"the prefix {prefix} is not empty: it holds {len(blocking)} keys that are not bound to a lease "
                f"({_shown(blocking)}); a restore goes into an empty prefix: delete every key under it first "
                "(README: Backup and restore), or restore into another prefix")
        if marker is not None:
            log.warning("%s: this restore of the same backup continues it", marker.describe())
        return current, marker_revision

    async def _write(self, batch: Sequence[tuple[str, bytes]], current: dict[str, Entry]) -> None:
        """One transaction: each key created, or a replaceable key replaced
        at the revision it was read at (read again when it moved, and tried
        again after a short pause, for up to REPLACE_DEADLINE per key)."""
        prefix = self._keys.prefix
        moving_since: dict[str, float] = {}  # replaceable key -> when it first moved under this batch
        pause = REPLACE_PAUSE
        while True:
            checks = []
            for rel, _ in batch:
                seen = current.get(prefix + rel)
                checks.append(Check(prefix + rel, seen.mod_revision if seen is not None else 0))
            try:
                await self._store.txn(checks, [Put(prefix + rel, value) for rel, value in batch])
                return
            except Conflict as exc:
                moved = sorted(exc.keys)
                fixed = [k for k in moved if not replaceable(self._keys, k)]
                now = time.monotonic()
                busy = [k for k in moved if now - moving_since.setdefault(k, now) >= REPLACE_DEADLINE]
                if fixed or busy:
                    why = ("(something else writes into the prefix)" if fixed else
                           f"(written again and again for {REPLACE_DEADLINE:g} s: an agent registering in a loop, "
                           "or status reads)")
                    raise errors.Aborted(
                        f"{_shown([k.removeprefix(prefix) for k in (fixed or busy)])} changed during the restore "
                        f"{why}; nothing of this batch was written: find the writer, then run the restore again "
                        "with the same file to finish it") from None
                log.debug("restore: %s changed meanwhile; replacing it again", _shown(moved))
                await asyncio.sleep(pause)
                pause = min(2 * pause, REPLACE_PAUSE_MAX)
                for key in moved:  # written meanwhile by an agent's registration or a status read: replace it again
                    entry = await self._store.get(key)
                    if entry is None:
                        current.pop(key, None)
                    else:
                        current[key] = entry

    async def _agent_epochs(self) -> dict[str, int]:
        """{"agent <peer>": the epoch of the highest leader fence it has
        seen} for the live agents that answer; the others are named in a
        warning (the restore goes on: they refuse this leader's deploys only
        if they saw a higher epoch than every other source)."""
        if self._agent_fences is None:
            return {}
        try:
            fences, silent = await self._agent_fences()
        except (errors.ClusterAcmeError, ValueError) as exc:
            reason = exc.message if isinstance(exc, errors.ClusterAcmeError) else str(exc)
            log.warning("restore: cannot list the live agents to ask their leader fence (%s); the fence epoch is "
                        "set from the clock, the backup and etcd only", reason)
            return {}
        if silent:
            log.warning("restore: %d live agent(s) did not say their leader fence: %s; the fence epoch is set "
                        "without them (one that saw a higher epoch refuses this leader's deploys until the next "
                        "restore)", len(silent), "; ".join(f"{p}: {why}" for p, why in sorted(silent.items())))
        return {f"agent {peer}": fence >> EPOCH_SHIFT for peer, fence in fences.items()}

    async def _finish(self, wanted: dict[str, bytes], marker_revision: int, who: str,
                      sha256: str) -> tuple[int, int]:
        """Delete the marker and set the new fence epoch, in one
        transaction; the store revision after it and the epoch."""
        key = self._keys.fence_epoch()
        rel = key.removeprefix(self._keys.prefix)
        seen = {"the backup": _epoch_of(wanted[rel], rel) if rel in wanted else 0}
        existing = await self._store.get(key)
        if existing is not None:
            seen[key] = _epoch_of(existing.value, key)
        seen.update(await self._agent_epochs())
        now = self._clock()
        source, after = max(seen.items(), key=lambda item: item[1])
        if clock_epoch(now) < after:
            log.warning("this coordinator's clock (%s, epoch %d) is behind the fence epoch %d of %s: the clocks of "
                        "the replicas disagree (check NTP); the restore sets epoch %d, one above it",
                        now.isoformat(timespec="seconds"), clock_epoch(now), after, source, after + 1)
        epoch = next_epoch(now, after)
        record = {"epoch": epoch, "set_at": now.isoformat(timespec="seconds"), "set_by": who, "backup_sha256": sha256}
        ops: list[Op] = [Delete(self._keys.restoring()), Put(key, records.encode(record))]
        checks = [Check(self._keys.restoring(), marker_revision),
                  Check(key, existing.mod_revision if existing is not None else 0)]
        try:
            revision = await self._store.txn(checks, ops)
        except Conflict:
            raise errors.Aborted("meta/restoring or meta/fence_epoch changed during the restore; run it again with "
                                 "the same file to finish it") from None
        return revision, epoch


def _batches(todo: Sequence[tuple[str, bytes]]) -> Iterator[Sequence[tuple[str, bytes]]]:
    """Runs of at most TXN_OPS entries and TXN_BYTES bytes (one larger entry alone)."""
    start, size = 0, 0
    for i, (key, value) in enumerate(todo):
        weight = len(key) + len(value)
        if i > start and (i - start >= TXN_OPS or size + weight > TXN_BYTES):
            yield todo[start:i]
            start, size = i, 0
        size += weight
    if start < len(todo):
        yield todo[start:]
