"""The revocation's ways and their order (issue 9, item 3), with the CA, the agents and DNS faked.

The orders go through the real ``Issuance``: ``start_sign`` and
``start_authorization`` with their own checks (ACME off, a pending
certificate, a running order, the DNS preflight, the compare-and-swap of the
slot) and the driver's own record writes (``Issuance._save``: the pending
certificate, ``last_sign``, the history). Only the ACME part of the driver is
replaced: each order ends as the test says (issued, failed, rate limited, or
left unfinished by a lost leadership).

Each test sets what the cluster knows, what the peers hold and what the CA
answers each way, then checks the way used, the ways refused (with their
reasons), where the chain stops, and what etcd and the history kept.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import ipaddress
import json
import threading
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from clusteracme.coordinator import history, records, revocation
from clusteracme.coordinator.errors import CAError, RateLimited
from clusteracme.coordinator.history import History
from clusteracme.coordinator.issuance import Issuance, utcnow
from clusteracme.coordinator.orders import OrderRecord, Phase
from clusteracme.coordinator.peers import PeerInfo
from clusteracme.coordinator.preflight import Lookup
from clusteracme.coordinator.revocation import UNATTACHED, Revocation
from clusteracme.coordinator.settings import TimingSettings
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme import certinfo, errors
from clusteracme.ctl import base as ctl_base
from clusteracme.ctl import trust as ctl_trust
from clusteracme.v1 import agent_pb2, common_pb2
from clusteracme.v1 import coordinator_pb2 as pb

NAME = "www.example.test"
KEYS = Keys("/t/")


def make_cert(names: list[str], key: ec.EllipticCurvePrivateKey | None = None, issuer: str = "Some CA", *,
              sans: list[x509.GeneralName] | None = None, ca: bool = False,
              issuer_key: ec.EllipticCurvePrivateKey | None = None, subject: str = "") -> x509.Certificate:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject or names[0])]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    general = sans if sans is not None else [x509.DNSName(n) for n in names]
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    return builder.sign(issuer_key or ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_sha(cert: x509.Certificate) -> str:
    return certinfo.spki_sha256(cert.public_key())


def serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


async def put(store: MemoryStore, key: str, value: dict[str, Any]) -> None:
    await store.put_if(key, records.encode(value), expect_mod_revision=None)


def unauthorized(what: str) -> CAError:
    return CAError(f"revoking the certificate: the CA answered {what} (unauthorized)", problem="unauthorized")


class FakeClient:
    def __init__(self, world: World, provider: str) -> None:
        self.world, self.provider = world, provider

    def revoke(self, der: bytes, reason: int) -> str:
        self.world.calls.append(("account", self.provider, reason))
        if self.world.gate is not None:
            assert self.world.gate.wait(10), "the test never opened the gate"
        return self.world.answer("account")

    def nonce_and_revoke_url(self) -> tuple[str, str]:
        return "nonce", "https://ca.test/revoke"

    def post_signed(self, url: str, jws_json: str, what: str) -> str:
        self.world.calls.append(("key", self.provider, json.loads(jws_json)["peer"]))
        return self.world.answer("key")


class FakeAccounts:
    def __init__(self, world: World) -> None:
        self.world = world

    async def resolve(self, name: str) -> str:
        if name not in self.world.providers:
            raise errors.NotFound(f"no provider named {name!r}")
        return name

    async def choose(self, *, explicit: str = "", slot: dict[str, Any] | None = None, renewal: bool = False) -> str:
        assert explicit, "a revocation always names its provider"
        return explicit

    async def client(self, name: str) -> FakeClient:
        return FakeClient(self.world, name)


class FakeRegistry:
    def __init__(self, world: World) -> None:
        self.world = world

    async def list(self) -> list[PeerInfo]:
        return [self.world.peers[p] for p in sorted(self.world.peers)]

    async def get(self, peer_id: str) -> PeerInfo:
        if peer_id not in self.world.peers:
            raise errors.NotFound(f"no peer {peer_id}")
        return self.world.peers[peer_id]


class FakeResolver:
    """DNS: a name listed in ``world.dns`` resolves to those addresses; any
    other name to every registered peer."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def resolve(self, name: str, rdtype: str) -> Lookup:
        hook, self.world.during_resolve = self.world.during_resolve, None
        if hook is not None:
            await hook()
        if rdtype == "AAAA":
            return Lookup()
        if name in self.world.dns:
            return Lookup(addresses=tuple(self.world.dns[name]))
        return Lookup(addresses=tuple(p.addresses[0] for p in self.world.peers.values()))


class FakeStub:
    def __init__(self, world: World, peer_id: str) -> None:
        self.world, self.peer_id = world, peer_id

    async def Status(self, request: Any, **kw: Any) -> Any:  # noqa: N802 (gRPC stub)
        self.world.in_flight += 1
        self.world.most_in_flight = max(self.world.most_in_flight, self.world.in_flight)
        try:
            await asyncio.sleep(0)
            if self.peer_id in self.world.broken:  # answers, with an error (a broken key store)
                raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           details="internal error in Status; see the server log")
            status = self.world.statuses.get(self.peer_id)
            if status is None:
                raise errors.Unavailable(f"peer {self.peer_id} does not answer")
            return status
        finally:
            self.world.in_flight -= 1

    async def SignRevocation(self, request: Any, **kw: Any) -> Any:  # noqa: N802 (gRPC stub)
        if self.world.sign_error is not None:
            raise self.world.sign_error
        return agent_pb2.SignRevocationResponse(jws_json=json.dumps({"peer": self.peer_id}))


