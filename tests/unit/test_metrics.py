"""The coordinator's metrics (issue 14, point 2): what the order driver,
deployment, the renewal scheduler and the alarm job count and set, by
trigger and result, and the series that go with a removed peer or slot.

The drivers are the real ones with fakes at their ports (the fakes of
test_revocation_ways, test_deploy_intent and test_alarms). The registry is
the process's own: counters are compared before and after, and the peers
here have names no other test uses."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest
from clusteracme.coordinator import metrics, records
from clusteracme.coordinator.metrics import REGISTRY
from clusteracme.coordinator.orders import Phase
from clusteracme.coordinator.scheduler import RenewalScheduler
from clusteracme.coordinator.settings import RenewalSettings
from clusteracme.coordinator.store.memory import MemoryStore
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clusteracme import errors
from tests.unit import test_alarms as al
from tests.unit import test_deploy_intent as di
from tests.unit import test_revocation_ways as ways


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def exposed() -> dict[str, Any]:
    """The families of /metrics as a scraper parses them, by name."""
    return {f.name: f for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())}


# --- names ------------------------------------------------------------------------------


def test_the_consecutive_failures_are_a_gauge_under_their_new_name_and_counters_end_in_total() -> None:
    text = generate_latest(REGISTRY).decode()
    assert "# TYPE clusteracme_renewal_consecutive_failures gauge" in text
    assert "clusteracme_renewal_failures" not in text
    for counter in ("clusteracme_signs", "clusteracme_deploys", "clusteracme_rollbacks",
                    "clusteracme_alarm_webhook_posts", "clusteracme_orders_compacted"):
        assert f"# TYPE {counter}_total counter" in text, counter
    assert "# TYPE clusteracme_order_duration_seconds histogram" in text
    assert "_created" not in text  # no creation-time gauge beside each counter and histogram
    families = exposed()
    assert all(f.documentation for f in families.values())  # every family has its # HELP
    assert families["clusteracme_build_info"].samples[0].labels.keys() == {"version"}


def test_every_known_trigger_and_result_is_exposed_at_zero_before_anything_happens() -> None:
    families = exposed()
    combos = {name: {(s.labels["trigger"], s.labels["result"]) for s in families[name].samples
                     if s.name == f"{name}_total"}
              for name in ("clusteracme_signs", "clusteracme_deploys", "clusteracme_rollbacks")}
    assert combos["clusteracme_signs"] >= {(t, r) for t in ("manual", "scheduled") for r in ("succeeded", "failed")}
    assert combos["clusteracme_deploys"] >= {(t, r) for t in ("manual", "rollout", "scheduled") for r in ("ok", "failed")}
    assert combos["clusteracme_rollbacks"] >= {(t, r) for t in ("manual", "rollout") for r in ("ok", "failed")}
    outcomes = {s.labels["outcome"] for s in families["clusteracme_order_duration_seconds"].samples}
    assert outcomes == {"succeeded", "failed"}
    buckets = sorted(float(s.labels["le"]) for s in families["clusteracme_order_duration_seconds"].samples
                     if s.name.endswith("_bucket") and s.labels["outcome"] == "failed")
    assert buckets[0] == 1.0 and buckets[-2] == 3600.0  # seconds to an hour, then +Inf


# --- signs and the order duration ----------------------------------------------------------


async def ended(world: ways.World, auto: bool, outcome: Phase, seconds: float) -> None:
    """Start a sign and end it through the driver's own write, ``seconds`` after it was created."""
    rec = await world.issuance.start_sign("mx1", "", "pebble", False, "coordinator:c" if auto else "operator:t",
                                          auto=auto)
    _, revision = await records.read(world.store, ways.KEYS.order(rec.order_id))
    at = (datetime.datetime.fromisoformat(rec.created_at) + datetime.timedelta(seconds=seconds)).isoformat()
    if outcome is Phase.ISSUED:
        issued = dataclasses.replace(rec, phase=Phase.ISSUED, updated_at=at,
                                     chain_pem=ways.pem(ways.make_cert([ways.NAME], issuer="Pebble Intermediate")))
        revision = await world.issuance._save(rec, issued, revision)
        await world.issuance._save(issued, dataclasses.replace(issued, phase=Phase.DONE, cleaned=True), revision)
    else:
        await world.issuance._save(rec, dataclasses.replace(rec, phase=Phase.FAILED, cleaned=True, error="no",
                                                            updated_at=at), revision)


