"""acmectl backup / restore: the cluster's state in etcd, to a file and back.

The file (``FORMAT_NAME``) is JSON lines, written in one pass as the
coordinator streams the backup:

- the first line ``{"clusteracme_backup": 1, "manifest": {...}}``: the
  ``BackupManifest`` in its JSON mapping (field names as in the proto);
- one line per entry, in key order: ``{"key": "<relative key>", "value":
  "<base64>"}``;
- the last line ``{"end": {"entries": N, "file_sha256": "<hex>"}}``: the
  SHA-256 of every byte before that line, so damage anywhere in the file
  (the manifest too, which the entries' digest does not cover) or a cut is
  seen. Not a deliberate edit: whoever can edit the file can compute both
  digests again (the file is no signature).

It holds the whole cluster state, account keys included (sealed: they are
useless without the coordinators' key file), so it is written 0600, through a
temporary file in the same directory renamed into place once complete and
checked, and never over an existing file unless ``--force`` (a symlink
there, dangling or not, counts as one: ``--force`` replaces the link, never
its target). ``restore`` reads and checks the whole file (size, lines, both
digests, the manifest against the entries) before it calls anything, and
refuses a damaged or changed file with one sentence (exit status 2).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.json_format import MessageToDict

from clusteracme import errors
from clusteracme.backupformat import FORMAT, EntriesCheck, Manifest
from clusteracme.ctl.base import Ctl, CtlError
from clusteracme.v1 import coordinator_pb2 as pb

FORMAT_NAME = "clusteracme_backup"
MAX_FILE_BYTES = 1024 * 1024 * 1024
"""The largest backup file restore reads: far above a cluster's state (the
coordinator takes at most 512 MiB of values, base64 in the file)."""
CALL_TIMEOUT = 300.0
"""backup and restore wait at least this long (or --timeout if longer): a
restore writes the whole state, then waits for a fresh leader."""
CHUNK_BYTES = 1024 * 1024
"""Keys and values per restore message: a quarter of gRPC's message limit."""


class BackupFileError(errors.InvalidArgument):
    """The file is not a complete, unchanged backup."""


