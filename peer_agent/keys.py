"""The peer's private keys and CSRs, on local disk only (SPEC R3, DESIGN).

Layout under the agent's state directory::

    slots/<slot>/keys/<sha256>.key      every key generated for the slot (0600),
                                        named by the SHA-256 of its public key
    slots/<slot>/keys/<sha256>.retired  a key seen unused (JSON, 0600): retired_at (first
                                        seen so), seen (calls that found it so), last_seen,
                                        due_at (first call past the retention)
    slots/<slot>/keys/<sha256>.deleting a key being deleted (renamed there first);
                                        left by a crash, the next prune finishes it
    slots/<slot>/keys/<sha256>.deleted  tombstone of a deleted key: JSON with
                                        retired_at and deleted_at (0600)
    slots/<slot>/csr.pem                the latest CSR
    slots/<slot>/current                <sha256> of the latest CSR's key

``<slot>`` is ``server`` or ``domain-<name>``. A new CSR never overwrites a
key: a certificate signed for an earlier CSR still finds its key by the
fingerprint of its public key. Private keys never leave this module except as
signatures (the CSR).

Retired keys (:meth:`KeyStore.prune`): a key is in use while the cluster
still refers to it (the ``keep`` list the coordinator sends: the keys of
every pending, active and previous certificate and current CSR in etcd), while
it is the slot's current CSR key, and while it belongs to the active or
previous pair on this disk. A key in none of these gets a ``.retired`` marker
the first time it is seen so, updated by every later call. It is deleted
(renamed to ``.deleting``, overwritten, unlinked) and a small ``.deleted``
tombstone stays, so a later revocation can say what happened, once a call
finds the retention over that an earlier call had already found over: never
before the third call that saw it unused, and a clock jumping forward does
not delete on the first call after the jump. The times come from this
host's clock: a marker dated after now (the clock was stepped back), or
before the key file's mtime (written while the clock was behind), restarts
the retention. A key back in use loses its marker. Tombstones are dropped
after :data:`TOMBSTONE_SECONDS`.
"""

from __future__ import annotations

import datetime
import fcntl
import grp
import json
import logging
import os
import re
import stat
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from clusteracme.peer_agent.errors import AgentError, InvalidSlot, UnknownKeyType
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from clusteracme.certinfo import key_label, spki_sha256
from clusteracme.errors import InvalidArgument
from clusteracme.pki import write_private
from clusteracme.v1 import common_pb2

log = logging.getLogger(__name__)

# proto enum -> (label, generator). Labels match acmectl's --key-type values.
KEY_TYPES = {
    common_pb2.KEY_TYPE_EC_P256: ("ec-p256", lambda: ec.generate_private_key(ec.SECP256R1())),
    common_pb2.KEY_TYPE_EC_P384: ("ec-p384", lambda: ec.generate_private_key(ec.SECP384R1())),
    common_pb2.KEY_TYPE_RSA_2048: ("rsa-2048", lambda: rsa.generate_private_key(65537, 2048)),
    common_pb2.KEY_TYPE_RSA_3072: ("rsa-3072", lambda: rsa.generate_private_key(65537, 3072)),
    common_pb2.KEY_TYPE_RSA_4096: ("rsa-4096", lambda: rsa.generate_private_key(65537, 4096)),
}
# Used with fullmatch and \Z: "$" also matches before a final newline ("a.example\n" would pass).
_DOMAIN_RE = re.compile(r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
KEY_SUFFIX = ".key"
RETIRED_SUFFIX = ".retired"
DELETED_SUFFIX = ".deleted"
DELETING_SUFFIX = ".deleting"
MTIME_SLACK = 1.0
"""Seconds a marker may predate its key file's mtime (the marker's time is
kept to the millisecond, file systems stamp from a coarse clock)."""
TOMBSTONE_SECONDS = 366 * 86400.0
"""A tombstone says for a year that a key was deleted, then goes too (a
certificate signed for that key has expired long before)."""

# Optional CSR subject attributes besides the CN, in the order they go into
# the subject: (CsrSubject field, OID, label, upper bound from RFC 5280 appendix A).
SUBJECT_ATTRIBUTES = (
    ("country", NameOID.COUNTRY_NAME, "C", 2),
    ("state", NameOID.STATE_OR_PROVINCE_NAME, "ST", 128),
    ("locality", NameOID.LOCALITY_NAME, "L", 128),
    ("organization", NameOID.ORGANIZATION_NAME, "O", 64),
    ("organizational_unit", NameOID.ORGANIZATIONAL_UNIT_NAME, "OU", 64),
)


REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})
"""Unicode categories refused in subject attributes: controls, format
characters (zero-width, bidi), line and paragraph separators, private use,
surrogates, unassigned."""


