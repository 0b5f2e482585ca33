"""The peer's deployed certificate pairs on local disk (SPEC R8, R10).

Layout per slot, next to KeyStore's ``keys/`` (``<slot>`` from
``clusteracme.peer_agent.keys.slot_dirname``)::

    slots/<slot>/certs/<serial_hex>/fullchain.pem  (0644) leaf first, then intermediates
    slots/<slot>/certs/<serial_hex>/privkey.pem    (0600) a copy of the slot's key for it
    slots/<slot>/active   -> certs/<serial_hex>    the live pair
    slots/<slot>/previous -> certs/<serial_hex>    the backup pair

External services are configured with ``slots/<slot>/active/fullchain.pem``
and ``.../active/privkey.pem``; the agent's own endpoints load the generation
directory the symlink named when it was read, so one read is always coherent.

The disk is the whole state: a restarted agent (or a second ``CertStore``)
reads exactly what a finished call left. Crash safety: every file is written
to a temp name, fsynced and renamed, and its directory fsynced, before any
symlink names it; each symlink moves with one ``rename``. A switch moves two
symlinks, and the order is chosen so that a crash between them leaves
``previous == active``, which reads as "no previous pair", never a live pair
that was not meant to be live:

- install moves ``previous`` first (to the old active), then ``active``: a
  crash in between still serves the old pair, and repeating the deploy ends
  in exactly the intended state;
- rollback moves ``active`` first (to the old previous), then ``previous``:
  a crash in between has done the rollback and only lost the backup.

Generation directories that no symlink names are deleted after each switch.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from clusteracme.peer_agent.errors import (
    BrokenPair,
    CertificateNotCurrent,
    InvalidChain,
    KeyNotHeld,
    NameMismatch,
    RollbackRefused,
)
from clusteracme.peer_agent.keys import KeyStore, slot_dirname
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from clusteracme import certinfo
from clusteracme.pki import open_unique_temp

log = logging.getLogger(__name__)

CERTS = "certs"
ACTIVE = "active"
PREVIOUS = "previous"
FULLCHAIN = "fullchain.pem"
PRIVKEY = "privkey.pem"
STAGING_PREFIX = ".staging-"
# A real chain is a few KiB and 2-4 certificates; the bounds only stop garbage.
MAX_CHAIN_BYTES = 256 * 1024
MAX_CHAIN_CERTS = 10
# RFC 5280 serials are at most 20 octets; a little slack for non-conforming CAs.
_TARGET_RE = re.compile(rf"{CERTS}/([0-9a-f]{{1,64}})")
# Strict PEM: a label and base64 lines only (certificates carry no PEM headers).
_PEM_BLOCK_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]{1,64})-----\r?\n[A-Za-z0-9+/=\r\n]*?-----END \1-----")


@dataclass(frozen=True)
class ValidatedPair:
    """A chain that passed every check for a slot, with the key it needs."""

    domain: str
    leaf: x509.Certificate
    chain_pem: bytes   # normalized: each certificate re-encoded, leaf first
    key_pem: bytes     # the slot's key file, as stored
    serial_hex: str
    not_after: datetime.datetime
    names: tuple[str, ...]


@dataclass(frozen=True)
class LivePair:
    """A pair on disk (or staged): the files a TLS server loads."""

    domain: str
    serial_hex: str
    fullchain: Path
    privkey: Path
    not_after: datetime.datetime
    names: tuple[str, ...]


@dataclass(frozen=True)
class SlotCerts:
    """What one slot holds; ``problem`` is set (and the rest empty) when its
    active pair cannot be read."""

    domain: str
    active_serial: str
    active_not_after: datetime.datetime | None
    previous_serial: str
    problem: str = ""


class CertStore:
    """Validate, install, roll back and read the certificate pairs of every slot.

    Not safe for concurrent writers: the agent serializes ``install`` and
    ``rollback`` (see ``clusteracme.peer_agent.deployer``). Every method blocks on disk
    I/O; async callers run them in a thread.
    """

    def __init__(self, state_dir: Path, keys: KeyStore, clock: Callable[[], float] = time.time) -> None:
        self._root = state_dir / "slots"
        self._keys = keys
        self._clock = clock

    # -- checks ---------------------------------------------------------

    def validate(self, domain: str, chain_pem: str, expected_names: Iterable[str]) -> ValidatedPair:
        """Check everything about a chain to deploy; change nothing.

        Raises InvalidSlot, InvalidChain, KeyNotHeld, NameMismatch or
        CertificateNotCurrent with a sentence naming the reason.
        """
        slot = self._slot_dir(domain)
        certs = _parse_chain(chain_pem)
        leaf = certs[0]
        serial = format(leaf.serial_number, "x")
        # The serial names the generation directory: one the symlinks could
        # not name (negative, or longer than the slack allows) would leave
        # ``active`` pointing at a directory that reads as broken.
        if leaf.serial_number <= 0:
            raise InvalidChain(f"certificate {serial[:48]} has a serial number that is not positive (RFC 5280); "
                               "the peer files certificates by serial and cannot install it")
        if not _TARGET_RE.fullmatch(f"{CERTS}/{serial}"):
            raise InvalidChain(f"certificate {serial[:48]}... has a serial number of {len(serial)} hex digits, more "
                               "than the peer accepts (RFC 5280 allows 20 octets)")
        key_pem = self._held_key(domain, leaf, serial)
        for i, (cert, issuer) in enumerate(zip(certs, certs[1:], strict=False)):
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
                raise InvalidChain(
                    f"certificate {i} of the chain (serial {format(cert.serial_number, 'x')}) is not issued by "
                    f"certificate {i + 1} (serial {format(issuer.serial_number, 'x')}): {exc or 'bad signature'}"
                ) from exc
        names = {n.lower() for n in certinfo.cert_names(leaf)}
        expected = {n.lower() for n in expected_names}
        if not expected:
            raise NameMismatch("no expected names were given for the certificate")
        if names != expected:
            raise NameMismatch(
                f"certificate {serial} names {', '.join(sorted(names)) or 'no DNS name'}, "
                f"expected {', '.join(sorted(expected))}"
            )
        if domain and domain not in names:
            raise NameMismatch(f"certificate {serial} does not name {domain}, the domain of its slot")
        _check_current(leaf, serial, self._now())
        if serial in (self._target(slot, ACTIVE), self._target(slot, PREVIOUS)):
            # One directory per serial: a different certificate under a serial
            # in use would be mixed with the old one, or silently ignored.
            held = _leaf_of(slot / CERTS / serial / FULLCHAIN)
            if held is not None and held != leaf:
                raise InvalidChain(f"serial {serial} is already held by this peer for a different certificate")
        return ValidatedPair(
            domain=domain,
            leaf=leaf,
            chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs),
            key_pem=key_pem,
            serial_hex=serial,
            not_after=leaf.not_valid_after_utc,
            names=tuple(sorted(names)),
        )

    def _held_key(self, domain: str, leaf: x509.Certificate, serial: str) -> bytes:
        fingerprint = certinfo.spki_sha256(leaf.public_key())
        key_file = self._keys.key_file(domain, fingerprint)
        if key_file is None:
            raise KeyNotHeld(f"the peer does not hold the key of certificate {serial}")
        key_pem = key_file.read_bytes()
        try:
            key = serialization.load_pem_private_key(key_pem, None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyNotHeld(f"the key file {key_file.name} for certificate {serial} does not load ({exc})") from exc
        if certinfo.spki_sha256(key.public_key()) != fingerprint:
            raise KeyNotHeld(f"the key file {key_file.name} does not match certificate {serial}")
        return key_pem

    # -- changes --------------------------------------------------------

    @contextlib.contextmanager
    def staged(self, pair: ValidatedPair) -> Iterator[LivePair]:
        """The pair as files in a private temp directory of its slot, removed
        on exit: TLS libraries load only files, and a pair must be loaded
        before it is installed."""
        tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self._slot_dir(pair.domain)))
        try:
            _write_atomic(tmp / FULLCHAIN, pair.chain_pem, 0o644, sync=False)
            _write_atomic(tmp / PRIVKEY, pair.key_pem, 0o600, sync=False)
            yield LivePair(pair.domain, pair.serial_hex, tmp / FULLCHAIN, tmp / PRIVKEY, pair.not_after, pair.names)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def install(self, domain: str, pair: ValidatedPair) -> tuple[str, str]:
        """Make ``pair`` the slot's active pair, the old active the previous
        one; returns (active_serial, previous_serial).

        Re-installing the active serial moves no symlink (its files are
        rewritten only if they differ, e.g. a new intermediate).
        """
        if pair.domain != domain:
            raise ValueError(f"the pair was validated for slot {pair.domain!r}, not {domain!r}")
        slot = self._slot_dir(domain)
        generation = slot / CERTS / pair.serial_hex
        for directory in (slot / CERTS, generation):
            directory.mkdir(exist_ok=True)
            directory.chmod(0o755)  # fullchain is public; privkey keeps its own 0600
        changed = _put(generation / FULLCHAIN, pair.chain_pem, 0o644)
        access = self._keys.access  # keys.group: 0640 and the group's, else 0600
        changed = _put(generation / PRIVKEY, pair.key_pem, access.key_mode, access.gid) or changed
        if changed:
            _fsync_dir(generation)
            _fsync_dir(slot / CERTS)
        old_active = self._target(slot, ACTIVE)
        if old_active != pair.serial_hex:
            if old_active is not None:
                self._point(slot, PREVIOUS, old_active)
            self._point(slot, ACTIVE, pair.serial_hex)
            _fsync_dir(slot)
            log.info("slot %s: certificate %s active (previous %s)", slot.name, pair.serial_hex, old_active,
                     extra={"domain": domain, "serial": pair.serial_hex, "event": "deploy"})
        self._prune(slot)
        return self._serials(slot)

    def rollback_target(self, domain: str, expected_active_serial: str = "") -> LivePair:
        """The pair a rollback would make active; raises RollbackRefused (or
        BrokenPair, CertificateNotCurrent) when the rollback must not happen."""
        slot = self._slot_dir(domain)
        active, previous = self._serials(slot)
        label = f"the {'domain ' + domain if domain else 'server'} slot"
        if not active:
            raise RollbackRefused(f"{label} has no active certificate to roll back")
        if expected_active_serial and expected_active_serial.lower() != active:
            raise RollbackRefused(
                f"the active certificate of {label} is {active}, not {expected_active_serial}; nothing was changed"
            )
        if not previous:
            raise RollbackRefused(f"{label} has no previous certificate to roll back to")
        target = self._read(slot, domain, PREVIOUS)
        assert target is not None
        # Swapping in an expired pair would break every new connection.
        _check_current(_leaf_of(target.fullchain), previous, self._now())
        return target

    def rollback(self, domain: str, expected_active_serial: str = "") -> tuple[str, str]:
        """Swap active and previous; returns (active_serial, previous_serial).

        Order (see the module docstring): ``active`` first, then ``previous``.
        """
        slot = self._slot_dir(domain)
        old_active, _ = self._serials(slot)
        target = self.rollback_target(domain, expected_active_serial)
        self._point(slot, ACTIVE, target.serial_hex)
        self._point(slot, PREVIOUS, old_active)
        _fsync_dir(slot)
        log.info("slot %s: rolled back to %s (previous %s)", slot.name, target.serial_hex, old_active,
                 extra={"domain": domain, "serial": target.serial_hex, "event": "rollback"})
        self._prune(slot)
        return self._serials(slot)

    # -- reads ----------------------------------------------------------

    def active(self, domain: str) -> LivePair | None:
        """The live pair, or None; raises BrokenPair if it cannot be read."""
        return self._read(self._slot_dir(domain), domain, ACTIVE)

    def previous(self, domain: str) -> LivePair | None:
        """The backup pair, or None (also when it is the active one, as after
        a crash in the middle of a switch)."""
        slot = self._slot_dir(domain)
        if not self._serials(slot)[1]:
            return None
        return self._read(slot, domain, PREVIOUS)

    def slots(self) -> list[SlotCerts]:
        """Every slot that has an active pair, server slot first."""
        out: list[SlotCerts] = []
        if not self._root.is_dir():
            return out
        for slot in sorted(self._root.iterdir(), key=lambda p: (p.name != "server", p.name)):
            if slot.name == "server":
                domain = ""
            elif slot.name.startswith("domain-"):
                domain = slot.name.removeprefix("domain-")
            else:
                continue
            if not (slot / ACTIVE).is_symlink():
                continue
            try:
                pair = self._read(slot, domain, ACTIVE)
                assert pair is not None
                out.append(SlotCerts(domain, pair.serial_hex, pair.not_after, self._serials(slot)[1]))
            except BrokenPair as exc:
                log.warning("%s", exc)
                out.append(SlotCerts(domain, "", None, "", problem=exc.message))
        return out

    def apply_access(self) -> int:
        """Give what is on disk the access ``keys.group`` asks for (the
        agent's start-up; every later CSR and deploy writes it so): with a
        group, the state directory 0711, ``slots/`` and every slot directory
        0750 and each deployed ``privkey.pem`` 0640, owned by the group;
        without, those directories 0700 and keys 0600 (the state directory
        is left as it is). Returns how many paths were changed."""
        access = self._keys.access
        targets: list[tuple[Path, int]] = []
        if access.gid is not None:
            targets.append((self._root.parent, 0o711))  # others may pass, not list: the group reaches slots/
        if self._root.is_dir():
            targets.append((self._root, access.dir_mode))
            for slot in sorted(self._root.iterdir()):
                if slot.is_symlink() or not slot.is_dir() or \
                        not (slot.name == "server" or slot.name.startswith("domain-")):
                    continue
                targets.append((slot, access.dir_mode))
                certs = slot / CERTS
                if certs.is_dir() and not certs.is_symlink():
                    targets += [(generation / PRIVKEY, access.key_mode) for generation in sorted(certs.iterdir())
                                if (generation / PRIVKEY).is_file() and not (generation / PRIVKEY).is_symlink()]
        changed = 0
        state_dir = self._root.parent
        for path, mode in targets:
            info = path.lstat()
            # The state directory is systemd's (StateDirectory=): its mode only. 0711 lets the group pass
            # without owning it, and a group systemd did not set would be chowned back at every start.
            mine = path != state_dir
            if info.st_mode & 0o7777 == mode and (not mine or access.gid in (None, info.st_gid)):
                continue
            if mine:
                access.apply(path, mode)
            else:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
            changed += 1
        if changed:
            log.info("key access (keys.group = %r): %d files and directories changed", access.group, changed)
        return changed

    # -- helpers --------------------------------------------------------

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)

    def now(self) -> datetime.datetime:
        """This store's clock: the time validity is checked at."""
        return self._now()

    def _slot_dir(self, domain: str) -> Path:
        return self._root / slot_dirname(domain)

    def _target(self, slot: Path, link: str) -> str | None:
        """The serial a symlink names, None when there is no symlink."""
        try:
            target = os.readlink(slot / link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BrokenPair(f"{slot.name}/{link} is not a symlink ({exc.strerror})") from exc
        match = _TARGET_RE.fullmatch(target)
        if match is None:
            raise BrokenPair(f"{slot.name}/{link} points to {target!r}, not to a certificate directory")
        return match.group(1)

    def _serials(self, slot: Path) -> tuple[str, str]:
        active = self._target(slot, ACTIVE) or ""
        previous = self._target(slot, PREVIOUS) or ""
        return active, ("" if previous == active else previous)

    def _read(self, slot: Path, domain: str, link: str) -> LivePair | None:
        serial = self._target(slot, link)
        if serial is None:
            return None
        generation = slot / CERTS / serial
        leaf = _leaf_of(generation / FULLCHAIN)
        if leaf is None:
            raise BrokenPair(f"{slot.name}/{link}: {generation / FULLCHAIN} is missing or unreadable")
        if format(leaf.serial_number, "x") != serial:
            raise BrokenPair(f"{slot.name}/{link}: {generation / FULLCHAIN} holds another serial than {serial}")
        if not (generation / PRIVKEY).is_file():
            raise BrokenPair(f"{slot.name}/{link}: {generation / PRIVKEY} is missing")
        names = tuple(sorted(n.lower() for n in certinfo.cert_names(leaf)))
        return LivePair(domain, serial, generation / FULLCHAIN, generation / PRIVKEY, leaf.not_valid_after_utc, names)

    def _point(self, slot: Path, link: str, serial: str) -> None:
        """Move ``link`` to ``certs/<serial>`` in one rename."""
        tmp = slot / f"{link}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a crash
        os.symlink(f"{CERTS}/{serial}", tmp)
        os.replace(tmp, slot / link)

    def _prune(self, slot: Path) -> None:
        """Delete generations no symlink names, and staging left by a crash.
        Failing to delete is logged, never fatal: the switch is done."""
        keep = {self._target(slot, ACTIVE), self._target(slot, PREVIOUS)}
        doomed = [p for p in (slot / CERTS).iterdir() if p.name not in keep] if (slot / CERTS).is_dir() else []
        doomed += list(slot.glob(STAGING_PREFIX + "*"))
        for path in doomed:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError as exc:
                log.warning("cannot delete the old certificate directory %s: %s", path, exc)


def _parse_chain(chain_pem: str) -> list[x509.Certificate]:
    if len(chain_pem) > MAX_CHAIN_BYTES:
        raise InvalidChain(f"the chain is larger than {MAX_CHAIN_BYTES} bytes")
    if not chain_pem.isascii():
        raise InvalidChain("the chain holds non-ASCII characters; expected PEM certificates")
    labels = [m.group(1) for m in _PEM_BLOCK_RE.finditer(chain_pem)]
    if _PEM_BLOCK_RE.sub("", chain_pem).strip():
        raise InvalidChain("the chain holds text outside PEM blocks")
    if any("PRIVATE KEY" in label for label in labels):
        raise InvalidChain("the chain holds a private key: send certificates only, keys never leave the peer")
    for label in labels:
        if label != "CERTIFICATE":
            raise InvalidChain(f"the chain holds a {label} block; only CERTIFICATE blocks are accepted")
    if not labels:
        raise InvalidChain("the chain holds no certificate")
    if len(labels) > MAX_CHAIN_CERTS:
        raise InvalidChain(f"the chain holds {len(labels)} certificates, more than {MAX_CHAIN_CERTS}")
    try:
        return x509.load_pem_x509_certificates(chain_pem.encode("ascii"))
    except ValueError as exc:
        raise InvalidChain(f"a certificate of the chain does not parse ({exc})") from exc


def _check_current(leaf: x509.Certificate | None, serial: str, now: datetime.datetime) -> None:
    if leaf is None:
        raise BrokenPair(f"certificate {serial} cannot be read")
    if now < leaf.not_valid_before_utc:
        raise CertificateNotCurrent(
            f"certificate {serial} is not valid before {leaf.not_valid_before_utc.isoformat()} (now {now.isoformat()})"
        )
    if now > leaf.not_valid_after_utc:
        raise CertificateNotCurrent(f"certificate {serial} expired at {leaf.not_valid_after_utc.isoformat()}")


def _leaf_of(fullchain: Path) -> x509.Certificate | None:
    """The first certificate of a file on disk, None if it is missing or unreadable."""
    try:
        return x509.load_pem_x509_certificates(fullchain.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None


def _put(path: Path, data: bytes, mode: int, gid: int | None = None) -> bool:
    """Write ``path`` unless it already holds ``data`` with ``mode`` (and
    group ``gid``); True if written."""
    try:
        info = path.lstat()
        if not path.is_symlink() and info.st_mode & 0o777 == mode and gid in (None, info.st_gid) \
                and path.read_bytes() == data:
            return False
    except OSError:
        pass
    _write_atomic(path, data, mode, gid=gid)
    return True


def _write_atomic(path: Path, data: bytes, mode: int, *, sync: bool = True, gid: int | None = None) -> None:
    """Temp file + fsync + rename: readers see the old file or the new one.

    The temp file has a unique name in the same directory, created with
    ``O_EXCL|O_NOFOLLOW`` (as ``pki.write_private``): nothing planted at a
    temp name is reused or followed, and two writers never share one."""
    fd, tmp = open_unique_temp(path)
    try:
        with open(fd, "wb") as f:
            if gid is not None:
                os.fchown(fd, -1, gid)  # before any byte is written (keys.group)
            os.fchmod(fd, mode)  # os.open's mode is filtered by the umask
            f.write(data)
            f.flush()
            if sync:
                os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
