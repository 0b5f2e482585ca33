"""Benchmark: a fleet's burst of certificates, all signed at once through the API.

Brings up the product's local cluster with N peers (real etcd, pebble with
PEBBLE_VA_NOSLEEP=1 and PEBBLE_WFE_NONCEREJECT=0, challtestsrv DNS, a
coordinator and N agents as processes, started in parallel). Every peer has
its server slot plus ``slots - 1`` domain (SNI) slots. Every peer is
registered and serves every token; each name points in DNS at 8 of the peers
at most (pebble's DNS client reads 512-byte answers: see
``clusteracme.localcluster.cluster.dns_answer_limit``), a rotating window, so
every peer comes first for some names and answers pebble's validations.

1. All N x slots CSRs are created through the API, concurrently but bounded.
2. All N x slots ``Sign(wait=true)`` calls start at once (grpc.aio, one
   channel); an order's latency runs from starting its call to its reply.
3. On the same pebble, the `acme` library alone runs as many orders (names of
   the same shape) from a thread pool as large as the coordinator's admission
   limit, with its own HTTP-01 responder: pebble's own share of the time.
   (It polls orders, not authorizations: see ``bench.acme_alone`` for the
   pebble deadlock that authorization polling runs into.)

It prints failures, wall time, orders/s, p50/p99 order latency, the
coordinator's RSS and CPU seconds over the burst, the leader's event-loop lag
p99 (from its ``clusteracme_event_loop_lag_seconds`` histogram), pebble's and
the agents' CPU seconds, and the idle RSS of the agents. Any failed order
makes it exit non-zero; the cluster is always torn down, and its run
directory (logs) is kept when something failed.

    python -m bench.fleet [--peers 30] [--slots 7] [--names 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from clusteracme.coordinator.settings import AdmissionSettings
from prometheus_client.parser import text_string_to_metric_families

from bench.acme_alone import AcmeAlone, Responder, make_csr
from clusteracme import procstat
from clusteracme.errors import NotFound
from clusteracme.localcluster.cluster import MAX_DNS_PEERS, LocalCluster
from clusteracme.localcluster.infra import free_port
from clusteracme.v1 import common_pb2, coordinator_pb2_grpc
from clusteracme.v1 import coordinator_pb2 as pb

BASELINE_ADDRESS = "127.0.0.99"  # not a peer: the baseline's own responder
LOOP_LAG = "clusteracme_event_loop_lag_seconds"
AIM_SECONDS = 30.0  # issue 8: 210 certificates on the 2-core machine
AIM_AGENT_RSS = 60 * 10**6  # issue 8: idle agent, 60 MB (57.2 MiB)
KEY_TYPE_EC_P256 = 1
MiB = 2**20


# --- what the kernel says about our processes -------------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (``/proc/<pid>/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NotFound(f"no process {pid}") from exc
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces; fields[0] is field 3
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds every core of this machine has spent busy so far (``/proc/stat``)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _rss(pid: int) -> int | None:
    try:
        return procstat.rss_bytes(pid)
    except NotFound:
        return None


class Watch:
    """CPU seconds and resident memory of a group of processes over an
    interval, sampled every ``interval`` seconds on a thread, so a process
    that dies during the interval still counts what it used until then."""

    def __init__(self, pids: Iterable[int], interval: float = 0.25) -> None:
        self.pids = list(pids)
        self.interval = interval
        self._cpu_start = {pid: cpu_seconds(pid) for pid in self.pids}
        self._cpu_last = dict(self._cpu_start)
        self.rss_before = self._sample()
        self.rss_peak = self.rss_before or 0
        self.rss_after: int | None = self.rss_before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)
        self._thread.start()

    def _sample(self) -> int | None:
        """Record CPU; the group's RSS now (None once every process is gone)."""
        rss, alive = 0, False
        for pid in self.pids:
            with contextlib.suppress(NotFound):
                self._cpu_last[pid] = cpu_seconds(pid)
                rss += procstat.rss_bytes(pid)
                alive = True
        return rss if alive else None

    def _record(self) -> bool:
        self.rss_after = self._sample()
        if self.rss_after is not None:
            self.rss_peak = max(self.rss_peak, self.rss_after)
        return self.rss_after is not None

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and self._record():
            pass

    def stop(self) -> Watch:
        self._stop.set()
        self._thread.join()
        self._record()
        return self

    @property
    def cpu(self) -> float:
        return sum(self._cpu_last.values()) - sum(self._cpu_start.values())