class InvalidSubject(AgentError, InvalidArgument):
    """A CSR subject attribute (O, OU, L, ST, C) is malformed or too long."""


def validate_subject(subject: Mapping[str, str] | None) -> dict[str, str]:
    """The non-empty subject attributes, checked (C upper-cased); raises
    InvalidSubject naming the attribute. Empty values mean "absent"."""
    known = {name for name, *_ in SUBJECT_ATTRIBUTES}
    unknown = sorted(set(subject or {}) - known)
    if unknown:
        raise InvalidSubject(f"unknown CSR subject attribute(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
    out: dict[str, str] = {}
    for name, _, label, bound in SUBJECT_ATTRIBUTES:
        value = (subject or {}).get(name, "")
        if not isinstance(value, str):
            raise InvalidSubject(f"the subject's {label} must be text")
        if not value:
            continue
        bad = next((ch for ch in value if unicodedata.category(ch) in REFUSED_CATEGORIES), None)
        if bad is not None:  # spaces of any kind (Zs: NBSP, U+3000) are fine
            raise InvalidSubject(f"the subject's {label} holds a control or non-printable character "
                                 f"(U+{ord(bad):04X})")
        value = value.strip()  # as the coordinator does
        if not value:
            raise InvalidSubject(f"the subject's {label} is blank")
        if name == "country":
            if len(value) != 2 or not value.isascii() or not value.isalpha():
                raise InvalidSubject(
                    f"the subject's C must be two letters (ISO 3166 code, e.g. JP), not {value[:10]!r}")
            out[name] = value.upper()
            continue
        if len(value) > bound:
            raise InvalidSubject(f"the subject's {label} has {len(value)} characters, more than {bound} (RFC 5280)")
        out[name] = value
    return out


@dataclass(frozen=True)
class RetiredKey:
    """A key no longer in use: waiting for the retention (``deleted_at`` None)
    or deleted (a tombstone)."""

    domain: str
    fingerprint: str
    retired_at: datetime.datetime
    deleted_at: datetime.datetime | None = None


@dataclass(frozen=True)
class Marker:
    """A retired key's ``.retired`` file."""

    retired_at: datetime.datetime            # first seen unused
    seen: int                                # prune calls that found it unused
    last_seen: datetime.datetime             # the latest of them
    due_at: datetime.datetime | None = None  # the first of them that found the retention over

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"retired_at": rfc3339(self.retired_at), "seen": self.seen,
                                  "last_seen": rfc3339(self.last_seen)}
        if self.due_at is not None:
            out["due_at"] = rfc3339(self.due_at)
        return out


class LinkedKey(Exception):
    """A key file to delete has other hard links: left alone."""


@dataclass
class PruneResult:
    retired: list[RetiredKey] = field(default_factory=list)  # waiting: still on disk
    deleted: list[RetiredKey] = field(default_factory=list)  # deleted by this call
    skipped: list[str] = field(default_factory=list)  # slots left alone, with the reason


def rfc3339(at: datetime.datetime) -> str:
    return at.astimezone(datetime.UTC).isoformat(timespec="milliseconds")


def _parse_time(text: object) -> datetime.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        at = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return at if at.tzinfo is not None else None


def _domain_of(slot_dir: Path) -> str | None:
    """The domain of a slot directory ("" for the server slot), None for anything else."""
    if slot_dir.name == "server":
        return ""
    if slot_dir.name.startswith("domain-") and _DOMAIN_RE.fullmatch(slot_dir.name.removeprefix("domain-")):
        return slot_dir.name.removeprefix("domain-")
    return None


