"""The JSON records the coordinator keeps in etcd: their schema number, the
cluster's schema marker, and read-modify-write on them.

Every record carries a ``schema`` number and is read through :func:`decode`
(there is no other ``json.loads`` of an etcd value). Writers read the record
with its ``mod_revision`` and write it back with compare-and-swap; a writer
that loses the race re-reads and re-decides (:func:`update`).

What the schema number means (README "Upgrading"): records gain fields
without it changing; an older version ignores a field it does not know, and
may drop it when it rewrites the record, so a field that may be dropped
without harm is all such a change may add. A change an older version could
not safely ignore (a field whose loss does harm, a field that changes
meaning, a different shape) raises :data:`SCHEMA`. Then:

- a record of a newer schema is refused (:class:`NewerRecord`: the key, the
  record's schema, the highest this version knows), so a coordinator never
  writes it back in an older form: ``update`` decodes before ``change`` runs;
- a record of an older schema is lifted on read, one step at a time, by
  :data:`UPGRADES`; one older than :data:`OLDEST_SCHEMA` is refused;
- ``meta/schema`` (:class:`SchemaMarker`) holds the highest schema of the
  coordinators that have led the cluster: a leader raises it at the start of
  its term (:func:`raise_marker`), and a coordinator that knows less refuses
  to lead (``app``). A release that raises SCHEMA must keep writing the
  previous schema while ``meta/schema`` is lower (its standbys run beside
  older leaders during a rolling upgrade).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from clusteracme.coordinator.errors import NewerRecord, UnreadableRecord
from clusteracme.coordinator.store.base import Conflict, Store
from clusteracme.coordinator.store.keys import Keys

from clusteracme import __version__
from clusteracme.errors import Aborted

SCHEMA = 1
"""The schema this version writes, and the newest it reads."""
OLDEST_SCHEMA = 1
"""The oldest schema this version reads (lifted by UPGRADES)."""
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
"""``UPGRADES[n]`` turns a record of schema ``n`` into one of schema ``n + 1``;
one entry for every n from OLDEST_SCHEMA to SCHEMA - 1."""
MAX_CAS_ATTEMPTS = 20


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps({**record, "schema": SCHEMA}, sort_keys=True, separators=(",", ":")).encode()


def _named(key: str) -> str:
    return f"the record {key}" if key else "a record"


def peek(raw: bytes, key: str = "") -> dict[str, Any]:
    """The JSON object of a record whatever its schema. Only for reads that
    inform and tolerate any shape (the replicas' member records, the schema
    marker), never for one that leads to a write. UnreadableRecord when it is
    not a JSON object."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnreadableRecord(key, f"{_named(key)} is not JSON ({exc}): it was damaged, or not written by "
                                    "clusteracme") from None
    if not isinstance(data, dict):
        raise UnreadableRecord(key, f"{_named(key)} is not a JSON object: it was damaged, or not written by "
                                    "clusteracme")
    return data


def decode(raw: bytes, key: str = "") -> dict[str, Any]:
    """The record in ``raw`` (the value of ``key``), lifted to SCHEMA.

    NewerRecord when its schema is newer than this version knows;
    UnreadableRecord when it is not a record, its schema is not a number, or
    it is older than OLDEST_SCHEMA. Both are FailedPrecondition (a clear gRPC
    error) and ValueError (the loops that skip an unreadable record)."""
    data = peek(raw, key)
    schema = data.get("schema")
    if type(schema) is not int or schema < 1:
        raise UnreadableRecord(key, f"{_named(key)} has no valid schema number ({schema!r}): it was damaged, or "
                                    "not written by clusteracme")
    if schema > SCHEMA:
        raise NewerRecord(key, f"{_named(key)} has record schema {schema}, newer than this coordinator knows "
                               f"(clusteracme {__version__} knows schema up to {SCHEMA}): it was written by a newer "
                               "clusteracme; upgrade this coordinator (it never writes over a newer record)",
                          schema=schema, known=SCHEMA)
    if schema < OLDEST_SCHEMA:
        raise UnreadableRecord(key, f"{_named(key)} has record schema {schema}, older than this coordinator reads "
                                    f"(clusteracme {__version__} reads schema {OLDEST_SCHEMA} to {SCHEMA}): upgrade "
                                    "through an intermediate release, which rewrites it (README, Upgrading)")
    while schema < SCHEMA:
        data = UPGRADES[schema](data)
        schema += 1
        data["schema"] = schema
    return data


