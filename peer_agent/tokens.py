"""The open HTTP-01 tokens of this peer: which token answers with which key
authorization, for which orders, and until when.

Pure bookkeeping, no I/O: time comes from an injected clock. A token may be
held by several orders at once, because a CA reuses a pending authorization
(same token, same key authorization) for concurrent orders naming the same
host; the token stays served until the last order holding it lets go or every
holding expires. Expiry is what keeps a lost cleanup from leaving port 80 open
for ever.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from clusteracme.peer_agent.errors import InvalidToken, TokenConflict

# RFC 8555 section 8.3: the token is base64url without padding. The upper
# bound is ours: CAs send 43 characters; anything far longer is garbage.
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
# RFC 8555 section 8.1: the key authorization is token "." base64url(JWK
# thumbprint); SHA-256 gives 43 characters, the bound leaves room for others.
_THUMBPRINT_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")

DEFAULT_MAX_TTL = 3600.0
MAX_ORDER_ID_LEN = 256

# One order's part of a batched call: (order id, token -> key authorization).
OrderTokens = tuple[str, Mapping[str, str]]


@dataclass
class _Entry:
    key_authorization: str
    # order id -> expiry (clock time); a holding is live while now < expiry
    holders: dict[str, float] = field(default_factory=dict)

    def live(self, now: float) -> bool:
        return any(expiry > now for expiry in self.holders.values())


def validate_token(token: object) -> str:
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        raise InvalidToken(
            "a challenge token must be 1 to 128 base64url characters [A-Za-z0-9_-]"
        )
    return token


def validate_key_authorization(token: str, key_authorization: object) -> str:
    if not isinstance(key_authorization, str) or not key_authorization.startswith(
        token + "."
    ):
        raise InvalidToken(
            f"the key authorization for token {token} must be '<token>.<thumbprint>'"
        )
    if not _THUMBPRINT_RE.fullmatch(key_authorization[len(token) + 1 :]):
        raise InvalidToken(
            f"the key authorization for token {token} must end in a base64url thumbprint"
        )
    return key_authorization


def validate_order_id(order_id: object) -> str:
    if (
        not isinstance(order_id, str)
        or not 0 < len(order_id) <= MAX_ORDER_ID_LEN
        or not order_id.isprintable()
    ):
        raise InvalidToken(
            f"an order id must be 1 to {MAX_ORDER_ID_LEN} printable characters"
        )
    return order_id


class TokenStore:
    """Open tokens with their key authorizations and expiries.

    ``add`` and ``add_batch`` validate the whole request before changing
    anything, so a rejected call leaves the store as it was. Expired holdings are never
    served, even before ``purge_expired`` drops them.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_ttl: float = DEFAULT_MAX_TTL,
    ) -> None:
        if not (isinstance(max_ttl, (int, float)) and 0 < max_ttl < math.inf):
            raise ValueError("max_ttl must be a positive finite number of seconds")
        self._clock = clock
        self.max_ttl = float(max_ttl)
        self._entries: dict[str, _Entry] = {}

    def validate(self, order_id: str, tokens: Mapping[str, str], ttl: float) -> None:
        """Raise InvalidToken or TokenConflict if ``add`` would; change nothing."""
        self.validate_batch([(order_id, tokens)], ttl)

    def validate_batch(self, orders: Sequence[OrderTokens], ttl: float) -> None:
        """Raise InvalidToken or TokenConflict if ``add_batch`` would; change nothing.

        The orders are checked as if added one after the other, so a token
        that two orders of the batch open with different key authorizations
        conflicts just as it would in two calls.
        """
        if not orders:
            raise InvalidToken("at least one challenge token is required")
        for order_id, tokens in orders:
            validate_order_id(order_id)
            if not isinstance(tokens, Mapping) or not tokens:
                raise InvalidToken("at least one challenge token is required")
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, (int, float))
            or not 0 < ttl <= self.max_ttl
        ):
            raise InvalidToken(
                f"the token TTL must be more than 0 and at most {self.max_ttl:g} seconds"
            )
        now = self._clock()
        opened: dict[str, str] = {}  # what the earlier orders of the batch open
        for _, tokens in orders:
            for token, key_authorization in tokens.items():
                validate_key_authorization(validate_token(token), key_authorization)
                current = opened.get(token)
                entry = self._entries.get(token)
                if current is None and entry is not None and entry.live(now):
                    current = entry.key_authorization
                if current is not None and current != key_authorization:
                    raise TokenConflict(
                        f"token {token} is already open with a different key authorization"
                    )
                opened[token] = key_authorization

    def add(self, order_id: str, tokens: Mapping[str, str], ttl: float) -> int:
        """Open ``tokens`` for ``order_id`` until now + ``ttl``.

        Re-adding a token the order already holds only moves its expiry.
        Returns how many tokens this order now holds.
        """
        self.add_batch([(order_id, tokens)], ttl)
        return self.held(order_id)

    def add_batch(self, orders: Sequence[OrderTokens], ttl: float) -> int:
        """Open the tokens of several orders, each as ``add`` would, until
        now + ``ttl``: all of them, or (when one is refused) none.

        Returns how many tokens are open after the call.
        """
        self.validate_batch(orders, ttl)
        now = self._clock()
        for order_id, tokens in orders:
            for token, key_authorization in tokens.items():
                entry = self._entries.get(token)
                if entry is None or not entry.live(now):
                    # an expired, not yet purged entry may carry another key
                    # authorization: start afresh rather than inherit its holders
                    entry = self._entries[token] = _Entry(key_authorization)
                entry.holders[order_id] = now + ttl
        return self.live_count(now)

    def remove(self, order_id: str, tokens: Iterable[str] | None = None) -> int:
        """Release ``order_id``'s hold on ``tokens`` (all of them when None).

        Unknown tokens are ignored, so cleanup can be repeated. Returns how
        many holdings were released.
        """
        names = list(self._entries) if tokens is None else list(tokens)
        released = 0
        for token in names:
            entry = self._entries.get(token)
            if entry is None or entry.holders.pop(order_id, None) is None:
                continue
            released += 1
            if not entry.holders:
                del self._entries[token]
        return released

    def remove_all(self) -> int:
        """Forget every token of every order; returns how many tokens went."""
        count = len(self._entries)
        self._entries.clear()
        return count

    def get(self, token: str, now: float | None = None) -> str | None:
        """The key authorization of an open, unexpired token, else None."""
        entry = self._entries.get(token)
        if entry is None or not entry.live(self._clock() if now is None else now):
            return None
        return entry.key_authorization

    def purge_expired(self, now: float | None = None) -> int:
        """Drop expired holdings; returns how many tokens stopped existing."""
        now = self._clock() if now is None else now
        purged = 0
        for token, entry in list(self._entries.items()):
            entry.holders = {o: e for o, e in entry.holders.items() if e > now}
            if not entry.holders:
                del self._entries[token]
                purged += 1
        return purged

    def held(self, order_id: str, now: float | None = None) -> int:
        """How many unexpired tokens ``order_id`` holds."""
        now = self._clock() if now is None else now
        return sum(
            1
            for entry in self._entries.values()
            if entry.holders.get(order_id, -math.inf) > now
        )

    def live_count(self, now: float | None = None) -> int:
        """Tokens open now (expired holdings, even if not purged, do not count)."""
        now = self._clock() if now is None else now
        return sum(1 for entry in self._entries.values() if entry.live(now))

    def next_expiry(self) -> float | None:
        """The earliest expiry of any holding, or None when nothing is open."""
        return min(
            (e for entry in self._entries.values() for e in entry.holders.values()),
            default=None,
        )

    def __len__(self) -> int:
        """Tokens stored, including expired ones not purged yet."""
        return len(self._entries)