def slot_dirname(domain: str) -> str:
    if not domain:
        return "server"
    if not _DOMAIN_RE.fullmatch(domain):
        raise InvalidSlot(f"{domain!r} is not a valid domain slot name")
    return f"domain-{domain}"


@dataclass(frozen=True)
class SlotKeyInfo:
    domain: str
    public_key_sha256: str   # the key of the latest CSR
    key_type: str
    held_keys: tuple[str, ...]


@dataclass(frozen=True)
class KeyAccess:
    """Who besides the agent may read the deployed private keys (the agent
    setting ``keys.group``): nobody (``gid`` None: slot directories 0700,
    keys 0600) or one group (slot directories 0750, the deployed
    ``privkey.pem`` 0640, both owned by the group). The key store
    (``slots/<slot>/keys/``) stays 0700 either way."""

    group: str = ""
    gid: int | None = None

    @classmethod
    def of_group(cls, group: str) -> KeyAccess:
        """The access for ``keys.group``; InvalidArgument when the group does
        not exist or the agent cannot give files to it (not a member)."""
        if not group:
            return cls()
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise InvalidArgument(f"keys.group: there is no group named {group!r} on this host") from None
        if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
            raise InvalidArgument(
                f"keys.group: the agent (uid {os.geteuid()}) is not a member of group {group!r}, so it cannot "
                f"give the keys to it; add it to the group (systemd: SupplementaryGroups={group})")
        return cls(group, gid)

    @property
    def dir_mode(self) -> int:
        """Mode of ``slots/`` and of every slot directory."""
        return 0o700 if self.gid is None else 0o750

    @property
    def key_mode(self) -> int:
        """Mode of a deployed ``privkey.pem``."""
        return 0o600 if self.gid is None else 0o640

    def apply(self, path: Path, mode: int) -> None:
        """Give ``path`` (a directory or file of the agent's) ``mode`` and,
        with a group, that group; never through a symlink."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if self.gid is not None and os.fstat(fd).st_gid != self.gid:
                os.fchown(fd, -1, self.gid)
            os.fchmod(fd, mode)  # after the chown, which may clear set-id bits
        finally:
            os.close(fd)


class KeyStore:
    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time,
                 access: KeyAccess = KeyAccess()) -> None:
        self.state_dir = state_dir
        self.access = access
        self._root = state_dir / "slots"
        self._clock = clock
        # A CSR switching the current key and a prune deciding what is in use
        # never interleave (both run in threads).
        self._lock = threading.Lock()
        # slots(): each key's type by (path, mtime, size, inode): a status loads no key it has loaded before
        # (RSA-4096 takes ~0.4 s to load).
        self._key_types: dict[Path, tuple[tuple[int, int, int], str]] = {}

    def generate_csr(self, domain: str, common_name: str, sans: list[str], key_type: int,
                     subject: Mapping[str, str] | None = None) -> tuple[str, str]:
        """New key + CSR for the slot; returns (csr_pem, spki_sha256).

        ``subject``: optional O, OU, L, ST, C (CsrSubject field names) put in
        the CSR's subject besides the CN. Everything is checked before the old
        CSR key is replaced, so a refused request leaves the slot as it was.
        """
        if key_type not in KEY_TYPES:
            raise UnknownKeyType(
                f"unknown key type {key_type}; choose one of " + ", ".join(label for label, _ in KEY_TYPES.values())
            )
        slot_dir = self._root / slot_dirname(domain)
        names = [common_name, *[n for n in sans if n != common_name]]
        for name in names:
            if not _DOMAIN_RE.fullmatch(name):
                raise InvalidSlot(f"{name!r} is not a valid A-label DNS name")
        attributes = validate_subject(subject)
        key = KEY_TYPES[key_type][1]()
        subject_name = x509.Name([
            *(x509.NameAttribute(oid, attributes[name])
              for name, oid, _, _ in SUBJECT_ATTRIBUTES if name in attributes),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(subject_name)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256())
        )
        csr_pem = csr.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fingerprint = spki_sha256(key.public_key())
        with self._lock:
            for directory in (self._root, slot_dir):
                directory.mkdir(exist_ok=True, mode=0o700)
                self.access.apply(directory, self.access.dir_mode)  # mkdir's mode is filtered by the umask
            (slot_dir / "keys").mkdir(exist_ok=True, mode=0o700)
            (slot_dir / "keys").chmod(0o700)  # the agent's alone, keys.group or not
            # The slot directory's flock: another process writing this slot's CSR (a second agent on
            # the same state directory) cannot pair its csr.pem with this call's current.
            slot_fd = os.open(slot_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fcntl.flock(slot_fd, fcntl.LOCK_EX)
                write_private(slot_dir / "keys" / f"{fingerprint}.key", key_pem)
                write_private(slot_dir / "csr.pem", csr_pem)
                write_private(slot_dir / "current", fingerprint.encode())  # last: the switch to the new key
            finally:
                os.close(slot_fd)  # releases the flock
        return csr_pem.decode(), fingerprint

    def key_file(self, domain: str, fingerprint: str) -> Path | None:
        """The key whose public key has this SHA-256 fingerprint, if the slot holds it."""
        if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            return None
        path = self._root / slot_dirname(domain) / "keys" / f"{fingerprint}.key"
        return path if path.is_file() else None

    def find_key(self, fingerprint: str) -> Path | None:
        """The key with this public-key fingerprint, in whichever slot holds it."""
        if not re.fullmatch(r"[0-9a-f]{64}", fingerprint) or not self._root.is_dir():
            return None
        for slot_dir in self._root.iterdir():
            path = slot_dir / "keys" / f"{fingerprint}.key"
            if path.is_file():
                return path
        return None

    def slots(self) -> list[SlotKeyInfo]:
        out: list[SlotKeyInfo] = []
        if not self._root.is_dir():
            return out
        known, seen = self._key_types, {}
        for slot_dir in sorted(self._root.iterdir()):
            current = slot_dir / "current"
            if not current.is_file():
                continue
            fingerprint = current.read_text().strip()
            path = slot_dir / "keys" / f"{fingerprint}.key"
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            cached = known.get(path)
            if cached is not None and cached[0] == stamp:
                key_type = cached[1]
            else:
                key_type = key_label(serialization.load_pem_private_key(path.read_bytes(), None).public_key())
            seen[path] = (stamp, key_type)
            domain = "" if slot_dir.name == "server" else slot_dir.name.removeprefix("domain-")
            held = tuple(sorted(p.stem for p in (slot_dir / "keys").glob("*.key")))
            out.append(SlotKeyInfo(domain, fingerprint, key_type, held))
        self._key_types = seen  # only the current keys: the cache never outgrows the slots
        return out

    # -- retired keys ---------------------------------------------------------

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)

    def _slot_dirs(self) -> list[tuple[str, Path]]:
        if not self._root.is_dir():
            return []
        out = []
        for slot_dir in sorted(self._root.iterdir()):
            domain = _domain_of(slot_dir)
            if domain is not None and (slot_dir / "keys").is_dir():
                out.append((domain, slot_dir))
        return out

    def prune(self, keep: Iterable[str], retention_seconds: float,
              pairs_in_use: Callable[[str], Iterable[str]], *, dry_run: bool = False) -> PruneResult:
        """Retire the keys not in use, delete those retired for at least
        ``retention_seconds`` (see the module docstring); with ``dry_run``
        report the same and change nothing.

        ``keep``: fingerprints the cluster still refers to. ``pairs_in_use(domain)``:
        the fingerprints of the slot's active and previous pairs on disk; when
        it raises (a pair that cannot be read), the slot is left alone, as is
        a slot whose current CSR key cannot be read: what is in use there is
        not known. A key whose marker cannot be written is left alone, the
        other keys go on. ``retention_seconds`` must be at least 1 (0 is what
        a request that forgot the field carries).
        """
        keep = set(keep)
        bad = sorted(fp for fp in keep if not _FINGERPRINT_RE.fullmatch(fp))
        if bad:
            raise InvalidArgument(f"keep holds {len(bad)} value(s) that are not SHA-256 fingerprints "
                                  f"(64 lowercase hex digits), e.g. {bad[0][:70]!r}; nothing was changed")
        if not 1 <= retention_seconds < float("inf"):  # also refuses NaN
            raise InvalidArgument(f"the key retention (retention_seconds) must be at least 1 second, not "
                                  f"{retention_seconds} (0 is an unset field); nothing was changed")
        result = PruneResult()
        with self._lock:
            now = self._now()
            for domain, slot_dir in self._slot_dirs():
                label = _label(domain)
                try:
                    current = (slot_dir / "current").read_text().strip()
                except FileNotFoundError:
                    current = ""
                except (OSError, UnicodeDecodeError) as exc:
                    current = f"unreadable ({getattr(exc, 'strerror', None) or exc})"
                if not _FINGERPRINT_RE.fullmatch(current):
                    result.skipped.append(f"{label}: the current CSR key is {current or 'not recorded'}; "
                                          "its keys are left alone")
                    continue
                try:
                    on_disk = set(pairs_in_use(domain))
                except (AgentError, OSError, ValueError) as exc:
                    result.skipped.append(f"{label}: the certificate pairs on disk cannot be read ({exc}); "
                                          "its keys are left alone")
                    continue
                try:
                    self._prune_slot(domain, slot_dir / "keys", keep | on_disk | {current}, retention_seconds, now,
                                     dry_run, result)
                except OSError as exc:  # the directory itself: what was done is done, the rest next call
                    result.skipped.append(f"{label}: {exc.filename or ''} {exc.strerror or exc}; "
                                          "its other keys are left alone")
        for reason in result.skipped:
            log.warning("key retention: %s", reason)
        return result

    def _prune_slot(self, domain: str, keys_dir: Path, in_use: set[str], retention_seconds: float,
                    now: datetime.datetime, dry_run: bool, result: PruneResult) -> None:
        if not dry_run:
            for doomed in keys_dir.glob("*" + DELETING_SUFFIX):  # a deletion a crash cut short
                self._finish_deleting(domain, keys_dir, doomed, now)
        held = {p.name.removesuffix(KEY_SUFFIX) for p in keys_dir.glob("*" + KEY_SUFFIX)}
        for fingerprint in sorted(fp for fp in held if _FINGERPRINT_RE.fullmatch(fp)):
            marker_path = keys_dir / (fingerprint + RETIRED_SUFFIX)
            tombstone = keys_dir / (fingerprint + DELETED_SUFFIX)
            if fingerprint in in_use:
                for stale in (marker_path, tombstone):  # back in use (a tombstone: a deletion cut short)
                    if stale.exists() and not dry_run:
                        _unlink(stale)
                        if stale is marker_path:
                            log.info("key retention: key %s (%s) is in use again", fingerprint, _label(domain))
                continue
            marker = self._trusted_marker(domain, keys_dir, fingerprint, now)
            if marker is None:  # first seen unused (or the retention restarts)
                if not dry_run:
                    try:
                        _write_marker(marker_path, Marker(now, 1, now))
                    except OSError as exc:
                        result.skipped.append(f"{_label(domain)}: key {fingerprint}: its retirement marker cannot "
                                              f"be written ({exc.strerror or exc}); left alone")
                        continue
                    log.info("key retention: key %s (%s) is no longer in use: retired, deleted after the retention",
                             fingerprint, _label(domain))
                result.retired.append(RetiredKey(domain, fingerprint, now))
                continue
            due = (now - marker.retired_at).total_seconds() >= retention_seconds
            if due and marker.due_at is not None and marker.seen >= 2:  # over at an earlier call too
                if not dry_run:
                    try:
                        self._delete(keys_dir, fingerprint, marker.retired_at, now)
                    except (OSError, LinkedKey) as exc:
                        log.error("key retention: cannot delete key %s (%s): %s", fingerprint, _label(domain), exc)
                        result.retired.append(RetiredKey(domain, fingerprint, marker.retired_at))
                        continue
                result.deleted.append(RetiredKey(domain, fingerprint, marker.retired_at, now))
                continue
            if not dry_run:
                try:
                    _write_marker(marker_path, Marker(marker.retired_at, marker.seen + 1, now,
                                                      (marker.due_at or now) if due else None))
                except OSError as exc:
                    result.skipped.append(f"{_label(domain)}: key {fingerprint}: its retirement marker cannot be "
                                          f"updated ({exc.strerror or exc}); left alone")
            result.retired.append(RetiredKey(domain, fingerprint, marker.retired_at))
        if dry_run:
            return
        for marker_path in keys_dir.glob("*" + RETIRED_SUFFIX):  # a marker whose key is gone by other hands
            if marker_path.name.removesuffix(RETIRED_SUFFIX) not in held:
                _unlink(marker_path)
        for tombstone in keys_dir.glob("*" + DELETED_SUFFIX):
            info = _read_tombstone(domain, tombstone)
            if info is not None and info.deleted_at is not None and \
                    (now - info.deleted_at).total_seconds() > TOMBSTONE_SECONDS:
                _unlink(tombstone)

    def _trusted_marker(self, domain: str, keys_dir: Path, fingerprint: str,
                        now: datetime.datetime) -> Marker | None:
        """The key's marker, None when there is none or it cannot be trusted
        (the retention then starts again from now)."""
        marker = _read_marker(keys_dir / (fingerprint + RETIRED_SUFFIX))
        if marker is None:
            return None
        if max(marker.retired_at, marker.last_seen, marker.due_at or marker.retired_at) > now:
            log.warning("key retention: the marker of key %s (%s) is dated after now, %s (the clock was stepped "
                        "back?): its retention starts again", fingerprint, _label(domain), rfc3339(now))
            return None
        try:
            mtime = (keys_dir / (fingerprint + KEY_SUFFIX)).stat().st_mtime
        except OSError:
            return marker  # gone meanwhile: nothing to protect
        if marker.retired_at.timestamp() + MTIME_SLACK < mtime:
            log.warning("key retention: the marker of key %s (%s), %s, is older than the key file (written while "
                        "the clock was behind, or the file restored?): its retention starts again", fingerprint,
                        _label(domain), rfc3339(marker.retired_at))
            return None
        return marker

    def _delete(self, keys_dir: Path, fingerprint: str, retired_at: datetime.datetime,
                now: datetime.datetime) -> None:
        """Tombstone first, then the key: renamed to ``.deleting`` (no
        revocation finds it any more), overwritten, unlinked; then the
        marker. A crash in between leaves a key the next call deletes again,
        or a ``.deleting`` file it finishes. A key file with other hard
        links is refused (LinkedKey): overwriting it would wipe the other
        names' content, unlinking ours would leave the key behind."""
        key_file = keys_dir / (fingerprint + KEY_SUFFIX)
        fd = os.open(key_file, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise LinkedKey(f"{key_file} has {info.st_nlink} hard links (or is not a regular file): not "
                                "deleted; remove the other links")
            write_private(keys_dir / (fingerprint + DELETED_SUFFIX), json.dumps(
                {"retired_at": rfc3339(retired_at), "deleted_at": rfc3339(now)}).encode() + b"\n")
            os.rename(key_file, keys_dir / (fingerprint + DELETING_SUFFIX))
            _overwrite(fd, info.st_size)
        finally:
            os.close(fd)
        (keys_dir / (fingerprint + DELETING_SUFFIX)).unlink()
        _unlink(keys_dir / (fingerprint + RETIRED_SUFFIX))
        _fsync_dir(keys_dir)
        log.info("key retention: key %s deleted (retired %s)", fingerprint, rfc3339(retired_at))

    def _finish_deleting(self, domain: str, keys_dir: Path, doomed: Path, now: datetime.datetime) -> None:
        """Complete a deletion a crash cut short (``<sha256>.deleting``)."""
        fingerprint = doomed.name.removesuffix(DELETING_SUFFIX)
        tombstone = keys_dir / (fingerprint + DELETED_SUFFIX)
        try:
            if _FINGERPRINT_RE.fullmatch(fingerprint) and _read_tombstone(domain, tombstone) is None:
                marker = _read_marker(keys_dir / (fingerprint + RETIRED_SUFFIX))
                write_private(tombstone, json.dumps({
                    "retired_at": rfc3339(marker.retired_at if marker is not None else now),
                    "deleted_at": rfc3339(now)}).encode() + b"\n")
            fd = os.open(doomed, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                info = os.fstat(fd)
                if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                    _overwrite(fd, info.st_size)
                else:
                    log.warning("key retention: %s has %d hard links: unlinked without overwriting", doomed,
                                info.st_nlink)
            finally:
                os.close(fd)
            doomed.unlink()
            _unlink(keys_dir / (fingerprint + RETIRED_SUFFIX))
            _fsync_dir(keys_dir)
        except OSError as exc:
            log.error("key retention: cannot finish deleting %s: %s", doomed, exc)
            return
        log.info("key retention: finished deleting key %s (%s), interrupted earlier", fingerprint, _label(domain))

    def read_key(self, fingerprint: str) -> bytes | None:
        """The PEM of the key with this fingerprint, None when no slot holds
        it. Read under the store's lock: never a key being deleted."""
        with self._lock:
            path = self.find_key(fingerprint)
            return None if path is None else path.read_bytes()

    def retired(self) -> list[RetiredKey]:
        """Keys waiting for the retention, then tombstones of deleted keys."""
        waiting: list[RetiredKey] = []
        deleted: list[RetiredKey] = []
        for domain, slot_dir in self._slot_dirs():
            keys_dir = slot_dir / "keys"
            for marker_path in sorted(keys_dir.glob("*" + RETIRED_SUFFIX)):
                fingerprint = marker_path.name.removesuffix(RETIRED_SUFFIX)
                marker = _read_marker(marker_path)
                if marker is not None and (keys_dir / (fingerprint + KEY_SUFFIX)).is_file():
                    waiting.append(RetiredKey(domain, fingerprint, marker.retired_at))
            for tombstone in sorted(keys_dir.glob("*" + DELETED_SUFFIX)):
                info = _read_tombstone(domain, tombstone)
                if info is not None and not (keys_dir / (info.fingerprint + KEY_SUFFIX)).exists():
                    deleted.append(info)
        return waiting + deleted

    def deleted_key(self, fingerprint: str) -> RetiredKey | None:
        """The tombstone of a key this peer deleted, if any slot has one."""
        if not _FINGERPRINT_RE.fullmatch(fingerprint):
            return None
        for domain, slot_dir in self._slot_dirs():
            keys_dir = slot_dir / "keys"
            info = _read_tombstone(domain, keys_dir / (fingerprint + DELETED_SUFFIX))
            if info is not None and not (keys_dir / (fingerprint + KEY_SUFFIX)).exists():
                return info
        return None


def _label(domain: str) -> str:
    return f"domain {domain}" if domain else "server slot"


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("key retention: cannot delete %s: %s", path, exc)


def _overwrite(fd: int, size: int) -> None:
    zeros = b"\0" * size
    written = 0
    while written < size:
        written += os.pwrite(fd, zeros[written:], written)
    os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_marker(path: Path, marker: Marker) -> None:
    write_private(path, json.dumps(marker.to_json()).encode() + b"\n")


def _read_marker(path: Path) -> Marker | None:
    """A key's retirement marker, None without a (readable) one: a marker that
    does not parse counts as absent, so the key is retired afresh (the
    retention starts again rather than deleting early). A marker of the first
    release holds only the RFC 3339 time: seen once."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("key retention: cannot read %s: %s", path, exc)
        return None
    if not text.lstrip().startswith("{"):
        retired_at = _parse_time(text)
        return Marker(retired_at, 1, retired_at) if retired_at is not None else None
    try:
        data = json.loads(text)
        retired_at, last_seen = _parse_time(data["retired_at"]), _parse_time(data["last_seen"])
        due_at = _parse_time(data["due_at"]) if data.get("due_at") else None
        seen = data["seen"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if retired_at is None or last_seen is None or (data.get("due_at") and due_at is None) or \
            type(seen) is not int or seen < 1:
        return None
    return Marker(retired_at, seen, last_seen, due_at)


def _read_tombstone(domain: str, path: Path) -> RetiredKey | None:
    try:
        data = json.loads(path.read_text())
        retired_at, deleted_at = _parse_time(data["retired_at"]), _parse_time(data["deleted_at"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("key retention: cannot read the tombstone %s: %s", path, exc)
        return None
    if retired_at is None or deleted_at is None:
        return None
    return RetiredKey(domain, path.name.removesuffix(DELETED_SUFFIX), retired_at, deleted_at)
