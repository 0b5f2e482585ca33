"""TokenStore: expiry against a fake clock, idempotency, shared tokens and
validation (a rejected call changes nothing)."""

from __future__ import annotations

import math

import pytest
from clusteracme.peer_agent.errors import AgentError, InvalidToken, TokenConflict
from clusteracme.peer_agent.tokens import TokenStore

from clusteracme.errors import AlreadyExists, InvalidArgument

THUMB = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
T1, T2, T3 = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA", "tok_2", "tok-3"


def ka(token: str) -> str:
    return f"{token}.{THUMB}"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> TokenStore:
    return TokenStore(clock=clock)


def test_add_and_get(store: TokenStore) -> None:
    assert store.add("o1", {T1: ka(T1), T2: ka(T2)}, 60) == 2
    assert store.get(T1) == ka(T1)
    assert store.get(T2) == ka(T2)
    assert store.get(T3) is None
    assert len(store) == 2


def test_expired_token_is_not_served_even_before_purge(
    store: TokenStore, clock: FakeClock
) -> None:
    store.add("o1", {T1: ka(T1)}, 10)
    assert store.next_expiry() == clock.now + 10
    clock.advance(9.999)
    assert store.get(T1) == ka(T1)
    clock.advance(0.001)
    assert store.get(T1) is None
    assert len(store) == 1  # still stored until purged
    assert store.purge_expired() == 1
    assert len(store) == 0
    assert store.next_expiry() is None


def test_get_and_purge_take_an_explicit_now(store: TokenStore, clock: FakeClock) -> None:
    store.add("o1", {T1: ka(T1)}, 10)
    assert store.get(T1, now=clock.now + 20) is None
    assert store.purge_expired(now=clock.now + 5) == 0
    assert store.purge_expired(now=clock.now + 10) == 1


def test_purge_keeps_unexpired(store: TokenStore, clock: FakeClock) -> None:
    store.add("o1", {T1: ka(T1)}, 10)
    store.add("o2", {T2: ka(T2)}, 30)
    clock.advance(15)
    assert store.purge_expired() == 1
    assert store.get(T1) is None
    assert store.get(T2) == ka(T2)
    assert store.next_expiry() == clock.now + 15


def test_re_adding_identically_is_idempotent_and_extends(
    store: TokenStore, clock: FakeClock
) -> None:
    store.add("o1", {T1: ka(T1)}, 10)
    clock.advance(8)
    assert store.add("o1", {T1: ka(T1)}, 10) == 1
    assert len(store) == 1
    clock.advance(7)  # 15 s after the first add, 7 s after the second
    assert store.get(T1) == ka(T1)
    assert store.next_expiry() == clock.now + 3


def test_conflicting_key_authorization_is_rejected(store: TokenStore) -> None:
    store.add("o1", {T1: ka(T1)}, 60)
    other = f"{T1}.otherThumbprint"
    for order in ("o2", "o1"):
        with pytest.raises(TokenConflict) as info:
            store.add(order, {T1: other}, 60)
        assert T1 in str(info.value)
    assert store.get(T1) == ka(T1)
    assert isinstance(info.value, AlreadyExists) and isinstance(info.value, AgentError)


def test_conflict_in_a_batch_adds_nothing(store: TokenStore) -> None:
    store.add("o1", {T1: ka(T1)}, 60)
    with pytest.raises(TokenConflict):
        store.add("o2", {T2: ka(T2), T1: f"{T1}.otherThumbprint"}, 60)
    assert store.get(T2) is None
    assert len(store) == 1


def test_expired_token_may_be_reopened_with_another_key_authorization(
    store: TokenStore, clock: FakeClock
) -> None:
    store.add("o1", {T1: ka(T1)}, 10)
    clock.advance(10)
    store.add("o2", {T1: f"{T1}.otherThumbprint"}, 10)
    assert store.get(T1) == f"{T1}.otherThumbprint"
    # the stale holding of o1 went with the old entry
    assert store.remove("o1") == 0
    assert store.get(T1) == f"{T1}.otherThumbprint"


