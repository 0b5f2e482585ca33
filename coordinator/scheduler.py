"""The renewal scheduler (SPEC R9): the leader's loop that signs and deploys
for peers in automatic mode, and warns for those in manual mode.

Thin driver over the pure math in ``clusteracme.coordinator.renewal``. Everything it
decides is persisted in etcd before it acts (the slot's ``renewal`` state, the
drawn sign opportunities under ``schedule/``), so a restarted or new leader
carries on where the last one stopped: no opportunity is used twice, nothing
is signed twice, and a certificate signed before a crash is deployed at its
slot by whoever leads then.

Automatic mode pauses (signs nothing, counts no failure, backs off nothing)
while ACME is disabled on the peer or for the slot, while the certificate in
service was imported, and while no provider can be chosen; the reason is in
the plan (status). A paused slot costs no etcd read per tick (no
opportunity, no renewal information is read for it): the opportunities are
marked spent once when the pause starts and once when it ends, so work
resumes at the next opportunity. An order that ACME switched off ended before
the CA was asked anything (``Issuance._admit``) is a pause too, not a failure.
The slot settings written here: the schedule, the slot's provider, ACME on/off
for the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clusteracme.coordinator import records, renewal, slots
from clusteracme.coordinator.accounts import Accounts, ProviderBook, ProviderUnresolved
from clusteracme.coordinator.admission import QueueFull
from clusteracme.coordinator.deployment import INTENT, Deployment, Settled
from clusteracme.coordinator.issuance import KEY_TYPE_LABELS, Issuance, slot_name
from clusteracme.coordinator.metrics import (
    CERT_NOT_AFTER,
    CONSECUTIVE_FAILURES,
    PEER_ALIVE,
    PEERS_ALIVE,
    RENEWAL_DUE,
    RENEWAL_OVERDUE,
    count_sign,
    forget_slots,
)
from clusteracme.coordinator.peers import PeerInfo, Registry
from clusteracme.coordinator.settings import RenewalSettings
from clusteracme.coordinator.store.base import Store
from clusteracme.coordinator.store.keys import Keys

from clusteracme import certinfo, errors, logfields

log = logging.getLogger(__name__)
UTC = datetime.UTC
SLOW_TICK_SECONDS = 1.0  # a tick that took longer is logged at INFO (the first one always is)
DEFAULT_SCHEDULE = {"auto": False, "days": "all", "time": "now", "tz": "UTC", "key_policy": "rotate"}
_LABEL_TO_KEY_TYPE = {label: enum for enum, label in KEY_TYPE_LABELS.items()}


def _iso(when: datetime.datetime | None) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds") if when else ""


def _parse(text: str | None) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(text) if text else None


@dataclass
class _TickCache:
    """Read once per tick for all its slots: the providers (what the choice
    of a provider depends on) and each peer's drawn opportunities per period."""

    previous_at: datetime.datetime | None = None  # the previous tick (of this leader): the pauses it saw
    book: ProviderBook | None = None
    opportunities: dict[tuple[str, datetime.datetime], tuple[datetime.datetime, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What the scheduler will do next for one slot (also shown by status)."""

    schedule: dict[str, Any]
    due: renewal.Due | None
    next_sign_opportunity: datetime.datetime | None
    next_deploy_slot: datetime.datetime | None
    retry_at: datetime.datetime | None
    failures: int
    warning: str
    paused: str = ""    # why automatic mode signs nothing now (auto mode only)
    provider: str = ""  # the provider automatic renewal would sign with ("" when none can be chosen)


class RenewalScheduler:
    def __init__(self, store: Store, keys: Keys, registry: Registry, accounts: Accounts, issuance: Issuance,
                 deployment: Deployment, settings: RenewalSettings, identity: str, *,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(UTC),
                 randbelow: Callable[[int], int] = secrets.randbelow) -> None:
        self._store = store
        self._keys = keys
        self._registry = registry
        self._accounts = accounts
        self._issuance = issuance
        self._deployment = deployment
        self._settings = settings
        self._identity = identity
        self._clock = clock
        self._randbelow = randbelow
        self._ticks = 0
        self._tick: _TickCache | None = None  # what a tick reads once for all its slots (None between ticks)
        self._last_tick_at: datetime.datetime | None = None  # when the previous tick of this leader started

    # --- schedule settings --------------------------------------------------
    @staticmethod
    def validated(schedule: dict[str, Any]) -> dict[str, Any]:
        """Check a schedule (raises InvalidArgument) and return it normalised."""
        days = renewal.parse_days(schedule["days"])
        renewal.parse_time(schedule["time"])
        renewal.parse_tz(schedule["tz"])
        if schedule["key_policy"] not in ("rotate", "reuse"):
            raise errors.InvalidArgument(f"key policy {schedule['key_policy']!r}: choose rotate or reuse")
        return {**schedule, "days": ",".join(renewal.WEEKDAYS[d] for d in sorted(days))}

    async def set_schedule(self, peer_id: str, domain: str, changes: dict[str, Any], *,
                           provider: str = "") -> dict[str, Any]:
        """Change a slot's schedule; ``provider``: save it with the slot
        (it must exist), "default" to follow the cluster default, "" to keep."""
        await self._registry.get(peer_id)
        if provider and provider != "default":
            await self._accounts.exists(provider)
        key = self._keys.cert(peer_id, slot_name(domain))
        now = _iso_ms(self._clock())

        def change(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None or not current.get("csr"):
                raise errors.FailedPrecondition(
                    f"peer {peer_id}{f' (domain {domain})' if domain else ''} has no CSR yet: "
                    "create one first (acmectl csr create), the renewals reuse its names and key type")
            schedule = self.validated({**DEFAULT_SCHEDULE, **(current.get("schedule") or {}), **changes})
            updated = {**current, "schedule": schedule}
            if schedule["auto"] and not (current.get("schedule") or {}).get("auto"):
                # Turned on now: only opportunities from now on count (status
                # shows the next one, and that is the one used).
                updated["renewal"] = {**(current.get("renewal") or {}), "auto_since": now}
            if provider == "default":
                updated.pop("provider", None)
            elif provider:
                updated["provider"] = provider
            return current if updated == current else updated

        updated = await records.update(self._store, key, change)
        assert updated is not None
        return updated

    # --- the loop -------------------------------------------------------------
    async def run(self) -> None:
        """Tick until cancelled; one slot's trouble never stops the others."""
        logfields.bind(who=self._identity)  # what the scheduler starts (orders, deploys) it asks for itself
        with contextlib.suppress(errors.ClusterAcmeError):
            await self._accounts.warn_reserved()  # providers named "default"/"manual" from older versions
        while True:
            try:
                await self.tick()
            except errors.ClusterAcmeError as exc:
                log.warning("renewal scheduler: %s", exc.message)
            await asyncio.sleep(self._settings.tick_seconds)

    async def tick(self) -> int:
        """Look at every slot of every registered peer once; return how many.

        The slots are read page by page (a fleet's ``certs/`` is far larger
        than one etcd reply may be) and the loop is yielded between slots, so
        a tick over thousands of slots never holds the event loop for long.
        """
        started = time.monotonic()
        peers = {p.peer_id: p for p in await self._registry.list()}
        PEERS_ALIVE.set(sum(p.alive for p in peers.values()))
        for peer in peers.values():
            PEER_ALIVE.labels(peer=peer.peer_id).set(1 if peer.alive else 0)
        prefix = self._keys.all_certs()
        seen = 0
        slot_labels: set[tuple[str, str]] = set()
        pages = self._store.range_pages(prefix)
        self._tick = _TickCache(previous_at=self._last_tick_at)
        self._last_tick_at = self._clock()
        try:
            async with contextlib.aclosing(pages):
                async for page in pages:
                    for entry in page:
                        peer_id, _, _ = entry.key.removeprefix(prefix).partition("/")
                        if peer_id not in peers:
                            continue
                        seen += 1
                        # The metric's domain label: "server", or the domain of "domain/<name>".
                        slot_labels.add((peer_id, entry.key.removeprefix(f"{prefix}{peer_id}/").removeprefix("domain/")))
                        slot_key = entry.key.removeprefix(f"{prefix}{peer_id}/")
                        with logfields.log_context(peer=peer_id, domain=slot_key.partition("domain/")[2]):
                            try:
                                await self._slot_tick(peers[peer_id], records.decode(entry.value, entry.key))
                            except errors.ClusterAcmeError as exc:
                                log.warning("renewal of %s: %s", entry.key.removeprefix(prefix), exc.message)
                            except Exception:
                                # One odd slot must not stop the renewals of all the others
                                # (nor, by killing this task, the coordinator).
                                log.exception("renewal of %s failed unexpectedly", entry.key.removeprefix(prefix))
                        await asyncio.sleep(0)  # let RPCs and keep-alives in between slots
        finally:
            self._tick = None
        # A whole tick saw every slot there is: the series of the others
        # (a removed peer, a deleted slot) go.
        forget_slots(slot_labels, peers)
        elapsed = time.monotonic() - started
        level = logging.INFO if self._ticks == 0 or elapsed >= SLOW_TICK_SECONDS else logging.DEBUG
        log.log(level, "renewal scheduler: tick over %d slot(s) of %d peer(s) took %.3fs", seen, len(peers), elapsed)
        self._ticks += 1
        return seen

    async def _slot_tick(self, peer: PeerInfo, slot: dict[str, Any]) -> None:
        now = self._clock()
        peer_id = peer.peer_id
        domain = slot.get("domain", "")
        if slot.get(INTENT) and peer.alive \
                and await self._deployment.settle(peer_id, domain) in (Settled.DONE, Settled.NOT_DONE):
            # A deploy or rollback whose answer was never recorded (its leader
            # stopped): settled from the agent's disk. The first tick of a new
            # leader does it at once; the next tick works from the new record.
            # A dead peer's is left until it heartbeats again (no tick waits on it).
            return
        labels = {"peer": peer_id, "domain": domain or "server"}
        schedule = {**DEFAULT_SCHEDULE, **(slot.get("schedule") or {})}
        active, pending = slot.get("active"), slot.get("pending")
        state = await self._account_finished_order(peer_id, domain, slot)
        CONSECUTIVE_FAILURES.labels(**labels).set(state.get("failures", 0))
        if active:
            CERT_NOT_AFTER.labels(**labels).set(_parse(active["not_after"]).timestamp())  # type: ignore[union-attr]
        # Asked first: a paused slot reads no renewal information and no opportunity.
        paused, provider = await self._pause_of(peer, slot) if schedule["auto"] else ("", "")
        due = await self._due(peer_id, domain, slot, now, fetch_ari=not paused)
        if active and due is not None:
            RENEWAL_DUE.labels(**labels).set(due.at.timestamp())
        else:  # no certificate in service (the due time of a first sign is no renewal point)
            with contextlib.suppress(KeyError):
                RENEWAL_DUE.remove(labels["peer"], labels["domain"])
        aging = _aging(slot, now)
        if aging is not None and state.get("warned_imported") != aging.serial_hex:
            log.warning("%s %s: %s", peer_id, labels["domain"], aging.warning())
            await self._save_state(peer_id, domain, {"warned_imported": aging.serial_hex})

        if not schedule["auto"]:
            # An imported certificate is watched by its 2/3 age alone (aging):
            # "sign a new one or turn on automatic mode" is no advice for it.
            overdue = bool(active) and not slots.is_imported(active) and due is not None and now >= due.at
            RENEWAL_OVERDUE.labels(**labels).set(1 if overdue or aging else 0)
            if overdue and state.get("warned_serial") != active["serial_hex"]:  # type: ignore[index]
                log.warning("renewal due for %s %s (manual mode): certificate %s reached %s at %s; "
                            "sign a new one (acmectl sign) or turn on automatic mode", peer_id, labels["domain"],
                            active["serial_hex"], due.reason, _iso(due.at))  # type: ignore[index,union-attr]
                await self._save_state(peer_id, domain, {"warned_serial": active["serial_hex"]})  # type: ignore[index]
            return
        # A certificate signed by hand and not deployed blocks automatic work:
        # say so through the same signal as manual mode when renewal is due.
        manual_pending = bool(pending) and not pending.get("auto")  # type: ignore[union-attr]
        RENEWAL_OVERDUE.labels(**labels).set(
            1 if aging or (manual_pending and active and due is not None and now >= due.at) else 0)
        if slot.get("current_order"):
            return  # an order is running; its end is accounted for on a later tick
        if pending:
            if pending.get("auto"):
                # Signed before any pause: deployed at its slot all the same
                # (no ACME involved; left alone it would expire unused).
                await self._deploy_if_slot(peer_id, domain, schedule, pending, state, now)
            return  # a certificate signed by hand is the operator's to deploy
        if paused:
            if state.get("paused") != paused:
                await self._pause(peer_id, domain, paused, now)
            return
        if state.get("paused"):
            # The pause is over: the opportunities that passed during it (up
            # to the previous tick, the last that saw it; up to now when this
            # leader saw none) are spent, marked once here: work resumes at
            # the next one.
            previous = self._tick.previous_at if self._tick is not None else None
            spent = min(previous, now) if previous is not None else now
            log.info("automatic renewal of %s %s resumes at the next sign opportunity", peer_id, labels["domain"])
            state = await self._save_state(peer_id, domain, {"paused": "", "handled_opportunity": _iso_ms(spent)})
        if not slot.get("csr") or due is None or now < due.at:
            return
        retry_at = _parse(state.get("retry_at"))
        if retry_at and now < retry_at:
            return
        # Only an opportunity drawn after the renewal point (after any backoff,
        # and after automatic mode was turned on) counts: signing right at a
        # due time anyone can compute from the certificate would make the time
        # predictable.
        earliest = max(t for t in (due.at, retry_at, _parse(state.get("auto_since"))) if t is not None)
        opportunity = await self._passed_opportunity(peer_id, schedule, state, now, earliest)
        if opportunity is None:
            return
        # Persist the opportunity as used *before* acting: a crash here can
        # cost this opportunity, never cause a second order for it.
        await self._save_state(peer_id, domain, {"handled_opportunity": _iso_ms(opportunity), "paused": ""})
        await self._sign(peer_id, domain, slot, schedule, active, now, state, provider)

    async def _pause_of(self, peer: PeerInfo, slot: dict[str, Any], *, fresh: bool = False) -> tuple[str, str]:
        """(why automatic renewal signs nothing for the slot now, "" when it
        may; the provider it would sign with). The providers are read once
        per tick (``fresh``: read now)."""
        paused = slots.standing_pause(peer.enabled, slot)
        if paused:
            return paused, ""
        tick = None if fresh else self._tick
        if tick is None:
            book = await self._accounts.book()
        else:
            if tick.book is None:
                tick.book = await self._accounts.book()
            book = tick.book
        try:
            return "", book.choose(slot=slot, renewal=True)
        except ProviderUnresolved as exc:
            return exc.message, ""

    async def _current_pause(self, peer_id: str, domain: str) -> tuple[str, str, dict[str, Any] | None]:
        """``_pause_of`` on the peer and the slot as etcd holds them now (and the slot)."""
        peer = await self._registry.get(peer_id)
        slot, _ = await records.read(self._store, self._keys.cert(peer_id, slot_name(domain)))
        if slot is None:
            return "", "", None
        paused, provider = await self._pause_of(peer, slot, fresh=True)
        return paused, provider, slot

    async def _pause(self, peer_id: str, domain: str, paused: str, now: datetime.datetime | None = None) -> None:
        """A pause starts (or its reason changes): nothing is signed and
        nothing counts as a failure (no backoff). With ``now``, every
        opportunity until now is marked spent, once."""
        deliberate = paused in (slots.PAUSED_PEER, slots.PAUSED_DOMAIN, slots.PAUSED_IMPORTED)
        log.log(logging.INFO if deliberate else logging.WARNING,
                "automatic renewal of %s %s is paused, nothing is signed: %s", peer_id, slots.label(domain), paused)
        changes: dict[str, Any] = {"paused": paused}
        if now is not None:
            changes["handled_opportunity"] = _iso_ms(now)
        await self._save_state(peer_id, domain, changes)

    async def _sign(self, peer_id: str, domain: str, slot: dict[str, Any], schedule: dict[str, Any],
                    active: dict[str, Any] | None, now: datetime.datetime, state: dict[str, Any],
                    provider: str) -> None:
        csr = slot["csr"]
        try:
            self._issuance.check_room()  # before a new key: a full queue is load, not a failure
            if schedule["key_policy"] == "rotate" and active:
                # The peer and the slot as they are now, not as the tick read
                # them: a slot switched off (or imported into, or left without
                # a provider) meanwhile must not get a new key.
                paused, provider, fresh = await self._current_pause(peer_id, domain)
                if paused:
                    raise slots.SigningPaused(paused, paused)
                if fresh is None or not fresh.get("csr") or fresh.get("current_order") or fresh.get("pending"):
                    log.info("automatic sign for %s %s skipped: the slot changed meanwhile (an order or a pending "
                             "certificate)", peer_id, slots.label(domain))
                    return
                csr, active = fresh["csr"], fresh.get("active")
                # A new key per renewal; the first certificate uses the CSR
                # the operator made (its key has signed nothing yet).
                names = csr["names"]
                await self._issuance.create_csr(peer_id, domain, names[0], names[1:],
                                                _LABEL_TO_KEY_TYPE.get(csr["key_type"], 1))
            replaces = ""
            # RFC 9773 "replaces" only towards the CA that issued the
            # certificate in service: another CA (or account) refuses an order
            # that claims to replace a certificate it did not issue to it.
            if active and not slots.is_imported(active) and active.get("provider") == provider:
                try:
                    replaces = renewal.ari_cert_id(certinfo.leaf(active["chain_pem"]))
                except errors.InvalidArgument:
                    pass  # no Authority Key Identifier: renew without "replaces"
            rec = await self._issuance.start_sign(peer_id, domain, provider, False, self._identity, auto=True,
                                                  replaces=replaces)
        except QueueFull as exc:
            # Load never counts as a failure: give the opportunity back and
            # try again at a later tick (no order was saved).
            log.warning("automatic sign for %s %s waits: %s", peer_id, domain or "server", exc.message)
            await self._save_state(peer_id, domain, {"handled_opportunity": state.get("handled_opportunity", "")})
            return
        except (slots.SigningPaused, ProviderUnresolved) as exc:
            # Switched off (or the provider lost its account) since the check
            # a moment ago: a pause, not a failure.
            await self._pause(peer_id, domain, exc.paused if isinstance(exc, slots.SigningPaused) else exc.message)
            return
        except errors.Aborted as exc:
            # The slot changed while the order was being saved (a race, e.g.
            # with a switch-off): a pause if it is one now, otherwise nothing
            # happened; either way no failure.
            paused, _, _ = await self._current_pause(peer_id, domain)
            if paused:
                await self._pause(peer_id, domain, paused)
            else:
                log.info("automatic sign for %s %s raced a change of the slot (%s); trying again at the next tick",
                         peer_id, slots.label(domain), exc.message)
                await self._save_state(peer_id, domain,
                                       {"handled_opportunity": state.get("handled_opportunity", "")})
            return
        except errors.ClusterAcmeError as exc:
            failures = state.get("failures", 0) + 1
            retry_at = now + datetime.timedelta(seconds=self._backoff(failures))
            log.warning("automatic sign for %s %s could not start (%s); failure %d, next try after %s",
                        peer_id, domain or "server", exc.message, failures, _iso(retry_at))
            count_sign(auto=True, issued=False)  # a failed automatic sign, though no order was made
            await self._save_state(peer_id, domain, {"failures": failures, "retry_at": _iso(retry_at),
                                                     "last_error": exc.message})
            return
        log.info("automatic sign for %s %s: order %s (provider %s)", peer_id, domain or "server", rec.order_id,
                 rec.provider, extra={"order_id": rec.order_id, "provider": rec.provider})
        await self._save_state(peer_id, domain, {"last_auto_order": rec.order_id})

    def _backoff(self, failures: int) -> float:
        return renewal.backoff(failures, base_seconds=self._settings.backoff_base_seconds,
                               cap_seconds=self._settings.backoff_cap_seconds)

    async def _account_finished_order(self, peer_id: str, domain: str, slot: dict[str, Any]) -> dict[str, Any]:
        """Fold the end of the last automatic order into the failure count (once)."""
        state = dict(slot.get("renewal") or {})
        order_id = state.get("last_auto_order")
        last = slot.get("last_sign") or {}
        if not order_id or state.get("counted_order") == order_id or last.get("order_id") != order_id \
                or last.get("status") not in ("valid", "failed"):
            return state
        now = self._clock()
        paused = slots.pause_of_order_error(last.get("error", "")) if last["status"] == "failed" else ""
        if paused:
            # Ended before the CA was asked anything because ACME was switched
            # off meanwhile: a pause, no failure, no backoff.
            log.info("automatic order %s for %s %s ended unsent: %s", order_id, peer_id, slots.label(domain),
                     last.get("error", ""))
            changes: dict[str, Any] = {"paused": paused}
        elif last["status"] == "failed":
            failures = state.get("failures", 0) + 1
            wait = self._backoff(failures)
            try:
                order = await self._issuance.get_order(order_id)
            except errors.NotFound:
                pass  # compacted by the retention job: no CA retry-after left to honour
            else:
                wait = max(wait, order.retry_after)  # the CA's rate limit wins when it asks for longer
            changes = {"failures": failures, "retry_at": _iso(now + datetime.timedelta(seconds=wait)),
                       "last_error": last.get("error", "")}
            log.warning("automatic sign for %s %s failed (%s); failure %d, next try after %s", peer_id,
                        domain or "server", last.get("error", ""), failures, changes["retry_at"])
        else:
            changes = {"failures": 0, "retry_at": "", "last_error": ""}
        changes["counted_order"] = order_id
        return await self._save_state(peer_id, domain, changes)

    async def _deploy_if_slot(self, peer_id: str, domain: str, schedule: dict[str, Any], pending: dict[str, Any],
                              state: dict[str, Any], now: datetime.datetime) -> None:
        if now >= _parse(pending["not_after"]):  # type: ignore[operator]
            # It expired waiting for its slot (a slot far away, or a very short
            # lifetime): drop it (history keeps a copy) so a fresh one is signed.
            log.warning("automatically signed certificate %s for %s %s expired before its deploy slot; "
                        "discarding it to sign again", pending["serial_hex"], peer_id, domain or "server")
            await self._issuance.discard_pending(peer_id, domain, self._identity)
            return
        slot_at = self._deploy_slot(schedule, _parse(pending["signed_at"]))  # type: ignore[arg-type]
        not_before = _parse(state.get("deploy_retry_at"))
        if now < slot_at or (not_before and now < not_before):
            return
        try:
            outcome = await self._deployment.deploy(peer_id, domain, self._identity, trigger="scheduled")
        except errors.ClusterAcmeError as exc:
            outcome = None
            error = exc.message
        else:
            error = outcome.error
        if outcome is not None and outcome.ok:
            log.info("scheduled deploy on %s %s: %s is live", peer_id, domain or "server", outcome.active_serial,
                     extra={"serial": outcome.active_serial})
            await self._save_state(peer_id, domain, {"deploy_retry_at": ""})
            return
        retry = now + datetime.timedelta(seconds=self._settings.deploy_retry_seconds)
        log.warning("scheduled deploy on %s %s failed (%s); trying again after %s", peer_id, domain or "server",
                    error, _iso(retry))
        if outcome is None:  # refused (nothing changed), or unanswered (its intent is settled at the next tick)
            await self._save_state(peer_id, domain, {"deploy_retry_at": _iso(retry)})

    def _deploy_slot(self, schedule: dict[str, Any], after: datetime.datetime) -> datetime.datetime:
        return renewal.next_deploy_slot(after, renewal.parse_days(schedule["days"]), renewal.parse_time(schedule["time"]),
                                        renewal.parse_tz(schedule["tz"]))

    # --- opportunities ----------------------------------------------------------
    async def _opportunities(self, peer_id: str, period_start: datetime.datetime,
                             period_end: datetime.datetime) -> tuple[datetime.datetime, ...]:
        """The period's two sign times: drawn once (cryptographic RNG) and
        stored, so every replica and every restart uses the same ones.
        Within a tick, read once per peer and period."""
        tick = self._tick
        cached = tick.opportunities.get((peer_id, period_start)) if tick is not None else None
        if cached is not None:
            return cached
        key = self._keys.schedule(peer_id, period_start)
        data, _ = await records.read(self._store, key)
        if data is None:
            drawn = renewal.draw_opportunities(period_start, period_end, self._randbelow)
            try:
                await self._store.put_if(key, records.encode({"times": [_iso_ms(t) for t in drawn]}),
                                         expect_mod_revision=0)
            except errors.Aborted:
                pass  # another writer drew them first: theirs count
            data, _ = await records.read(self._store, key)
            assert data is not None
        times: tuple[datetime.datetime, ...] = tuple(_parse(t) for t in data["times"])  # type: ignore[misc]
        if tick is not None and tick is self._tick:
            tick.opportunities[(peer_id, period_start)] = times
        return times

    def _period(self, schedule: dict[str, Any], when: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime]:
        tz = renewal.parse_tz(schedule["tz"])
        start = renewal.period_start(when, self._settings.period_seconds, tz)
        return start, renewal.period_end(start, self._settings.period_seconds, tz)

    async def _passed_opportunity(self, peer_id: str, schedule: dict[str, Any], state: dict[str, Any],
                                  now: datetime.datetime, earliest: datetime.datetime) -> datetime.datetime | None:
        """The latest opportunity in (last handled, now], looking at this
        period and the one before (an opportunity just before midnight)."""
        handled = _parse(state.get("handled_opportunity"))
        start, end = self._period(schedule, now)
        previous_start, _ = self._period(schedule, start - datetime.timedelta(microseconds=1))
        candidates = [*await self._opportunities(peer_id, previous_start, start),
                      *await self._opportunities(peer_id, start, end)]
        passed = [t for t in candidates if earliest <= t <= now and (handled is None or t > handled)]
        return max(passed) if passed else None

    async def _next_opportunity(self, peer_id: str, schedule: dict[str, Any],
                                not_before: datetime.datetime) -> datetime.datetime | None:
        start, end = self._period(schedule, not_before)
        for _ in range(2):
            found = renewal.next_opportunity(not_before, await self._opportunities(peer_id, start, end))
            if found is not None:
                return found
            start, end = self._period(schedule, end)
        return None

    # --- renewal time, with the CA's renewal information ------------------------
    async def _due(self, peer_id: str, domain: str, slot: dict[str, Any], now: datetime.datetime,
                   *, fetch_ari: bool) -> renewal.Due | None:
        active = slot.get("active")
        if not active:
            csr = slot.get("csr")
            if not csr:
                return None
            return renewal.Due(_parse(csr.get("created_at")) or now, "no certificate deployed yet")
        cert = certinfo.leaf(active["chain_pem"])
        if slots.is_imported(active):
            # Not from an ACME CA: no renewal information to ask for, and the
            # 2/3 of its lifetime at which status warns (slots.imported_aging),
            # whatever fraction the cluster renews its own certificates at.
            return renewal.renewal_due(cert.not_valid_before_utc, cert.not_valid_after_utc)
        ari = (slot.get("renewal") or {}).get("ari") or {}
        if ari.get("serial") != active["serial_hex"] or (fetch_ari and now >= _parse(ari["next_check"])):  # type: ignore[operator]
            if fetch_ari:
                ari = await self._fetch_ari(peer_id, domain, active, cert, now, ari)
            else:
                ari = {}
        chosen = _parse(ari.get("chosen")) if ari.get("serial") == active["serial_hex"] else None
        return renewal.renewal_due(cert.not_valid_before_utc, cert.not_valid_after_utc,
                                   fraction=self._settings.fraction, ari_time=chosen)

    async def _fetch_ari(self, peer_id: str, domain: str, active: dict[str, Any], cert: Any,
                         now: datetime.datetime, slot_state: dict[str, Any] | None = None) -> dict[str, Any]:
        recheck = self._settings.ari_recheck_seconds
        ari: dict[str, Any] = {"serial": active["serial_hex"], "chosen": ""}
        try:
            client = await self._accounts.client(active.get("provider") or await self._accounts.resolve(""))
            answer = await asyncio.to_thread(client.renewal_info, renewal.ari_cert_id(cert))
            if answer is not None:
                window = renewal.parse_renewal_info(answer[0], answer[1])
                previous = (slot_state or {})
                same_window = (previous.get("serial") == active["serial_hex"] and previous.get("start") == _iso(window.start)
                               and previous.get("end") == _iso(window.end) and previous.get("chosen"))
                # Keep the instant already drawn while the window is unchanged:
                # redrawing at every check would drift towards its start.
                chosen = previous["chosen"] if same_window else _iso_ms(
                    renewal.pick_in_window(window.start, window.end, self._randbelow))
                ari.update(start=_iso(window.start), end=_iso(window.end), chosen=chosen)
                recheck = window.retry_after_seconds or recheck  # clamped to [1 min, 1 day] by the parser
        except errors.ClusterAcmeError as exc:
            log.info("renewal information for %s %s unavailable (%s); using the lifetime fraction", peer_id,
                     domain or "server", exc.message)
            recheck = min(recheck, 300.0)
        ari["next_check"] = _iso(now + datetime.timedelta(seconds=recheck))
        await self._save_state(peer_id, domain, {"ari": ari})
        return ari

    # --- state --------------------------------------------------------------------
    async def _save_state(self, peer_id: str, domain: str, changes: dict[str, Any]) -> dict[str, Any]:
        key = self._keys.cert(peer_id, slot_name(domain))
        result: dict[str, Any] = {}

        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None:
                return None
            state = {**(current.get("renewal") or {}), **changes}
            result.update(state)
            return {**current, "renewal": state}

        await records.update(self._store, key, change)
        return result

    # --- what status shows ---------------------------------------------------------
    async def provider_book(self) -> ProviderBook:
        """Read once, pass to :meth:`plan` for every slot of a status."""
        return await self._accounts.book()

    async def plan(self, peer_id: str, slot: dict[str, Any], *, peer: PeerInfo | None = None,
                   book: ProviderBook | None = None) -> Plan:
        now = self._clock()
        peer = peer or await self._registry.get(peer_id)
        book = book or await self._accounts.book()
        schedule = {**DEFAULT_SCHEDULE, **(slot.get("schedule") or {})}
        state = slot.get("renewal") or {}
        due = await self._due(peer_id, slot.get("domain", ""), slot, now, fetch_ari=False)
        retry_at = _parse(state.get("retry_at"))
        paused = slots.standing_pause(peer.enabled, slot)
        try:
            provider = book.choose(slot=slot, renewal=True)
        except ProviderUnresolved as exc:
            provider = ""
            paused = paused or exc.message
        if not schedule["auto"]:
            paused = ""  # nothing automatic to pause
        warning = ""
        next_sign = next_deploy = None
        pending = slot.get("pending")
        aging = _aging(slot, now)
        if aging is not None:
            warning = aging.warning()
        elif not schedule["auto"] and slot.get("active") and not slots.is_imported(slot.get("active")) \
                and due and now >= due.at:
            warning = (f"renewal due since {_iso(due.at)} ({due.reason}) and the slot is in manual mode: "
                       "sign a new certificate or turn on automatic mode")
        if schedule["auto"] and pending and pending.get("auto"):
            next_deploy = self._deploy_slot(schedule, _parse(pending["signed_at"]))  # type: ignore[arg-type]
        elif schedule["auto"] and due is not None and not pending and not paused:
            not_before = max(t for t in (due.at, now, retry_at, _parse(state.get("auto_since"))) if t is not None)
            next_sign = await self._next_opportunity(peer_id, schedule, not_before)
            if next_sign is not None:
                next_deploy = self._deploy_slot(schedule, next_sign)
        return Plan(schedule, due, next_sign, next_deploy, retry_at, state.get("failures", 0), warning, paused,
                    provider)

    # --- domain slots: ACME on/off ---------------------------------------------------
    async def set_domain_acme(self, peer_id: str, domain: str, enabled: bool) -> dict[str, Any]:
        """Switch ACME on or off for one slot ("" or "server": the server
        slot). Disabling is refused while an order runs for the slot: an
        order finishing on a switched-off slot would leave a certificate no
        one asked for; wait for it, then disable."""
        await self._registry.get(peer_id)
        domain = slots.parse_slot(domain)
        key = self._keys.cert(peer_id, slot_name(domain))
        what = f"domain {domain}" if domain else "the server certificate"

        async def change(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None:
                raise errors.NotFound(f"peer {peer_id} has no slot for {what} (acmectl domain list {peer_id}; "
                                      "a slot exists once a CSR was created for it)")
            if slots.acme_enabled(current) == enabled:
                return current
            order_id = current.get("current_order")
            if not enabled and order_id:
                try:
                    running = await self._issuance.get_order(order_id)
                except errors.NotFound:
                    running = None
                if running is not None and not running.done:
                    raise errors.FailedPrecondition(
                        f"order {order_id} for {what} on peer {peer_id} is still running ({running.phase.value}); "
                        f"ACME is switched off only between orders: wait for it (acmectl order show {order_id}), "
                        "then disable")
            return {**current, "acme_enabled": enabled}

        updated = await records.update(self._store, key, change)
        assert updated is not None
        log.info("ACME %s for %s on peer %s", "enabled" if enabled else "disabled", what, peer_id)
        return updated

    async def domains(self, peer_id: str) -> list[slots.DomainView]:
        """Every certificate slot of the peer, as ``acmectl domain list`` shows it."""
        peer = await self._registry.get(peer_id)
        book = await self._accounts.book()
        return [await self.domain_view(peer, slot, book) for slot in await self._issuance.slots(peer_id)]

    async def domain_view(self, peer: PeerInfo, slot: dict[str, Any], book: ProviderBook | None = None
                          ) -> slots.DomainView:
        plan = await self.plan(peer.peer_id, slot, peer=peer, book=book)
        return slots.view(slot, self._clock(), mode="auto" if plan.schedule["auto"] else "manual",
                          paused=plan.paused)


def _aging(slot: dict[str, Any], now: datetime.datetime) -> slots.Aging | None:
    try:
        return slots.imported_aging(slot, now)
    except errors.ClusterAcmeError:
        return None  # an unreadable chain: nothing to say about its age


def _iso_ms(when: datetime.datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds")
