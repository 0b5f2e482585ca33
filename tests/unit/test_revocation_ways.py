"""The revocation's ways and their order (issue 9, item 3), with every party faked but etcd (in memory).

Each test sets what the cluster knows, what the peers hold and what the CA
answers each way, then checks the way used, the ways refused (with their
reasons), where the chain stops, and what the history kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme import certinfo, errors
from clusteracme.v1 import agent_pb2, common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from coordinator import ctl, records
from coordinator.errors import CAError
from coordinator.history import History
from coordinator.orders import OrderRecord, Phase
from coordinator.peers import PeerInfo
from coordinator.revocation import UNATTACHED, Revocation
from coordinator.store.keys import Keys
from coordinator.store.memory import MemoryStore

NAME = "www.example.test"
KEYS = Keys("/t/")


def make_cert(names: list[str], key: ec.EllipticCurvePrivateKey | None = None,
              issuer: str = "Some CA") -> x509.Certificate:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()))


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_sha(cert: x509.Certificate) -> str:
    return certinfo.spki_sha256(cert.public_key())


async def put(store: MemoryStore, key: str, value: dict[str, Any]) -> None:
    await store.put_if(key, records.encode(value), expect_mod_revision=None)


def unauthorized(what: str) -> CAError:
    return CAError(f"revoking the certificate: the CA answered {what} (unauthorized)", problem="unauthorized")


class FakeClient:
    def __init__(self, world: World, provider: str) -> None:
        self.world, self.provider = world, provider

    def revoke(self, der: bytes, reason: int) -> str:
        self.world.calls.append(("account", self.provider, reason))
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

    async def client(self, name: str) -> FakeClient:
        return FakeClient(self.world, name)


class FakeRegistry:
    def __init__(self, world: World) -> None:
        self.world = world

    async def list(self) -> list[PeerInfo]:
        return [self.world.peers[p] for p in sorted(self.world.peers)]

    async def get(self, peer_id: str) -> PeerInfo:
        return self.world.peers[peer_id]


class FakeStub:
    def __init__(self, world: World, peer_id: str) -> None:
        self.world, self.peer_id = world, peer_id

    async def Status(self, request: Any, **kw: Any) -> Any:  # noqa: N802 (gRPC stub)
        status = self.world.statuses.get(self.peer_id)
        if status is None:
            raise errors.Unavailable(f"peer {self.peer_id} does not answer")
        return status

    async def SignRevocation(self, request: Any, **kw: Any) -> Any:  # noqa: N802 (gRPC stub)
        if self.world.sign_error is not None:
            raise self.world.sign_error
        return agent_pb2.SignRevocationResponse(jws_json=json.dumps({"peer": self.peer_id}))


class FakePool:
    def __init__(self, world: World) -> None:
        self.world = world

    async def call(self, peer: PeerInfo, what: str, fn: Callable[..., Any], timeout: float | None = None) -> Any:
        return await fn(FakeStub(self.world, peer.peer_id), {})

    async def fan_out(self, peers: list[PeerInfo], what: str, fn: Callable[..., Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for peer in peers:
            try:
                out[peer.peer_id] = await fn(FakeStub(self.world, peer.peer_id), {})
            except errors.ClusterAcmeError as exc:
                out[peer.peer_id] = exc
        return out


class FakeIssuance:
    """Authorization-only orders and signs end as the test says; a sign
    stores a pending certificate on the slot, as the real driver does."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.orders: dict[str, OrderRecord] = {}

    async def start_authorization(self, names: tuple[str, ...], provider: str, who: str) -> OrderRecord:
        self.world.calls.append(("authorize", provider, names))
        rec = OrderRecord(order_id=f"authz{len(self.orders)}", peer_id="", domain="", provider=provider, names=names,
                          csr_pem="", authorize_only=True, phase=self.world.authz_phase, cleaned=True,
                          error="" if self.world.authz_phase is Phase.DONE else "the CA did not validate")
        self.orders[rec.order_id] = rec
        return rec

    async def start_sign(self, peer_id: str, domain: str, provider: str, force: bool, who: str = "") -> OrderRecord:
        self.world.calls.append(("sign", provider, (peer_id, domain)))
        if self.world.sign_refusal is not None:
            raise self.world.sign_refusal
        key = KEYS.cert(peer_id, f"domain/{domain}" if domain else "server")
        slot, _ = await records.read(self.world.store, key)
        assert slot is not None
        fresh = make_cert(slot["csr"]["names"])
        self.world.fresh_serial = format(fresh.serial_number, "x")
        rec = OrderRecord(order_id=f"sign{len(self.orders)}", peer_id=peer_id, domain=domain, provider=provider,
                          names=tuple(slot["csr"]["names"]), csr_pem="", phase=Phase.DONE, cleaned=True,
                          chain_pem=pem(fresh))
        self.orders[rec.order_id] = rec
        await put(self.world.store, key, {**slot, "pending": {"serial_hex": self.world.fresh_serial,
                                                              "chain_pem": pem(fresh)}})
        return rec

    async def wait(self, order_id: str) -> OrderRecord:
        return self.orders[order_id]


