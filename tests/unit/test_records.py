"""Record schema versions (issue 13, point 7): a record newer than this
coordinator knows is refused with a message that names it and says what to
do, and is never written over; the cluster's marker ``meta/schema`` keeps an
older coordinator from leading; an agent newer than its coordinator is
noticed once."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from clusteracme.coordinator import orders, records
from clusteracme.coordinator.errors import NewerRecord, UnreadableRecord
from clusteracme.coordinator.peers import PeerInfo, Registry, newer_release
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore

from clusteracme import __version__, errors
from clusteracme.rpcutil import status_code_for

KEYS = Keys("/t/")
ROOT = Path(__file__).resolve().parents[2]


def raw(schema: Any = records.SCHEMA, **fields: Any) -> bytes:
    return json.dumps({**fields, "schema": schema}).encode()


# --- decode ----------------------------------------------------------------------------------------


def test_a_record_of_this_schema_reads_as_written() -> None:
    assert records.decode(records.encode({"a": 1}), "/t/x") == {"a": 1, "schema": records.SCHEMA}


def test_a_newer_record_names_the_key_its_schema_the_highest_known_and_the_fix() -> None:
    with pytest.raises(NewerRecord) as refused:
        records.decode(raw(records.SCHEMA + 1, peer_id="p1"), "/t/peers/p1")
    exc = refused.value
    assert exc.message == (
        f"the record /t/peers/p1 has record schema {records.SCHEMA + 1}, newer than this coordinator knows "
        f"(clusteracme {__version__} knows schema up to {records.SCHEMA}): it was written by a newer clusteracme; "
        "upgrade this coordinator (it never writes over a newer record)")
    assert (exc.key, exc.schema, exc.known) == ("/t/peers/p1", records.SCHEMA + 1, records.SCHEMA)
    # A clear gRPC error, and still a ValueError for the loops that skip an unreadable record.
    assert status_code_for(exc) is grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(exc, ValueError) and isinstance(exc, errors.FailedPrecondition)


@pytest.mark.parametrize(("value", "said"), [
    (b'{"a": 1}', "has no valid schema number (None)"),
    (raw(0), "has no valid schema number (0)"),
    (raw("1"), "has no valid schema number ('1')"),
    (raw(True), "has no valid schema number (True)"),
    (b"{broken", "is not JSON"),
    (b"\xff\xfe", "is not JSON"),
    (b"[1, 2]", "is not a JSON object"),
])
def test_an_invalid_record_is_refused_with_another_message(value: bytes, said: str) -> None:
    with pytest.raises(UnreadableRecord) as refused:
        records.decode(value, "/t/orders/o1")
    assert not isinstance(refused.value, NewerRecord)
    assert refused.value.message.startswith("the record /t/orders/o1 ") and said in refused.value.message
    assert "damaged, or not written by clusteracme" in refused.value.message
    assert status_code_for(refused.value) is grpc.StatusCode.FAILED_PRECONDITION


def test_an_older_record_is_lifted_step_by_step_or_refused_when_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    # As a release with schema 3 that reads 2 and up would have it.
    monkeypatch.setattr(records, "SCHEMA", 3)
    monkeypatch.setattr(records, "OLDEST_SCHEMA", 2)
    monkeypatch.setattr(records, "UPGRADES", {2: lambda d: {"names": [d["name"]], "schema": d["schema"]}})
    assert records.decode(raw(2, name="a.example"), "/t/k") == {"names": ["a.example"], "schema": 3}
    assert records.decode(raw(3, names=[]), "/t/k") == {"names": [], "schema": 3}
    with pytest.raises(UnreadableRecord) as refused:
        records.decode(raw(1), "/t/k")
    assert not isinstance(refused.value, NewerRecord)
    assert refused.value.message == (f"the record /t/k has record schema 1, older than this coordinator reads "
                                     f"(clusteracme {__version__} reads schema 2 to 3): upgrade through an "
                                     "intermediate release, which rewrites it (README, Upgrading)")


def test_the_schema_constants_agree() -> None:
    assert orders.SCHEMA == records.SCHEMA  # OrderRecord.from_json checks its own copy
    assert records.OLDEST_SCHEMA <= records.SCHEMA
    assert set(records.UPGRADES) == set(range(records.OLDEST_SCHEMA, records.SCHEMA))


def test_peek_reads_any_schema_for_information_only() -> None:
    assert records.peek(raw(records.SCHEMA + 5, name="c9"), "/t/coordinators/c9")["name"] == "c9"
    with pytest.raises(UnreadableRecord):
        records.peek(b"nope", "/t/coordinators/c9")


def test_every_etcd_value_is_read_through_records() -> None:
    """No json.loads of a stored value outside records.py (secretbox opens
    the sealed account key inside a record it was handed)."""
    offenders = []
    for path in sorted((ROOT / "coordinator").rglob("*.py")):
        if path.name in ("records.py", "secretbox.py"):
            continue
        if re.search(r"json\.loads\(", path.read_text()):
            offenders.append(path.name)
    assert offenders == []
    # ... and every decode names the key it read (the error names the record).
    unnamed = [f"{p.name}: {line.strip()}" for p in sorted((ROOT / "coordinator").rglob("*.py"))
               for line in p.read_text().splitlines() if re.search(r"records\.(decode|peek)\([^,()]+\)", line)]
    assert unnamed == []


# --- never written over ------------------------------------------------------------------------------


async def test_update_refuses_a_newer_record_before_changing_anything() -> None:
    store = MemoryStore()
    key = KEYS.cert("p1", "server")
    revision = await store.put_if(key, raw(records.SCHEMA + 1, domain="", future="x"), expect_mod_revision=0)
    called = []
    with pytest.raises(NewerRecord):
        await records.update(store, key, lambda current: called.append(current) or {"domain": ""})
    entry = await store.get(key)
    assert called == [] and entry is not None and entry.mod_revision == revision
    assert json.loads(entry.value)["future"] == "x"


async def test_a_registration_over_a_newer_peer_record_is_refused_and_writes_nothing() -> None:
    store = MemoryStore()
    key = KEYS.peer("p1")
    revision = await store.put_if(key, raw(records.SCHEMA + 1, peer_id="p1"), expect_mod_revision=0)
    registry = Registry(store, KEYS, lease_ttl=10)
    with pytest.raises(errors.FailedPrecondition) as refused:
        await registry.register(PeerInfo("p1", ("127.0.0.2",), "127.0.0.2:1", "", "closed", "0.2.0", False, ""))
    assert "/t/peers/p1" in refused.value.message
    assert (await store.get(key)).mod_revision == revision  # type: ignore[union-attr]
    assert await store.get(KEYS.peer_alive("p1")) is None


# --- the cluster's marker ----------------------------------------------------------------------------


async def test_the_first_leader_writes_the_marker_and_later_ones_leave_it() -> None:
    store = MemoryStore()
    assert await records.read_marker(store, KEYS) == (None, 0)
    marker = await records.raise_marker(store, KEYS, "c1")
    assert (marker.schema, marker.version, marker.written_by) == (records.SCHEMA, __version__, "c1")
    entry = await store.get("/t/meta/schema")
    assert entry is not None and json.loads(entry.value)["schema"] == records.SCHEMA
    assert (await records.read_marker(store, KEYS))[0] == marker
    again = await records.raise_marker(store, KEYS, "c2")  # same schema: nothing written
    assert again == marker and (await store.get("/t/meta/schema")).mod_revision == entry.mod_revision  # type: ignore[union-attr]


async def test_a_newer_leader_raises_a_lower_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    await records.raise_marker(store, KEYS, "c1")
    monkeypatch.setattr(records, "SCHEMA", records.SCHEMA + 1)
    raised = await records.raise_marker(store, KEYS, "c2")
    assert raised.schema == records.SCHEMA and raised.written_by == "c2"
    assert (await records.read_marker(store, KEYS))[0] == raised


async def test_an_older_coordinator_refuses_to_lead_and_writes_nothing() -> None:
    store = MemoryStore()
    future = records.SCHEMA + 1
    revision = await store.put_if("/t/meta/schema", raw(future, version="9.0.0", written_by="c9",
                                                        at="2030-01-01T00:00:00+00:00"), expect_mod_revision=0)
    marker, _ = await records.read_marker(store, KEYS)
    refusal = records.refuse_to_lead(marker, "/t/meta/schema")
    assert refusal is not None and (refusal.schema, refusal.known) == (future, records.SCHEMA)
    assert refusal.message == (
        f"/t/meta/schema says this cluster's records are at schema {future} (raised by coordinator c9, clusteracme "
        f"9.0.0, at 2030-01-01T00:00:00+00:00); this coordinator, clusteracme {__version__}, knows schema up to "
        f"{records.SCHEMA} and must not lead it: upgrade this coordinator")
    with pytest.raises(NewerRecord) as refused:
        await records.raise_marker(store, KEYS, "c1")
    assert refused.value.message == refusal.message
    assert (await store.get("/t/meta/schema")).mod_revision == revision  # type: ignore[union-attr]
    assert records.refuse_to_lead(None, "/t/meta/schema") is None
    assert records.refuse_to_lead(records.SchemaMarker(records.SCHEMA), "/t/meta/schema") is None


async def test_a_damaged_marker_is_refused_with_what_to_do() -> None:
    store = MemoryStore()
    await store.put_if("/t/meta/schema", b'{"schema": "two"}', expect_mod_revision=0)
    with pytest.raises(UnreadableRecord) as refused:
        await records.read_marker(store, KEYS)
    assert refused.value.message == ("/t/meta/schema holds no valid schema number ('two'): it was damaged; delete "
                                     "it and a leader writes it again")


async def test_the_marker_goes_through_the_leaders_fence() -> None:
    store = MemoryStore()
    await store.put_if("/t/leader", b"c1", expect_mod_revision=0)
    fence = (await store.get("/t/leader")).mod_revision  # type: ignore[union-attr]
    await records.raise_marker(store.fenced("/t/leader", fence), KEYS, "c1")
    assert await store.get("/t/meta/schema") is not None
    await store.delete_if("/t/meta/schema", expect_mod_revision=None)
    await store.put_if("/t/leader", b"c2", expect_mod_revision=None)  # c1 lost the election meanwhile
    with pytest.raises(errors.ClusterAcmeError):
        await records.raise_marker(store.fenced("/t/leader", fence), KEYS, "c1")
    assert await store.get("/t/meta/schema") is None


def test_the_marker_key_is_built_in_keys() -> None:
    assert KEYS.schema_marker() == "/t/meta/schema"
    with pytest.raises(errors.InvalidArgument):
        KEYS.meta("a/b")


# --- agents newer than their coordinator ----------------------------------------------------------------


@pytest.mark.parametrize(("version", "than", "newer"), [
    ("0.3.0", "0.2.0", True), ("0.2.0", "0.2.0", False), ("0.2", "0.2.0", False), ("0.2.1", "0.2", True),
    ("0.10.0", "0.9.9", True), ("1.0.0rc1", "0.9", True), ("0.1.9", "0.2.0", False), ("v0.3", "0.2.0", True),
    ("", "0.2.0", False), ("dev", "0.2.0", False), ("0.2.0.dev3+g1", "0.2.0", False), ("1", "0.2.0", False), ("2.0", "1", False),
])
def test_release_order(version: str, than: str, newer: bool) -> None:
    assert newer_release(version, than) is newer


async def test_an_agent_newer_than_the_coordinator_is_warned_about_once_per_peer(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry(MemoryStore(), KEYS, lease_ttl=10)

    def peer(name: str, version: str) -> PeerInfo:
        return PeerInfo(name, ("127.0.0.2",), "127.0.0.2:1", "", "closed", version, False, "")

    with caplog.at_level(logging.WARNING, logger="clusteracme.coordinator.peers"):
        for _ in range(3):
            await registry.register(peer("p1", "99.0.0"))
            await registry.register(peer("p2", __version__))
        await registry.register(peer("p1", "99.1.0"))  # upgraded again: said again
    warnings = [r.getMessage() for r in caplog.records if "newer than this coordinator" in r.getMessage()]
    assert warnings == [
        f"peer p1 runs agent version 99.0.0, newer than this coordinator (clusteracme {__version__}): upgrade the "
        "coordinators before the agents (README, Upgrading); what the newer agent adds waits for a coordinator "
        "that knows it",
        f"peer p1 runs agent version 99.1.0, newer than this coordinator (clusteracme {__version__}): upgrade the "
        "coordinators before the agents (README, Upgrading); what the newer agent adds waits for a coordinator "
        "that knows it"]
    assert [p.version for p in await registry.list()] == ["99.1.0", __version__]
