"""Validation and normalization of the DNS names a certificate is ordered for
(SPEC R4, the pure half of the preflight; the DNS half is ``preflight.py``).

Pure: no I/O. Names leave here in the form the CA and the certificate use:
A-labels (punycode), lowercase, no trailing dot.
"""

from __future__ import annotations

import ipaddress
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import idna
from clusteracme.coordinator.errors import InvalidNames

# Common CA limit on identifiers per order (Let's Encrypt, and pebble's default).
MAX_NAMES = 100
MAX_LABEL_OCTETS = 63
MAX_NAME_OCTETS = 253

_LDH = frozenset(string.ascii_lowercase + string.digits + "-")


@dataclass(frozen=True)
class NameProblem:
    """Why one name cannot be ordered. ``name`` is the name as given; it is
    empty for problems of the request as a whole (an empty name, too many)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}" if self.name else self.reason


class _Refused(Exception):
    """Internal: carries one name's refusal reason out of the checks."""


def normalize_names(common_name: str, sans: Sequence[str]) -> list[str]:
    """Return the common name and the SANs as A-labels, CN first, duplicates
    removed (order kept).

    A single trailing dot (the root, as in ``example.com.``) is stripped; more
    than one is refused. Raises ``InvalidNames`` listing every bad name, one
    problem each, so the operator can fix them all in one go.
    """
    if isinstance(sans, str):
        # A bare string is a Sequence[str] too; iterating it would validate
        # single characters and report nonsense.
        raise TypeError("sans must be a sequence of names, not a string")

    problems: list[NameProblem] = []
    names: list[str] = []
    refused: set[str] = set()
    if not common_name:
        problems.append(NameProblem("", "the common name is empty"))
    for position, raw in enumerate([common_name, *sans]):
        if not raw:
            if position > 0:
                problems.append(NameProblem("", "an alternative name is empty"))
            continue
        try:
            a_label = _to_a_label(raw)
        except _Refused as refusal:
            if raw not in refused:
                refused.add(raw)
                problems.append(NameProblem(raw, str(refusal)))
            continue
        if a_label not in names:
            names.append(a_label)

    count = len(names) + len(refused)
    if count > MAX_NAMES:
        problems.append(
            NameProblem("", f"{count} names; a CA accepts at most {MAX_NAMES} per certificate")
        )
    if problems:
        raise InvalidNames(problems)
    return names


def _to_a_label(raw: str) -> str:
    """One name to its A-label form, or ``_Refused`` with the first reason.

    The cheap, specific checks run on the raw text first so the operator reads
    "wildcard" or "underscore" instead of an IDNA codepoint error.
    """
    if any(c.isspace() or unicodedata.category(c) == "Cc" for c in raw):
        raise _Refused("contains whitespace or a control character")
    if "*" in raw:
        raise _Refused("wildcards need DNS-01; HTTP-01 cannot validate them")
    if raw.endswith(".."):
        raise _Refused("trailing dots; at most one final dot is allowed")
    name = raw.removesuffix(".")
    if _is_ip_address(name):
        raise _Refused("an IP address, not a DNS name; only DNS names can be ordered here")
    if "_" in name:
        raise _Refused("contains an underscore, which a host name cannot have")
    if name.isascii():
        # Same rules as below, checked before IDNA so ASCII mistakes get our
        # plain reasons rather than the library's.
        _check_host_name(name.lower())
    try:
        a_label = idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise _Refused(f"not a valid internationalized name: {exc}") from None
    # A U-label's length and label count are only known in A-label form.
    _check_host_name(a_label)
    return a_label


def _is_ip_address(raw: str) -> bool:
    candidate = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _check_host_name(name: str) -> None:
    """The host-name rules on a lowercase ASCII name without trailing dot."""
    labels = name.split(".")
    if "" in labels:
        raise _Refused("empty label")
    for label in labels:
        if len(label) > MAX_LABEL_OCTETS:
            raise _Refused(
                f"label {label[:20]}... is {len(label)} octets long; at most {MAX_LABEL_OCTETS}"
            )
    if len(name) > MAX_NAME_OCTETS:
        raise _Refused(f"{len(name)} octets long; at most {MAX_NAME_OCTETS}")
    for label in labels:
        bad = sorted(set(label) - _LDH)
        if bad:
            raise _Refused(
                f"label {label!r} contains {''.join(bad)!r}; "
                "only letters, digits and hyphens are allowed"
            )
        if label.startswith("-") or label.endswith("-"):
            raise _Refused(f"label {label!r} starts or ends with a hyphen")
        if label[2:4] == "--" and not label.startswith("xn--"):
            raise _Refused(
                f"label {label!r} has '--' in positions 3-4, which is reserved for "
                "IDNA A-labels ('xn--')"
            )
    if len(labels) < 2:
        raise _Refused("a single label; a public CA cannot issue a certificate for it")
    if labels[-1].isdigit():
        # Catches IPv4 look-alikes ipaddress does not parse (1.2.3, 127.0.0.1.).
        raise _Refused("the last label is all digits; no top-level domain is numeric")