class Meter:
    """CPU seconds of named groups of processes and of the whole machine over an interval."""

    def __init__(self, groups: dict[str, Iterable[int]]) -> None:
        self._machine = machine_busy_seconds()
        self.started = time.perf_counter()
        self.watches = {name: Watch(pids) for name, pids in groups.items()}

    def stop(self) -> dict[str, float]:
        """{group: CPU seconds}, plus "machine" (every core) and "wall"."""
        cpu = {name: watch.stop().cpu for name, watch in self.watches.items()}
        cpu["machine"] = machine_busy_seconds() - self._machine
        cpu["wall"] = time.perf_counter() - self.started
        return cpu


# --- the leader's event-loop lag ---------------------------------------------------------
def scrape_loop_lag(url: str) -> dict[float, float] | None:
    """Cumulative bucket counts {le: count} of the loop-lag histogram, or None
    when the endpoint or the metric is not there (yet)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == LOOP_LAG:
            buckets = {float(s.labels["le"]): s.value for s in family.samples if s.name == LOOP_LAG + "_bucket"}
            return buckets or None
    return None


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> tuple[float, int] | None:
    """The ``q`` quantile of the observations made between two scrapes, the
    way Prometheus's histogram_quantile estimates it (linear within the
    bucket; past the last finite bound, that bound); with the sample count."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]  # the +Inf bucket
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower, int(total)
            share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
            return lower + (bound - lower) * share, int(total)
        lower, below = bound, cumulative
    return lower, int(total)


# --- the burst ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Cert:
    peer_id: str
    domain: str  # empty: the peer's server slot
    names: list[str]


