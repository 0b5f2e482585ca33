"""Backup and restore (issue 13): the manifest check, the backup file, and
the coordinator's backup and restore on the in-memory store (fakes at the
ports; the real etcd, processes and agents: tests/integration/test_backup_restore.py)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from clusteracme.coordinator import backup, records
from clusteracme.coordinator.backup import Backups, Snapshot, chunks, fence_token, next_epoch
from clusteracme.coordinator.peers import PeerInfo
from clusteracme.coordinator.store.base import Check, Op, Put
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from clusteracme.coordinator.term import Term

from clusteracme import errors
from clusteracme.backupformat import FORMAT, Manifest, check_entries, entries_sha256
from clusteracme.ctl import backup as ctlbackup
from clusteracme.ctl.base import CtlError
from clusteracme.daemon import Supervisor
from clusteracme.v1 import agent_pb2

KEYS = Keys("/c/")
NOW = datetime.datetime(2026, 5, 1, 12, 0, tzinfo=datetime.UTC)


def manifest_for(entries: Sequence[tuple[str, bytes]], **changes: Any) -> Manifest:
    fields = dict(format=FORMAT, prefix=KEYS.prefix, revision=42, created_at="2026-05-01T12:00:00+00:00",
                  coordinator_version="1.0", record_schema=records.SCHEMA, entry_count=len(entries),
                  value_bytes=sum(len(v) for _, v in entries), sha256=entries_sha256(entries), skipped_leased=3,
                  created_by="operator:admin")
    fields.update(changes)
    return Manifest(**fields)


ENTRIES = [("certs/p1/server", b'{"schema":1,"x":1}'), ("peers/p1", b'{"schema":1,"peer_id":"p1"}'),
           ("providers/pebble", b"\x00sealed\xff" * 10), ("trust/" + "a" * 64, b"")]


# --- the manifest and its digest -------------------------------------------------------------------


def test_the_digest_is_the_one_the_proto_defines() -> None:
    expected = hashlib.sha256(b"k\x00" + (3).to_bytes(8, "big") + b"abc" + b"l\x00" + bytes(8)).hexdigest()
    assert entries_sha256([("k", b"abc"), ("l", b"")]) == expected
    # The length prefix keeps key/value boundaries apart: moving a byte changes the digest.
    assert entries_sha256([("ab", b"c")]) != entries_sha256([("a", b"bc")])


def test_entries_that_match_their_manifest_pass() -> None:
    check_entries(manifest_for(ENTRIES), ENTRIES)
    check_entries(manifest_for([]), [])


@pytest.mark.parametrize(("manifest", "entries", "says"), [
    (manifest_for(ENTRIES, format=2), ENTRIES, "backup format 2"),
    (manifest_for(ENTRIES), ENTRIES[:-1], "holds 3 entries where its manifest says 4"),
    (manifest_for(ENTRIES, value_bytes=1), ENTRIES, "more than its manifest says"),
    (manifest_for(ENTRIES, sha256="0" * 64), ENTRIES, "do not match its manifest's SHA-256"),
    (manifest_for(ENTRIES), [ENTRIES[1], ENTRIES[0], *ENTRIES[2:]], "not in strictly ascending key order"),
    (manifest_for(ENTRIES), [ENTRIES[0], ENTRIES[0]], "not in strictly ascending key order"),
    (manifest_for([("a\x00b", b"")]), [("a\x00b", b"")], "NUL"),
    (manifest_for([("/abs", b"")]), [("/abs", b"")], "starts with '/'"),
    (manifest_for([("", b"")]), [("", b"")], "an empty key"),
])
def test_entries_that_differ_from_their_manifest_are_refused(manifest: Manifest, entries: list[tuple[str, bytes]],
                                                             says: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=says):
        check_entries(manifest, entries)


def test_the_manifest_converts_to_and_from_its_message() -> None:
    m = manifest_for(ENTRIES)
    assert Manifest.from_pb(m.to_pb()) == m


# --- the backup file --------------------------------------------------------------------------------


def write_file(path: Path, entries: Sequence[tuple[str, bytes]], *, force: bool = False) -> Path:
    manifest = manifest_for(entries).to_pb()
    writer = ctlbackup.BackupWriter(str(path), force=force)
    writer.write(ctlbackup.header_line(manifest))
    for key, value in entries:
        writer.write(ctlbackup.entry_line(key, value))
    writer.commit(len(entries))
    return path


def test_a_backup_file_reads_back_as_written_and_is_private(tmp_path: Path) -> None:
    path = write_file(tmp_path / "b.jsonl", ENTRIES)
    manifest, entries = ctlbackup.read_backup(str(path))
    assert entries == ENTRIES and Manifest.from_pb(manifest) == manifest_for(ENTRIES)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["b.jsonl"]  # no temporary file left
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[0])["clusteracme_backup"] == 1 and json.loads(lines[-1])["end"]["entries"] == 4


def test_an_existing_file_is_kept_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text("precious")
    with pytest.raises(CtlError, match="exists; give --force"):
        write_file(path, ENTRIES)
    assert path.read_text() == "precious"
    write_file(path, ENTRIES, force=True)
    assert ctlbackup.read_backup(str(path))[1] == ENTRIES


def test_a_dangling_symlink_is_an_existing_file_replaced_only_with_force_and_never_followed(tmp_path: Path) -> None:
    path, target = tmp_path / "b.jsonl", tmp_path / "elsewhere.jsonl"
    path.symlink_to(target)  # dangling: Path.exists() says False
    with pytest.raises(CtlError, match="exists; give --force"):
        write_file(path, ENTRIES)
    assert path.is_symlink() and not target.exists()
    write_file(path, ENTRIES, force=True)
    assert not path.is_symlink() and not target.exists()  # the link replaced, not followed
    assert ctlbackup.read_backup(str(path))[1] == ENTRIES


def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    writer = ctlbackup.BackupWriter(str(path), force=False)
    writer.write(ctlbackup.header_line(manifest_for([]).to_pb()))
    path.write_text("someone else's")
    with pytest.raises(CtlError, match="appeared"):
        writer.commit(0)
    writer.discard()
    assert path.read_text() == "someone else's" and len(list(tmp_path.iterdir())) == 1


def test_every_single_byte_change_and_every_cut_is_refused(tmp_path: Path) -> None:
    data = write_file(tmp_path / "b.jsonl", ENTRIES[:2]).read_bytes()
    for i in range(len(data)):
        for changed in (data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:], data[:i]):
            with pytest.raises(ctlbackup.BackupFileError):
                ctlbackup.parse_backup(changed, "f")


@pytest.mark.parametrize(("content", "says"), [
    (b"", "does not end with a line break"),
    (b"hello\n", "not a complete clusteracme backup"),
    (b'{"end": {"entries": 0, "file_sha256": "' + hashlib.sha256(b"").hexdigest().encode() + b'"}}\n',
     "format None"),
])
def test_files_that_are_not_backups_are_refused_in_one_sentence(content: bytes, says: str) -> None:
    with pytest.raises(ctlbackup.BackupFileError, match=says) as refused:
        ctlbackup.parse_backup(content, "f")
    assert "\n" not in refused.value.message


def test_a_consistent_file_with_a_wrong_manifest_is_refused(tmp_path: Path) -> None:
    """Rewritten with a fresh file digest (a deliberate edit): the entries' digest still catches it."""
    manifest = manifest_for(ENTRIES).to_pb()
    manifest.entry_count = 3
    body = ctlbackup.header_line(manifest) + b"".join(ctlbackup.entry_line(k, v) for k, v in ENTRIES[:3])
    data = body + ctlbackup.end_line(3, hashlib.sha256(body).hexdigest())
    with pytest.raises(ctlbackup.BackupFileError, match="SHA-256"):
        ctlbackup.parse_backup(data, "f")


