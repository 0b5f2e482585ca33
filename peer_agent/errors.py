"""The peer agent's error tree.

Every class also subclasses one of the shared kinds in ``clusteracme.errors``
(InvalidArgument, AlreadyExists, Unavailable, ...), so the single gRPC status
mapping and the retry policy apply without knowing about the agent; catching
``AgentError`` catches everything the agent raises on purpose.
"""

from __future__ import annotations

from clusteracme.errors import (
    AlreadyExists,
    ClusterAcmeError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)


class AgentError(ClusterAcmeError):
    """Base of the agent's own errors."""


class InvalidToken(AgentError, InvalidArgument):
    """A challenge token, key authorization, order id or TTL is malformed."""


class TokenConflict(AgentError, AlreadyExists):
    """The token is already open with a different key authorization."""


class NotStarted(AgentError, FailedPrecondition):
    """The challenge service was used before ``start()`` or after ``stop()``."""


class FrontError(AgentError, Unavailable):
    """A listening socket (the port-80 front or the challenge server) cannot
    be bound; the message names the address."""


class InvalidSlot(AgentError, InvalidArgument):
    """A certificate slot or DNS name in a CSR request is malformed."""


class UnknownKeyType(AgentError, InvalidArgument):
    """The requested key type is not one the agent can generate."""
