"""What a cluster backup is, on both sides of the wire: its manifest, the
digest over its entries, and the check that they agree.

A backup is every key under the cluster's etcd prefix at one revision
(except the keys bound to a lease), each as (key relative to the prefix,
value), in ascending key order, with a manifest (the proto's
``BackupManifest``). The coordinator makes it (``coordinator.backup``),
acmectl keeps it in a file (``ctl.backup``) and sends it back for a restore;
both check it with :func:`check_entries` and compute the same digest, so
this module is the one definition of "the entries match the manifest".

The digest (``BackupManifest.sha256``): SHA-256 over the entries in order,
for each the key (UTF-8), a NUL, the value's length as 8 bytes big-endian,
the value. A key holding a NUL is refused (it would make two different
backups hash alike).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, fields

from clusteracme.errors import InvalidArgument
from clusteracme.v1 import coordinator_pb2 as pb

FORMAT = 1
"""The backup format this version writes and reads (``BackupManifest.format``)."""
MAX_KEY_BYTES = 4096
"""No key of ours comes near it; a longer one is not from a clusteracme prefix."""


@dataclass(frozen=True)
class Manifest:
    """``BackupManifest`` as a value (field for field, same names)."""

    format: int
    prefix: str
    revision: int
    created_at: str
    coordinator_version: str
    record_schema: int
    entry_count: int
    value_bytes: int
    sha256: str
    skipped_leased: int
    created_by: str

    @classmethod
    def from_pb(cls, m: pb.BackupManifest) -> Manifest:
        return cls(**{f.name: getattr(m, f.name) for f in fields(cls)})

    def to_pb(self) -> pb.BackupManifest:
        return pb.BackupManifest(**{f.name: getattr(self, f.name) for f in fields(self)})


class Digest:
    """The running SHA-256 of ``BackupManifest.sha256`` (module docstring)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, key: str, value: bytes) -> None:
        self._hash.update(key.encode())
        self._hash.update(b"\0")
        self._hash.update(len(value).to_bytes(8, "big"))
        self._hash.update(value)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def entries_sha256(entries: Iterable[tuple[str, bytes]]) -> str:
    digest = Digest()
    for key, value in entries:
        digest.update(key, value)
    return digest.hexdigest()


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an entry's key (relative to the prefix), or None."""
    if not key:
        return "an empty key"
    if "\0" in key:
        return f"the key {key[:80]!r} holds a NUL character"
    if key.startswith("/"):
        return f"the key {key[:80]!r} starts with '/' (keys are relative to the prefix)"
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"the key {key[:80]!r}... is longer than {MAX_KEY_BYTES} bytes"
    return None


class EntriesCheck:
    """:func:`check_entries` one entry at a time, for entries that arrive
    in a stream: ``add`` each (refused at once when its key is bad or out of
    order), then ``finish``."""

    def __init__(self, manifest: Manifest) -> None:
        if manifest.format != FORMAT:
            raise InvalidArgument(f"backup format {manifest.format} is not one this version reads (format {FORMAT})")
        self._manifest = manifest
        self._digest = Digest()
        self._previous: str | None = None
        self.count = 0
        self.value_bytes = 0

    def add(self, key: str, value: bytes) -> None:
        problem = key_problem(key)
        if problem is not None:
            raise InvalidArgument(f"entry {self.count + 1} of the backup has {problem}")
        if self._previous is not None and key <= self._previous:
            raise InvalidArgument(f"the backup's entries are not in strictly ascending key order at {key[:80]!r} "
                                  f"(after {self._previous[:80]!r})")
        self._previous = key
        self.count += 1
        self.value_bytes += len(value)
        if self.count > self._manifest.entry_count or self.value_bytes > self._manifest.value_bytes:
            raise InvalidArgument(f"the backup holds more than its manifest says ({self._manifest.entry_count} "
                                  f"entries, {self._manifest.value_bytes} value bytes)")
        self._digest.update(key, value)

    def finish(self) -> None:
        m = self._manifest
        if self.count != m.entry_count:
            raise InvalidArgument(f"the backup holds {self.count} entries where its manifest says {m.entry_count}")
        if self.value_bytes != m.value_bytes:
            raise InvalidArgument(f"the backup's values total {self.value_bytes} bytes where its manifest says "
                                  f"{m.value_bytes}")
        if self._digest.hexdigest() != m.sha256:
            raise InvalidArgument(f"the backup's entries do not match its manifest's SHA-256 ({m.sha256[:16]}...): "
                                  "it was damaged or changed")


def check_entries(manifest: Manifest, entries: Iterable[tuple[str, bytes]]) -> None:
    """InvalidArgument (one sentence) unless the entries are what the
    manifest says: this format, keys valid and strictly ascending, as many
    entries and value bytes as it counts, and its SHA-256."""
    check = EntriesCheck(manifest)
    for key, value in entries:
        check.add(key, value)
    check.finish()