def test_a_large_file_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_file(tmp_path / "b.jsonl", ENTRIES)
    monkeypatch.setattr(ctlbackup, "MAX_FILE_BYTES", 100)
    with pytest.raises(ctlbackup.BackupFileError, match="larger than"):
        ctlbackup.read_backup(str(path))


def test_restore_messages_carry_the_manifest_first_then_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctlbackup, "CHUNK_BYTES", 100)
    entries = [(f"k{i:03d}", b"v" * 40) for i in range(10)]
    messages = list(ctlbackup._messages(manifest_for(entries).to_pb(), entries))
    assert messages[0].HasField("manifest") and not messages[0].entries
    assert all(not m.HasField("manifest") and len(m.entries) == 2 for m in messages[1:])
    assert [(e.key, e.value) for m in messages for e in m.entries] == entries


# --- the coordinator: backup --------------------------------------------------------------------


async def fill(store: MemoryStore) -> None:
    for key, value in ENTRIES:
        await store.put_if(KEYS.prefix + key, value, expect_mod_revision=None)
    lease = await store.grant_lease(60)
    for key in (KEYS.leader(), KEYS.coordinator("c1"), KEYS.peer_alive("p1")):
        await store.put_if(key, b"{}", expect_mod_revision=None, lease=lease)
    await store.put_if("/other/x", b"not ours", expect_mod_revision=None)