@pytest.mark.parametrize(("auto", "outcome"), [(False, Phase.ISSUED), (True, Phase.ISSUED), (False, Phase.FAILED),
                                               (True, Phase.FAILED)])
async def test_an_ended_order_counts_one_sign_by_who_started_it_and_its_duration(auto: bool, outcome: Phase) -> None:
    world = ways.World()
    world.peer("mx1")
    await world.slot("mx1", [ways.NAME])
    trigger, result = "scheduled" if auto else "manual", "succeeded" if outcome is Phase.ISSUED else "failed"
    signs = {(t, r): value("clusteracme_signs_total", trigger=t, result=r)
             for t in ("manual", "scheduled") for r in ("succeeded", "failed")}
    count = value("clusteracme_order_duration_seconds_count", outcome=result)
    total = value("clusteracme_order_duration_seconds_sum", outcome=result)
    within = {le: value("clusteracme_order_duration_seconds_bucket", outcome=result, le=le) for le in ("60.0", "120.0")}

    await ended(world, auto, outcome, 90)

    # Once, though an issued order is written twice more (issued, then done once cleaned up).
    assert {k: value("clusteracme_signs_total", trigger=k[0], result=k[1]) - v for k, v in signs.items()} == {
        k: 1.0 if k == (trigger, result) else 0.0 for k in signs}
    assert value("clusteracme_order_duration_seconds_count", outcome=result) == count + 1
    assert value("clusteracme_order_duration_seconds_sum", outcome=result) == pytest.approx(total + 90)
    assert value("clusteracme_order_duration_seconds_bucket", outcome=result, le="60.0") == within["60.0"]
    assert value("clusteracme_order_duration_seconds_bucket", outcome=result, le="120.0") == within["120.0"] + 1


async def test_an_authorization_only_order_is_timed_but_signs_nothing() -> None:
    world = ways.World()
    world.peer("mx2")
    world.dns[ways.NAME] = [world.peers["mx2"].addresses[0]]
    world.outcomes = ["ok"]
    signs = sum(value("clusteracme_signs_total", trigger=t, result=r)
                for t in ("manual", "scheduled") for r in ("succeeded", "failed"))
    count = value("clusteracme_order_duration_seconds_count", outcome="succeeded")
    rec = await world.issuance.start_authorization((ways.NAME,), "pebble", "operator:t")
    assert (await world.issuance.wait(rec.order_id)).phase is Phase.DONE
    assert value("clusteracme_order_duration_seconds_count", outcome="succeeded") == count + 1
    assert sum(value("clusteracme_signs_total", trigger=t, result=r)
               for t in ("manual", "scheduled") for r in ("succeeded", "failed")) == signs


# --- deploys and rollbacks --------------------------------------------------------------------


def switches() -> dict[tuple[str, str, str], float]:
    return {(kind, t, r): value(f"clusteracme_{kind}s_total", trigger=t, result=r)
            for kind, triggers in (("deploy", metrics.DEPLOY_TRIGGERS), ("rollback", metrics.ROLLBACK_TRIGGERS))
            for t in triggers for r in ("ok", "failed")}


def moved(before: dict[tuple[str, str, str], float]) -> dict[tuple[str, str, str], float]:
    """What changed since ``before``, only the counters that did."""
    return {k: v - before[k] for k, v in switches().items() if v != before[k]}


async def test_a_manual_deploy_and_rollback_count_by_result_a_refusal_before_the_agent_does_not() -> None:
    c = di.Cluster()
    await c.create_slot()
    before = switches()
    assert (await c.leader.deploy(di.PEER.peer_id, "", "operator:alice")).ok
    assert (await c.leader.rollback(di.PEER.peer_id, "", "operator:alice")).ok
    assert moved(before) == {("deploy", "manual", "ok"): 1.0, ("rollback", "manual", "ok"): 1.0}

    before = switches()
    with pytest.raises(errors.FailedPrecondition, match="no pending certificate"):  # deployed: nothing to ask
        await c.leader.deploy(di.PEER.peer_id, "", "operator:alice")
    assert moved(before) == {}


async def test_a_deploy_the_agent_refuses_or_does_not_answer_counts_as_failed() -> None:
    c = di.Cluster()
    await c.create_slot()
    before = switches()
    c.agent.mode = "refuse"
    with pytest.raises(errors.FailedPrecondition):
        await c.leader.deploy(di.PEER.peer_id, "", "operator:alice")
    c.agent.mode = "lost"
    with pytest.raises(errors.Unavailable):
        await c.leader.deploy(di.PEER.peer_id, "", "operator:alice")
    assert moved(before) == {("deploy", "manual", "failed"): 2.0}


