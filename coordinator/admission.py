"""Admission control for orders (SPEC R19, DESIGN "Orders are admitted, not
just started"). Pure: no I/O, time is an argument.

Every order starts in phase ``queued``. The leader drives at most
``max_active`` orders at once; the rest wait here in submission order. An
order is admitted when a slot is free *and* its provider's optional budget of
new orders per rolling hour has room: a budget-blocked order lets the orders
of other providers behind it go first, never those of its own provider
(submission order holds per provider). Orders resumed past ``new`` (already
open at the CA) are running work, not candidates: they take a slot at once,
even over the limit, and cost no budget.

The queue itself lives in etcd (the order records in phase ``queued``), so a
new leader rebuilds this object from what it reads and admits in the same
order. Only past ``max_queued`` waiting orders is a new order refused
(:class:`QueueFull`), with a hint of when to try again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from clusteracme.errors import InvalidArgument, ResourceExhausted

BUDGET_WINDOW = 3600.0
"""The budget's rolling window, in seconds (budgets are per hour)."""


class QueueFull(ResourceExhausted):
    """More orders wait than the configured bound; try again later."""


@dataclass(frozen=True)
class Limits:
    max_active: int
    max_queued: int
    orders_per_hour: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_active < 1:
            raise InvalidArgument(f"max_active_orders must be at least 1, not {self.max_active}")
        if self.max_queued < 0:
            raise InvalidArgument(f"max_queued_orders must not be negative, not {self.max_queued}")
        for provider, budget in self.orders_per_hour.items():
            if budget < 1:
                raise InvalidArgument(f"orders_per_hour for {provider!r} must be at least 1, not {budget}")


class Admission:
    """The queue, the running set and the per-provider budgets of one leader.

    ``now`` arguments are wall-clock seconds (budget uses are seeded from the
    ``ordered_at`` times of order records, which survive a leader change).
    """

    def __init__(self, limits: Limits, *, typical_order_seconds: float = 10.0) -> None:
        self.limits = limits
        self._queue: list[tuple[str, str]] = []  # (order_id, provider), submission order
        self._active: set[str] = set()
        self._reserved = 0  # places promised to orders being saved (check_room .. enqueue)
        self._uses: dict[str, deque[float]] = {}
        self._typical = typical_order_seconds

    # --- queries ---------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def is_active(self, order_id: str) -> bool:
        return order_id in self._active

    def position(self, order_id: str) -> int:
        """1-based place in the queue; 0 when not queued."""
        for index, (queued_id, _) in enumerate(self._queue):
            if queued_id == order_id:
                return index + 1
        return 0

    def retry_hint(self) -> float:
        """Seconds after which a refused order has a fair chance of room:
        the time the active slots take to work through the queue."""
        rounds = (self.queued + 1) / self.limits.max_active
        return max(1.0, rounds * self._typical)

    # --- moves -----------------------------------------------------------------
    def check_room(self) -> None:
        """Raise :class:`QueueFull` when one more order would have to wait
        beyond the bound (an order that finds a free slot never waits)."""
        waiting = self.queued + self._reserved
        if waiting >= self.limits.max_queued and self.active + waiting >= self.limits.max_active:
            hint = self.retry_hint()
            raise QueueFull(
                f"{waiting} orders are already waiting (max_queued_orders = {self.limits.max_queued}); "
                f"try again in about {hint:.0f} s",
                retry_after=hint,
            )

    def reserve(self) -> None:
        """:meth:`check_room` and hold the place while the order is saved
        (concurrent signs cannot all pass the check); then :meth:`enqueue`
        with ``reserved=True``, or :meth:`unreserve` when saving failed."""
        self.check_room()
        self._reserved += 1

    def unreserve(self) -> None:
        self._reserved = max(0, self._reserved - 1)

    def enqueue(self, order_id: str, provider: str, *, reserved: bool = False) -> None:
        """Queue an order (no-op when it is already queued or running). The
        bound is checked by :meth:`reserve` before the order is saved;
        orders already saved (a new leader resuming) are always taken."""
        if reserved:
            self.unreserve()
        if order_id in self._active or self.position(order_id):
            return
        self._queue.append((order_id, provider))

    def run_resumed(self, order_id: str) -> None:
        """An order already open at the CA: running work, takes a slot now."""
        self._active.add(order_id)

    def release(self, order_id: str) -> None:
        """The order's driver stopped (ended, or this leader stepped down)."""
        self._active.discard(order_id)
        self._queue = [(o, p) for o, p in self._queue if o != order_id]

    def record_use(self, provider: str, at: float) -> None:
        """A new order was opened at ``provider``'s CA at ``at`` (seeding from
        etcd after a leader change, or an admission)."""
        uses = self._uses.setdefault(provider, deque())
        uses.append(at)
        if len(uses) > 1 and uses[-2] > at:  # seeded out of order: keep it sorted
            self._uses[provider] = deque(sorted(uses))

    def observe_duration(self, seconds: float) -> None:
        """Feed an admitted order's run time into the retry hint."""
        self._typical = 0.8 * self._typical + 0.2 * max(0.0, seconds)

    def admit(self, now: float) -> list[str]:
        """Take the orders that may start now out of the queue, in order."""
        admitted: list[str] = []
        blocked: set[str] = set()  # providers whose budget is spent: later orders of theirs wait too
        index = 0
        while index < len(self._queue) and len(self._active) < self.limits.max_active:
            order_id, provider = self._queue[index]
            if provider in blocked or not self._has_budget(provider, now):
                blocked.add(provider)
                index += 1
                continue
            del self._queue[index]
            self._active.add(order_id)
            if provider in self.limits.orders_per_hour:
                self.record_use(provider, now)
            admitted.append(order_id)
        return admitted

    def next_budget_at(self, now: float) -> float | None:
        """When a queued order held back only by its provider's budget may go
        (None when none is): the moment the oldest use leaves the window."""
        if len(self._active) >= self.limits.max_active:
            return None  # a slot must free first; a release wakes the queue
        times = []
        for _, provider in self._queue:
            if not self._has_budget(provider, now):
                times.append(self._uses[provider][0] + BUDGET_WINDOW)
        return min(times) if times else None

    def _has_budget(self, provider: str, now: float) -> bool:
        budget = self.limits.orders_per_hour.get(provider)
        if budget is None:
            return True
        uses = self._uses.get(provider)
        if uses is None:
            return True
        while uses and uses[0] <= now - BUDGET_WINDOW:
            uses.popleft()
        return len(uses) < budget
