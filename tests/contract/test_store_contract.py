"""The Store contract, run against the real etcd adapter and the in-memory one.

Each test gets a fresh key prefix, so the etcd tests share one server. Time
moves through ``Harness.advance``: real sleeping for etcd, a fake clock for
the memory store. A few tests at the end are etcd-only (restart, auth, TLS).
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import json
import logging
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import etcd3aio
import grpc
import grpc.aio
import pytest
from clusteracme.coordinator.store.base import (
    Check,
    Compacted,
    Conflict,
    Delete,
    EventKind,
    LeaseLost,
    NotLeader,
    Put,
    StoreUnavailable,
    WatchEvent,
)
from clusteracme.coordinator.store.etcd import EtcdStore, _too_large
from clusteracme.coordinator.store.memory import MemoryStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.errors import InvalidArgument
from clusteracme.localcluster.infra import Etcd, free_port
from tests.conftest import start_etcd

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    store: EtcdStore | MemoryStore
    prefix: str
    advance: Callable[[float], Awaitable[None]]
    """Let ``seconds`` pass for the store's lease clock."""
    unreachable: Callable[[], Awaitable[EtcdStore | MemoryStore]]
    """A store of the same kind that cannot reach its backend."""

    def k(self, name: str) -> str:
        return self.prefix + name