class FakePool:
    def __init__(self, world: World) -> None:
        self.world = world

    async def call(self, peer: PeerInfo, what: str, fn: Callable[..., Any], timeout: float | None = None) -> Any:
        if not peer.alive:
            raise errors.Unavailable(f"peer {peer.peer_id} is dead")
        return await fn(FakeStub(self.world, peer.peer_id), {})


class DrivenIssuance(Issuance):
    """The real Issuance; the driver's ACME part is replaced: ``wait`` ends
    the order as ``world.outcomes`` says, through the driver's own writes."""

    def __init__(self, world: World) -> None:
        super().__init__(world.store, KEYS, FakeRegistry(world), FakeAccounts(world), FakePool(world),  # type: ignore[arg-type]
                         FakeResolver(world), TimingSettings(), History(world.store, KEYS))  # type: ignore[arg-type]
        self.world = world

    def spawn(self, order_id: str) -> Any:
        return None  # driven by wait(), as the test says

    async def start_authorization(self, names: tuple[str, ...], provider: str, who: str) -> OrderRecord:
        self.world.calls.append(("authorize", provider, names))
        return await super().start_authorization(names, provider, who)

    async def start_sign(self, peer_id: str, domain: str, provider: str, force: bool, who: str = "", *,
                         auto: bool = False, replaces: str = "") -> OrderRecord:
        self.world.calls.append(("sign", provider, (peer_id, domain)))
        return await super().start_sign(peer_id, domain, provider, force, who, auto=auto, replaces=replaces)

    async def wait(self, order_id: str) -> OrderRecord:
        rec = await self.get_order(order_id)
        _, revision = await records.read(self.world.store, KEYS.order(order_id))
        outcome = self.world.outcomes.pop(0) if self.world.outcomes else "ok"
        if outcome == "lost":  # the driver stopped: leadership lost
            return rec
        now = utcnow()
        if outcome == "ok" and rec.authorize_only:
            end = dataclasses.replace(rec, phase=Phase.DONE, cleaned=True, updated_at=now)
            await self._save(rec, end, revision)
            return end
        if outcome == "ok":
            fresh = make_cert(list(rec.names), issuer="Pebble Intermediate")
            self.world.fresh_serial = serial(fresh)
            issued = dataclasses.replace(rec, phase=Phase.ISSUED, chain_pem=pem(fresh), updated_at=now)
            revision = await self._save(rec, issued, revision)
            end = dataclasses.replace(issued, phase=Phase.DONE, cleaned=True)
            await self._save(issued, end, revision)
            return end
        error, retry_after = outcome if isinstance(outcome, tuple) else (outcome, 0.0)
        end = dataclasses.replace(rec, phase=Phase.FAILED, cleaned=True, error=error, retry_after=retry_after,
                                  updated_at=now)
        await self._save(rec, end, revision)
        return end


class World:
    def __init__(self, page_keys: int = 100) -> None:
        self.store = MemoryStore(page_keys=page_keys)
        self.providers = {"pebble", "other"}
        self.peers: dict[str, PeerInfo] = {}
        self.statuses: dict[str, agent_pb2.AgentStatusResponse] = {}
        self.broken: set[str] = set()
        self.dns: dict[str, list[str]] = {}
        self.answers: dict[str, list[str | Exception]] = {"account": [], "key": []}
        self.outcomes: list[Any] = []
        self.calls: list[tuple[Any, ...]] = []
        self.sign_error: Exception | None = None
        self.during_resolve: Callable[[], Any] | None = None
        self.gate: threading.Event | None = None
        self.fresh_serial = ""
        self.in_flight = self.most_in_flight = 0
        self.issuance = DrivenIssuance(self)
        self.revocation = Revocation(self.store, KEYS, FakeRegistry(self), FakeAccounts(self),  # type: ignore[arg-type]
                                     self.issuance, FakePool(self), History(self.store, KEYS))  # type: ignore[arg-type]

    def answer(self, way: str) -> str:
        queue = self.answers[way]
        result = queue.pop(0) if queue else "200 OK: revoked"
        if isinstance(result, Exception):
            raise result
        return result

    def peer(self, peer_id: str, *, alive: bool = True, silent: bool = False, enabled: bool = True,
             held: tuple[str, ...] = (), csr_key: str = "", active: x509.Certificate | None = None,
             active_not_after: str | None = None, retired: tuple[agent_pb2.RetiredKey, ...] = ()) -> None:
        address = str(ipaddress.ip_address("10.0.0.1") + len(self.peers))
        self.peers[peer_id] = PeerInfo(peer_id, (address,), f"{address}:1", f"{address}:80", "closed", "1",
                                       enabled, "2026-01-01", alive)
        if alive and not silent:
            certificates = []
            if active is not None:
                not_after = active.not_valid_after_utc.isoformat() if active_not_after is None else active_not_after
                certificates.append(common_pb2.SlotCertificates(slot=common_pb2.Slot(), active_serial_hex=serial(active),
                                                                active_not_after=not_after))
            self.statuses[peer_id] = agent_pb2.AgentStatusResponse(
                peer_id=peer_id,
                keys=[agent_pb2.SlotKey(slot=common_pb2.Slot(), public_key_sha256=csr_key,
                                        held_keys=[k for k in (*held, csr_key) if k])],
                certificates=certificates, retired_keys=list(retired))

    async def slot(self, peer_id: str, names: list[str], *, csr_key: str = "", **extra: Any) -> None:
        csr = {"names": names, "public_key_sha256": csr_key or f"csrkey-{peer_id}", "pem": f"CSR of {peer_id}"}
        await put(self.store, KEYS.cert(peer_id, "server"),
                  {"peer_id": peer_id, "domain": "", "csr": csr, "pending": None, "current_order": None, **extra})

    async def read_slot(self, peer_id: str) -> dict[str, Any]:
        slot, _ = await records.read(self.store, KEYS.cert(peer_id, "server"))
        assert slot is not None
        return slot

    async def events(self, peer_id: str) -> list[dict[str, Any]]:
        return [records.decode(e.value) for e in await self.store.range(KEYS.events(peer_id))]

    async def orders(self) -> list[dict[str, Any]]:
        return [records.decode(e.value) for e in await self.store.range(KEYS.orders())]

    async def revoke(self, cert: x509.Certificate | bytes, provider: str = "", force: bool = False,
                     reason: str = "superseded") -> Any:
        data = cert if isinstance(cert, bytes) else pem(cert).encode()
        return await self.revocation.revoke(data, provider, reason, force, "operator:t")