def test_token_shared_by_two_orders_stays_until_both_let_go(store: TokenStore) -> None:
    store.add("o1", {T1: ka(T1)}, 60)
    store.add("o2", {T1: ka(T1)}, 60)
    assert len(store) == 1
    assert store.remove("o1") == 1
    assert store.get(T1) == ka(T1)
    assert store.remove("o2", [T1]) == 1
    assert store.get(T1) is None
    assert len(store) == 0


def test_shared_token_lives_until_the_last_holding_expires(
    store: TokenStore, clock: FakeClock
) -> None:
    store.add("o1", {T1: ka(T1)}, 10)
    store.add("o2", {T1: ka(T1)}, 30)
    clock.advance(20)
    assert store.get(T1) == ka(T1)
    assert store.purge_expired() == 0
    assert store.remove("o1") == 0  # its holding already expired
    clock.advance(10)
    assert store.get(T1) is None
    assert store.purge_expired() == 1


def test_remove(store: TokenStore) -> None:
    store.add("o1", {T1: ka(T1), T2: ka(T2)}, 60)
    store.add("o2", {T3: ka(T3)}, 60)
    assert store.remove("o1", [T1, "unknown", T3]) == 1  # T3 is o2's
    assert store.get(T1) is None
    assert store.get(T3) == ka(T3)
    assert store.remove("o1", None) == 1
    assert store.remove("o1", None) == 0  # repeatable
    assert store.remove("nobody") == 0
    assert len(store) == 1
    assert store.remove_all() == 1
    assert len(store) == 0


def test_add_returns_tokens_held_by_the_order(store: TokenStore) -> None:
    assert store.add("o1", {T1: ka(T1)}, 60) == 1
    assert store.add("o1", {T2: ka(T2)}, 60) == 2
    assert store.add("o2", {T3: ka(T3)}, 60) == 1


@pytest.mark.parametrize(
    "token",
    ["", "a" * 129, "abc=", "ab/c", "..", "a b", "t\u00f6k", "%2e", "a.b", "tok\n", 42, None],
)
def test_invalid_tokens_are_rejected(store: TokenStore, token: object) -> None:
    with pytest.raises(InvalidToken) as info:
        store.add("o1", {token: f"{token}.{THUMB}"}, 60)  # type: ignore[dict-item]
    assert isinstance(info.value, InvalidArgument)
    assert len(store) == 0


def test_longest_token_is_accepted(store: TokenStore) -> None:
    token = "A" * 128
    store.add("o1", {token: ka(token)}, 60)
    assert store.get(token) == ka(token)


@pytest.mark.parametrize(
    "key_authorization",
    [T1, f"{T1}.", f"{T1}.a=b", f"{T1}.x.y", f"{T2}.{THUMB}", f"x{T1}.{THUMB}",
     f"{T1}.{'a' * 129}", f"{T1}:{THUMB}", None, b"bytes"],
)
def test_invalid_key_authorizations_are_rejected(
    store: TokenStore, key_authorization: object
) -> None:
    with pytest.raises(InvalidToken):
        store.add("o1", {T1: key_authorization}, 60)  # type: ignore[dict-item]
    assert len(store) == 0


@pytest.mark.parametrize("ttl", [0, -1, 3600.001, math.nan, math.inf, True, "10", None])
def test_invalid_ttls_are_rejected(store: TokenStore, ttl: object) -> None:
    with pytest.raises(InvalidToken):
        store.add("o1", {T1: ka(T1)}, ttl)  # type: ignore[arg-type]
    assert len(store) == 0


def test_ttl_bound_is_configurable(clock: FakeClock) -> None:
    store = TokenStore(clock=clock, max_ttl=30)
    store.add("o1", {T1: ka(T1)}, 30)
    with pytest.raises(InvalidToken):
        store.add("o1", {T1: ka(T1)}, 31)
    with pytest.raises(ValueError):
        TokenStore(clock=clock, max_ttl=0)


