"""The coordinator's error tree.

Every class also subclasses one of the shared kinds in ``clusteracme.errors``
(InvalidArgument, FailedPrecondition, Unavailable, ...), so the single gRPC
status mapping and the retry policy apply without knowing about the
coordinator; catching ``CoordinatorError`` catches everything the coordinator
raises on purpose. Messages are sentences acmectl prints as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from clusteracme.errors import (
    ClusterAcmeError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)

if TYPE_CHECKING:
    # Annotation only: names.py raises InvalidNames, so a runtime import would
    # be circular.
    from clusteracme.coordinator.names import NameProblem


class CoordinatorError(ClusterAcmeError):
    """Base of the coordinator's own errors."""


# --- preflight (SPEC R4) ---------------------------------------------------


class InvalidNames(CoordinatorError, InvalidArgument):
    """One or more requested names can never be ordered; ``problems`` has one
    entry per bad name."""

    def __init__(self, problems: Sequence[NameProblem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


class PreflightFailed(CoordinatorError, FailedPrecondition):
    """The names are valid but DNS does not point them at the cluster (yet);
    ``problems`` has one entry per name that fails."""

    def __init__(self, problems: Sequence[NameProblem]) -> None:
        self.problems = list(problems)
        listed = "; ".join(str(p) for p in self.problems)
        super().__init__(f"DNS check failed: {listed} (--force skips the DNS check)")


class ResolverFailed(CoordinatorError, Unavailable):
    """The DNS resolver failed in a way that is not about one name (an
    unexpected library error); the preflight cannot judge any name."""


# --- the CA (SPEC R5, R15) ---------------------------------------------------


class CAError(CoordinatorError, FailedPrecondition):
    """The ACME server refused or failed a request; ``problem`` is the RFC 8555
    problem type's last part (e.g. ``rejectedIdentifier``)."""

    def __init__(self, message: str, *, problem: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.problem = problem


class RateLimited(CoordinatorError, Unavailable):
    """The CA answered ``rateLimited``; ``retry_after`` says when to try again."""


# --- records in etcd (issue 13, upgrades) --------------------------------------


class UnreadableRecord(CoordinatorError, FailedPrecondition, ValueError):
    """A record in etcd this coordinator cannot read: not a record (damaged,
    written by hand or by something else), or of a schema it does not know.
    Also a ValueError: the background loops that skip and log an unreadable
    record catch it as they catch a JSON error. ``key`` names the record."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class NewerRecord(UnreadableRecord):
    """A record of a schema newer than this coordinator knows: written by a
    newer clusteracme. Never written over; upgrade this coordinator.
    ``schema`` is the record's, ``known`` the highest this version reads."""

    def __init__(self, key: str, message: str, *, schema: int, known: int) -> None:
        super().__init__(key, message)
        self.schema = schema
        self.known = known
