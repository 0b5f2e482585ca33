"""Longevity on a real etcd: years of state must not stop a coordinator.

etcd (the launcher's, with its auto-compaction and quota) is filled before
any coordinator runs: 100 peers with 10 certificate slots each (1,000 slots:
CSR, active and previous chains), 5,000 ended order records of ~10 KB (done
and failed, CSR, chain, authorizations, 45 peers' progress), and 33 days of
schedule keys. Then a real coordinator daemon starts on it and must lead and
serve within 10 s, tick the renewal scheduler over the 1,000 slots, and its
retention job must compact the old orders into the peers' history.

Before paging by bytes, any of this failed: a 500-key page of these orders
is over gRPC's default 4 MiB (the first test shows it), so ``resume_all``
could not read ``orders/`` and the scheduler could not read ``certs/``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import random
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import etcd3aio
import grpc
import grpc.aio
import pytest
from clusteracme.coordinator import records, renewal
from clusteracme.coordinator.history import History
from clusteracme.coordinator.orders import AcmeStatus, Authz, OrderRecord, PeerProgress, Phase
from clusteracme.coordinator.store.base import Delete, Put, StoreUnavailable
from clusteracme.coordinator.store.etcd import EtcdStore
from clusteracme.coordinator.store.keys import Keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clusteracme import pki, rpcutil
from clusteracme.localcluster.cluster import write_toml
from clusteracme.localcluster.infra import Etcd, Process, free_port
from clusteracme.v1 import coordinator_pb2, coordinator_pb2_grpc

pytestmark = pytest.mark.timeout(300)

UTC = datetime.UTC
PREFIX = "/clusteracme/longevity/"
KEYS = Keys(PREFIX)
PEERS = 100
SLOTS_PER_PEER = 10  # the server slot and 9 domain slots
ORDERS = 5000
YOUNG = 200           # ended within the retention: kept
AUTHORIZE_ONLY = 20   # old revocation orders: no peer, deleted without an event
START_WITHIN = 10.0   # seconds from spawning the coordinator to serving


def _name(peer: int, slot: int) -> str:
    return f"d{slot}.peer{peer:03d}.example.com"


class Material:
    """Certificates like a CA's: EC P-256 leaves under an RSA-2048 intermediate."""

    def __init__(self) -> None:
        self.now = datetime.datetime.now(UTC)
        self.ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Longevity Test Intermediate R1"),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Longevity Test CA")])
        self.ca_name = ca_name
        self.intermediate = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(days=400))
            .not_valid_after(self.now + datetime.timedelta(days=1000))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        ).public_bytes(serialization.Encoding.PEM).decode()
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())

    def chain(self, names: list[str], issued_days_ago: float) -> tuple[str, str, str]:
        """(chain PEM, serial hex, not_after ISO) of a 90-day certificate."""
        start = self.now - datetime.timedelta(days=issued_days_ago)
        serial = x509.random_serial_number()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.ca_name).public_key(self.leaf_key.public_key()).serial_number(serial)
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        pem = leaf.public_bytes(serialization.Encoding.PEM).decode() + self.intermediate
        return pem, format(serial, "x"), leaf.not_valid_after_utc.isoformat()

    def csr(self, names: list[str]) -> str:
        return (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(self.leaf_key, hashes.SHA256())
        ).public_bytes(serialization.Encoding.PEM).decode()


def _order_json(rec: OrderRecord) -> dict[str, Any]:
    """``rec.to_json()``, without ``dataclasses.asdict``'s deep copies (5,000
    records of 45 nested objects each); checked equal on samples."""
    data = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
    data.update(
        phase=rec.phase.value, names=list(rec.names),
        authorizations=[{**vars(a), "status": a.status.value, "challenge_status": a.challenge_status.value}
                        for a in rec.authorizations],
        peers=[dict(vars(p)) for p in rec.peers], dns={k: list(v) for k, v in (rec.dns or {}).items()})
    return data