async def test_a_backup_holds_every_key_but_the_lease_bound_ones_at_one_revision() -> None:
    store = MemoryStore()
    await fill(store)
    snap = await Backups(store, KEYS, version="1.2", clock=lambda: NOW).snapshot("operator:admin")
    assert snap.entries == ENTRIES
    m = snap.manifest
    assert (m.skipped_leased, m.entry_count, m.prefix, m.created_by, m.coordinator_version) == \
        (3, 4, KEYS.prefix, "operator:admin", "1.2")
    assert m.revision == (await store.range_with_revision("/"))[1]
    check_entries(m, snap.entries)


def test_chunks_stay_under_their_limit_and_keep_the_order() -> None:
    entries = [(f"k{i}", b"x" * (300 if i != 5 else 5000)) for i in range(20)]
    runs = list(chunks(entries, limit=1000))
    assert [e for run in runs for e in run] == entries
    assert all(sum(len(k) + len(v) for k, v in run) <= 1000 or len(run) == 1 for run in runs)


async def test_no_backup_while_a_restore_is_unfinished() -> None:
    store = MemoryStore()
    await store.put_if(KEYS.restoring(), records.encode({"sha256": "ab" * 32, "entry_count": 9}),
                       expect_mod_revision=0)
    with pytest.raises(errors.FailedPrecondition, match="cut before it ended"):
        await Backups(store, KEYS, version="1").snapshot("operator:admin")


# --- the coordinator: restore -------------------------------------------------------------------


