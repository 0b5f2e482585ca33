"""Agents validate a chain to deploy against the cluster's trust store (issue
12 item 5): while the bundle the coordinator delivered holds certificates, a
chain that does not validate to one of its roots is refused and nothing
changes; without a bundle, or with an empty one, nothing is checked (as
before). Over real mutual-TLS gRPC on loopback (the coordinator's calls:
SetTrustBundle, Deploy), with the real deployer and certificate store on disk,
and throwaway CAs built here."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from clusteracme.peer_agent.certs import CertStore
from clusteracme.peer_agent.challenges import ChallengeService
from clusteracme.peer_agent.deployer import Deployer
from clusteracme.peer_agent.errors import StorageError, UntrustedChain
from clusteracme.peer_agent.front import FrontMode
from clusteracme.peer_agent.keys import KeyStore
from clusteracme.peer_agent.rpc.servicer import AgentServicer
from clusteracme.peer_agent.trust import BUNDLE_FILE, check_chain
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clusteracme import certinfo, pki
from clusteracme.rpcutil import TLSFiles, channel, server
from clusteracme.v1 import agent_pb2 as pb
from clusteracme.v1 import agent_pb2_grpc, common_pb2
from tests.unit.test_cert_store import snapshot

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
PEER = pki.Identity(pki.Role.AGENT, "peer1")
NAMES = ["peer1.example.com", "www.example.com"]
DAY = datetime.timedelta(days=1)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _cert(subject: str, public_key: object, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey, *,
          ca: bool, names: list[str] = ()) -> x509.Certificate:  # type: ignore[assignment]
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
        .public_key(public_key).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
        .not_valid_before(now - DAY).not_valid_after(now + 90 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(signer, hashes.SHA256())


class CA:
    """A throwaway root and intermediate that web-PKI path validation accepts."""

    def __init__(self, label: str, *, intermediate_name: str | None = None) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _cert(f"{label} Root", self.root_key.public_key(), None, self.root_key, ca=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = _cert(intermediate_name or f"{label} Intermediate", self.key.public_key(),
                                  self.root.subject, self.root_key, ca=True)

    def chain(self, keys: KeyStore, *, with_intermediate: bool = True) -> str:
        """A new key + CSR in the server slot, signed by the intermediate."""
        csr_pem, _ = keys.generate_csr("", NAMES[0], NAMES[1:], common_pb2.KEY_TYPE_EC_P256)
        csr = certinfo.load_csr(csr_pem)
        leaf = _cert(NAMES[0], csr.public_key(), self.intermediate.subject, self.key, ca=False, names=NAMES)
        return pem(leaf) + (pem(self.intermediate) if with_intermediate else "")


@pytest.fixture(scope="module")
def ours() -> CA:
    return CA("Ours")


@pytest.fixture(scope="module")
def unrelated() -> CA:
    return CA("Unrelated")


@dataclass
class Agent:
    state: Path
    keys: KeyStore
    certs: CertStore
    stub: agent_pb2_grpc.AgentServiceStub

    async def trust(self, *certs: x509.Certificate) -> pb.SetTrustBundleResponse:
        """What the coordinator pushes when the trust store changes."""
        bundle = "".join(pem(c) for c in certs)
        return await self.stub.SetTrustBundle(pb.SetTrustBundleRequest(
            bundle_pem=bundle, sha256=hashlib.sha256(bundle.encode()).hexdigest()), timeout=10)

    async def deploy(self, chain: str) -> pb.AgentDeployResponse:
        return await self.stub.Deploy(pb.AgentDeployRequest(slot=common_pb2.Slot(domain=""), chain_pem=chain,
                                                            expected_names=NAMES), timeout=30)

    async def refused(self, chain: str) -> str:
        """Deploy ``chain``, expect FAILED_PRECONDITION and an unchanged disk; the details."""
        before = snapshot(self.state / "slots")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.deploy(chain)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
        assert snapshot(self.state / "slots") == before
        return caught.value.details() or ""

    def active(self) -> str:
        return next((s.active_serial for s in self.certs.slots() if s.domain == ""), "")


@pytest.fixture
async def agent(pki_dir: Path, tmp_path: Path) -> AsyncIterator[Agent]:
    """An agent as the daemon builds it: the deployer checks the state directory's bundle copy
    (no trust_bundle_file: the copy is kept anyway)."""
    state = tmp_path / "state"
    state.mkdir()
    keys = KeyStore(state)
    certs = CertStore(state, keys)
    deployer = Deployer(certs, [], [], trust_bundle=state / BUNDLE_FILE)
    srv, port = server(TLSFiles(pki_dir / "ca.pem", pki_dir / "agent-peer1.pem", pki_dir / "agent-peer1.key"),
                       f"{HOST}:0")
    agent_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentServicer(PEER.name, ChallengeService(HOST, 0, FrontMode.CLOSED), keys, deployer, []), srv)
    await srv.start()
    chan = channel(TLSFiles(pki_dir / "ca.pem", pki_dir / "coordinator-c1.pem", pki_dir / "coordinator-c1.key"),
                   f"{HOST}:{port}", PEER.server_name)
    try:
        yield Agent(state, keys, certs, agent_pb2_grpc.AgentServiceStub(chan))
    finally:
        await chan.close()
        await srv.stop(grace=None)


async def test_without_a_bundle_any_linked_chain_deploys(agent: Agent, ours: CA, unrelated: CA) -> None:
    assert not (agent.state / BUNDLE_FILE).exists()
    assert (await agent.deploy(unrelated.chain(agent.keys))).active_serial_hex == agent.active() != ""
    # An empty trust store (the bundle the coordinator sends then) checks nothing either.
    assert (await agent.trust()).written_to == ""  # no trust_bundle_file: nothing published ...
    assert (agent.state / BUNDLE_FILE).read_text() == ""  # ... but the agent's copy is kept
    assert (await agent.deploy(ours.chain(agent.keys))).active_serial_hex == agent.active()


async def test_a_chain_from_another_ca_is_refused(agent: Agent, ours: CA, unrelated: CA) -> None:
    first = await agent.deploy(ours.chain(agent.keys))
    await agent.trust(ours.root)
    assert x509.load_pem_x509_certificates((agent.state / BUNDLE_FILE).read_bytes()) == [ours.root]
    details = await agent.refused(unrelated.chain(agent.keys))
    assert "does not validate against this peer's trust bundle (1 CA certificate of the cluster's trust store)" \
        in details, details
    assert "issuer CN=Unrelated Intermediate" in details and "nothing was changed" in details
    assert "no path from the leaf's issuer to a root certificate of the bundle" in details
    assert agent.active() == first.active_serial_hex
    # The trusted CA's chain deploys; so does the other once its root is trusted too.
    second = (await agent.deploy(ours.chain(agent.keys))).active_serial_hex
    assert agent.active() == second != first.active_serial_hex
    await agent.trust(ours.root, unrelated.root)
    third = await agent.deploy(unrelated.chain(agent.keys))
    assert third.active_serial_hex == agent.active() != second
    # Removed from the trust store again (an empty store): no check.
    await agent.trust()
    await agent.deploy(unrelated.chain(agent.keys))


async def test_a_chain_that_links_but_to_a_lookalike_is_refused(agent: Agent, ours: CA) -> None:
    """What the link check alone accepted: every certificate is issued by the
    next, and the intermediate carries the trusted intermediate's name, but it
    was issued by a root nobody trusts."""
    impostor = CA("Impostor", intermediate_name="Ours Intermediate")
    await agent.trust(ours.root, ours.intermediate)
    details = await agent.refused(impostor.chain(agent.keys))
    assert "does not validate against this peer's trust bundle (2 CA certificates" in details, details
    assert agent.active() == ""


async def test_the_bundle_intermediates_complete_a_leaf_only_chain(agent: Agent, ours: CA) -> None:
    await agent.trust(ours.root)
    leaf_only = ours.chain(agent.keys, with_intermediate=False)
    assert "does not validate" in await agent.refused(leaf_only)
    await agent.trust(ours.root, ours.intermediate)
    assert (await agent.deploy(ours.chain(agent.keys, with_intermediate=False))).active_serial_hex == agent.active()


async def test_a_bundle_of_intermediates_only_validates_nothing(agent: Agent, ours: CA) -> None:
    await agent.trust(ours.intermediate)
    details = await agent.refused(ours.chain(agent.keys))
    assert "it holds no root certificate, only intermediates" in details and "acmectl trust add" in details


def test_a_damaged_bundle_refuses_rather_than_checks_nothing(tmp_path: Path, ours: CA) -> None:
    bundle = tmp_path / BUNDLE_FILE
    keys = KeyStore(tmp_path)
    chain = ours.chain(keys).encode()
    now = datetime.datetime.now(datetime.UTC)
    check_chain(bundle, chain, now)  # absent: nothing checked
    bundle.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(StorageError, match="cannot be read"):
        check_chain(bundle, chain, now)
    bundle.write_text(pem(ours.root))
    check_chain(bundle, chain, now)
    with pytest.raises(UntrustedChain, match="does not validate"):  # at a time outside the validity
        check_chain(bundle, chain, now + 365 * DAY)