async def test_a_rollout_counts_its_deploys_and_its_rollback_on_failure_as_rollout() -> None:
    c = di.Cluster()
    await c.create_slot()
    before = switches()
    # The fake peer announces no TLS endpoint: the deploy goes in, its verification fails, it is rolled back.
    stages = [p.stage async for p in c.leader.rollout([di.PEER.peer_id], False, 1, True, "", "operator:alice")]
    assert "rolled-back" in stages and stages[-1] == "stopped"
    assert moved(before) == {("deploy", "rollout", "ok"): 1.0, ("rollback", "rollout", "ok"): 1.0}


async def test_a_scheduled_deploy_counts_as_scheduled() -> None:
    c = di.Cluster()
    await c.create_slot()
    s = RenewalScheduler(c.store, di.KEYS, di.Registry(), None, None, c.leader,  # type: ignore[arg-type]
                         RenewalSettings(), "coordinator:c", clock=c.clock)
    pending = (await c.slot())["pending"]
    schedule = {"auto": True, "days": "all", "time": "now", "tz": "UTC", "key_policy": "rotate"}
    before = switches()
    await s._deploy_if_slot(di.PEER.peer_id, "", schedule, pending, {}, di.T0 + datetime.timedelta(minutes=1))
    assert (await c.slot())["active"]["serial_hex"] == di.PENDING
    assert moved(before) == {("deploy", "scheduled", "ok"): 1.0}


# --- per-peer and per-slot series ----------------------------------------------------------------


def slot_series(peer_id: str) -> dict[str, dict[str, float]]:
    """Every per-slot and per-peer sample of the peer, by family then domain ("" for the peer's own)."""
    out: dict[str, dict[str, float]] = {}
    for family in exposed().values():
        for sample in family.samples:
            if sample.labels.get("peer") == peer_id:
                out.setdefault(sample.name, {})[sample.labels.get("domain", "")] = sample.value
    return out


async def test_the_tick_sets_the_slot_and_peer_series_and_a_removed_peer_or_slot_takes_its_series_along() -> None:
    base = MemoryStore()
    registry = await al.setup(base, "mt1", "mt2")
    clock = al.Clock()
    scheduler = al.scheduler(base, registry, clock)
    # Manual mode; the CA's renewal information already known (no CA asked): 90-day certificates, 20 days left.
    for peer_id, domain, serial, failures in (("mt1", "", "c1", 2), ("mt2", "", "c2", 0),
                                              ("mt1", "shop.example.com", "c3", 0)):
        ari = {"serial": serial, "chosen": "", "next_check": (al.NOW + al.DAY).isoformat()}
        await al.put_slot(base, peer_id, al.slot(domain, active=al.active(20, serial=serial),
                                                 renewal={"failures": failures, "ari": ari}))
    await al.kill(base, "mt2")
    await scheduler.tick()

    not_after = (al.NOW + 20 * al.DAY).timestamp()
    due = not_after - 90 * al.DAY.total_seconds() / 3  # 2/3 of the lifetime
    series = slot_series("mt1")
    assert series["clusteracme_peer_alive"] == {"": 1.0}
    assert series["clusteracme_certificate_not_after_seconds"] == {"server": not_after, "shop.example.com": not_after}
    assert series["clusteracme_renewal_due_seconds"]["server"] == pytest.approx(due)
    assert series["clusteracme_renewal_overdue"] == {"server": 1.0, "shop.example.com": 1.0}  # past 2/3, manual mode
    assert series["clusteracme_renewal_consecutive_failures"] == {"server": 2.0, "shop.example.com": 0.0}
    assert slot_series("mt2")["clusteracme_peer_alive"] == {"": 0.0}
    metrics.SLOT_DISK_MATCHES.labels(peer="mt1", domain="shop.example.com").set(1)  # as the alarm job sets it
    metrics.SLOT_DISK_MATCHES.labels(peer="mt2", domain="server").set(0)

    await base.delete_if(al.KEYS.cert("mt1", "domain/shop.example.com"), expect_mod_revision=None)
    await registry.remove("mt2")
    await scheduler.tick()
    assert slot_series("mt2") == {}
    assert {name: set(domains) for name, domains in slot_series("mt1").items()} == {
        "clusteracme_peer_alive": {""}, "clusteracme_certificate_not_after_seconds": {"server"},
        "clusteracme_renewal_due_seconds": {"server"}, "clusteracme_renewal_overdue": {"server"},
        "clusteracme_renewal_consecutive_failures": {"server"}}