@pytest.mark.parametrize("order_id", ["", "x" * 257, "a\nb", None])
def test_invalid_order_ids_are_rejected(store: TokenStore, order_id: object) -> None:
    with pytest.raises(InvalidToken):
        store.add(order_id, {T1: ka(T1)}, 60)  # type: ignore[arg-type]
    assert len(store) == 0


def test_empty_batch_is_rejected(store: TokenStore) -> None:
    with pytest.raises(InvalidToken):
        store.add("o1", {}, 60)


def test_one_bad_token_in_a_batch_adds_nothing(store: TokenStore) -> None:
    with pytest.raises(InvalidToken):
        store.add("o1", {T1: ka(T1), "bad/token": "bad/token." + THUMB}, 60)
    assert store.get(T1) is None
    assert len(store) == 0


# --- batches: several orders in one call ---------------------------------------


def test_a_batch_opens_every_order_as_if_added_one_by_one(store: TokenStore, clock: FakeClock) -> None:
    assert store.add_batch([("o1", {T1: ka(T1)}), ("o2", {T2: ka(T2), T1: ka(T1)})], 60) == 2
    assert (store.get(T1), store.get(T2)) == (ka(T1), ka(T2))
    assert (store.held("o1"), store.held("o2")) == (1, 2)
    store.remove("o1")
    assert store.get(T1) == ka(T1)  # o2 still holds it
    clock.advance(60)
    assert store.get(T2) is None and store.live_count() == 0


def test_an_order_twice_in_a_batch_merges(store: TokenStore) -> None:
    assert store.add_batch([("o1", {T1: ka(T1)}), ("o1", {T2: ka(T2)})], 60) == 2
    assert store.held("o1") == 2


@pytest.mark.parametrize(
    "orders",
    [
        [("o1", {T1: ka(T1)}), ("o2", {"bad/token": "bad/token." + THUMB})],
        [("o1", {T1: ka(T1)}), ("o2", {T2: "not-the-token." + THUMB})],
        [("o1", {T1: ka(T1)}), ("o2", {})],
        [("o1", {T1: ka(T1)}), ("", {T2: ka(T2)})],
        [],
    ],
    ids=["bad-token", "bad-key-authorization", "order-without-tokens", "empty-order-id", "no-orders"],
)
def test_one_invalid_order_refuses_the_whole_batch(store: TokenStore, orders: list) -> None:  # type: ignore[type-arg]
    store.add("o0", {T3: ka(T3)}, 60)
    with pytest.raises(InvalidToken):
        store.add_batch(orders, 60)
    assert store.get(T1) is None and store.get(T2) is None
    assert len(store) == 1 and store.held("o0") == 1


def test_a_conflict_inside_a_batch_refuses_it(store: TokenStore) -> None:
    with pytest.raises(TokenConflict):
        store.add_batch([("o1", {T1: ka(T1)}), ("o2", {T1: f"{T1}.otherThumb"})], 60)
    assert len(store) == 0


def test_a_conflict_with_an_open_token_refuses_the_batch(store: TokenStore) -> None:
    store.add("o0", {T1: ka(T1)}, 60)
    with pytest.raises(TokenConflict):
        store.add_batch([("o1", {T2: ka(T2)}), ("o2", {T1: f"{T1}.otherThumb"})], 60)
    assert store.get(T2) is None and store.get(T1) == ka(T1)
    assert store.held("o0") == 1 and store.held("o1") == 0


def test_a_batch_with_a_bad_ttl_adds_nothing(store: TokenStore) -> None:
    with pytest.raises(InvalidToken):
        store.add_batch([("o1", {T1: ka(T1)}), ("o2", {T2: ka(T2)})], 0)
    assert len(store) == 0


def test_live_count_ignores_expired_holdings_not_yet_purged(store: TokenStore, clock: FakeClock) -> None:
    store.add("o1", {T1: ka(T1)}, 10)
    store.add("o2", {T2: ka(T2)}, 60)
    clock.advance(10)
    assert (store.live_count(), len(store)) == (1, 2)