def _manifest_json(manifest: pb.BackupManifest) -> dict[str, Any]:
    return MessageToDict(manifest, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def header_line(manifest: pb.BackupManifest) -> bytes:
    return _line({FORMAT_NAME: FORMAT, "manifest": _manifest_json(manifest)})


def entry_line(key: str, value: bytes) -> bytes:
    return _line({"key": key, "value": base64.b64encode(value).decode()})


def end_line(entries: int, file_sha256: str) -> bytes:
    return _line({"end": {"entries": entries, "file_sha256": file_sha256}})


def _object(line: bytes, number: int, path: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise BackupFileError(f"{path} is not a clusteracme backup: line {number} is not JSON") from None
    if not isinstance(obj, dict):
        raise BackupFileError(f"{path} is not a clusteracme backup: line {number} is not a JSON object")
    return obj


def parse_backup(data: bytes, path: str) -> tuple[pb.BackupManifest, list[tuple[str, bytes]]]:
    """The manifest and entries of a backup file's bytes; BackupFileError
    (one sentence) unless every line is as written and both digests match."""
    try:
        return _parse(data, path)
    except errors.InvalidArgument as exc:
        if isinstance(exc, BackupFileError):
            raise
        raise BackupFileError(f"{path}: {exc.message}") from None


def _parse(data: bytes, path: str) -> tuple[pb.BackupManifest, list[tuple[str, bytes]]]:
    if not data.endswith(b"\n"):
        raise BackupFileError(f"{path} is not a complete clusteracme backup: it does not end with a line break "
                              "(cut short?)")
    body_end = data.rfind(b"\n", 0, len(data) - 1) + 1  # the start of the last line
    try:
        end = json.loads(data[body_end:]).get("end")
    except (ValueError, UnicodeDecodeError, AttributeError):
        end = None
    if not isinstance(end, dict) or set(end) != {"entries", "file_sha256"}:
        raise BackupFileError(f"{path} is not a complete clusteracme backup: its last line is not a backup's end "
                              "line (cut short, or not a backup)")
    if hashlib.sha256(data[:body_end]).hexdigest() != end["file_sha256"]:
        raise BackupFileError(f"{path} was changed or damaged: its content does not match the SHA-256 on its last "
                              "line")
    lines = data[:body_end].split(b"\n")[:-1]
    first = _object(lines[0], 1, path) if lines else {}
    if first.get(FORMAT_NAME) != FORMAT:
        raise BackupFileError(f"{path} is a clusteracme backup file of format {first.get(FORMAT_NAME)!r}; this "
                              f"version reads format {FORMAT}")
    if set(first) != {FORMAT_NAME, "manifest"} or not isinstance(first["manifest"], dict):
        raise BackupFileError(f"{path}: the first line holds no manifest")
    try:
        manifest = json_format.ParseDict(first["manifest"], pb.BackupManifest())
    except json_format.ParseError as exc:
        raise BackupFileError(f"{path}: the manifest is not one this version reads ({exc})") from None
    check = EntriesCheck(Manifest.from_pb(manifest))
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        obj = _object(line, number, path)
        if set(obj) != {"key", "value"} or not isinstance(obj["key"], str) or not isinstance(obj["value"], str):
            raise BackupFileError(f"{path}: line {number} is not an entry (a key and a base64 value)")
        try:
            value = base64.b64decode(obj["value"], validate=True)
        except (binascii.Error, ValueError):
            raise BackupFileError(f"{path}: line {number} has a value that is not base64") from None
        check.add(obj["key"], value)
        entries.append((obj["key"], value))
    if end["entries"] != len(entries):
        raise BackupFileError(f"{path}: its end line counts {end['entries']} entries, the file holds {len(entries)}")
    check.finish()
    return manifest, entries


def read_backup(path: str) -> tuple[pb.BackupManifest, list[tuple[str, bytes]]]:
    """The backup in the file ``path``, checked in full (``parse_backup``)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise CtlError(f"cannot read the backup file {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise BackupFileError(f"the backup file {path} is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; not a "
                              "clusteracme backup")
    return parse_backup(data, path)


class BackupWriter:
    """The file being written: a 0600 temporary file beside ``path``,
    renamed into place by ``commit`` (refusing an existing ``path`` unless
    ``force``), deleted by ``discard``."""

    def __init__(self, path: str, *, force: bool) -> None:
        self.path = Path(path)
        self.force = force
        # lexists: a symlink (dangling too) is a file there; --force replaces the link, never what it names.
        if os.path.lexists(self.path) and not force:
            raise CtlError(f"{path} exists; give --force to replace it")
        if self.path.is_dir() and not self.path.is_symlink():
            raise CtlError(f"{path} is a directory")
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError as exc:
            raise CtlError(f"cannot write a backup next to {path}: {exc.strerror}") from None
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")  # mkstemp: mode 0600, whatever the umask
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def commit(self, entries: int) -> None:
        self._file.write(end_line(entries, self._hash.hexdigest()))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        try:
            if self.force:
                os.replace(self._tmp, self.path)
            else:
                os.link(self._tmp, self.path)  # refuses a file that appeared meanwhile
                os.unlink(self._tmp)
        except FileExistsError:
            raise CtlError(f"{self.path} appeared while the backup was read; give --force to replace it") from None
        except OSError as exc:
            raise CtlError(f"cannot write {self.path}: {exc.strerror}") from None
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.size = self.path.stat().st_size

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _received() -> Iterator[None]:
    """Around a check of what the coordinator sent: its failure is the coordinator's, not bad input."""
    try:
        yield
    except errors.InvalidArgument as exc:
        raise errors.Unavailable(f"the backup the coordinator sent is inconsistent ({exc.message}); nothing was "
                                 "written") from None


async def cmd_backup(ctl: Ctl, a: argparse.Namespace) -> None:
    writer = BackupWriter(a.file, force=a.force)
    try:
        manifest: pb.BackupManifest | None = None
        check: EntriesCheck | None = None
        async for chunk in ctl.client.stream("Backup", pb.BackupRequest(), read=True,
                                             timeout=max(ctl.args.timeout, CALL_TIMEOUT)):
            if manifest is None:
                if not chunk.HasField("manifest"):
                    raise errors.Unavailable("the coordinator's backup did not start with its manifest")
                manifest = chunk.manifest
                with _received():
                    check = EntriesCheck(Manifest.from_pb(manifest))
                writer.write(header_line(manifest))
            assert check is not None
            for entry in chunk.entries:
                with _received():
                    check.add(entry.key, entry.value)
                writer.write(entry_line(entry.key, entry.value))
        if manifest is None or check is None:
            raise errors.Unavailable("the coordinator sent no backup")
        with _received():
            check.finish()
        writer.commit(check.count)
    except BaseException:
        writer.discard()
        raise
    m = ctl.shown(manifest)
    ctl.out(manifest, lambda: print(
        f"backup of {m.prefix} at revision {m.revision} written to {a.file}: {m.entry_count} entries, "
        f"{m.value_bytes} value bytes ({writer.size} bytes on disk, mode 0600); {m.skipped_leased} lease-bound "
        f"keys left out; sha256 {m.sha256}\nkeep it with the account-key secret file and the cluster CA "
        "(README: Backup and restore)"))


def _messages(manifest: pb.BackupManifest, entries: list[tuple[str, bytes]]) -> Iterator[pb.RestoreChunk]:
    yield pb.RestoreChunk(manifest=manifest)
    batch: list[pb.BackupEntry] = []
    size = 0
    for key, value in entries:
        if batch and size + len(key) + len(value) > CHUNK_BYTES:
            yield pb.RestoreChunk(entries=batch)
            batch, size = [], 0
        batch.append(pb.BackupEntry(key=key, value=value))
        size += len(key) + len(value)
    if batch:
        yield pb.RestoreChunk(entries=batch)


async def cmd_restore(ctl: Ctl, a: argparse.Namespace) -> None:
    manifest, entries = read_backup(a.file)
    if a.check:
        m = ctl.shown(manifest)
        ctl.out(manifest, lambda: print(
            f"{a.file}: a complete backup of {m.prefix} at revision {m.revision}, made {m.created_at} by "
            f"{m.created_by} (clusteracme {m.coordinator_version}, record schema {m.record_schema}): "
            f"{m.entry_count} entries, {m.value_bytes} value bytes, sha256 {m.sha256}"))
        return
    r = await ctl.client.client_stream("Restore", lambda: _messages(manifest, entries),
                                       timeout=max(ctl.args.timeout, CALL_TIMEOUT))
    r = ctl.shown(r)
    ctl.out(r, lambda: print(r.detail))