def test_forget_slots_removes_every_per_slot_and_per_peer_series_not_kept() -> None:
    for gauge in metrics.SLOT_GAUGES:
        gauge.labels(peer="mf1", domain="server").set(1)
        gauge.labels(peer="mf2", domain="a.example").set(1)
    metrics.PEER_ALIVE.labels(peer="mf1").set(1)
    metrics.PEER_ALIVE.labels(peer="mf2").set(1)
    metrics.forget_slots({("mf1", "server")}, {"mf1"})
    assert set(slot_series("mf1")) == {g.describe()[0].name for g in (*metrics.SLOT_GAUGES, metrics.PEER_ALIVE)}
    assert slot_series("mf2") == {}
    metrics.forget_slots(set(), ())
    assert slot_series("mf1") == {}


async def test_the_alarm_job_sets_whether_the_disk_matches_only_where_it_asked_the_agent() -> None:
    base = MemoryStore()
    store = await al.fenced(base)
    registry = await al.setup(base, "md1", "md2", "md3")
    clock, pool = al.Clock(), al.FakePool()
    for peer_id in ("md1", "md2", "md3"):
        await al.put_slot(base, peer_id, al.slot(auto=True, active=al.active(60, serial="c1"),
                                                 previous={"serial_hex": "c0"}))
    pool.disks = {"md1": {"": ("c1", "c0")}, "md2": {"": ("c9", "c1")}, "md3": errors.Unavailable("down")}
    job = al.make_job(store, registry, pool, clock)
    await job.run_once()
    assert value("clusteracme_slot_disk_matches", peer="md1", domain="server") == 1.0
    assert REGISTRY.get_sample_value("clusteracme_slot_disk_matches", {"peer": "md2", "domain": "server"}) == 0.0
    assert REGISTRY.get_sample_value("clusteracme_slot_disk_matches", {"peer": "md3", "domain": "server"}) is None
    pool.disks["md2"] = {"": ("c1", "c0")}
    await al.later(job, clock, 10)  # between two disk checks: the agents are not asked, nothing changes
    assert REGISTRY.get_sample_value("clusteracme_slot_disk_matches", {"peer": "md2", "domain": "server"}) == 0.0
    await al.later(job, clock, 30)
    assert REGISTRY.get_sample_value("clusteracme_slot_disk_matches", {"peer": "md2", "domain": "server"}) == 1.0
    metrics.forget_slots(set(), ())


async def test_an_automatic_sign_that_fails_before_its_order_exists_counts_as_a_failed_scheduled_sign() -> None:
    """Each failure the consecutive-failures gauge counts is in signs_total too."""
    from tests.unit import test_scheduler as ts

    h, _ = await ts.renewal_due_harness("alpha")
    h.issuance.refuse = errors.Unavailable("the agent did not make the new key")
    plan = await h.plan()
    h.clock.now = plan.next_sign_opportunity  # type: ignore[assignment]
    before = value("clusteracme_signs_total", trigger="scheduled", result="failed")
    await h.scheduler.tick()
    assert (await h.slot())["renewal"]["failures"] == 1 and h.issuance.signs == []
    assert value("clusteracme_signs_total", trigger="scheduled", result="failed") == before + 1


def test_the_end_of_a_term_leaves_only_what_a_standby_exports() -> None:
    """README: a standby exports its leader flag, build info and counters;
    the leader's work gauges read 0 and its per-peer, per-slot and alarm series go."""
    for gauge in metrics.SLOT_GAUGES:
        gauge.labels(peer="me1", domain="server").set(1)
    metrics.PEER_ALIVE.labels(peer="me1").set(1)
    metrics.ALARM.labels(kind="peer-dead", peer="me1", domain="").set(1)
    for gauge in (metrics.PEERS_ALIVE, metrics.ORDERS_ACTIVE, metrics.ORDERS_QUEUED):
        gauge.set(3)
    metrics.end_term()
    assert slot_series("me1") == {}
    for name in ("clusteracme_peers_alive", "clusteracme_orders_active", "clusteracme_orders_queued"):
        assert value(name) == 0.0 and REGISTRY.get_sample_value(name) == 0.0, name
