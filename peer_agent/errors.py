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


class InvalidChain(AgentError, InvalidArgument):
    """A chain to deploy is not a clean PEM list of certificates, does not
    link (each issued by the next), or reuses a serial this peer already holds
    for a different certificate."""


class NameMismatch(AgentError, InvalidArgument):
    """A certificate's DNS names differ from the expected ones, or a domain
    certificate does not name its domain."""


class CertificateNotCurrent(AgentError, FailedPrecondition):
    """A certificate is expired or not yet valid by the agent's clock."""


class KeyNotHeld(AgentError, FailedPrecondition):
    """The peer holds no key (or no intact key) for a certificate's public key."""


class RollbackRefused(AgentError, FailedPrecondition):
    """A rollback without a previous pair, or whose expected active serial is
    not the active one."""


class BrokenPair(AgentError, FailedPrecondition):
    """A certificate pair on disk cannot be read (missing file, bad symlink,
    unparsable certificate)."""


class TLSLoadError(AgentError, FailedPrecondition):
    """The TLS library refuses to load a certificate pair; nothing live was touched."""


class EndpointError(AgentError, Unavailable):
    """An in-process TLS endpoint cannot listen; the message names the address."""


class StorageError(AgentError, FailedPrecondition):
    """The agent's state directory cannot be written (disk full, read-only,
    permissions): an operator must act; retrying the same call will not help."""


class UntrustedChain(AgentError, FailedPrecondition):
    """The trust bundle the coordinator delivered is not empty and a chain to
    deploy does not validate to one of its root certificates."""
