"""acmectl's argument types: every value on the command line is checked while
the line is parsed, before any call, and refused with one sentence (argparse
turns it into ``acmectl: --limit: ...``, exit status 2).

Each type is a small callable object so that tests (and shell completion) can
tell what an option takes: :class:`Integer` and :class:`Seconds` know their
range, :class:`PeerId` and :class:`Domain` their syntax, :class:`ReadableFile`
its size cap. Only rules that are certain on the client are checked here: a
peer id is the name of an agent identity (``pki.Identity``), a domain at most
253 characters without blanks or ``/``; the coordinator keeps the rest (name
rules, provider names, schedules).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
from collections.abc import Iterable

from clusteracme import errors, pki
from clusteracme.safetext import terminal_safe

UNATTACHED = "_unattached"  # coordinator/revocation.py UNATTACHED: the history of certificates no slot held
MAX_DOMAIN_CHARS = 253  # RFC 1035: a DNS name of at most 253 characters (an A-label is never shorter)
MAX_SHOWN = 60  # characters of a refused value repeated in the error


def shown(value: str) -> str:
    """A refused value as the error quotes it: control characters escaped, long values cut."""
    cut = value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + "..."
    return repr(terminal_safe(cut))


class Integer:
    """A whole number in ``[low, high]``, written in ASCII digits (no ``1_000``, no ``0x10``)."""

    _SYNTAX = re.compile(r"[+-]?[0-9]+")

    def __init__(self, low: int, high: int, note: str = "") -> None:
        self.low, self.high, self.note = low, high, note
        self.__name__ = "integer"

    def __call__(self, value: str) -> int:
        if not self._SYNTAX.fullmatch(value):
            raise argparse.ArgumentTypeError(f"{shown(value)} is not a whole number")
        number = int(value) if len(value) <= 20 else None  # a longer one is out of any range here
        if number is None or not self.low <= number <= self.high:
            raise argparse.ArgumentTypeError(f"{shown(value)} is out of range: {self.low}{self.note} to {self.high}")
        return number


class Seconds:
    """A duration in seconds: a finite number, more than 0, at most ``high``."""

    _SYNTAX = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")

    def __init__(self, high: float) -> None:
        self.high = high
        self.__name__ = "seconds"

    def __call__(self, value: str) -> float:
        if not self._SYNTAX.fullmatch(value) or len(value) > 40:
            raise argparse.ArgumentTypeError(f"{shown(value)} is not a number of seconds")
        number = float(value)
        if not math.isfinite(number) or number <= 0 or number > self.high:
            raise argparse.ArgumentTypeError(f"{shown(value)} is out of range: more than 0, at most "
                                             f"{self.high:g} seconds")
        return number


class PeerId:
    """A peer id: the name of the peer's agent identity (agent:NAME), the
    only names a peer registers under. ``extra``: other words taken as they
    are (the history's ``_unattached``)."""

    RULE = "letters, digits, '.', '_' and '-', at most 63, starting with a letter or digit"

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.extra = frozenset(extra)
        self.__name__ = "peer id"

    def __call__(self, value: str) -> str:
        if value in self.extra:
            return value
        try:
            pki.Identity.parse(f"{pki.Role.AGENT.value}:{value}")
        except errors.InvalidArgument:
            raise argparse.ArgumentTypeError(f"{shown(value)} is not a peer id ({self.RULE})") from None
        return value


class PeerList:
    """Comma-separated peer ids, in order (``--peers a,b``); returned as given, checked."""

    def __init__(self) -> None:
        self.one = PeerId()
        self.__name__ = "peer list"

    def __call__(self, value: str) -> str:
        items = value.split(",")
        if not value or "" in items:
            raise argparse.ArgumentTypeError(f"{shown(value)} has an empty item; separate peer ids with single "
                                             "commas")
        for item in items:
            self.one(item)
        twice = sorted({item for item in items if items.count(item) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"{shown(value)} names {', '.join(twice)} more than once; give each "
                                             "peer id once")
        return value


class Domain:
    """The domain of a certificate slot: plausible as a DNS name (the
    coordinator checks the name rules). ``server``: also the word "server"
    (the server certificate's slot)."""

    def __init__(self, *, server: bool = False) -> None:
        self.server = server
        self.__name__ = "domain"

    def __call__(self, value: str) -> str:
        if self.server and value == "server":
            return value
        if not value:
            raise argparse.ArgumentTypeError("the domain is empty" + ("; give a domain or 'server'" if self.server
                                                                      else "; give a domain or leave the option out"))
        if len(value) > MAX_DOMAIN_CHARS:
            raise argparse.ArgumentTypeError(f"{shown(value)} is {len(value)} characters long; a domain has at most "
                                             f"{MAX_DOMAIN_CHARS}")
        if "/" in value or any(c.isspace() or not c.isprintable() for c in value):
            raise argparse.ArgumentTypeError(f"{shown(value)} is not a domain: it holds a blank, a '/' or a control "
                                             "character")
        return value


class Word:
    """An identifier the coordinator stores as one key component (an order
    id): 1 to ``high`` printable characters, no blank, no ``/``."""

    def __init__(self, what: str, high: int = 128) -> None:
        self.what, self.high = what, high
        self.__name__ = what

    def __call__(self, value: str) -> str:
        if (not value or len(value) > self.high or "/" in value
                or any(c.isspace() or not c.isprintable() for c in value)):
            raise argparse.ArgumentTypeError(f"{shown(value)} is not {self.what}: 1 to {self.high} characters, no "
                                             "blank, '/' or control character")
        return value


class Sha256:
    """A SHA-256 fingerprint: 64 hex digits, openssl's ``AB:CD:...`` form taken too; returned in lower case."""

    _HEX = re.compile(r"[0-9a-f]{64}")

    def __init__(self) -> None:
        self.__name__ = "sha256"

    def __call__(self, value: str) -> str:
        normal = value.strip().replace(":", "").lower()
        if not self._HEX.fullmatch(normal):
            raise argparse.ArgumentTypeError(f"{shown(value)} is not a SHA-256 fingerprint (64 hex digits)")
        return normal


class Choice:
    """One of ``choices``; refused with "unknown WHAT 'x'; choose one of ..."."""

    def __init__(self, what: str, choices: Iterable[str]) -> None:
        self.what, self.choices = what, tuple(choices)
        self.__name__ = what

    def __call__(self, value: str) -> str:
        if value not in self.choices:
            raise argparse.ArgumentTypeError(f"unknown {self.what} {shown(value)}; choose one of "
                                             + ", ".join(self.choices))
        return value


class LocalPath:
    """A path of a local file or directory acmectl writes (``pki init DIR``,
    ``backup FILE``): not empty (``''`` would mean the current directory),
    no NUL character. Whether it can be written is known when it is."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.__name__ = what

    def __call__(self, value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError(f"the {self.what} path is empty")
        if "\x00" in value:
            raise argparse.ArgumentTypeError(f"the {self.what} path {shown(value)} holds a NUL character")
        return value


class ClusterName:
    """The cluster's name in its CA certificate's common name ("NAME cluster
    CA", at most 64 characters in X.509): 1 to ``pki.MAX_CLUSTER_NAME``
    printable characters."""

    def __init__(self) -> None:
        self.high = pki.MAX_CLUSTER_NAME
        self.__name__ = "cluster name"

    def __call__(self, value: str) -> str:
        if not value or len(value) > self.high or not value.isprintable():
            raise argparse.ArgumentTypeError(f"{shown(value)} is not a cluster name: 1 to {self.high} printable "
                                             "characters (no control character)")
        return value


class Hostname:
    """A DNS name for a certificate's subject alternative names, in ASCII
    (an internationalized name as its A-label, xn--...): labels of letters,
    digits and '-' (not first nor last), 1 to 63 characters each, at most 253
    in all; a leading ``*.`` (wildcard) and a final dot taken."""

    RULE = "ASCII letters, digits, '-' and dots, labels of 1 to 63 characters, at most 253 in all"
    _LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")

    def __init__(self) -> None:
        self.__name__ = "DNS name"

    def __call__(self, value: str) -> str:
        name = value[:-1] if value.endswith(".") else value
        labels = name.split(".")
        if labels[0] == "*" and len(labels) > 1:
            labels = labels[1:]
        if (not name or len(name) > MAX_DOMAIN_CHARS
                or not all(len(label) <= 63 and self._LABEL.fullmatch(label) for label in labels)):
            raise argparse.ArgumentTypeError(f"{shown(value)} is not a DNS name ({self.RULE}; an internationalized "
                                             "name as its xn-- form)")
        return value


class ReadableFile:
    """A regular file this user can read, of at most ``limit`` bytes. Opened
    without blocking (a FIFO never hangs the check) and never read here: the
    command reads it, with the same cap. ``what`` names it in the error."""

    def __init__(self, what: str, limit: int) -> None:
        self.what, self.limit = what, limit
        self.__name__ = what

    def __call__(self, value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError(f"the {self.what} path is empty")
        try:
            fd = os.open(value, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read the {self.what} {terminal_safe(value)}: "
                                             f"{exc.strerror}") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise argparse.ArgumentTypeError(f"the {self.what} {terminal_safe(value)} is not a regular file")
        if st.st_size > self.limit:
            raise argparse.ArgumentTypeError(f"the {self.what} {terminal_safe(value)} is larger than "
                                             f"{_size(self.limit)}")
        return value


def _size(limit: int) -> str:
    if limit % (1024 * 1024) == 0:
        return f"{limit // (1024 * 1024)} MiB"
    if limit % 1024 == 0:
        return f"{limit // 1024} KiB"
    return f"{limit} bytes"