@dataclass
class Run:
    """The outcome of one burst of orders."""

    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(kind, detail): kind groups them (a gRPC code, the phase an order ended in)."""


@dataclass
class Figures:
    """Everything the report shows."""

    total: int
    product: Run
    cpu: dict[str, float]
    """CPU seconds over the burst, by group (see ``Meter.stop``)."""
    coordinator: Watch
    loop_lag: str
    agent_idle: tuple[float | None, float | None]
    agent_after: tuple[float | None, float | None]
    alone: Run | None = None
    cpu_alone: dict[str, float] = field(default_factory=dict)


def fleet_certs(peers: int, slots: int, names_per_cert: int, tag: str) -> list[Cert]:
    certs = []
    for i in range(1, peers + 1):
        for s in range(slots):
            base = f"s{s}.p{i}.{tag}.fleet.example"  # short: 8 addresses fit pebble's DNS answers
            names = [base] + [f"a{j}.{base}" for j in range(1, names_per_cert)]
            certs.append(Cert(f"peer{i}", base if s else "", names))
    return certs


def in_parallel(fn: Callable[[int], object], count: int, workers: int = 8) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, range(count)))


def _operator_credentials(cluster: LocalCluster) -> grpc.ChannelCredentials:
    pki = cluster.pki_dir
    return grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (pki / "operator-admin.key").read_bytes(),
                                        (pki / "operator-admin.pem").read_bytes())


def prepare(cluster: LocalCluster, certs: list[Cert], args: argparse.Namespace) -> None:
    """Provider and account, every peer enabled, DNS for every name, every CSR."""
    cluster.ctl("provider", "add", "pebble", "--directory", cluster.directory_url, "--ca-bundle", str(cluster.ca_bundle))
    cluster.ctl("account", "register", "--provider", "pebble", "--email", "bench@bench.example", "--agree-tos")
    names = [(n, k) for k, c in enumerate(certs) for n in c.names]
    widths: set[int] = set()
    in_parallel(lambda i: widths.add(len(cluster.set_dns_rotating(*names[i]))), len(names))
    print(f"DNS: each name points at {'-'.join(str(w) for w in sorted(widths))} of the {args.peers} peers "
          f"(a rotating window, at most {MAX_DNS_PEERS}); every peer is registered and serves", flush=True)
    seconds = asyncio.run(_create_csrs(cluster, certs, args.csr_concurrency))
    print(f"{len(certs)} CSRs created through the API in {seconds:.1f} s ({args.csr_concurrency} at a time)",
          flush=True)


async def _create_csrs(cluster: LocalCluster, certs: list[Cert], concurrency: int) -> float:
    """Enable every peer and create every CSR through the API; returns the seconds the CSRs took."""
    async with grpc.aio.secure_channel(cluster.coordinator_endpoint, _operator_credentials(cluster)) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await asyncio.gather(*(stub.SetPeerEnabled(pb.SetPeerEnabledRequest(peer_id=a.peer_id, enabled=True),
                                                   timeout=60) for a in cluster.agents))
        gate = asyncio.Semaphore(concurrency)

        async def create(cert: Cert) -> None:
            async with gate:
                await stub.CreateCSR(pb.CreateCSRRequest(
                    peer_id=cert.peer_id, slot=common_pb2.Slot(domain=cert.domain), common_name=cert.names[0],
                    sans=cert.names[1:], key_type=KEY_TYPE_EC_P256), timeout=120)

        started = time.perf_counter()
        await asyncio.gather(*(create(c) for c in certs))
        return time.perf_counter() - started


def warm_up(cluster: LocalCluster) -> None:
    """One order before the clock starts: its tokens go to every agent, which
    then has its challenge server's HTTP stack loaded, as in a fleet that has
    been running. (Idle agent memory is read before this.)"""
    name = "warmup.fleet.example"
    cluster.set_dns_rotating(name, 0)
    cluster.ctl("csr", "create", "peer1", "--cn", name, "--domain", name)
    cluster.ctl("sign", "peer1", "--domain", name, "--wait")
    cluster.ctl("pending", "discard", "peer1", "--domain", name)


async def burst(cluster: LocalCluster, certs: list[Cert], deadline: float) -> Run:
    """Every Sign(wait=true) at once; each one's latency and every failure."""
    run = Run()
    async with grpc.aio.secure_channel(cluster.coordinator_endpoint, _operator_credentials(cluster)) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await channel.channel_ready()

        async def sign(cert: Cert) -> None:
            started = time.perf_counter()
            label = f"{cert.peer_id}/{cert.domain or 'server'}"
            try:
                order = await stub.Sign(pb.SignRequest(peer_id=cert.peer_id, slot=common_pb2.Slot(domain=cert.domain),
                                                       wait=True), timeout=deadline)
            except grpc.aio.AioRpcError as exc:
                run.failures.append((exc.code().name, f"{label}: {exc.code().name}: {exc.details()} after {time.perf_counter() - started:.1f} s ({exc.debug_error_string()})"))
                return
            if not order.succeeded:
                run.failures.append((f"order ended {order.phase}",
                                     f"{label}: order {order.order_id} ended {order.phase}: {order.error}"))
                return
            run.latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(sign(c) for c in certs))
        run.wall = time.perf_counter() - started
    return run