async def read(store: Store, key: str) -> tuple[dict[str, Any] | None, int]:
    """The record and its mod_revision (0 when absent)."""
    entry = await store.get(key)
    if entry is None:
        return None, 0
    return decode(entry.value, key), entry.mod_revision


async def update(
    store: Store,
    key: str,
    change: Callable[[dict[str, Any] | None], dict[str, Any] | None | Awaitable[dict[str, Any] | None]],
) -> dict[str, Any] | None:
    """Apply ``change`` to the record with compare-and-swap, retrying lost races.

    ``change`` gets the current record (None when absent) and returns the new
    one, or the same object to write nothing. It may raise to refuse. A
    record this version cannot read is refused before ``change`` runs.
    """
    for _ in range(MAX_CAS_ATTEMPTS):
        current, revision = await read(store, key)
        new = change(current)
        if isinstance(new, Awaitable):
            new = await new
        if new is current or new is None:
            return current
        try:
            await store.put_if(key, encode(new), expect_mod_revision=revision)
            return new
        except Conflict:
            continue
    raise Aborted(f"{key}: too much contention, giving up after {MAX_CAS_ATTEMPTS} attempts")


# --- the cluster's schema marker (meta/schema) ----------------------------------------


@dataclass(frozen=True)
class SchemaMarker:
    """``meta/schema``: the highest record schema of the coordinators that
    have led this cluster, and which one raised it last."""

    schema: int
    version: str = ""      # clusteracme version of the coordinator that wrote it
    written_by: str = ""   # that coordinator's name
    at: str = ""           # when (RFC 3339, UTC)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "written_by": self.written_by, "at": self.at}

    def describe(self) -> str:
        by = f"coordinator {self.written_by}" if self.written_by else "a coordinator"
        return f"{by}, clusteracme {self.version or '?'}" + (f", at {self.at}" if self.at else "")


def refuse_to_lead(marker: SchemaMarker | None, key: str) -> NewerRecord | None:
    """The error to refuse leadership with when ``marker`` is newer than
    this version knows, else None."""
    if marker is None or marker.schema <= SCHEMA:
        return None
    return NewerRecord(key, f"{key} says this cluster's records are at schema {marker.schema} (raised by "
                            f"{marker.describe()}); this coordinator, clusteracme {__version__}, knows schema up to "
                            f"{SCHEMA} and must not lead it: upgrade this coordinator",
                       schema=marker.schema, known=SCHEMA)


async def read_marker(store: Store, keys: Keys) -> tuple[SchemaMarker | None, int]:
    """``meta/schema`` and its mod_revision ((None, 0) when absent). It is
    read whatever its schema: its number is what a coordinator compares."""
    key = keys.schema_marker()
    entry = await store.get(key)
    if entry is None:
        return None, 0
    data = peek(entry.value, key)
    schema = data.get("schema")
    if type(schema) is not int or schema < 1:
        raise UnreadableRecord(key, f"{key} holds no valid schema number ({schema!r}): it was damaged; "
                                    "delete it and a leader writes it again")
    return SchemaMarker(schema, str(data.get("version", "")), str(data.get("written_by", "")),
                        str(data.get("at", ""))), entry.mod_revision


async def raise_marker(store: Store, keys: Keys, name: str,
                       now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
                       ) -> SchemaMarker:
    """At the start of a leader's term (through its fenced store): write
    ``meta/schema`` when absent or lower than SCHEMA; refuse (NewerRecord)
    when it is higher. Returns the marker as it stands after."""
    key = keys.schema_marker()
    for _ in range(MAX_CAS_ATTEMPTS):
        marker, revision = await read_marker(store, keys)
        refusal = refuse_to_lead(marker, key)
        if refusal is not None:
            raise refusal
        if marker is not None and marker.schema == SCHEMA:
            return marker
        new = SchemaMarker(SCHEMA, __version__, name, now().isoformat(timespec="seconds"))
        try:
            await store.put_if(key, encode(new.to_json()), expect_mod_revision=revision)
            return new
        except Conflict:
            continue
    raise Aborted(f"{key}: too much contention, giving up after {MAX_CAS_ATTEMPTS} attempts")