@pytest.fixture(params=["memory", "etcd"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    prefix = f"/contract/{uuid.uuid4().hex}/"
    store: EtcdStore | MemoryStore
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        async def advance(seconds: float) -> None:
            clock.now += seconds
            store.expire_leases()

        async def unreachable() -> MemoryStore:
            dead = MemoryStore()
            dead.set_reachable(False)
            return dead

        yield Harness(store, prefix, advance, unreachable)
    else:
        store = EtcdStore([request.getfixturevalue("etcd_endpoint")], timeout=5)
        await store.connect()

        async def unreachable_etcd() -> EtcdStore:
            dead = EtcdStore([f"127.0.0.1:{free_port()}"], timeout=1)
            await dead.connect()
            return dead

        yield Harness(store, prefix, asyncio.sleep, unreachable_etcd)
    await store.close()


async def _next_events(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    async with asyncio.timeout(10):
        return [await anext(events) for _ in range(count)]


async def _eventually_absent(h: Harness, key: str, within: float) -> None:
    async with asyncio.timeout(within):
        while await h.store.get(key) is not None:
            await asyncio.sleep(0.1)


# Reads and compare-and-swap.


async def test_get_missing_is_none(h: Harness) -> None:
    assert await h.store.get(h.k("nothing")) is None
    assert await h.store.range(h.k("nothing/")) == []


async def test_put_if_create_only(h: Harness) -> None:
    key = h.k("a")
    revision = await h.store.put_if(key, b"one", expect_mod_revision=0)
    entry = await h.store.get(key)
    assert entry is not None
    assert (entry.key, entry.value, entry.mod_revision, entry.create_revision, entry.lease) == (
        key, b"one", revision, revision, 0)
    with pytest.raises(Conflict) as info:
        await h.store.put_if(key, b"two", expect_mod_revision=0)
    assert info.value.keys == {key}
    assert (await h.store.get(key)).value == b"one"  # type: ignore[union-attr]


async def test_put_if_compare_and_swap(h: Harness) -> None:
    key = h.k("a")
    first = await h.store.put_if(key, b"one", expect_mod_revision=0)
    second = await h.store.put_if(key, b"two", expect_mod_revision=first)
    assert second > first
    entry = await h.store.get(key)
    assert entry is not None and (entry.value, entry.mod_revision, entry.create_revision) == (b"two", second, first)
    with pytest.raises(Conflict):
        await h.store.put_if(key, b"stale", expect_mod_revision=first)
    with pytest.raises(Conflict):
        await h.store.put_if(h.k("absent"), b"x", expect_mod_revision=first)
    assert await h.store.get(h.k("absent")) is None
    third = await h.store.put_if(key, b"three", expect_mod_revision=None)
    assert (await h.store.get(key)).value == b"three" and third > second  # type: ignore[union-attr]


async def test_delete_if(h: Harness) -> None:
    key = h.k("a")
    revision = await h.store.put_if(key, b"one", expect_mod_revision=0)
    with pytest.raises(Conflict):
        await h.store.delete_if(key, expect_mod_revision=revision + 100)
    assert await h.store.get(key) is not None
    assert await h.store.delete_if(key, expect_mod_revision=revision) is True
    assert await h.store.get(key) is None
    assert await h.store.delete_if(key, expect_mod_revision=None) is False
    with pytest.raises(Conflict):
        await h.store.delete_if(key, expect_mod_revision=revision)
    await h.store.put_if(key, b"two", expect_mod_revision=0)
    assert await h.store.delete_if(key, expect_mod_revision=None) is True


async def test_txn_is_all_or_nothing(h: Harness) -> None:
    a, b, c = h.k("a"), h.k("b"), h.k("c")
    rev_a = await h.store.put_if(a, b"a1", expect_mod_revision=0)
    rev_b = await h.store.put_if(b, b"b1", expect_mod_revision=0)
    ops = [Put(a, b"a2"), Delete(b), Put(c, b"c1")]

    with pytest.raises(Conflict) as info:
        await h.store.txn([Check(a, rev_a), Check(b, rev_a), Check(c, 0)], ops)
    assert info.value.keys == {b}
    assert [e.value for e in await h.store.range(h.prefix)] == [b"a1", b"b1"]

    revision = await h.store.txn([Check(a, rev_a), Check(b, rev_b), Check(c, 0)], ops)
    entries = {e.key: e for e in await h.store.range(h.prefix)}
    assert set(entries) == {a, c}
    assert entries[a].mod_revision == entries[c].mod_revision == entries[c].create_revision == revision
    assert entries[a].create_revision == rev_a


async def test_txn_refuses_a_key_twice(h: Harness) -> None:
    with pytest.raises(InvalidArgument):
        await h.store.txn([], [Put(h.k("a"), b"1"), Delete(h.k("a"))])


async def test_range_is_sorted_and_bounded_by_prefix(h: Harness) -> None:
    for name in ["p/c", "p/a/deep", "p/b", "pa", "p-sibling/x", "p"]:
        await h.store.put_if(h.k(name), name.encode(), expect_mod_revision=None)
    entries, revision = await h.store.range_with_revision(h.k("p/"))
    assert [e.key for e in entries] == [h.k("p/a/deep"), h.k("p/b"), h.k("p/c")]
    assert revision >= max(e.mod_revision for e in entries)


async def test_range_returns_every_key_of_a_large_prefix(h: Harness) -> None:
    names = [f"{i:05d}" for i in range(1201)]
    for start in range(0, len(names), 100):
        await h.store.txn([], [Put(h.k("many/" + n), b"x" * 64) for n in names[start:start + 100]])
    entries = await h.store.range(h.k("many/"))
    assert [e.key for e in entries] == [h.k("many/" + n) for n in names]


async def _fill(h: Harness, sub: str, count: int, size: int) -> list[str]:
    """``count`` keys of ``size``-byte values under ``sub/``, in key order."""
    keys = [h.k(f"{sub}/{i:05d}") for i in range(count)]
    per_txn = max(1, min(100, 1_000_000 // size))  # each request under etcd's 1.5 MiB --max-request-bytes
    for start in range(0, count, per_txn):
        await h.store.txn([], [Put(k, k.encode()[-5:] * (size // 5)) for k in keys[start:start + per_txn]])
    return keys


async def test_range_pages_cover_the_range_in_order(h: Harness) -> None:
    keys = await _fill(h, "pages", 250, 20_000)  # 5 MB: several pages in both stores
    whole = await h.store.range(h.k("pages/"))
    pages = [page async for page in h.store.range_pages(h.k("pages/"))]
    assert len(pages) > 1 and all(pages)
    assert [e for page in pages for e in page] == whole and [e.key for e in whole] == keys
    backwards = [e async for page in h.store.range_pages(h.k("pages/"), reverse=True) for e in page]
    assert backwards == whole[::-1]
    bare = [e async for page in h.store.range_pages(h.k("pages/"), keys_only=True) for e in page]
    assert [(e.key, e.value, e.mod_revision, e.create_revision) for e in bare] == [
        (e.key, b"", e.mod_revision, e.create_revision) for e in whole]
    newest = h.store.range_pages(h.k("pages/"), reverse=True)
    async with aclosing(newest):
        assert (await anext(newest))[0].key == keys[-1]  # the head only, then leave
    assert [page async for page in h.store.range_pages(h.k("nothing/"))] == []


async def test_range_pages_survive_compaction_under_a_slow_reader(h: Harness) -> None:
    keys = await _fill(h, "slow", 250, 20_000)
    seen: list[str] = []
    async with aclosing(h.store.range_pages(h.k("slow/"))) as pages:
        async for page in pages:
            if not seen:
                # The snapshot's revision is compacted away before the next page.
                revision = await h.store.put_if(h.k("slow/zzz"), b"late", expect_mod_revision=None)
                await h.store.compact(revision)
            seen.extend(e.key for e in page)
    assert seen[:len(keys)] == keys and set(seen) <= {*keys, h.k("slow/zzz")}


# Leases.


async def test_lease_revoke_deletes_its_keys(h: Harness) -> None:
    key, plain = h.k("alive"), h.k("plain")
    lease = await h.store.grant_lease(30)
    await h.store.put_if(key, b"x", expect_mod_revision=0, lease=lease)
    await h.store.put_if(plain, b"y", expect_mod_revision=0)
    assert (await h.store.get(key)).lease == lease  # type: ignore[union-attr]
    assert await h.store.keepalive_once(lease) > 0

    await h.store.revoke_lease(lease)
    assert await h.store.get(key) is None
    assert await h.store.get(plain) is not None
    with pytest.raises(LeaseLost):
        await h.store.keepalive_once(lease)
    with pytest.raises(LeaseLost):
        await h.store.put_if(h.k("late"), b"z", expect_mod_revision=0, lease=lease)
    assert await h.store.get(h.k("late")) is None
    await h.store.revoke_lease(lease)  # revoking again is not an error


async def test_ranges_tell_the_lease_of_each_key(h: Harness) -> None:
    """What a backup leaves out (``coordinator.backup``): range_with_revision
    and range_pages, keys only or not, give each entry's lease (0: none)."""
    lease = await h.store.grant_lease(30)
    await h.store.put_if(h.k("r/leased"), b"x", expect_mod_revision=0, lease=lease)
    await h.store.put_if(h.k("r/plain"), b"y", expect_mod_revision=0)
    entries, _ = await h.store.range_with_revision(h.k("r/"))
    assert [(e.key, e.lease, e.value) for e in entries] == [(h.k("r/leased"), lease, b"x"), (h.k("r/plain"), 0, b"y")]
    for keys_only in (False, True):
        async with aclosing(h.store.range_pages(h.k("r/"), keys_only=keys_only)) as pages:
            seen = [(e.key, e.lease, e.value) async for page in pages for e in page]
        assert seen == [(h.k("r/leased"), lease, b"" if keys_only else b"x"),
                        (h.k("r/plain"), 0, b"" if keys_only else b"y")]
    await h.store.revoke_lease(lease)


async def test_lease_expiry_deletes_its_keys(h: Harness) -> None:
    kept, dropped = h.k("kept"), h.k("dropped")
    short, renewed = await h.store.grant_lease(2), await h.store.grant_lease(2)
    await h.store.put_if(dropped, b"x", expect_mod_revision=0, lease=short)
    await h.store.put_if(kept, b"y", expect_mod_revision=0, lease=renewed)
    for _ in range(3):
        await h.advance(1.0)
        await h.store.keepalive_once(renewed)
    await _eventually_absent(h, dropped, within=5)
    assert await h.store.get(kept) is not None
    with pytest.raises(LeaseLost):
        await h.store.keepalive_once(short)


# Watch.


async def test_watch_replays_and_follows_puts_and_deletes(h: Harness) -> None:
    a, b = h.k("w/a"), h.k("w/b")
    await h.store.put_if(h.k("before"), b"", expect_mod_revision=0)
    rev_a = await h.store.put_if(a, b"1", expect_mod_revision=0)
    rev_b = await h.store.put_if(b, b"2", expect_mod_revision=0)
    await h.store.put_if(h.k("w-sibling"), b"", expect_mod_revision=0)
    async with aclosing(h.store.watch(h.k("w/"), rev_a)) as events:
        replayed = await _next_events(events, 2)
        assert [(e.kind, e.key, e.value, e.mod_revision) for e in replayed] == [
            (EventKind.PUT, a, b"1", rev_a), (EventKind.PUT, b, b"2", rev_b)]

        rev_del = await h.store.txn([], [Delete(a)])
        lease = await h.store.grant_lease(30)
        rev_c = await h.store.put_if(h.k("w/c"), b"3", expect_mod_revision=0, lease=lease)
        await h.store.revoke_lease(lease)
        live = await _next_events(events, 3)
        assert [(e.kind, e.key, e.value) for e in live] == [
            (EventKind.DELETE, a, b""), (EventKind.PUT, h.k("w/c"), b"3"), (EventKind.DELETE, h.k("w/c"), b"")]
        assert live[0].mod_revision == rev_del and live[1].mod_revision == rev_c
        assert live[2].mod_revision > rev_c


async def test_watch_of_compacted_history_raises(h: Harness) -> None:
    first = await h.store.put_if(h.k("c"), b"1", expect_mod_revision=None)
    latest = await h.store.put_if(h.k("c"), b"2", expect_mod_revision=None)
    await h.store.compact(latest)
    with pytest.raises(Compacted):
        async with aclosing(h.store.watch(h.prefix, first)) as events:
            await _next_events(events, 1)


# The leader fence.


async def test_fenced_writes_need_the_fence_revision(h: Harness) -> None:
    leader, a = h.k("leader"), h.k("a")
    token = await h.store.put_if(leader, b"me", expect_mod_revision=0)
    fenced = h.store.fenced(leader, token)

    rev_a = await fenced.put_if(a, b"1", expect_mod_revision=0)
    rev_b = await fenced.txn([], [Put(h.k("b"), b"2")])
    assert await fenced.delete_if(h.k("b"), expect_mod_revision=rev_b) is True
    with pytest.raises(Conflict) as conflict:  # a data conflict is not a fence failure
        await fenced.put_if(a, b"x", expect_mod_revision=rev_a + 100)
    assert not isinstance(conflict.value, NotLeader)
    assert (await fenced.get(a)).value == b"1"  # type: ignore[union-attr]

    await h.store.put_if(leader, b"someone else", expect_mod_revision=token)
    with pytest.raises(NotLeader):
        await fenced.put_if(a, b"2", expect_mod_revision=rev_a)
    with pytest.raises(NotLeader):
        await fenced.put_if(a, b"2", expect_mod_revision=rev_a + 100)  # both checks fail
    with pytest.raises(NotLeader):
        await fenced.delete_if(a, expect_mod_revision=None)
    with pytest.raises(NotLeader):
        await fenced.txn([], [Put(h.k("c"), b"3"), Delete(a)])
    entries = await h.store.range(h.prefix)
    assert [(e.key, e.value) for e in entries] == [(a, b"1"), (leader, b"someone else")]

    await h.store.delete_if(leader, expect_mod_revision=None)
    with pytest.raises(NotLeader):  # an absent fence key fails the fence too
        await fenced.put_if(h.k("d"), b"4", expect_mod_revision=None)


# Failures.


async def test_unreachable_store_raises_store_unavailable(h: Harness) -> None:
    dead = await h.unreachable()
    try:
        with pytest.raises(StoreUnavailable):
            await dead.get(h.k("a"))
        with pytest.raises(StoreUnavailable):
            await dead.put_if(h.k("a"), b"1", expect_mod_revision=0)
    finally:
        await dead.close()


async def test_close_ends_watches_and_calls_with_store_unavailable(h: Harness) -> None:
    revision = await h.store.put_if(h.k("a"), b"1", expect_mod_revision=0)

    async def drain() -> None:
        async with aclosing(h.store.watch(h.prefix, revision)) as events:
            async for _ in events:
                pass

    watching = asyncio.create_task(drain())
    await asyncio.sleep(0.2)
    await h.store.close()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(watching, 5)
    with pytest.raises(StoreUnavailable):
        await h.store.get(h.k("a"))


async def test_bad_watch_start_is_refused(h: Harness) -> None:
    with pytest.raises(InvalidArgument):
        async with aclosing(h.store.watch(h.prefix, 0)) as events:
            await anext(events)


# etcd only.


def _watch_request_tasks() -> set[asyncio.Task[object]]:
    """grpc's tasks feeding the request side of stream calls (our watches), still running."""
    return {t for t in asyncio.all_tasks()
            if not t.done() and t.get_coro().__qualname__.endswith("_consume_request_iterator")}


async def test_etcd_watch_resumes_after_restart_and_leaves_no_task_behind(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    etcd = start_etcd(tmp_path)
    store = EtcdStore([etcd.endpoint], timeout=5)
    await store.connect()
    try:
        first = await store.put_if("/r/a", b"1", expect_mod_revision=None)
        with caplog.at_level(logging.INFO):
            async with aclosing(store.watch("/r/", first)) as events:
                assert [e.value for e in await _next_events(events, 1)] == [b"1"]
                [first_stream] = _watch_request_tasks()  # held: a leaked task must not vanish by GC
                waiting = asyncio.ensure_future(anext(events))  # the watch runs through the outage
                etcd.stop()
                # The stream ended by itself (UNAVAILABLE): its request task ends too, before
                # any restart, instead of staying pending until GC logs it destroyed.
                async with asyncio.timeout(10):
                    while not first_stream.done():
                        await asyncio.sleep(0.05)
                assert "UNAVAILABLE; resuming" in caplog.text
                etcd.start()
                async with asyncio.timeout(15):
                    while True:
                        try:
                            await store.put_if("/r/b", b"2", expect_mod_revision=None)
                            break
                        except StoreUnavailable:
                            await asyncio.sleep(0.2)
                resumed = await asyncio.wait_for(waiting, 10)
                assert (resumed.key, resumed.value) == ("/r/b", b"2")
                assert len(_watch_request_tasks()) == 1  # the live stream's only
            await asyncio.sleep(0.05)
            assert _watch_request_tasks() == set()  # closing the watch ends it too
            gc.collect()
            await asyncio.sleep(0.05)
        assert "Task was destroyed" not in caplog.text and "never retrieved" not in caplog.text
    finally:
        await store.close()
        etcd.stop()


def _etcd_json(endpoint: str, path: str, body: dict[str, str]) -> None:
    request = urllib.request.Request(f"http://{endpoint}/v3/{path}", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=5) as resp:
        resp.read()


async def test_etcd_auth_and_token_renewal(tmp_path: Path) -> None:
    etcd = start_etcd(tmp_path, extra_args=["--auth-token-ttl", "1"])
    endpoint = etcd.endpoint
    try:
        _etcd_json(endpoint, "auth/user/add", {"name": "root", "password": "s3cret"})
        _etcd_json(endpoint, "auth/user/grant", {"user": "root", "role": "root"})
        _etcd_json(endpoint, "auth/enable", {})

        with pytest.raises(StoreUnavailable):
            await EtcdStore([endpoint], user="root", password="wrong").connect()
        async with EtcdStore([endpoint], user="root", password="s3cret") as store:
            await store.put_if("/auth/a", b"1", expect_mod_revision=0)
            await asyncio.sleep(2.5)  # the simple token expires after 1 s idle
            assert (await store.get("/auth/a")).value == b"1"  # type: ignore[union-attr]
    finally:
        etcd.stop()


def _tls_material(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    now = datetime.datetime.now(datetime.UTC)

    def make(name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
             san: list[x509.GeneralName]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = issuer or (subject, key)
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()), key

    ca, ca_key = make("test ca", None, [])
    paths: dict[str, Path] = {}
    for name, (cert, key) in {
        "ca": (ca, ca_key),
        "server": make("etcd", (ca.subject, ca_key),
                       [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        "client": make("coordinator", (ca.subject, ca_key), []),
    }.items():
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[name + "-key"] = directory / f"{name}.key"
        paths[name + "-key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


async def test_etcd_over_mutual_tls(tmp_path: Path) -> None:
    pki = _tls_material(tmp_path)
    # The launcher polls /health over plain HTTP, so TLS clients get a second listener.
    tls_port = free_port()
    etcd = Etcd(tmp_path, extra_args=[])
    port = etcd.client_port
    etcd.extra_args = (
        "--listen-client-urls", f"http://127.0.0.1:{port},https://127.0.0.1:{tls_port}",
        "--advertise-client-urls", f"http://127.0.0.1:{port},https://127.0.0.1:{tls_port}",
        "--cert-file", str(pki["server"]), "--key-file", str(pki["server-key"]),
        "--trusted-ca-file", str(pki["ca"]), "--client-cert-auth",
    )
    etcd.start()
    try:
        store = EtcdStore([f"localhost:{tls_port}"], ca=pki["ca"], cert=pki["client"], key=pki["client-key"])
        async with store:
            await store.put_if("/tls/a", b"1", expect_mod_revision=0)
            assert (await store.get("/tls/a")).value == b"1"  # type: ignore[union-attr]
        anonymous = EtcdStore([f"localhost:{tls_port}"], ca=pki["ca"].read_bytes(), timeout=2)
        async with anonymous:
            with pytest.raises(StoreUnavailable):
                await anonymous.get("/tls/a")
    finally:
        etcd.stop()


async def test_etcd_reads_beyond_grpc_message_limits(etcd_endpoint: str) -> None:
    """The replies that broke at scale: a 500-key page of ~10 KB records is
    over gRPC's default 4 MiB; values near etcd's 1.5 MiB maximum add up to
    more than the channel's 16 MiB in one range, one failed transaction's
    read-back, or one watch reply catching up."""
    store = EtcdStore([etcd_endpoint], timeout=10)
    async with store:
        h = Harness(store, f"/big/{uuid.uuid4().hex}/", asyncio.sleep, None)  # type: ignore[arg-type]
        records = await _fill(h, "orders", 600, 10_000)
        # The premise: the old fixed page of 500 keys, at gRPC's defaults, is refused.
        raw = etcd3aio.Etcd3Client([etcd_endpoint])
        await raw.connect()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await raw.kv.get(h.k("orders/"), etcd3aio.prefix_range_end(h.k("orders/")), limit=500)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await raw.close()
        assert [e.key for e in await store.range(h.k("orders/"))] == records

        first = await store.put_if(h.k("start"), b"", expect_mod_revision=None)
        large = await _fill(h, "large", 20, 1200 * 1024)  # 24 MiB; etcd's default max request is 1.5 MiB
        entries = await store.range(h.k("large/"))
        assert [(e.key, len(e.value)) for e in entries] == [(k, 1200 * 1024) for k in large]
        assert [e.key async for page in store.range_pages(h.k("large/"), reverse=True) for e in page] == large[::-1]
        with pytest.raises(Conflict) as lost:
            await store.txn([Check(e.key, e.mod_revision - 1) for e in entries], [Put(h.k("never"), b"x")])
        assert lost.value.keys == set(large)
        async with aclosing(store.watch(h.k("large/"), first)) as events:
            caught_up = await _next_events(events, len(large))
        assert [(e.key, len(e.value)) for e in caught_up] == [(k, 1200 * 1024) for k in large]


async def test_etcd_range_reads_a_new_snapshot_when_compacted_between_pages(etcd_endpoint: str) -> None:
    store = EtcdStore([etcd_endpoint], page_bytes=64 * 1024)  # pages of a few keys
    async with store:
        h = Harness(store, f"/snap/{uuid.uuid4().hex}/", asyncio.sleep, None)  # type: ignore[arg-type]
        keys = await _fill(h, "k", 60, 20_000)
        read = store._call
        late: list[int] = []

        async def compact_after_first_page(operation: str, fn, **kwargs):  # type: ignore[no-untyped-def]
            result = await read(operation, fn, **kwargs)
            if operation == "KV.Range" and not late:
                late.append(await store.put_if(h.k("k/zzz"), b"late", expect_mod_revision=None))
                await store.compact(late[0])  # the first page's revision is gone
            return result

        store._call = compact_after_first_page  # type: ignore[method-assign]
        entries, revision = await store.range_with_revision(h.k("k/"))
        assert [e.key for e in entries] == [*keys, h.k("k/zzz")] and revision >= late[0]


async def test_etcd_ascending_pages_go_unsorted_so_etcd_honours_their_limit(etcd_endpoint: str) -> None:
    """etcd drops the limit of a sorted range (it reads the rest of the
    range, sorts, truncates): ascending pages ask for no sort order and
    still come in key order; reverse pages must sort (descending)."""
    store = EtcdStore([etcd_endpoint], page_bytes=64 * 1024)  # pages of a few keys
    async with store:
        h = Harness(store, f"/sort/{uuid.uuid4().hex}/", asyncio.sleep, None)  # type: ignore[arg-type]
        keys = await _fill(h, "k", 60, 20_000)
        kv = store._services.kv  # type: ignore[union-attr]
        real_get = kv.get
        sent: list[tuple[int, int]] = []

        async def get(*args, **kwargs):  # type: ignore[no-untyped-def]
            sent.append((kwargs["sort_order"], kwargs["limit"]))
            return await real_get(*args, **kwargs)

        kv.get = get  # type: ignore[method-assign]
        pages = [[e.key for e in page] async for page in store.range_pages(h.k("k/"))]
        assert len(pages) > 3 and [k for page in pages for k in page] == keys
        assert sent and all(order == etcd3aio.SortOrder.NONE and limit > 0 for order, limit in sent)
        sent.clear()
        assert [e.key for e in await store.range(h.k("k/"))] == keys
        assert {order for order, _ in sent} == {etcd3aio.SortOrder.NONE}
        sent.clear()
        assert [e.key async for page in store.range_pages(h.k("k/"), reverse=True) for e in page] == keys[::-1]
        assert {order for order, _ in sent} == {etcd3aio.SortOrder.DESCEND}


async def test_etcd_refuses_an_oversized_write_as_invalid_argument(etcd_endpoint: str) -> None:
    """A request over etcd's --max-request-bytes (1.5 MiB) can never succeed:
    InvalidArgument, not a StoreUnavailable its writer would retry forever,
    whichever layer refuses it: etcd itself, etcd's gRPC server (over 2 MiB)
    or our channel's send limit."""
    store = EtcdStore([etcd_endpoint], max_message_bytes=3 * 2**20, page_bytes=2**20)
    async with store:
        key = f"/oversized/{uuid.uuid4().hex}"
        for size in (1_600_000, 2_200_000, 4_000_000):
            with pytest.raises(InvalidArgument, match="larger than etcd accepts") as refused:
                await store.put_if(key, b"x" * size, expect_mod_revision=None)
            assert not isinstance(refused.value, StoreUnavailable)
        await store.put_if(key, b"x" * 1_000_000, expect_mod_revision=0)
        # Replies over the receive limit are still a matter of smaller pages.
        for n in range(4):
            await store.put_if(f"{key}/{n}", b"y" * 1_400_000, expect_mod_revision=0)
        assert [len(e.value) for e in await store.range(f"{key}/")] == [1_400_000] * 4


def test_too_large_tells_a_reply_from_a_request() -> None:
    assert _too_large("Stream removed (CLIENT: Received message larger than max (4200090 vs. 3145728))") == "reply"
    assert _too_large("Received message larger than max (4200090 vs. 4194304)") == "reply"  # older grpc-core
    assert _too_large("grpc: received message larger than max (2200023 vs. 2097152)") == "request"  # etcd's server
    assert _too_large("CLIENT: Sent message larger than max (4000023 vs. 3145728)") == "request"
    assert _too_large("etcdserver: mvcc: database space exceeded") is None
    assert _too_large("etcdserver: too many requests") is None
