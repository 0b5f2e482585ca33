"""The JSON records the coordinator keeps in etcd, and read-modify-write on them.

Every record carries a ``schema`` number. Writers read the record with its
``mod_revision`` and write it back with compare-and-swap; a writer that loses
the race re-reads and re-decides (:func:`update`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from clusteracme.coordinator.store.base import Conflict, Store

from clusteracme.errors import Aborted

SCHEMA = 1
MAX_CAS_ATTEMPTS = 20


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps({**record, "schema": SCHEMA}, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"unsupported record schema {data.get('schema')!r}")
    return data


async def read(store: Store, key: str) -> tuple[dict[str, Any] | None, int]:
    """The record and its mod_revision (0 when absent)."""
    entry = await store.get(key)
    if entry is None:
        return None, 0
    return decode(entry.value), entry.mod_revision


async def update(
    store: Store,
    key: str,
    change: Callable[[dict[str, Any] | None], dict[str, Any] | None | Awaitable[dict[str, Any] | None]],
) -> dict[str, Any] | None:
    """Apply ``change`` to the record with compare-and-swap, retrying lost races.

    ``change`` gets the current record (None when absent) and returns the new
    one, or the same object to write nothing. It may raise to refuse.
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