class FakeTerm:
    """The leader's term: pausing and ending it are recorded; ending it
    elects c2, whose record says it leads (a fresh term that serves)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.paused: list[str] = []
        self.ended = 0
        self.requested = 0

    async def pause(self, reason: str) -> None:
        self.paused.append(reason)

    async def end(self) -> None:
        self.ended += 1
        lease = await self.store.grant_lease(60)
        await self.store.put_if(KEYS.leader(), b"c2", expect_mod_revision=None, lease=lease)
        await self.store.put_if(KEYS.coordinator("c2"), records.encode({"name": "c2", "role": "leader"}),
                                expect_mod_revision=None, lease=lease)

    def request_end(self) -> None:
        self.requested += 1


async def source_backup() -> Snapshot:
    store = MemoryStore()
    await fill(store)
    return await Backups(store, KEYS, version="1").snapshot("operator:admin")


def restorer(store: MemoryStore, term: FakeTerm) -> Backups:
    return Backups(store, KEYS, version="1", term=term, clock=lambda: NOW)


async def ours(store: MemoryStore) -> dict[str, bytes]:
    return {e.key.removeprefix(KEYS.prefix): e.value for e in await store.range(KEYS.prefix) if not e.lease}


async def test_a_restore_loads_the_backup_sets_the_fence_epoch_and_ends_the_term() -> None:
    snap, store = await source_backup(), MemoryStore()
    term = FakeTerm(store)
    lease = await store.grant_lease(60)
    await store.put_if(KEYS.peer_alive("p1"), b"1", expect_mod_revision=None, lease=lease)  # lease-bound: allowed
    result = await restorer(store, term).restore(snap, "operator:admin")
    state = await ours(store)
    epoch = json.loads(state.pop("meta/fence_epoch"))
    assert state == dict(ENTRIES)
    assert epoch["epoch"] == next_epoch(NOW, 0) and epoch["backup_sha256"] == snap.manifest.sha256
    assert term.paused and term.ended == 1 and term.requested == 0
    assert result.entry_count == 4 and result.written == 4 and "coordinator c2 leads again" in result.detail


async def test_a_non_empty_prefix_is_refused_naming_its_keys_and_nothing_changes() -> None:
    snap, store = await source_backup(), MemoryStore()
    for i in range(7):
        await store.put_if(KEYS.prefix + f"events/p9/{i:020d}", b"{}", expect_mod_revision=None)
    before = await ours(store)
    term = FakeTerm(store)
    with pytest.raises(errors.FailedPrecondition, match=r"holds 7 keys .*\(events/p9/0+0, .* and 2 more\)"):
        await restorer(store, term).restore(snap, "operator:admin")
    assert await ours(store) == before and not term.paused and not term.ended and not term.requested


async def test_registrations_draws_and_the_schema_marker_written_since_the_wipe_are_replaced() -> None:
    snap, store = await source_backup(), MemoryStore()
    await store.put_if(KEYS.peer("p1"), b'{"schema":1,"peer_id":"p1","enabled":false}', expect_mod_revision=None)
    await store.put_if(KEYS.peer("p7"), b'{"schema":1,"peer_id":"p7"}', expect_mod_revision=None)  # a new peer
    await store.put_if(KEYS.schema_marker(), b'{"schema":1}', expect_mod_revision=None)
    await restorer(store, FakeTerm(store)).restore(snap, "operator:admin")
    state = await ours(store)
    assert state["peers/p1"] == dict(ENTRIES)["peers/p1"] and "peers/p7" in state


class CutAfter(MemoryStore):
    """A store whose writes fail after ``n`` transactions (the restore's client gone, say)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    async def txn(self, checks: Sequence[Check], ops: Sequence[Op]) -> int:
        if self.left <= 0:
            raise errors.Unavailable("cut")
        self.left -= 1
        return await super().txn(checks, ops)


async def test_a_cut_restore_leaves_its_marker_and_is_finished_by_the_same_backup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup, "TXN_OPS", 1)
    snap, store = await source_backup(), CutAfter(2)
    term = FakeTerm(store)
    with pytest.raises(errors.Unavailable, match="cut"):
        await restorer(store, term).restore(snap, "operator:admin")
    assert term.requested == 1 and term.ended == 0  # the term ends (a fresh one refuses commands)
    assert await backup.restore_pending(store, KEYS) is not None
    assert len(await ours(store)) == 1 + 2  # the marker and two entries

    other = Snapshot(manifest_for([ENTRIES[0]]), [ENTRIES[0]])
    with pytest.raises(errors.FailedPrecondition, match="finish that restore with its own file"):
        await restorer(store, FakeTerm(store)).restore(other, "operator:admin")

    store.left = 100
    result = await restorer(store, FakeTerm(store)).restore(snap, "operator:admin")
    assert result.written == 2 and await backup.restore_pending(store, KEYS) is None
    state = await ours(store)
    state.pop("meta/fence_epoch")
    assert state == dict(ENTRIES)


async def test_a_backup_with_lease_bound_keys_or_newer_records_is_refused() -> None:
    store = MemoryStore()
    for bad, says in (([("leader", b"c1")], "a restore never writes"),
                      ([("peers/p1/alive", b"1")], "a restore never writes")):
        with pytest.raises(errors.InvalidArgument, match=says):
            await restorer(store, FakeTerm(store)).restore(Snapshot(manifest_for(bad), bad), "operator:admin")
    newer = manifest_for(ENTRIES, record_schema=records.SCHEMA + 1)
    with pytest.raises(errors.FailedPrecondition, match=f"schema {records.SCHEMA + 1}, newer"):
        await restorer(store, FakeTerm(store)).restore(Snapshot(newer, ENTRIES), "operator:admin")
    marker = [("meta/schema", json.dumps({"schema": records.SCHEMA + 1}).encode())]
    with pytest.raises(errors.FailedPrecondition, match="newer than this coordinator knows"):
        await restorer(store, FakeTerm(store)).restore(Snapshot(manifest_for(marker), marker), "operator:admin")
    assert await store.range("/") == []