def baseline(cluster: LocalCluster, certs: list[Cert], concurrency: int) -> tuple[Run, dict[str, float]]:
    """The `acme` library alone, as many orders from ``concurrency`` threads;
    with the CPU seconds pebble and this process spent on them."""
    assert cluster.infra is not None
    challtestsrv = cluster.infra.challtestsrv
    names = [n for c in certs for n in c.names]
    in_parallel(lambda k: challtestsrv.set_a(names[k], [BASELINE_ADDRESS]), len(names))
    csrs = [make_csr(c.names) for c in certs]  # before the clock, as the product's CSRs are
    responder = Responder(BASELINE_ADDRESS, cluster.front_port)
    run = Run()
    try:
        # Polling orders, not authorizations: see bench.acme_alone (pebble deadlock).
        acme = AcmeAlone(cluster.directory_url, str(cluster.ca_bundle), responder, "base@bench.example",
                         poll_authorizations=False)

        def order(k: int) -> None:
            try:
                run.latencies.append(acme.order(csrs[k]))
            except Exception as exc:  # noqa: BLE001 (a benchmark counts every failure)
                run.failures.append((type(exc).__name__, f"{certs[k].names[0]}: {type(exc).__name__}: {exc}"))

        groups = processes(cluster)
        meter = Meter({key: groups[key] for key in ("pebble", "bench")})
        started = time.perf_counter()
        in_parallel(order, len(csrs), workers=concurrency)
        run.wall = time.perf_counter() - started
        cpu = meter.stop()
    finally:
        responder.close()
    return run, cpu


def processes(cluster: LocalCluster) -> dict[str, list[int]]:
    """The cluster's processes by group, and this one (the benchmark's client)."""
    assert cluster.coordinator is not None and cluster.infra is not None
    infra = [("etcd", cluster.infra.etcd.pid), ("pebble", cluster.infra.pebble.pid)]
    return {
        "coordinator": [cluster.coordinator.pid],
        "agents": [a.process.pid for a in cluster.agents if a.process is not None],
        **{name: [pid] for name, pid in infra if pid is not None},
        "bench": [os.getpid()],
    }


def measure_burst(cluster: LocalCluster, certs: list[Cert], deadline: float, metrics_url: str,
                  agent_idle: tuple[float | None, float | None]) -> Figures:
    """Run the burst while watching the cluster's processes and the leader's loop lag."""
    groups = processes(cluster)
    lag_before = scrape_loop_lag(metrics_url)
    meter = Meter(groups)
    product = asyncio.run(burst(cluster, certs, deadline))
    cpu = meter.stop()
    lag_after = scrape_loop_lag(metrics_url)
    assert cluster.coordinator is not None
    if not cluster.coordinator.alive:
        loop_lag = "n/a (the coordinator exited)"
    elif lag_after is None:
        loop_lag = f"n/a ({LOOP_LAG} not exposed)"
    elif (p99 := histogram_quantile(0.99, lag_before or {}, lag_after)) is None:
        loop_lag = "n/a (no observations during the burst)"
    else:
        loop_lag = f"{p99[0] * 1000:.0f} ms (n={p99[1]})"
    return Figures(len(certs), product, cpu, meter.watches["coordinator"], loop_lag, agent_idle,
                   _rss_summary(groups["agents"]))


# --- the report --------------------------------------------------------------------------
def percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MiB:.0f} MiB"


def _rss_summary(pids: Iterable[int]) -> tuple[float | None, float | None]:
    values = [r for r in (_rss(p) for p in pids) if r is not None]
    return (statistics.median(values), max(values)) if values else (None, None)


def _row(label: str, *cells: str) -> None:
    print(f"  {label:38}" + "".join(f"{c:>26}" for c in cells))


CPU_ROWS = (("coordinator", "coordinator"), ("agents", "agents (all)"), ("etcd", "etcd"), ("pebble", "pebble"),
            ("bench", "this process (client; acme alone)"))


