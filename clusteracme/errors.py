"""The shared error tree: what went wrong, and whether and when to retry.

Each side (coordinator, peer agent) subclasses these; the mapping to gRPC
status codes lives in exactly one place, ``clusteracme.rpcutil``. Messages are
human sentences: acmectl prints them as they are.
"""

from __future__ import annotations


class ClusterAcmeError(Exception):
    """Base of every error the product raises on purpose.

    ``retryable`` says whether the same request may succeed later unchanged;
    ``retry_after`` (seconds) says when, if known.
    """

    retryable: bool = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidArgument(ClusterAcmeError):
    """The request itself is wrong (bad name, bad key type, garbage PEM)."""


class NotFound(ClusterAcmeError):
    """The named thing (peer, provider, order, pending certificate) does not exist."""


class AlreadyExists(ClusterAcmeError):
    """Creating something that is already there."""


class FailedPrecondition(ClusterAcmeError):
    """The request is well-formed but the system is not in a state to do it
    (no account yet, no CSR yet, peer disabled, order already running)."""


class PermissionDenied(ClusterAcmeError):
    """The caller's identity may not make this call."""


class Unavailable(ClusterAcmeError):
    """A dependency (etcd, a peer, the CA) is unreachable or busy; try again."""

    retryable = True


class ResourceExhausted(ClusterAcmeError):
    """Over a documented bound (the order queue is full): try again later,
    ``retry_after`` says when."""

    retryable = True


class Aborted(ClusterAcmeError):
    """Lost a compare-and-swap race or leadership; re-read and decide again."""

    retryable = True


class DeadlineExceeded(ClusterAcmeError):
    """A bounded wait ran out."""

    retryable = True