async def test_what_a_restore_receives_is_bounded_by_its_manifest() -> None:
    store = MemoryStore()
    books = restorer(store, FakeTerm(store))

    async def stream(*messages: tuple[Manifest | None, list[tuple[str, bytes]]]
                     ) -> AsyncIterator[tuple[Manifest | None, list[tuple[str, bytes]]]]:
        for message in messages:
            yield message

    m = manifest_for(ENTRIES)
    assert (await books.receive(stream((m, []), (None, ENTRIES[:2]), (None, ENTRIES[2:])))).entries == ENTRIES
    with pytest.raises(errors.InvalidArgument, match="first message carries no manifest"):
        await books.receive(stream((None, ENTRIES)))
    with pytest.raises(errors.InvalidArgument, match="second manifest"):
        await books.receive(stream((m, []), (m, [])))
    with pytest.raises(errors.InvalidArgument, match="more than its manifest"):
        await books.receive(stream((m, ENTRIES), (None, [("zz", b"")])))
    with pytest.raises(errors.InvalidArgument, match="sent nothing"):
        await books.receive(stream())


async def test_restore_transactions_stay_within_etcd_limits() -> None:
    class Counting(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[tuple[int, int]] = []

        async def txn(self, checks: Sequence[Check], ops: Sequence[Op]) -> int:
            self.sizes.append((len(ops), sum(len(o.key) + len(o.value) for o in ops if isinstance(o, Put))))
            return await super().txn(checks, ops)

    entries = sorted([(f"events/p1/{i:020d}", os.urandom(20_000)) for i in range(100)]
                     + [(f"trust/{i:064x}", b"x") for i in range(200)] + [("orders/big", b"y" * 700_000)])
    store = Counting()
    await restorer(store, FakeTerm(store)).restore(Snapshot(manifest_for(entries), entries), "operator:admin")
    writes = store.sizes[:-1]  # the last one deletes the marker and sets the fence epoch
    assert sum(n for n, _ in writes) == len(entries)
    assert all(n <= backup.TXN_OPS and (size <= backup.TXN_BYTES or n == 1) for n, size in writes)


def test_the_fence_token_after_a_restore_outranks_every_token_before_it() -> None:
    before = fence_token(0, 2**31)  # a cluster that never restored, after billions of writes
    epoch = next_epoch(NOW, 0)
    assert fence_token(epoch, 2) > before
    assert fence_token(next_epoch(NOW, epoch), 1) > fence_token(epoch, 2**32 - 1)  # same second: still above
    assert fence_token(epoch, 3) < 2**63  # fits the agents' uint64 (and an int64) for decades
    assert next_epoch(NOW + datetime.timedelta(days=365 * 60), 0) << 32 < 2**63


# --- the restore's term, stream, replicas, fence epoch and busy keys (review fixes) ---------------------


class Parts:
    """The leader's parts a real Term stops: deploys in flight never go idle (a slow pause)."""

    class Part:
        async def close(self) -> None:
            pass

        async def wait_idle(self) -> None:
            await asyncio.Event().wait()

    def __init__(self) -> None:
        self.issuance, self.revocation, self.deployment = self.Part(), self.Part(), self.Part()


class HoldingRouter:
    def __init__(self) -> None:
        self.held: str | None = None

    def hold(self, detail: str) -> None:
        self.held = detail

    def block(self, detail: str) -> None:
        pass


async def test_a_restore_cancelled_during_its_pause_ends_the_term() -> None:
    """The client gone (Ctrl-C, deadline) while the term waits for deploys to go idle: the term still
    ends, so the commands it holds are not refused for ever."""
    snap, store, router = await source_backup(), MemoryStore(), HoldingRouter()
    term = Term(Supervisor(), router)
    term.attach(Parts())  # type: ignore[arg-type]
    restoring = asyncio.create_task(Backups(store, KEYS, version="1", term=term).restore(snap, "operator:admin"))
    while router.held is None:
        await asyncio.sleep(0.01)
    restoring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await restoring
    assert term.end_requested.is_set()
    assert await ours(store) == {}


async def test_a_pause_that_fails_ends_the_term() -> None:
    class FailingPause(FakeTerm):
        async def pause(self, reason: str) -> None:
            raise errors.Unavailable("etcd gone while stopping the work")

    snap, store = await source_backup(), MemoryStore()
    term = FailingPause(store)
    with pytest.raises(errors.Unavailable, match="etcd gone"):
        await restorer(store, term).restore(snap, "operator:admin")
    assert term.requested == 1 and await ours(store) == {}


async def messages(*batches: tuple[Manifest | None, list[tuple[str, bytes]]],
                   read: list[int]) -> AsyncIterator[tuple[Manifest | None, list[tuple[str, bytes]]]]:
    """A restore's messages; ``read`` counts those taken."""
    for batch in batches:
        read.append(1)
        yield batch


async def test_a_bad_entry_is_refused_as_it_arrives_before_the_rest_is_read() -> None:
    store = MemoryStore()
    books = restorer(store, FakeTerm(store))
    m, read = manifest_for(ENTRIES), []
    with pytest.raises(errors.InvalidArgument, match="strictly ascending"):
        await books.receive(messages((m, []), (None, [ENTRIES[1], ENTRIES[0]]), (None, ENTRIES[2:]), read=read))
    assert len(read) == 2  # the third message was never asked for
    bad = [("a\x00b", b"")]
    with pytest.raises(errors.InvalidArgument, match="NUL"):
        await books.receive(messages((manifest_for(bad), bad), read=[]))


async def test_key_bytes_count_against_the_restore_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup, "MAX_RESTORE_BYTES", 1000)
    store = MemoryStore()
    entries = [(f"k{i}/" + "x" * 300, b"") for i in range(5)]  # no value bytes at all: 1500 key bytes
    read: list[int] = []
    with pytest.raises(errors.InvalidArgument, match="keys and values pass 1000 bytes"):
        await restorer(store, FakeTerm(store)).receive(
            messages((manifest_for(entries), []), *((None, [e]) for e in entries), read=read))
    assert len(read) == 5  # the manifest and four entries (1212 key bytes): the fifth entry never read