def report(args: argparse.Namespace, f: Figures) -> None:
    product, alone = f.product, f.alone

    def rate(run: Run) -> str:
        return f"{len(run.latencies) / run.wall:.1f}" if run.wall else "n/a"

    def cells(fn: Callable[[Run], str]) -> list[str]:
        return [fn(product)] + ([fn(alone)] if alone else [])

    def cpu_cells(key: str) -> list[str]:
        sides = [f.cpu] + ([f.cpu_alone] if alone else [])
        return [f"{side[key]:.1f} s" if key in side else "-" for side in sides]

    def rest(cpu: dict[str, float]) -> str:
        ours = sum(cpu.get(key, 0.0) for key, _ in CPU_ROWS)
        return f"{cpu['machine'] - ours:.1f} s"

    def busy(cpu: dict[str, float]) -> str:
        cores = os.cpu_count() or 1
        return f"{cpu['machine']:.1f} s = {100 * cpu['machine'] / (cores * cpu['wall']):.0f}% of {cores} cores"

    print()
    _row("", "clusteracme", *(["acme alone"] if alone else []))
    _row("orders", *cells(lambda r: str(f.total)))
    _row("failures", *cells(lambda r: str(len(r.failures))))
    _row("concurrency", f"{f.total} at once", *([f"{args.concurrency} threads"] if alone else []))
    _row("wall time", *cells(lambda r: _s(r.wall)))
    _row("orders/s", *cells(rate))
    _row("order latency p50", *cells(lambda r: _s(percentile(r.latencies, 0.5))))
    _row("order latency p99", *cells(lambda r: _s(percentile(r.latencies, 0.99))))
    print("  CPU seconds during the run")
    for key, label in CPU_ROWS:
        _row("  " + label, *cpu_cells(key))
    _row("  rest of the machine (other work)", rest(f.cpu), *([rest(f.cpu_alone)] if alone else []))
    _row("  machine busy", busy(f.cpu), *([busy(f.cpu_alone)] if alone else []))
    print()
    c = f.coordinator
    _row("coordinator RSS before/peak/after",
         f"{_mb(c.rss_before)} / {_mb(c.rss_peak)} / " + ("exited" if c.rss_after is None else _mb(c.rss_after)))
    _row("leader loop-lag p99", f.loop_lag)
    _row("agent RSS idle: median / max", f"{_mb(f.agent_idle[0])} / {_mb(f.agent_idle[1])}")
    _row("agent RSS after the burst: median / max", f"{_mb(f.agent_after[0])} / {_mb(f.agent_after[1])}")
    print()
    if alone and alone.wall and product.wall and not product.failures:
        print(f"ratio clusteracme / acme alone (wall time): {product.wall / alone.wall:.2f}x")
    aim = "met" if not product.failures and product.wall <= AIM_SECONDS else "NOT met"
    idle_max = f.agent_idle[1]
    print(f"aim of issue 8: {f.total} certificates in <= {AIM_SECONDS:.0f} s: {aim}; "
          f"idle agent <= {AIM_AGENT_RSS / 10**6:.0f} MB ({AIM_AGENT_RSS / MiB:.1f} MiB): "
          + ("n/a" if idle_max is None else "met" if idle_max <= AIM_AGENT_RSS else "NOT met"))


def _failures(label: str, run: Run) -> None:
    if not run.failures:
        return
    kinds = Counter(kind for kind, _ in run.failures)
    print(f"\n{label}: {len(run.failures)} orders failed: "
          + ", ".join(f"{count} {kind}" for kind, count in kinds.most_common()) + "; the first ones:", file=sys.stderr)
    for _, detail in run.failures[:5]:
        print(f"  {detail[:400]}", file=sys.stderr)


