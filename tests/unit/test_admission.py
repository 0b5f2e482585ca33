"""Admission control: the pure queue, slots and per-provider budgets."""

from __future__ import annotations

import pytest
from clusteracme.coordinator.admission import BUDGET_WINDOW, Admission, Limits, QueueFull

from clusteracme import errors


def test_orders_over_the_limit_wait_in_submission_order() -> None:
    adm = Admission(Limits(max_active=2, max_queued=10))
    for i in range(5):
        adm.enqueue(f"o{i}", "p")
    assert adm.admit(0.0) == ["o0", "o1"]
    assert adm.admit(0.0) == []  # no slot free
    assert [adm.position(f"o{i}") for i in range(5)] == [0, 0, 1, 2, 3]
    adm.release("o1")
    assert adm.admit(0.0) == ["o2"]
    assert adm.active == 2 and adm.queued == 2


def test_enqueue_is_idempotent_and_release_of_a_queued_order_drops_it() -> None:
    adm = Admission(Limits(max_active=1, max_queued=10))
    adm.enqueue("a", "p")
    adm.enqueue("a", "p")
    adm.enqueue("b", "p")
    assert adm.queued == 2
    adm.release("b")  # cancelled while waiting
    assert adm.admit(0.0) == ["a"]
    adm.enqueue("a", "p")  # already running: stays running, not queued again
    assert adm.queued == 0 and adm.is_active("a")


def test_resumed_orders_at_the_ca_run_at_once_even_over_the_limit() -> None:
    adm = Admission(Limits(max_active=1, max_queued=10))
    adm.run_resumed("x")
    adm.run_resumed("y")
    adm.enqueue("z", "p")
    assert adm.active == 2 and adm.admit(0.0) == []
    adm.release("x")
    assert adm.admit(0.0) == []  # still one over the limit
    adm.release("y")
    assert adm.admit(0.0) == ["z"]


def test_past_the_queue_bound_new_orders_are_refused_with_a_hint() -> None:
    adm = Admission(Limits(max_active=2, max_queued=3), typical_order_seconds=10.0)
    for i in range(3):
        adm.check_room()
        adm.enqueue(f"o{i}", "p")
    with pytest.raises(QueueFull) as info:
        adm.check_room()
    assert isinstance(info.value, errors.ResourceExhausted) and info.value.retryable
    assert info.value.retry_after == pytest.approx(20.0)  # (3 + 1) / 2 rounds of 10 s
    assert "max_queued_orders = 3" in info.value.message


def test_a_provider_budget_delays_its_orders_and_lets_others_pass() -> None:
    adm = Admission(Limits(max_active=10, max_queued=100, orders_per_hour={"le": 2}))
    for order_id, provider in [("a1", "le"), ("a2", "le"), ("a3", "le"), ("b1", "other"), ("a4", "le")]:
        adm.enqueue(order_id, provider)
    assert adm.admit(100.0) == ["a1", "a2", "b1"]
    assert adm.position("a3") == 1 and adm.position("a4") == 2
    assert adm.next_budget_at(200.0) == 100.0 + BUDGET_WINDOW
    assert adm.admit(100.0 + BUDGET_WINDOW - 1) == []
    assert adm.admit(100.0 + BUDGET_WINDOW) == ["a3", "a4"]  # both uses left the window


def test_budget_uses_seeded_from_etcd_count() -> None:
    adm = Admission(Limits(max_active=10, max_queued=100, orders_per_hour={"le": 1}))
    adm.record_use("le", 50.0)
    adm.enqueue("a", "le")
    assert adm.admit(60.0) == []
    assert adm.admit(50.0 + BUDGET_WINDOW) == ["a"]


def test_a_full_house_waits_for_a_release_not_the_budget_timer() -> None:
    adm = Admission(Limits(max_active=1, max_queued=10, orders_per_hour={"le": 1}))
    adm.enqueue("a", "le")
    adm.enqueue("b", "le")
    assert adm.admit(0.0) == ["a"]
    assert adm.next_budget_at(0.0) is None  # no slot: a release wakes the queue
    adm.release("a")
    assert adm.next_budget_at(1.0) == BUDGET_WINDOW


@pytest.mark.parametrize(("limits", "word"), [
    (dict(max_active=0, max_queued=1), "max_active_orders"),
    (dict(max_active=1, max_queued=-1), "max_queued_orders"),
    (dict(max_active=1, max_queued=1, orders_per_hour={"le": 0}), "orders_per_hour"),
])
def test_bad_limits_are_refused(limits: dict, word: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=word):
        Limits(**limits)