async def test_a_second_restore_is_refused_before_a_byte_of_it_is_read() -> None:
    snap, store = await source_backup(), MemoryStore()
    books = restorer(store, FakeTerm(store))
    go = asyncio.Event()

    async def slow() -> AsyncIterator[tuple[Manifest | None, Sequence[tuple[str, bytes]]]]:
        yield snap.manifest, []
        await go.wait()
        yield None, snap.entries

    first = asyncio.create_task(books.restore_stream(slow(), "operator:admin"))
    await asyncio.sleep(0.01)  # the first is reading its stream
    read: list[int] = []
    told: list[int] = []

    async def taken() -> None:
        told.append(1)

    with pytest.raises(errors.FailedPrecondition, match="already under way"):
        await books.restore_stream(messages((snap.manifest, snap.entries), read=read), "operator:admin", taken=taken)
    assert read == [] and told == []
    go.set()
    assert (await first).entry_count == len(ENTRIES)


async def test_a_restore_is_refused_while_an_older_replica_runs() -> None:
    snap, store = await source_backup(), MemoryStore()
    lease = await store.grant_lease(60)
    for name, version in (("c1", "0.3.0"), ("c2", "0.3.0"), ("c0", "0.2.9")):
        await store.put_if(KEYS.coordinator(name), records.encode({"name": name, "version": version}),
                           expect_mod_revision=None, lease=lease)
    term = FakeTerm(store)
    with pytest.raises(errors.FailedPrecondition, match=r"older than this one \(0\.3\.0\).*c0 \(0\.2\.9\)"):
        await Backups(store, KEYS, version="0.3.0", term=term).restore(snap, "operator:admin")
    assert await ours(store) == {} and not term.paused and not term.requested
    await store.delete_if(KEYS.coordinator("c0"), expect_mod_revision=None)  # upgraded (or stopped): the restore goes
    await Backups(store, KEYS, version="0.3.0", term=term, clock=lambda: NOW).restore(snap, "operator:admin")
    assert (await ours(store))["certs/p1/server"] == dict(ENTRIES)["certs/p1/server"]