# --- main --------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=30)
    parser.add_argument("--slots", type=int, default=7, help="per peer: the server slot plus slots-1 domain slots")
    parser.add_argument("--names", type=int, default=1, help="names per certificate")
    parser.add_argument("--max-active", type=int, default=None,
                        help="the coordinator's admission.max_active_orders (default: its own default)")
    parser.add_argument("--csr-concurrency", type=int, default=16, help="CreateCSR calls at once")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds each Sign(wait) may take")
    parser.add_argument("--no-baseline", action="store_true", help="skip the acme-alone run")
    parser.add_argument("--run-dir", help="keep logs and state here (default: a temp dir, kept only on failure)")
    parser.add_argument("--log-level", default="warning", help="the daemons' log level")
    parser.add_argument("--no-warmup", action="store_true",
                        help="start the burst on agents that have never served a challenge")
    args = parser.parse_args()
    if not 1 <= args.peers <= 250:
        parser.error("--peers must be between 1 and 250 (peers live on 127.0.0.2..)")
    if args.slots < 1 or args.names < 1:
        parser.error("--slots and --names must be at least 1")
    args.concurrency = args.max_active or AdmissionSettings().max_active_orders

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="clusteracme-fleet-"))
    try:
        ok = bench(args, run_dir)
    except BaseException:
        print(f"== logs and state kept in {run_dir}", file=sys.stderr)
        raise
    if not ok:
        print(f"== logs and state kept in {run_dir}", file=sys.stderr)
        raise SystemExit(1)
    if not args.run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)


def bench(args: argparse.Namespace, run_dir: Path) -> bool:
    """Run it all in ``run_dir``; False when any order failed."""
    metrics = f"127.0.0.1:{free_port()}"
    settings: dict[str, object] = {"metrics_listen": metrics}
    if args.max_active:
        settings["admission"] = {"max_active_orders": args.max_active}
    certs = fleet_certs(args.peers, args.slots, args.names, "prod")
    total = len(certs)
    print(f"fleet: {args.peers} peers x {args.slots} slots = {total} certificates, {args.names} name(s) each; "
          f"pebble PEBBLE_VA_NOSLEEP=1 NONCEREJECT=0", flush=True)
    started = time.monotonic()
    # NONCEREJECT=0: pebble otherwise rejects 5 % of good nonces at random,
    # which adds retry noise to both sides of the comparison.
    with LocalCluster(run_dir, peers=args.peers, log_level=args.log_level, coordinator_settings=settings,
                      pebble_env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}) as cluster:
        assert cluster.coordinator is not None and cluster.infra is not None and cluster.infra.pebble.pid
        print(f"cluster up in {time.monotonic() - started:.1f} s ({args.peers} agents started in parallel)",
              flush=True)
        agent_idle = _rss_summary(a.process.pid for a in cluster.agents if a.process is not None)
        prepare(cluster, certs, args)
        if not args.no_warmup:
            warmed = time.monotonic()
            warm_up(cluster)
            print(f"warm-up: one order served by every agent in {time.monotonic() - warmed:.1f} s "
                  "(agents in service have served before; the first challenge loads their HTTP stack)", flush=True)
        print(f"starting {total} Sign(wait=true) at once (admission limit {args.concurrency})", flush=True)
        figures = measure_burst(cluster, certs, args.deadline, f"http://{metrics}/metrics", agent_idle)
        product = figures.product
        print(f"burst done in {product.wall:.1f} s: {len(product.latencies)} issued, {len(product.failures)} failed"
              + ("" if cluster.coordinator.alive else
                 f"; the coordinator EXITED (code {cluster.coordinator.returncode}), see {run_dir}/coordinator.log"),
              flush=True)
        if not args.no_baseline:
            print(f"acme alone: {total} orders from {args.concurrency} threads on the same pebble", flush=True)
            figures.alone, figures.cpu_alone = baseline(
                cluster, fleet_certs(args.peers, args.slots, args.names, "base"), args.concurrency)

        report(args, figures)
        _failures("clusteracme", product)
        if figures.alone:
            _failures("acme alone", figures.alone)
        if not cluster.coordinator.alive:
            tail = [line for line in cluster.coordinator.log_tail(400).splitlines()
                    if any(word in line.lower() for word in ("leader", "error", "exception"))]
            print("coordinator log (leadership and errors, last lines):\n  " + "\n  ".join(tail[-15:]),
                  file=sys.stderr)
    alone_failed = len(figures.alone.failures) if figures.alone else 0
    if product.failures or alone_failed:
        print(f"\nFAILED: {len(product.failures)} of {total} clusteracme orders failed"
              + (f", {alone_failed} acme-alone orders failed" if alone_failed else ""), file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    main()