class World:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.providers = {"pebble", "other"}
        self.peers: dict[str, PeerInfo] = {}
        self.statuses: dict[str, agent_pb2.AgentStatusResponse] = {}
        self.answers: dict[str, list[str | Exception]] = {"account": [], "key": []}
        self.calls: list[tuple[Any, ...]] = []
        self.sign_error: Exception | None = None
        self.sign_refusal: Exception | None = None
        self.authz_phase = Phase.DONE
        self.fresh_serial = ""
        self.revocation = Revocation(self.store, KEYS, FakeRegistry(self), FakeAccounts(self),  # type: ignore[arg-type]
                                     FakeIssuance(self), FakePool(self), History(self.store, KEYS))  # type: ignore[arg-type]

    def answer(self, way: str) -> str:
        queue = self.answers[way]
        result = queue.pop(0) if queue else "200 OK: revoked"
        if isinstance(result, Exception):
            raise result
        return result

    def peer(self, peer_id: str, *, alive: bool = True, enabled: bool = True, held: tuple[str, ...] = (),
             csr_key: str = "", active: str = "", retired: tuple[agent_pb2.RetiredKey, ...] = ()) -> None:
        self.peers[peer_id] = PeerInfo(peer_id, ("127.0.0.1",), "127.0.0.1:1", "127.0.0.1:80", "closed", "1",
                                       enabled, "2026-01-01", alive)
        if alive:
            self.statuses[peer_id] = agent_pb2.AgentStatusResponse(
                peer_id=peer_id,
                keys=[agent_pb2.SlotKey(slot=common_pb2.Slot(), public_key_sha256=csr_key,
                                        held_keys=[k for k in (*held, csr_key) if k])],
                certificates=[common_pb2.SlotCertificates(slot=common_pb2.Slot(), active_serial_hex=active)],
                retired_keys=list(retired))

    async def slot(self, peer_id: str, names: list[str], *, csr_key: str = "", **extra: Any) -> None:
        csr = {"names": names, "public_key_sha256": csr_key or f"csrkey-{peer_id}", "pem": ""}
        await put(self.store, KEYS.cert(peer_id, "server"),
                  {"peer_id": peer_id, "domain": "", "csr": csr, "pending": None, "current_order": None, **extra})

    async def events(self, peer_id: str) -> list[dict[str, Any]]:
        return [records.decode(e.value) for e in await self.store.range(KEYS.events(peer_id))]

    async def revoke(self, cert: x509.Certificate, provider: str = "", force: bool = False) -> Any:
        return await self.revocation.revoke(pem(cert).encode(), provider, "keyCompromise", force, "operator:t")


@pytest.fixture
def world() -> World:
    return World()