async def test_the_fence_epoch_outranks_what_the_live_agents_saw_whatever_this_clock_says(
        caplog: pytest.LogCaptureFixture) -> None:
    """A replica whose clock ran an hour ahead restored first (the agents saw its epoch); this one's clock
    is right and its backup older: the epoch still goes above the agents'."""
    ahead = next_epoch(NOW + datetime.timedelta(hours=1), 0)
    asked: list[int] = []

    async def agent_fences() -> tuple[dict[str, int], dict[str, str]]:
        asked.append(1)
        return {"p1": fence_token(ahead, 7), "p2": fence_token(0, 900)}, {"p3": "no answer within 3 s"}

    snap, store = await source_backup(), MemoryStore()
    books = Backups(store, KEYS, version="1", term=FakeTerm(store), clock=lambda: NOW, agent_fences=agent_fences)
    with caplog.at_level(logging.WARNING, logger=backup.__name__):
        await books.restore(snap, "operator:admin")
    epoch = json.loads((await ours(store))["meta/fence_epoch"])["epoch"]
    assert asked == [1] and epoch == ahead + 1
    assert fence_token(epoch, 1) > fence_token(ahead, 2**32 - 1)
    logged = caplog.text
    assert "p3: no answer within 3 s" in logged and "clock" in logged and "agent p1" in logged


async def test_live_agent_fences_asks_the_live_agents_and_names_those_that_do_not_answer() -> None:
    def peer(peer_id: str, alive: bool) -> PeerInfo:
        return PeerInfo(peer_id, (), f"{peer_id}:1", "", "redirect", "1", True, "", alive)

    class Registry:
        async def list(self) -> list[PeerInfo]:
            return [peer("p1", True), peer("p2", True), peer("p3", True), peer("p4", False)]

    class Pool:
        def __init__(self) -> None:
            self.asked: list[str] = []

        async def call(self, p: PeerInfo, what: str, fn: Any, timeout: float | None = None) -> Any:
            self.asked.append(p.peer_id)
            if p.peer_id == "p2":
                await asyncio.Event().wait()  # hangs: the deadline answers for it
            if p.peer_id == "p3":
                raise errors.Unavailable(f"peer {p.peer_id}: connection refused")
            return agent_pb2.AgentStatusResponse(leader_fence=fence_token(5, 3))

    pool = Pool()
    fences, silent = await backup.LiveAgentFences(Registry(), pool, timeout=0.2)()  # type: ignore[arg-type]
    assert fences == {"p1": fence_token(5, 3)} and sorted(pool.asked) == ["p1", "p2", "p3"]
    assert silent == {"p2": "no answer within 0.2 s", "p3": "peer p3: connection refused"}


class Registering(MemoryStore):
    """An agent that registers again before each of the restore's transactions (``times``; -1: for ever)."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times
        self.n = 0

    async def txn(self, checks: Sequence[Check], ops: Sequence[Op]) -> int:
        if self.times and any(o.key == KEYS.peer("p1") for o in ops if isinstance(o, Put)):
            self.times -= 1
            self.n += 1
            await super().put_if(KEYS.peer("p1"), records.encode({"peer_id": "p1", "n": self.n}),
                                 expect_mod_revision=None)
        return await super().txn(checks, ops)


async def test_a_replaceable_key_written_again_and_again_is_replaced_until_a_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup, "REPLACE_PAUSE", 0.001, raising=False)
    snap, store = await source_backup(), Registering(times=12)
    await restorer(store, FakeTerm(store)).restore(snap, "operator:admin")
    assert (await ours(store))["peers/p1"] == dict(ENTRIES)["peers/p1"] and store.times == 0

    monkeypatch.setattr(backup, "REPLACE_DEADLINE", 0.1)
    snap, store = await source_backup(), Registering(times=-1)
    term = FakeTerm(store)
    with pytest.raises(errors.Aborted, match="peers/p1 changed during the restore .*again and again"):
        await restorer(store, term).restore(snap, "operator:admin")
    assert term.requested == 1