@pytest.fixture
def world() -> World:
    return World()


# --- the order of the ways ---------------------------------------------------------
async def test_the_issuing_account_first(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1")
    # Not active: the certificate is the slot's previous one.
    await world.slot("p1", [NAME], previous={"chain_pem": pem(cert), "provider": "pebble"})
    done = await world.revoke(cert)
    assert done.provider == "pebble" and done.authorization == "the issuing account (provider pebble)"
    assert done.refused == () and done.notes == () and world.calls == [("account", "pebble", 4)]
    events = await world.events("p1")
    assert [(e["result"], bool(e["certificate_pem"])) for e in events] == [("requested", True), ("ok", False)]


async def test_unknown_certificate_without_provider_is_refused_before_any_request(world: World) -> None:
    with pytest.raises(errors.FailedPrecondition, match="use --provider to revoke a certificate from another CA"):
        await world.revoke(make_cert([NAME]))
    assert world.calls == [] and await world.events(UNATTACHED) == []


async def test_the_issuer_of_a_slots_certificate_names_the_provider(world: World) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ours = make_cert(["a.example.test"], issuer="Shared CA", issuer_key=ca_key)
    await world.slot("p1", ["a.example.test"], previous={"chain_pem": pem(ours), "provider": "other",
                                                          "serial_hex": serial(ours)})
    world.peer("p1", held=())
    cert = make_cert([NAME], issuer="Shared CA", issuer_key=ca_key)
    world.answers["account"] = [unauthorized("no")]
    world.outcomes = ["ok"]
    with pytest.raises(errors.FailedPrecondition, match="every way was refused"):
        await world.revoke(cert)
    assert world.calls[0] == ("authorize", "other", (NAME,))


async def test_reset_story_the_key_on_a_live_peer(world: World) -> None:
    """The cluster's records are gone; a peer still holds the key."""
    cert = make_cert([NAME])
    world.peer("p1")
    world.peer("p2", held=(key_sha(cert),))
    done = await world.revoke(cert, provider="pebble")
    assert done.authorization == "the certificate's own key, signed on peer p2"
    assert done.refused == ("the issuing account: the cluster has no record of issuing this certificate",)
    assert world.calls == [("key", "pebble", "p2")]
    events = await world.events(UNATTACHED)
    assert [e["result"] for e in events] == ["requested", "ok"] and events[0]["certificate_pem"] == pem(cert)
    assert "refused first: the issuing account" in events[1]["detail"]


async def test_key_compromise_tries_the_key_first(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", held=(key_sha(cert),))
    await world.slot("p1", [NAME], previous={"chain_pem": pem(cert), "provider": "pebble"})
    done = await world.revoke(cert, reason="keyCompromise")
    assert done.authorization == "the certificate's own key, signed on peer p1" and done.refused == ()
    assert world.calls == [("key", "pebble", "p1")]
    # Without a key holder the issuing account is used, as for any reason.
    world.calls.clear()
    world.statuses["p1"] = agent_pb2.AgentStatusResponse(peer_id="p1")
    done = await world.revoke(cert, reason="keyCompromise")
    assert done.authorization == "the issuing account (provider pebble)" and world.calls == [("account", "pebble", 1)]


async def test_key_compromise_by_authorizations_says_the_reason_may_change(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1")
    done = await world.revoke(cert, provider="pebble", reason="keyCompromise")
    assert done.authorization.startswith("fresh authorizations for www.example.test")
    assert done.notes == (revocation.NOT_BY_KEY_NOTE,)
    assert "cessationOfOperation" in done.answer and done.answer.startswith(done.authorization)


# --- active, or possibly active ------------------------------------------------------
async def test_served_from_a_peers_disk_needs_force(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", held=(key_sha(cert),), active=cert)
    with pytest.raises(errors.FailedPrecondition, match="active on p1, on its disk; deploy a replacement first"):
        await world.revoke(cert, provider="pebble")
    assert world.calls == []
    done = await world.revoke(cert, provider="pebble", force=True)
    assert "own key, signed on peer p1" in done.authorization


async def test_the_same_serial_from_another_ca_on_disk_is_not_this_certificate(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", held=(key_sha(cert),), active=cert, active_not_after="2031-01-01T00:00:00+00:00")
    done = await world.revoke(cert, provider="pebble")
    assert "own key, signed on peer p1" in done.authorization


async def test_a_peer_that_cannot_be_asked_needs_force_for_a_certificate_not_in_the_records(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", held=(key_sha(cert),))
    world.peer("p2", alive=False)
    world.peer("p3", silent=True)
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble")
    assert ("not in the cluster's records and some peers could not be asked whether they serve it: "
            "p2 (not alive), p3 (did not answer)") in caught.value.message
    assert "--force" in caught.value.message and world.calls == [] and await world.events(UNATTACHED) == []
    done = await world.revoke(cert, provider="pebble", force=True)
    assert "own key, signed on peer p1" in done.authorization


async def test_a_dead_peer_does_not_block_a_certificate_the_records_know(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1")
    world.peer("p2", alive=False)
    await world.slot("p1", [NAME], previous={"chain_pem": pem(cert), "provider": "pebble"})
    done = await world.revoke(cert)
    assert done.authorization == "the issuing account (provider pebble)"


async def test_a_revoked_pending_certificate_is_discarded(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1")
    await world.slot("p1", [NAME], pending={"chain_pem": pem(cert), "provider": "pebble", "serial_hex": serial(cert),
                                            "auto": True})
    done = await world.revoke(cert)
    assert done.notes == ("the revoked certificate was pending on peer p1 and was discarded (the history keeps a "
                          "copy)",)
    assert done.notes[0] in done.answer
    assert (await world.read_slot("p1"))["pending"] is None
    events = await world.events("p1")
    assert [(e["what"], e["result"]) for e in events] == [("revoke", "requested"), ("discard", "ok"), ("revoke", "ok")]
    assert events[1]["certificate_pem"] == pem(cert) and events[1]["serial_hex"] == serial(cert)


# --- the fourth way ----------------------------------------------------------------------
async def test_the_whole_chain_down_to_a_new_order(world: World) -> None:
    cert = make_cert([NAME, "b.example.test"])
    await put(world.store, KEYS.order("old"), OrderRecord(
        order_id="old", peer_id="p1", domain="", provider="pebble", names=(NAME,), csr_pem="",
        phase=Phase.DONE, chain_pem=pem(cert)).to_json())
    world.peer("p1", csr_key="k1")
    world.peer("p2", csr_key="k2")
    world.peer("p3", csr_key="k3")
    await world.slot("p1", [NAME], csr_key="k1")                                     # other names
    await world.slot("p2", ["b.example.test", NAME], csr_key="k2",
                     pending={"serial_hex": "abc"})                                   # busy
    await world.slot("p3", [NAME, "b.example.test"], csr_key="k3")                   # this one
    world.answers["account"] = [unauthorized("not yours"), unauthorized("authorizations are not enough"),
                                "200 OK: revoked"]
    done = await world.revoke(cert)
    assert [c[0] for c in world.calls] == ["account", "authorize", "account", "sign", "account"]
    assert world.calls[3] == ("sign", "pebble", ("p3", ""))
    assert [r.split(":")[0] for r in done.refused] == [
        "the issuing account", "the certificate's own key", "fresh authorizations"]
    assert "not yours" in done.refused[0] and "no live peer holds it" in done.refused[1]
    assert "authorizations are not enough" in done.refused[2]
    assert done.authorization.startswith("a new order for the same names (provider pebble, order ")
    assert (f"a new certificate {world.fresh_serial} for the same names is pending on peer p3; discard or deploy it "
            "(until then no certificate is signed for that slot, automatic renewal included)") in done.authorization
    # Through the real driver writes: kept pending, not deployed, marked; the order ended.
    slot = await world.read_slot("p3")
    assert slot["pending"]["serial_hex"] == world.fresh_serial and not slot.get("active")
    assert slot["pending"]["for_revocation"] == serial(cert) and slot["pending"]["auto"] is False
    assert slot["current_order"] is None and slot["last_sign"]["status"] == "valid"
    p3 = await world.events("p3")
    assert [(e["what"], e["result"]) for e in p3] == [("sign", "ok"), ("revoke", "kept-pending")]
    assert p3[1]["serial_hex"] == world.fresh_serial and p3[1]["previous_serial_hex"] == serial(cert)
    assert f"ordered to revoke certificate {serial(cert)}" in p3[1]["detail"]
    events = await world.events("p1")
    assert [e["result"] for e in events] == ["requested", "ok"] and world.fresh_serial in events[1]["detail"]
    # The authorization-only order: DNS checked, only the peers DNS points at required.
    authz = [o for o in await world.orders() if o.get("authorize_only")]
    assert len(authz) == 1 and authz[0]["dns"] == {NAME: ["p1", "p2", "p3"], "b.example.test": ["p1", "p2", "p3"]}


async def test_slots_in_manual_mode_without_a_certificate_come_first(world: World) -> None:
    cert = make_cert([NAME])
    for pid in ("p1", "p2", "p3", "p4"):
        world.peer(pid, csr_key=f"k-{pid}")
    active = {"serial_hex": "1", "chain_pem": "x", "provider": "pebble"}
    await world.slot("p1", [NAME], csr_key="k-p1", schedule={"auto": True})
    await world.slot("p2", [NAME], csr_key="k-p2", active=active)
    await world.slot("p3", [NAME], csr_key="k-p3", schedule={"auto": False}, active=active)
    await world.slot("p4", [NAME], csr_key="k-p4")
    world.answers["account"] = [unauthorized("no"), "200 OK: revoked"]
    done = await world.revoke(cert, provider="pebble")
    assert "is pending on peer p4" in done.authorization
    world.calls.clear()
    world.answers["account"] = [unauthorized("no"), "200 OK: revoked"]
    # p4 is busy now; next: manual with a certificate (p2 before p3 by name), before automatic.
    await world.revoke(make_cert([NAME]), provider="pebble")
    assert ("sign", "pebble", ("p2", "")) in world.calls


async def test_an_uncounted_automatic_failure_keeps_its_slot(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    await world.slot("p1", [NAME], csr_key="k1", schedule={"auto": True},
                     last_sign={"status": "failed", "order_id": "auto1", "error": "x"},
                     renewal={"last_auto_order": "auto1", "counted_order": "auto0"})
    world.answers["account"] = [unauthorized("no")]
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble")
    assert "p1: its last automatic sign (order auto1) failed and is not yet accounted for" in caught.value.message
    assert [c[0] for c in world.calls] == ["authorize", "account"]
    # Once the scheduler has counted it, the slot may be used.
    slot = await world.read_slot("p1")
    await put(world.store, KEYS.cert("p1", "server"), {**slot, "renewal": {"last_auto_order": "auto1",
                                                                           "counted_order": "auto1"}})
    world.answers["account"] = [unauthorized("no")]
    done = await world.revoke(cert, provider="pebble")
    assert "is pending on peer p1" in done.authorization


@pytest.mark.parametrize(("setup", "why"), [
    ("running", "p1: order run1 is still running"),
    ("acme_off", "p1: ACME is off for this slot"),
    ("dead", "p1: the peer is not alive"),
    ("disabled", "p1: ACME is disabled on the peer"),
    ("lost_key", "p1: the peer no longer holds its CSR's key"),
    ("revoked_key", "p1: its CSR has the key of the certificate being revoked"),
    ("unregistered", "p1: the peer is not registered"),
])
async def test_each_reason_a_slot_cannot_be_signed(world: World, setup: str, why: str) -> None:
    cert = make_cert([NAME])
    world.peer("p0")
    if setup != "unregistered":
        world.peer("p1", csr_key="k1", alive=setup != "dead", enabled=setup != "disabled")
    extra: dict[str, Any] = {}
    csr_key = {"lost_key": "gone", "revoked_key": key_sha(cert)}.get(setup, "k1")
    if setup == "running":
        await put(world.store, KEYS.order("run1"), OrderRecord(
            order_id="run1", peer_id="p1", domain="", provider="pebble", names=(NAME,), csr_pem="",
            phase=Phase.ANSWERED).to_json())
        extra["current_order"] = "run1"
    if setup == "acme_off":
        extra["acme_enabled"] = False
    await world.slot("p1", [NAME], csr_key=csr_key, **extra)
    world.answers["account"] = [unauthorized("no")]
    force = setup == "dead"  # a dead peer and a certificate not in the records: --force
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble", force=force)
    assert why in caught.value.message and "every way was refused" in caught.value.message
    assert "sign" not in [c[0] for c in world.calls]


async def test_a_silent_peers_slot_is_not_used(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p0", held=(key_sha(cert),))
    world.peer("p1", silent=True)
    await world.slot("p1", [NAME], csr_key="k1")
    world.sign_error = errors.FailedPrecondition("the key of this certificate was deleted")
    world.answers["account"] = [unauthorized("no")]
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble", force=True)
    assert "p1: the peer did not answer" in caught.value.message


async def test_no_slot_for_a_new_order_every_way_refused(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1", held=())
    world.peer("p2", csr_key="k2")
    world.peer("p3", csr_key="k3", enabled=False)
    await world.slot("p1", [NAME], csr_key=key_sha(cert))     # the revoked key itself
    await world.slot("p2", [NAME], csr_key="lost")            # a key the peer no longer holds
    await world.slot("p3", [NAME], csr_key="k3")              # ACME disabled on the peer
    world.answers["account"] = [unauthorized("no")]
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble")
    message = caught.value.message
    assert message.startswith(f"certificate {serial(cert)} was not revoked: every way was refused")
    for part in ("the issuing account: the cluster has no record", "the certificate's own key: no live peer holds it",
                 "fresh authorizations: revoking the certificate: the CA answered no",
                 "p1: its CSR has the key of the certificate being revoked",
                 "p2: the peer no longer holds its CSR's key", "p3: ACME is disabled on the peer",
                 "create a CSR for those names"):
        assert part in message, part
    assert [c[0] for c in world.calls] == ["authorize", "account"]
    events = await world.events(UNATTACHED)
    assert [e["result"] for e in events] == ["requested", "failed"] and events[1]["detail"] == message


async def test_no_slot_at_all_says_how_to_make_one(world: World) -> None:
    world.peer("p1")
    world.answers["account"] = [unauthorized("no")]
    with pytest.raises(errors.FailedPrecondition, match=r"no slot has a CSR for exactly www.example.test "
                                                        r"\(create one on a peer"):
        await world.revoke(make_cert([NAME]), provider="pebble")


async def test_a_slot_signed_but_refused_still_says_the_pending_certificate(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    await world.slot("p1", [NAME], csr_key="k1")
    world.answers["account"] = [unauthorized("no"), unauthorized("still no")]
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble")
    assert f"a new certificate {world.fresh_serial} for the same names is pending on peer p1" in caught.value.message
    assert (await world.read_slot("p1"))["pending"]["for_revocation"] == serial(cert)


async def test_a_slot_taken_under_us_hands_over_to_the_next_once(world: World) -> None:
    """start_sign's own compare-and-swap fails (the slot changed while DNS was
    read): the next qualifying slot is tried."""
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    world.peer("p2", csr_key="k2")
    await world.slot("p1", [NAME], csr_key="k1")
    await world.slot("p2", [NAME], csr_key="k2")
    world.answers["account"] = [unauthorized("no")]
    original = world.issuance.start_sign

    async def touch() -> None:  # another writer changes p1's slot during start_sign's DNS preflight
        await put(world.store, KEYS.cert("p1", "server"), {**await world.read_slot("p1"), "note": "changed"})

    async def start_sign(*args: Any, **kw: Any) -> OrderRecord:
        if args[0] == "p1":
            world.during_resolve = touch
        return await original(*args, **kw)

    world.issuance.start_sign = start_sign  # type: ignore[method-assign]
    done = await world.revoke(cert, provider="pebble")
    assert [c[2] for c in world.calls if c[0] == "sign"] == [("p1", ""), ("p2", "")]
    assert "is pending on peer p2" in done.authorization
    assert (await world.read_slot("p1"))["pending"] is None and (await world.read_slot("p1"))["current_order"] is None


async def test_two_slots_taken_under_us_stop_with_aborted(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    world.peer("p2", csr_key="k2")
    await world.slot("p1", [NAME], csr_key="k1")
    await world.slot("p2", [NAME], csr_key="k2")
    world.answers["account"] = [unauthorized("no")]
    original = world.issuance.start_sign

    async def start_sign(peer_id: str, *args: Any, **kw: Any) -> OrderRecord:
        async def touch() -> None:
            await put(world.store, KEYS.cert(peer_id, "server"), {**await world.read_slot(peer_id), "n": 1})
        world.during_resolve = touch
        return await original(peer_id, *args, **kw)

    world.issuance.start_sign = start_sign  # type: ignore[method-assign]
    with pytest.raises(errors.Aborted, match="changed meanwhile"):
        await world.revoke(cert, provider="pebble")
    assert [e["result"] for e in await world.events(UNATTACHED)] == ["requested", "failed"]


async def test_a_sign_refused_by_start_sign_is_a_refusal(world: World) -> None:
    """A pending certificate lands between the slot choice and start_sign:
    start_sign's own check refuses; with no other slot, the way is refused."""
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    await world.slot("p1", [NAME], csr_key="k1")
    world.answers["account"] = [unauthorized("no")]
    original = world.issuance.start_sign

    async def start_sign(peer_id: str, *args: Any, **kw: Any) -> OrderRecord:
        await put(world.store, KEYS.cert(peer_id, "server"),
                  {**await world.read_slot(peer_id), "pending": {"serial_hex": "77", "chain_pem": "x"}})
        return await original(peer_id, *args, **kw)

    world.issuance.start_sign = start_sign  # type: ignore[method-assign]
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble")
    assert ("a new order for the same names: signing was refused (p1: peer p1 already has a pending certificate "
            "(serial 77)") in caught.value.message


# --- where the chain stops -----------------------------------------------------------
async def test_a_new_order_that_fails_stops_with_its_error(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    await world.slot("p1", [NAME], csr_key="k1")
    world.answers["account"] = [unauthorized("no")]
    world.outcomes = ["ok", ("the CA answered too many certificates (rateLimited)", 3600.0)]
    with pytest.raises(RateLimited) as caught:
        await world.revoke(cert, provider="pebble")
    assert caught.value.retry_after == 3600.0
    assert "by a new order for the same names, the new order for www.example.test on p1" in caught.value.message
    assert "too many certificates" in caught.value.message and "every way was refused" not in caught.value.message
    slot = await world.read_slot("p1")
    assert slot["pending"] is None and slot["last_sign"]["status"] == "failed" and slot["current_order"] is None


async def test_a_failed_validation_in_the_new_order_is_not_a_refusal(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    await world.slot("p1", [NAME], csr_key="k1")
    world.answers["account"] = [unauthorized("no")]
    world.outcomes = ["ok", "the CA did not validate: the order is invalid"]
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble")
    assert "every way was refused" not in caught.value.message
    assert "failed: the CA did not validate" in caught.value.message


@pytest.mark.parametrize("at", ["authorizations", "new order"])
async def test_lost_leadership_mid_order_is_unavailable(world: World, at: str) -> None:
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    await world.slot("p1", [NAME], csr_key="k1")
    world.outcomes = ["lost"] if at == "authorizations" else ["ok", "lost"]
    world.answers["account"] = [unauthorized("no")]
    with pytest.raises(errors.Unavailable, match="the coordinator lost leadership; the order .* continues at the "
                                                 "next leader"):
        await world.revoke(cert, provider="pebble")
    assert [e["result"] for e in await world.events(UNATTACHED)] == ["requested", "failed"]


async def test_a_network_error_stops_the_chain(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", held=(key_sha(cert),))
    world.answers["key"] = [errors.Unavailable("revoking the certificate: cannot reach the CA")]
    with pytest.raises(errors.Unavailable) as caught:
        await world.revoke(cert, provider="pebble")
    assert "by the certificate's own key, revoking the certificate: cannot reach the CA" in caught.value.message
    assert "refused before: the issuing account" in caught.value.message
    assert [c[0] for c in world.calls] == ["key"]  # no fresh authorizations, no new order
    assert [e["result"] for e in await world.events(UNATTACHED)] == ["requested", "failed"]


async def test_a_silent_peer_may_hold_the_key(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    world.peer("p2", silent=True)
    await world.slot("p1", [NAME], csr_key="k1")
    with pytest.raises(errors.Unavailable) as caught:
        await world.revoke(cert, provider="pebble", force=True)
    assert ("no peer that answered holds the certificate's key, and p2 did not answer; try again when they answer"
            in caught.value.message)
    assert world.calls == [] and await world.orders() == []  # no CA order spent


async def test_a_peer_whose_status_fails_is_not_silent(world: World) -> None:
    """A peer that answers Status with an error (its key store broken) is
    reachable: not a reason to stop, but named."""
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    world.broken.add("p1")
    await world.slot("p1", [NAME], csr_key="k1", pending={"chain_pem": pem(cert), "provider": "other",
                                                          "serial_hex": serial(cert)})
    world.answers["account"] = [unauthorized("not yours")]
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble")
    message = caught.value.message
    assert ("the certificate's own key: no live peer holds it (p1 answered its status with an error: internal "
            "error in Status; see the server log)") in message
    assert "p1: it already has a pending certificate" in message and "not yours" in message
    # Not in the records: such a peer cannot say whether it serves it.
    world.calls.clear()
    with pytest.raises(errors.FailedPrecondition, match=r"p1 \(its status failed: internal error in Status"):
        await world.revoke(make_cert([NAME]), provider="pebble")
    assert world.calls == []


async def test_already_revoked_stops_at_once(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", held=(key_sha(cert),))
    world.answers["key"] = [CAError("the CA answered Certificate has already been revoked.", problem="alreadyRevoked")]
    with pytest.raises(errors.FailedPrecondition, match="is already revoked"):
        await world.revoke(cert, provider="pebble")
    assert [c[0] for c in world.calls] == ["key"]


async def test_a_certificate_the_ca_does_not_know_stops_after_fresh_authorizations(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1")
    world.answers["account"] = [CAError("revoking the certificate: the CA answered Unable to find specified "
                                        "certificate. (malformed)", problem="malformed")]
    with pytest.raises(CAError) as caught:
        await world.revoke(cert, provider="pebble")
    message = caught.value.message
    assert "by fresh authorizations, revoking the certificate: the CA answered Unable to find" in message
    assert "refused before: the issuing account" in message and "the certificate's own key" in message
    assert [c[0] for c in world.calls] == ["authorize", "account"]  # no new order


async def test_failed_authorizations_stop_the_chain(world: World) -> None:
    world.peer("p1")
    world.outcomes = ["the CA did not validate: the order is invalid"]
    with pytest.raises(errors.FailedPrecondition, match=r"authorising www.example.test \(order \w+\) failed: "
                                                        "the CA did not validate"):
        await world.revoke(make_cert([NAME]), provider="pebble")
    assert [c[0] for c in world.calls] == ["authorize"]


# --- refused locally before any order --------------------------------------------------------
@pytest.mark.parametrize(("sans", "why"), [
    ([x509.DNSName(NAME), x509.IPAddress(ipaddress.ip_address("192.0.2.7"))],
     "the certificate names more than DNS names (IPAddress 192.0.2.7)"),
    ([x509.DNSName("*.example.test")], "wildcard names (*.example.test), which need DNS-01"),
    ([x509.IPAddress(ipaddress.ip_address("192.0.2.7"))], "more than DNS names"),
])
async def test_names_http_01_cannot_authorise(world: World, sans: list[x509.GeneralName], why: str) -> None:
    cert = make_cert([NAME], sans=sans)
    world.peer("p1", csr_key="k1")
    await world.slot("p1", [NAME], csr_key="k1")
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble")
    message = caught.value.message
    assert "every way was refused" in message
    assert why in message and message.count(why) == 2  # ways 3 and 4, refused locally
    assert world.calls == [] and await world.orders() == []


@pytest.mark.parametrize(("addresses", "why"), [
    ([], "www.example.test: no A/AAAA record"),
    (["192.0.2.99"], "www.example.test: resolves to 192.0.2.99 (IPv4, A), which is not a registered peer"),
])
async def test_names_dns_does_not_point_at_the_cluster(world: World, addresses: list[str], why: str) -> None:
    cert = make_cert([NAME])
    world.peer("p1", csr_key="k1")
    await world.slot("p1", [NAME], csr_key="k1")
    world.dns[NAME] = addresses
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble")
    message = caught.value.message
    assert "every way was refused" in message
    assert (f"fresh authorizations: DNS does not point every name at the cluster, nothing was asked of the CA ({why})"
            in message)
    assert "a new order for the same names: DNS does not point every name at the cluster" in message
    assert "--force skips" not in message
    assert await world.orders() == [] and [c[0] for c in world.calls] == ["authorize"]
    assert (await world.read_slot("p1"))["pending"] is None


async def test_a_dead_peer_outside_dns_is_not_required(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1")
    world.peer("p2", alive=False)
    world.dns[NAME] = [world.peers["p1"].addresses[0]]
    done = await world.revoke(cert, provider="pebble", force=True)
    assert done.authorization.startswith("fresh authorizations")
    authz = [o for o in await world.orders() if o.get("authorize_only")]
    assert authz[0]["dns"] == {NAME: ["p1"]}


async def test_a_peer_that_cannot_sign_hands_over(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", held=(key_sha(cert),))
    world.sign_error = errors.FailedPrecondition("the key of this certificate was deleted")
    done = await world.revoke(cert, provider="pebble")
    assert done.authorization.startswith("fresh authorizations for www.example.test")
    assert "peer p1 could not sign the request: the key of this certificate was deleted" in done.refused[1]


async def test_a_deleted_key_is_named(world: World) -> None:
    cert = make_cert([NAME])
    tombstone = agent_pb2.RetiredKey(slot=common_pb2.Slot(), public_key_sha256=key_sha(cert),
                                     retired_at="2026-01-01T00:00:00Z", deleted_at="2026-02-01T00:00:00Z")
    world.peer("p1", retired=(tombstone,))
    world.answers["account"] = [unauthorized("no")]
    with pytest.raises(errors.FailedPrecondition) as caught:
        await world.revoke(cert, provider="pebble")
    assert ("the certificate's own key: the key was deleted on peer p1 on 2026-02-01T00:00:00Z after the key "
            "retention") in caught.value.message


async def test_records_of_another_provider_skip_the_issuing_account(world: World) -> None:
    cert = make_cert([NAME])
    await put(world.store, KEYS.cert("p1", "server"),
              {"peer_id": "p1", "domain": "", "previous": {"chain_pem": pem(cert), "provider": "other"}})
    world.peer("p1", held=(key_sha(cert),))
    done = await world.revoke(cert, provider="pebble")
    assert done.refused == ("the issuing account: the cluster's records say provider other issued it, not pebble",)
    assert world.calls == [("key", "pebble", "p1")]


async def test_a_chain_in_any_order(world: World) -> None:
    root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = make_cert(["r"], root_key, issuer="Root", subject="Root", issuer_key=root_key, ca=True, sans=[])
    inter = make_cert(["i"], inter_key, issuer="Root", subject="Inter", issuer_key=root_key, ca=True, sans=[])
    leaf = make_cert([NAME], issuer="Inter", issuer_key=inter_key)
    world.peer("p1", held=(key_sha(leaf),))
    done = await world.revoke((pem(root) + pem(inter) + pem(leaf)).encode(), provider="pebble")
    assert done.serial_hex == serial(leaf) and "own key" in done.authorization


# --- the caller goes away ----------------------------------------------------------------------
async def test_a_cancelled_caller_does_not_stop_the_revocation(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1")
    await world.slot("p1", [NAME], pending={"chain_pem": pem(cert), "provider": "pebble", "serial_hex": serial(cert)})
    world.gate = threading.Event()
    caller = asyncio.create_task(world.revoke(cert))
    while not world.calls:  # the request is at the CA
        await asyncio.sleep(0.01)
    caller.cancel()  # the RPC's deadline passed
    with pytest.raises(asyncio.CancelledError):
        await caller
    world.gate.set()
    await world.revocation.wait_idle()
    events = await world.events("p1")
    assert [(e["what"], e["result"]) for e in events] == [("revoke", "requested"), ("discard", "ok"), ("revoke", "ok")]
    assert (await world.read_slot("p1"))["pending"] is None


async def test_a_revocation_stopped_by_shutdown_is_recorded(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1")
    await world.slot("p1", [NAME], previous={"chain_pem": pem(cert), "provider": "pebble"})
    world.gate = threading.Event()
    caller = asyncio.create_task(world.revoke(cert))
    while not world.calls:
        await asyncio.sleep(0.01)
    for task in list(world.revocation._running):
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    world.gate.set()
    events = await world.events("p1")
    assert [e["result"] for e in events] == ["requested", "failed"]
    assert "interrupted (the coordinator stopped)" in events[1]["detail"]


# --- fleet scale ----------------------------------------------------------------------------------
async def test_many_slots_and_peers_paged_and_bounded() -> None:
    world = World(page_keys=7)
    cert = make_cert([NAME])
    for i in range(120):
        world.peer(f"p{i:03d}", csr_key=f"k{i}")
        other = make_cert([f"n{i}.example.test"], issuer="Some CA")
        await world.slot(f"p{i:03d}", [f"n{i}.example.test"], csr_key=f"k{i}",
                         previous={"chain_pem": pem(other), "provider": "pebble", "serial_hex": serial(other)})
    await world.slot("p077", [NAME], csr_key="k77",
                     previous={"chain_pem": pem(cert), "provider": "other", "serial_hex": serial(cert)})
    done = await world.revoke(cert)
    assert done.provider == "other" and done.authorization == "the issuing account (provider other)"
    assert [e["result"] for e in await world.events("p077")] == ["requested", "ok"]
    assert 1 < world.most_in_flight <= revocation.STATUS_CONCURRENCY


async def test_unattached_copies_outlive_a_peers_history_bound(world: World,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "MAX_EVENTS", 2)
    monkeypatch.setattr(revocation, "UNATTACHED_MAX_EVENTS", 5)
    world.peer("p1")
    for _ in range(4):
        cert = make_cert([NAME])
        world.statuses["p1"] = agent_pb2.AgentStatusResponse(
            peer_id="p1", keys=[agent_pb2.SlotKey(slot=common_pb2.Slot(), held_keys=[key_sha(cert)])])
        await world.revoke(cert, provider="pebble")
    assert len(await world.events(UNATTACHED)) == 5


# --- acmectl ------------------------------------------------------------------------------------
async def test_ctl_prints_the_refused_ways(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    deadlines = []

    class FakeCtl(ctl_base.Ctl):
        async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
            deadlines.append(timeout)
            return pb.RevokeResponse(serial_hex="ab", provider="pebble", authorization="a new order for the same names",
                                     ca_answer="200 OK: revoked", reason="superseded",
                                     refused=["the issuing account: no", "fresh authorizations: no"])

    path = tmp_path / "c.pem"
    path.write_text("x")
    fake = FakeCtl(argparse.Namespace(json=False, timeout=5, coordinator="c:1"))
    await ctl_trust.cmd_revoke(fake, argparse.Namespace(certfile=str(path), provider="pebble", reason="superseded",
                                                  force=False))
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["certificate ab revoked at provider pebble (reason superseded)",
                     "  refused: the issuing account: no", "  refused: fresh authorizations: no",
                     "  authorised by: a new order for the same names", "  the CA answered: 200 OK: revoked"]
    assert deadlines == [900.0]  # two orders' worth, whatever the short global --timeout


async def test_ctl_says_the_revocation_goes_on_after_its_deadline(tmp_path: Any) -> None:
    class FakeCtl(ctl_base.Ctl):
        async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
            raise errors.DeadlineExceeded("coordinator c:1: did not answer in time")

    path = tmp_path / "c.pem"
    path.write_text("x")
    fake = FakeCtl(argparse.Namespace(json=False, timeout=1200, coordinator="c:1"))
    with pytest.raises(errors.DeadlineExceeded, match="the revocation goes on at the coordinator"):
        await ctl_trust.cmd_revoke(fake, argparse.Namespace(certfile=str(path), provider="", reason="superseded",
                                                      force=False))