async def test_the_issuing_account_first(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1")
    # Not active: the certificate is the slot's previous one.
    await world.slot("p1", [NAME], previous={"chain_pem": pem(cert), "provider": "pebble"})
    done = await world.revoke(cert)
    assert done.provider == "pebble" and done.authorization == "the issuing account (provider pebble)"
    assert done.refused == () and world.calls == [("account", "pebble", 1)]
    events = await world.events("p1")
    assert [(e["result"], bool(e["certificate_pem"])) for e in events] == [("requested", True), ("ok", False)]


async def test_unknown_certificate_without_provider_is_refused_before_any_request(world: World) -> None:
    with pytest.raises(errors.FailedPrecondition, match="use --provider to revoke a certificate from another CA"):
        await world.revoke(make_cert([NAME]))
    assert world.calls == [] and await world.events(UNATTACHED) == []


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


async def test_served_from_a_peers_disk_needs_force(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", held=(key_sha(cert),), active=format(cert.serial_number, "x"))
    with pytest.raises(errors.FailedPrecondition, match="active on p1, on its disk; deploy a replacement first"):
        await world.revoke(cert, provider="pebble")
    assert world.calls == []
    done = await world.revoke(cert, provider="pebble", force=True)
    assert "own key, signed on peer p1" in done.authorization


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
    assert done.authorization.startswith("a new order for the same names (provider pebble, order sign")
    assert (f"a new certificate {world.fresh_serial} for the same names is pending on peer p3; discard or deploy it"
            in done.authorization)
    slot, _ = await records.read(world.store, KEYS.cert("p3", "server"))
    assert slot is not None and slot["pending"]["serial_hex"] == world.fresh_serial  # kept, not deployed
    events = await world.events("p1")
    assert [e["result"] for e in events] == ["requested", "ok"]


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
    assert message.startswith(f"certificate {cert.serial_number:x} was not revoked: every way was refused")
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


async def test_already_revoked_stops_at_once(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", held=(key_sha(cert),))
    world.answers["key"] = [CAError("the CA answered Certificate has already been revoked.", problem="alreadyRevoked")]
    with pytest.raises(errors.FailedPrecondition, match="is already revoked"):
        await world.revoke(cert, provider="pebble")
    assert [c[0] for c in world.calls] == ["key"]


async def test_a_certificate_the_ca_does_not_know_stops_after_fresh_authorizations(world: World) -> None:
    cert = make_cert([NAME])
    world.answers["account"] = [CAError("revoking the certificate: the CA answered Unable to find specified "
                                        "certificate. (malformed)", problem="malformed")]
    with pytest.raises(CAError) as caught:
        await world.revoke(cert, provider="pebble")
    message = caught.value.message
    assert "by fresh authorizations, revoking the certificate: the CA answered Unable to find" in message
    assert "refused before: the issuing account" in message and "the certificate's own key" in message
    assert [c[0] for c in world.calls] == ["authorize", "account"]  # no new order


async def test_failed_authorizations_stop_the_chain(world: World) -> None:
    world.authz_phase = Phase.FAILED
    with pytest.raises(errors.FailedPrecondition, match="could not authorise www.example.test"):
        await world.revoke(make_cert([NAME]), provider="pebble")
    assert [c[0] for c in world.calls] == ["authorize"]


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


async def test_a_peer_that_cannot_sign_hands_over(world: World) -> None:
    cert = make_cert([NAME])
    world.peer("p1", held=(key_sha(cert),))
    world.sign_error = errors.FailedPrecondition("the key of this certificate was deleted")
    done = await world.revoke(cert, provider="pebble")
    assert done.authorization.startswith("fresh authorizations for www.example.test")
    assert "peer p1 could not sign the request: the key of this certificate was deleted" in done.refused[1]


async def test_records_of_another_provider_skip_the_issuing_account(world: World) -> None:
    cert = make_cert([NAME])
    await put(world.store, KEYS.cert("p1", "server"),
              {"peer_id": "p1", "domain": "", "previous": {"chain_pem": pem(cert), "provider": "other"}})
    world.peer("p1", held=(key_sha(cert),))
    done = await world.revoke(cert, provider="pebble")
    assert done.refused == ("the issuing account: the cluster's records say provider other issued it, not pebble",)
    assert world.calls == [("key", "pebble", "p1")]


async def test_ctl_prints_the_refused_ways(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    class FakeCtl(ctl.Ctl):
        async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
            return pb.RevokeResponse(serial_hex="ab", provider="pebble", authorization="a new order for the same names",
                                     ca_answer="200 OK: revoked", reason="superseded",
                                     refused=["the issuing account: no", "fresh authorizations: no"])

    path = tmp_path / "c.pem"
    path.write_text("x")
    fake = FakeCtl(argparse.Namespace(json=False, timeout=5, coordinator="c:1"))
    await ctl.cmd_revoke(fake, argparse.Namespace(certfile=str(path), provider="pebble", reason="superseded",
                                                  force=False))
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["certificate ab revoked at provider pebble (reason superseded)",
                     "  refused: the issuing account: no", "  refused: fresh authorizations: no",
                     "  authorised by: a new order for the same names", "  the CA answered: 200 OK: revoked"]