def _iso(when: datetime.datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


def _peer_record(peer: str, index: int, registered_at: str) -> dict[str, Any]:
    address = f"10.0.{index // 250}.{index % 250 + 1}"
    return {"peer_id": peer, "addresses": [address], "grpc_endpoint": f"{address}:7444",
            "http_front": f"{address}:80", "front_mode": "closed", "version": "0.1.0",
            "tls_endpoints": [f"{address}:443"], "enabled": True, "registered_at": registered_at}


def _slot_record(m: Material, peer: str, slot: int, *, current_order: str | None,
                 previous_pem: str) -> dict[str, Any]:
    domain = "" if slot == 0 else _name(int(peer[4:]), slot)
    names = [_name(int(peer[4:]), slot), f"www.{_name(int(peer[4:]), slot)}"]
    active_pem, active_serial, active_not_after = m.chain(names, 20)
    previous_serial = format(x509.load_pem_x509_certificate(previous_pem.encode()).serial_number, "x")
    far = _iso(m.now + datetime.timedelta(days=30))
    auto = slot % 2 == 1
    return {
        "peer_id": peer, "domain": domain, "current_order": current_order, "pending": None,
        "csr": {"pem": m.csr(names), "names": names, "key_type": "ec-p256", "public_key_sha256": "ab" * 32,
                "created_at": _iso(m.now - datetime.timedelta(days=200))},
        "active": {"serial_hex": active_serial, "chain_pem": active_pem, "not_after": active_not_after,
                   "names": names, "provider": "letsencrypt", "deployed_at": _iso(m.now - datetime.timedelta(days=19))},
        "previous": {"serial_hex": previous_serial, "chain_pem": previous_pem},
        "last_sign": {"status": "valid", "at": _iso(m.now - datetime.timedelta(days=20)), "error": "",
                      "order_id": f"o-{peer}-{slot}"},
        "last_deploy": {"status": "ok", "at": _iso(m.now - datetime.timedelta(days=19)), "error": "",
                        "serial_hex": active_serial},
        "schedule": {"auto": auto, "days": "mon,tue,wed,thu,fri", "time": "03:00", "tz": "Europe/Paris",
                     "key_policy": "rotate"},
        # The CA's renewal information was fetched and is not due again yet.
        "renewal": {"ari": {"serial": active_serial, "chosen": "", "next_check": far}, "failures": 0,
                    "counted_order": f"o-{peer}-{slot}"},
    }


def _order(m: Material, i: int, rng: random.Random, chains: list[str], csrs: dict[str, str]) -> OrderRecord:
    peer_index = i % PEERS
    slot = (i // PEERS) % SLOTS_PER_PEER
    names = [_name(peer_index, slot), f"www.{_name(peer_index, slot)}", f"api.{_name(peer_index, slot)}"]
    if i < YOUNG:
        age = datetime.timedelta(days=rng.uniform(0.1, 6))
    else:
        age = datetime.timedelta(days=rng.uniform(8, 60))
    ended = m.now - age
    failed = i % 10 == 3
    serving = [f"peer{(peer_index + k) % PEERS:03d}" for k in range(45)]
    authorize_only = YOUNG <= i < YOUNG + AUTHORIZE_ONLY
    if names[0] not in csrs:
        csrs[names[0]] = m.csr(names)
    return OrderRecord(
        order_id=f"{i:016x}", peer_id="" if authorize_only else f"peer{peer_index:03d}",
        domain="" if slot == 0 or authorize_only else _name(peer_index, slot),
        provider="letsencrypt", names=tuple(names), csr_pem="" if authorize_only else csrs[names[0]],
        phase=Phase.FAILED if failed else Phase.DONE, cleaned=True,
        order_url=f"https://acme-v02.api.letsencrypt.org/acme/order/123456789/{i:011d}",
        finalize_url=f"https://acme-v02.api.letsencrypt.org/acme/finalize/123456789/{i:011d}",
        certificate_url="" if failed or authorize_only else f"https://acme-v02.api.letsencrypt.org/acme/cert/{i:036x}",
        chain_pem="" if failed or authorize_only else chains[i % len(chains)],
        authorizations=tuple(
            Authz(name=n, url=f"https://acme-v02.api.letsencrypt.org/acme/authz-v3/{i * 3 + k:012d}",
                  status=AcmeStatus.INVALID if failed else AcmeStatus.VALID,
                  challenge_url=f"https://acme-v02.api.letsencrypt.org/acme/chall-v3/{i * 3 + k:012d}/Ab3dE",
                  challenge_status=AcmeStatus.INVALID if failed else AcmeStatus.VALID,
                  token=f"{rng.getrandbits(256):064x}"[:43],
                  key_authorization=f"{rng.getrandbits(256):064x}"[:43] + "." + f"{rng.getrandbits(256):064x}"[:43])
            for k, n in enumerate(names)),
        peers=tuple(PeerProgress(p, acknowledged=True, self_checked=not failed,
                                 error="" if not failed else f"http://10.0.0.1:80/.well-known/acme-challenge/x "
                                                             f"(Host {names[0]}) answered HTTP 404")
                    for p in serving),
        error=("the CA refused: urn:ietf:params:acme:error:unauthorized: Invalid response from "
               f"http://{names[0]}/.well-known/acme-challenge/x: 404") if failed else "",
        created_at=_iso(ended - datetime.timedelta(seconds=2)), updated_at=_iso(ended),
        requested_by="coordinator:c1" if i % 3 else "operator:alice", auto=bool(i % 3),
        authorize_only=authorize_only, dns={n: tuple(serving[:8]) for n in names},
        ordered_at=_iso(ended - datetime.timedelta(seconds=1)),
    )


@dataclass
class Filled:
    etcd: Etcd
    run_dir: Path
    orders_bytes: int
    slot_bytes: int
    expected_left: set[str]        # order ids the retention must keep
    compacted_per_peer: dict[str, int]
    schedules_kept: set[str]


async def _fill(etcd: Etcd) -> Filled:
    m = Material()
    rng = random.Random(8)
    store = EtcdStore([etcd.endpoint], timeout=30)
    async with store:
        async def put_all(items: list[tuple[str, bytes]]) -> None:
            batch: list[Put] = []
            size = 0
            for key, value in items:
                if batch and (size + len(value) > 1_000_000 or len(batch) == 100):  # etcd's 1.5 MiB request limit
                    await store.txn([], batch)
                    batch, size = [], 0
                batch.append(Put(key, value))
                size += len(value)
            if batch:
                await store.txn([], batch)

        registered = _iso(m.now - datetime.timedelta(days=400))
        peers = [f"peer{i:03d}" for i in range(PEERS)]
        await put_all([(KEYS.peer(p), records.encode(_peer_record(p, i, registered))) for i, p in enumerate(peers)])

        chains = [m.chain([_name(0, k), f"www.{_name(0, k)}"], 30)[0] for k in range(50)]
        csrs: dict[str, str] = {}
        orders = [_order(m, i, rng, chains, csrs) for i in range(ORDERS)]
        for sample in (orders[0], orders[3], orders[YOUNG]):
            assert json.loads(records.encode(_order_json(sample))) == json.loads(records.encode(sample.to_json()))
        pointed = orders[-1].order_id  # old and ended, but its slot still points at it: kept
        slots = []
        for i, p in enumerate(peers):
            for s in range(SLOTS_PER_PEER):
                current = pointed if (orders[-1].peer_id, orders[-1].domain) == (p, "" if s == 0 else _name(i, s)) \
                    else None
                slots.append((KEYS.cert(p, "server" if s == 0 else f"domain/{_name(i, s)}"),
                              records.encode(_slot_record(m, p, s, current_order=current,
                                                          previous_pem=chains[(i + s) % len(chains)]))))
        await put_all(slots)
        order_items = [(KEYS.order(o.order_id), records.encode(_order_json(o))) for o in orders]
        unreadable = ("ffffffffffffffff", json.dumps({**orders[YOUNG + 50].to_json(), "schema": 99}).encode())
        await put_all([*order_items, (KEYS.order(unreadable[0]), unreadable[1])])

        # 33 days of schedule keys per peer, and some of peers since removed.
        today = renewal.period_start(m.now, 86400, renewal.parse_tz("UTC"))
        schedule_items, kept = [], set()
        for p in [*peers, "gone1", "gone2", "gone3"]:
            for days in range(33):
                key = KEYS.schedule(p, today - datetime.timedelta(days=days))
                schedule_items.append((key, records.encode({"times": [_iso(m.now), _iso(m.now)]})))
                if days < 2 and not p.startswith("gone"):
                    kept.add(key)
        await put_all(schedule_items)

    compacted: dict[str, int] = {}
    for o in orders[YOUNG:-1]:  # the old ones, but the pointed one (the last)
        if not o.authorize_only:
            compacted[o.peer_id] = compacted.get(o.peer_id, 0) + 1
    expected_left = {o.order_id for o in orders[:YOUNG]} | {pointed, unreadable[0]}
    return Filled(etcd, Path(etcd.run_dir), sum(len(v) for _, v in order_items), sum(len(v) for _, v in slots),
                  expected_left, compacted, kept)


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    run_dir = tmp_path_factory.mktemp("longevity")
    etcd = Etcd(run_dir)
    etcd.start()
    try:
        started = time.monotonic()
        result = asyncio.run(_fill(etcd))
        print(f"\nfilled etcd in {time.monotonic() - started:.1f}s: {ORDERS} orders, "
              f"{result.orders_bytes / ORDERS / 1024:.1f} KB each on average ({result.orders_bytes / 2**20:.0f} MiB); "
              f"{PEERS * SLOTS_PER_PEER} slots, {result.slot_bytes / (PEERS * SLOTS_PER_PEER) / 1024:.1f} KB each")
        yield result
    finally:
        etcd.stop()


@dataclass
class Coordinator:
    process: Process
    endpoint: str
    tls: rpcutil.TLSFiles
    metrics_url: str
    serving_after: float
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


async def _serving(endpoint: str, tls: rpcutil.TLSFiles) -> int | None:
    """Number of peers ListPeers returns once health says SERVING; None before."""
    async with rpcutil.channel(tls, endpoint, pki.COORDINATOR_SERVER_NAME) as chan:
        try:
            health = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=1)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                return None
            peers = await coordinator_pb2_grpc.CoordinatorServiceStub(chan).ListPeers(
                coordinator_pb2.ListPeersRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return None
        return len(peers.peers)


@pytest.fixture(scope="module")
def coordinator(filled: Filled) -> Iterator[Coordinator]:
    run_dir = filled.run_dir
    pki_dir = run_dir / "pki"
    pki.init_ca(pki_dir, cluster="longevity")
    cert, key = pki.issue(pki_dir, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=pki_dir, ips=["127.0.0.1"])
    op_cert, op_key = pki.issue(pki_dir, pki.Identity(pki.Role.OPERATOR, "admin"), out_dir=pki_dir)
    pki.create_secret(run_dir / "account-key.secret")
    endpoint, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = run_dir / "coordinator.toml"
    write_toml(config, {
        "name": "c1", "listen": endpoint, "account_key_file": str(run_dir / "account-key.secret"),
        "dns_resolvers": [f"127.0.0.1:{free_port()}"], "metrics_listen": metrics,
        "tls": {"ca": str(pki_dir / pki.CA_CERT), "cert": str(cert), "key": str(key)},
        "etcd": {"endpoints": [filled.etcd.endpoint], "prefix": PREFIX},
        # Default retention (7 days): the old orders ended 8 to 60 days ago.
        "retention": {"interval_seconds": 3600},
    })
    tls = rpcutil.TLSFiles(pki_dir / pki.CA_CERT, op_cert, op_key)
    log_path = run_dir / "coordinator.log"
    started = time.monotonic()
    process = Process("coordinator", [sys.executable, "-m", "clusteracme.coordinator.app", "--config", str(config),
                                      "--log-level", "info"], log_path=log_path)
    try:
        deadline = started + 60
        while True:
            assert process.alive, f"the coordinator exited:\n{process.log_tail(40)}"
            answered = asyncio.run(_serving(endpoint, tls))
            if answered is not None:
                assert answered == PEERS
                break
            assert time.monotonic() < deadline, f"not serving after 60 s:\n{process.log_tail(40)}"
            time.sleep(0.1)
        serving_after = time.monotonic() - started
        print(f"\ncoordinator on {ORDERS} orders and {PEERS * SLOTS_PER_PEER} slots: leader and serving "
              f"(health SERVING, ListPeers answered {answered} peers) {serving_after:.2f}s after it was started")
        yield Coordinator(process, endpoint, tls, f"http://{metrics}/metrics", serving_after, log_path)
    finally:
        process.stop(timeout=10)


def _wait_for_log(c: Coordinator, pattern: str, within: float) -> re.Match[str]:
    deadline = time.monotonic() + within
    while True:
        found = re.search(pattern, c.log())
        if found:
            return found
        assert c.process.alive, f"the coordinator exited:\n{c.process.log_tail(40)}"
        assert time.monotonic() < deadline, f"no {pattern!r} in the log after {within:.0f}s:\n{c.process.log_tail(40)}"
        time.sleep(0.2)


async def _order_ids(endpoint: str) -> set[str]:
    async with EtcdStore([endpoint]) as store:
        return {KEYS.last(e.key) async for page in store.range_pages(KEYS.orders(), keys_only=True) for e in page}


def test_these_orders_overflow_one_grpc_reply_and_are_read_in_pages(filled: Filled) -> None:
    async def check() -> None:
        # The old way: one 500-key page at gRPC's default receive limit (4 MiB).
        raw = etcd3aio.Etcd3Client([filled.etcd.endpoint])
        await raw.connect()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await raw.kv.get(KEYS.orders(), etcd3aio.prefix_range_end(KEYS.orders()), limit=500)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await raw.close()
        async with EtcdStore([filled.etcd.endpoint]) as store:
            started = time.monotonic()
            entries = await store.range(KEYS.orders())
            print(f"\nrange of orders/: {len(entries)} records, {sum(len(e.value) for e in entries) / 2**20:.1f} MiB "
                  f"in {time.monotonic() - started:.2f}s")
            assert len(entries) == ORDERS + 1

    asyncio.run(check())


def test_the_coordinator_leads_and_serves_within_10_seconds(coordinator: Coordinator) -> None:
    assert coordinator.serving_after < START_WITHIN
    assert "is the leader" in coordinator.log()


def test_a_scheduler_tick_over_1000_slots_succeeds(coordinator: Coordinator) -> None:
    tick = _wait_for_log(coordinator, r"renewal scheduler: tick over (\d+) slot\(s\) of (\d+) peer\(s\) took ([\d.]+)s",
                         within=120)
    print(f"\nscheduler tick over {tick[1]} slots of {tick[2]} peers: {float(tick[3]):.2f}s")
    assert (int(tick[1]), int(tick[2])) == (PEERS * SLOTS_PER_PEER, PEERS)
    log = coordinator.log()
    assert "renewal scheduler:" not in log.replace(tick[0], "")  # no failed tick
    # No slot failed ("renewal of KEY: why" / "... failed unexpectedly"); a
    # pause ("automatic renewal of ... is paused": the seeded certificates'
    # provider is not configured here) is not a failure.
    assert "scheduler: renewal of " not in log


def test_retention_compacts_old_orders_into_history_and_prunes_schedules(filled: Filled,
                                                                          coordinator: Coordinator) -> None:
    done = _wait_for_log(coordinator, r"retention: (\d+) ended order\(s\) compacted into history, (\d+) schedule "
                                      r"key\(s\) pruned, \d+ agent channel\(s\) closed in ([\d.]+)s", within=180)
    print(f"\nretention: {done[1]} orders compacted, {done[2]} schedule keys pruned in {float(done[3]):.1f}s")
    assert asyncio.run(_order_ids(filled.etcd.endpoint)) == filled.expected_left
    assert int(done[1]) == ORDERS + 1 - len(filled.expected_left)
    assert "1 order record(s) cannot be read and are left alone: ffffffffffffffff" in coordinator.log()
    assert f"{AUTHORIZE_ONLY} authorization-only order(s) deleted" in coordinator.log()

    with urllib.request.urlopen(coordinator.metrics_url, timeout=5) as resp:
        metrics = resp.read().decode()
    assert f"clusteracme_orders_compacted_total {float(done[1])}" in metrics

    async def read_back() -> tuple[dict[str, int], dict[str, Any], set[str]]:
        async with EtcdStore([filled.etcd.endpoint]) as store:
            history = History(store, KEYS)
            per_peer = {}
            for peer in ("peer000", "peer042", "peer099"):
                per_peer[peer] = sum(e.what == "order" for _, e in await history.list(peer))
            [(_, newest)] = await history.list("peer042", limit=1)
            schedules = {e.key async for page in store.range_pages(KEYS.all_schedules(), keys_only=True)
                         for e in page}
            return per_peer, newest.__dict__, schedules

    per_peer, newest, schedules = asyncio.run(read_back())
    assert per_peer == {p: filled.compacted_per_peer[p] for p in per_peer}
    assert newest["what"] == "order" and newest["detail"].startswith(
        "order ") and "https://acme-v02.api.letsencrypt.org/acme/order/" in newest["detail"]
    assert newest["serial_hex"] or newest["result"] == "failed"
    assert schedules == filled.schedules_kept
    assert int(done[2]) == (PEERS + 3) * 33 - len(filled.schedules_kept)


def _gateway(endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """etcd's JSON gateway: what ``etcdctl`` does, without etcdctl."""
    request = urllib.request.Request(f"http://{endpoint}/v3/{path}", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


def test_a_full_etcd_is_named_and_recovered_as_the_readme_says(tmp_path: Path) -> None:
    etcd = Etcd(tmp_path, extra_args=["--quota-backend-bytes", str(4 * 2**20)])  # extra_args win
    etcd.start()
    try:
        log = (tmp_path / "etcd.log").read_text()
        assert '"auto-compaction-mode":"periodic"' in log and '"auto-compaction-retention":"1h0m0s"' in log
        assert '"quota-size-bytes":4194304' in log

        async def scenario() -> None:
            async with EtcdStore([etcd.endpoint]) as store:
                written: list[str] = []
                with pytest.raises(StoreUnavailable, match="NOSPACE"):
                    for n in range(100):
                        batch = [f"/full/{n:03d}/{i}" for i in range(5)]
                        await store.txn([], [Put(k, b"z" * 100_000) for k in batch])
                        written.extend(batch)
                assert written and await store.get(written[0]) is not None  # reads still work
                alarms = _gateway(etcd.endpoint, "maintenance/alarm", {"action": "GET"})["alarms"]
                assert [a["alarm"] for a in alarms] == ["NOSPACE"]
                for start in range(0, len(written), 100):  # deletes still work
                    await store.txn([], [Delete(k) for k in written[start:start + 100]])
                with pytest.raises(StoreUnavailable, match="NOSPACE"):
                    await store.put_if("/full/after", b"1", expect_mod_revision=None)
                # The README's recovery: compact, defragment, disarm.
                revision = _gateway(etcd.endpoint, "maintenance/status", {})["header"]["revision"]
                _gateway(etcd.endpoint, "kv/compaction", {"revision": revision, "physical": True})
                _gateway(etcd.endpoint, "maintenance/defragment", {})
                for alarm in alarms:
                    _gateway(etcd.endpoint, "maintenance/alarm",
                             {"action": "DEACTIVATE", "memberID": alarm["memberID"], "alarm": alarm["alarm"]})
                assert _gateway(etcd.endpoint, "maintenance/alarm", {"action": "GET"}).get("alarms", []) == []
                await store.put_if("/full/after", b"1", expect_mod_revision=None)
                assert int(_gateway(etcd.endpoint, "maintenance/status", {})["dbSize"]) < 2**20

        asyncio.run(scenario())
    finally:
        etcd.stop()
