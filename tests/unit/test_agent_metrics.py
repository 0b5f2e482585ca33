"""The agent's metrics (issue 14): the front and the challenge server count
the requests they answer over real loopback sockets, the deployer counts
reloads and keeps the served certificate's expiry per endpoint and SNI name
(series of a slot gone removed), and every number is read back from the
agent's own /metrics listener in the Prometheus text format.

The counters live in one registry per process, so each test compares a
scrape before with one after.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
import pytest
from clusteracme.peer_agent import metrics
from clusteracme.peer_agent.certs import CertStore
from clusteracme.peer_agent.challenges import ChallengeService
from clusteracme.peer_agent.deployer import Deployer
from clusteracme.peer_agent.errors import FrontError
from clusteracme.peer_agent.front import Front, FrontMode
from clusteracme.peer_agent.keys import KeyStore, slot_dirname
from clusteracme.peer_agent.listening import METRICS_MAX_CONNECTIONS, RESERVED_FILES, open_files_needed
from clusteracme.peer_agent.metrics import MetricsServer
from clusteracme.peer_agent.reload import CommandHook, SignalHook
from clusteracme.peer_agent.settings import AgentSettings, ChallengeSettings, FrontSettings
from clusteracme.peer_agent.tls_endpoint import TLSEndpoint
from prometheus_client.parser import text_string_to_metric_families

from clusteracme import __version__
from clusteracme.errors import InvalidArgument
from tests.unit.test_cert_store import CertFactory, issue
from tests.unit.test_challenge_front import HOST, KEY_AUTH, PATH, TOKEN, free_port, request, wait_for

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["peer1.example.com"]
SHOP = "shop.example"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Scrape = Callable[[], Awaitable[Samples]]
MakeService = Callable[..., Awaitable[tuple[ChallengeService, int]]]


@pytest.fixture
async def scrape() -> AsyncIterator[Scrape]:
    """The agent's real metrics listener; ``scrape()`` reads it over HTTP."""
    server = MetricsServer(f"{HOST}:{free_port()}")
    port = await server.start()

    async def read() -> Samples:
        async with aiohttp.ClientSession() as session, session.get(f"http://{HOST}:{port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    yield read
    await server.stop()


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def front_deltas(before: Samples, after: Samples) -> dict[str, float]:
    """outcome -> how much it moved (the ones that did)."""
    out = {}
    for outcome in metrics.FrontOutcome:
        name = "clusteracme_agent_front_requests_total"
        moved = (value(after, name, outcome=outcome.value) or 0) - (value(before, name, outcome=outcome.value) or 0)
        if moved:
            out[outcome.value] = moved
    return out


def tokens(samples: Samples) -> float:
    return value(samples, "clusteracme_agent_tokens_served_total") or 0


@pytest.fixture
async def service() -> AsyncIterator[MakeService]:
    made: list[ChallengeService] = []

    async def make(mode: FrontMode, **kwargs: object) -> tuple[ChallengeService, int]:
        port = free_port()
        one = ChallengeService(HOST, port, mode, **kwargs)  # type: ignore[arg-type]
        made.append(one)
        await one.start()
        return one, port

    yield make
    for one in made:
        await one.stop()


# --- the front and the challenge server ---------------------------------------------


async def test_a_closed_front_counts_each_request_once_by_outcome(scrape: Scrape, service: MakeService) -> None:
    challenges, port = await service(FrontMode.CLOSED)
    await challenges.present("o1", {TOKEN: KEY_AUTH}, 60)
    before = await scrape()
    assert (await request(port, PATH))[0] == 200
    assert (await request(port, "/.well-known/acme-challenge/unknownToken123"))[0] == 404
    assert (await request(port, "/index.html"))[0] == 404
    assert (await request(port, PATH, method="POST"))[0] == 405
    after = await scrape()
    # the front forwards to the challenge server: still one "served", not two
    assert front_deltas(before, after) == {"served": 1, "not_found": 2, "method_not_allowed": 1}
    assert tokens(after) - tokens(before) == 1


async def test_a_redirect_front_counts_redirects_bad_requests_and_served_tokens(scrape: Scrape, service: MakeService) -> None:
    challenges, port = await service(FrontMode.REDIRECT)
    before = await scrape()
    assert (await request(port, "/shop?q=1"))[0] == 301
    assert (await request(port, PATH))[0] == 301  # no open token: redirected like any path
    assert (await request(port, "/", host_header=None, http="HTTP/1.0"))[0] == 400
    await challenges.present("o1", {TOKEN: KEY_AUTH}, 60)
    assert (await request(port, PATH))[0] == 200
    assert (await request(port, PATH, method="HEAD"))[0] == 301
    after = await scrape()
    assert front_deltas(before, after) == {"redirected": 3, "bad_request": 1, "served": 1}
    assert tokens(after) - tokens(before) == 1


async def test_in_external_mode_the_challenge_server_counts_what_the_web_server_forwards(scrape: Scrape, service: MakeService) -> None:
    challenge_port = free_port()
    challenges, _ = await service(FrontMode.EXTERNAL, challenge_port=challenge_port)
    before = await scrape()
    assert (await request(challenge_port, PATH))[0] == 404
    await challenges.present("o1", {TOKEN: KEY_AUTH}, 60)
    assert (await request(challenge_port, PATH))[0] == 200
    assert (await request(challenge_port, PATH, method="PUT"))[0] == 405
    after = await scrape()
    assert front_deltas(before, after) == {"not_found": 1, "served": 1, "method_not_allowed": 1}
    assert tokens(after) - tokens(before) == 1


async def test_a_forward_the_challenge_server_does_not_take_is_counted_unavailable(scrape: Scrape) -> None:
    dead = free_port()  # nothing listens there
    front = Front(HOST, free_port(), FrontMode.CLOSED, upstream_port=lambda: dead, is_open=lambda _: True)
    port = await front.start()
    try:
        before = await scrape()
        assert (await request(port, PATH))[0] == 502
        after = await scrape()
    finally:
        await front.stop()
    assert front_deltas(before, after) == {"unavailable": 1}
    assert tokens(after) == tokens(before)


async def test_an_answer_that_fails_unexpectedly_is_counted_error(scrape: Scrape) -> None:
    """A bug in the answer path: aiohttp answers 500; the front, and the
    challenge server where it counts requests, count it as ``error``."""
    from clusteracme.peer_agent.challenge_server import ChallengeServer

    def broken(*_: object) -> int:
        raise RuntimeError("a bug")

    class BrokenStore:
        get = broken

    front = Front(HOST, free_port(), FrontMode.CLOSED, upstream_port=broken, is_open=lambda _: True)
    server = ChallengeServer(BrokenStore(), HOST, free_port(), count_requests=True)  # type: ignore[arg-type]
    front_port = await front.start()
    server_port = await server.start()
    try:
        before = await scrape()
        assert (await request(front_port, PATH))[0] == 500
        assert (await request(server_port, PATH))[0] == 500
        after = await scrape()
    finally:
        await front.stop()
        await server.stop()
    assert front_deltas(before, after) == {"error": 2}
    assert tokens(after) == tokens(before)


async def test_connections_reset_at_the_fronts_cap_are_counted_refused(scrape: Scrape) -> None:
    front = Front(HOST, free_port(), FrontMode.REDIRECT, upstream_port=lambda: None, max_connections=1)
    port = await front.start()
    before = await scrape()
    _, holder = await asyncio.open_connection(HOST, port)
    try:
        await wait_for(lambda: front.connections == 1)
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
        finally:
            writer.close()
        after = await scrape()
        while front_deltas(before, after) != {"refused": 1}:  # counted at the reset, maybe after our read
            await asyncio.sleep(0.02)
            after = await scrape()
    finally:
        holder.close()
        await front.stop()


async def test_no_label_comes_from_what_a_request_says(scrape: Scrape, service: MakeService) -> None:
    _, port = await service(FrontMode.REDIRECT)
    await request(port, "/secret-path-x1", host_header="attacker-host-x2.example")
    await request(port, "/.well-known/acme-challenge/tokenx3", host_header="attacker-host-x2.example")
    samples = await scrape()
    labels = {v for (_, pairs) in samples for _, v in pairs}
    assert not any(mark in label for label in labels for mark in ("x1", "x2", "x3"))
    outcomes = {v for (name, pairs) in samples for k, v in pairs if name.startswith("clusteracme_agent_front_")}
    assert outcomes == {o.value for o in metrics.FrontOutcome}


# --- reloads and the served certificate ---------------------------------------------


class Peer:
    """A deployer with one TLS endpoint (a fixed free port: the endpoint
    label does not move when it starts listening) over a state directory."""

    def __init__(self, state: Path, hooks: list[SignalHook | CommandHook] | None = None, port: int = 0) -> None:
        state.mkdir(exist_ok=True, mode=0o700)
        self.keys = KeyStore(state)
        self.store = CertStore(state, self.keys)
        self.endpoint = TLSEndpoint(HOST, port or free_port(), peer_id="peer-1")
        self.deployer = Deployer(self.store, [self.endpoint], hooks or [])
        self.address = self.endpoint.address

    async def deploy(self, factory: CertFactory, domain: str, names: list[str], days: int) -> float:
        """Deploy a certificate valid ``days`` more days; its not-after."""
        not_after = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)).replace(microsecond=0)
        chain, _ = issue(self.keys, factory, domain, names, not_after=not_after)
        await self.deployer.deploy(domain, chain, names)
        return not_after.timestamp()


def served(samples: Samples, endpoint: str) -> dict[str, float]:
    """sni -> not-after of one endpoint's series."""
    out = {}
    for (name, pairs), number in samples.items():
        labels = dict(pairs)
        if name == "clusteracme_agent_certificate_not_after_seconds" and labels["endpoint"] == endpoint:
            out[labels["sni"]] = number
    return out


def reloads(samples: Samples) -> Mapping[tuple[str, str], float]:
    return {(dict(pairs)["target"], dict(pairs)["result"]): number for (name, pairs), number in samples.items()
            if name == "clusteracme_agent_reloads_total"}


async def test_reloads_are_counted_per_configured_target_and_result(scrape: Scrape, tmp_path: Path) -> None:
    pid_file = tmp_path / "gone.pid"
    peer = Peer(tmp_path / "state", [CommandHook(["true"]), CommandHook(["false"]), SignalHook(pid_file)])
    await peer.deployer.start()
    try:
        targets = [f"tls {peer.address}", "command true", "command false", f"signal HUP to pid file {pid_file}"]
        started = reloads(await scrape())
        # every target's both results are there before the first deploy
        assert {(t, r) for t in targets for r in ("ok", "failed")} <= started.keys()
        factory = CertFactory()
        await peer.deploy(factory, "", NAMES, 60)
        await peer.deploy(factory, "", NAMES, 70)
        await peer.deployer.rollback("")
        after = reloads(await scrape())
    finally:
        await peer.deployer.stop()
    moved = {key: after[key] - started.get(key, 0) for key in after if after[key] != started.get(key, 0)}
    assert moved == {(f"tls {peer.address}", "ok"): 3, ("command true", "ok"): 3, ("command false", "failed"): 3,
                     (f"signal HUP to pid file {pid_file}", "failed"): 3}


async def test_the_served_expiry_per_endpoint_and_sni_follows_deploys_rollbacks_and_restarts(
        scrape: Scrape, tmp_path: Path) -> None:
    state = tmp_path / "state"
    factory = CertFactory()
    peer = Peer(state)
    await peer.deployer.start()
    try:
        assert served(await scrape(), peer.address) == {}  # nothing served: no series
        shop_60 = await peer.deploy(factory, SHOP, [SHOP], 60)
        # the only slot is a domain slot: a handshake without SNI gets it too
        assert served(await scrape(), peer.address) == {"": shop_60, SHOP: shop_60}
        server_30 = await peer.deploy(factory, "", NAMES, 30)
        assert served(await scrape(), peer.address) == {"": server_30, SHOP: shop_60}
        shop_80 = await peer.deploy(factory, SHOP, [SHOP], 80)
        assert served(await scrape(), peer.address) == {"": server_30, SHOP: shop_80}
        await peer.deployer.rollback(SHOP)
        assert served(await scrape(), peer.address) == {"": server_30, SHOP: shop_60}
    finally:
        await peer.deployer.stop()

    # The agent starts again without the domain slot (removed from disk): its series goes.
    shutil.rmtree(state / "slots" / slot_dirname(SHOP))
    again = Peer(state, port=peer.endpoint.port or 0)
    await again.deployer.start()
    try:
        assert served(await scrape(), again.address) == {"": server_30}
    finally:
        await again.deployer.stop()


# --- the listener ---------------------------------------------------------------------


async def test_the_listener_serves_the_text_format_at_metrics_only() -> None:
    listen_port = free_port()
    server = MetricsServer(f"{HOST}:{listen_port}")
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{HOST}:{listen_port}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=")
                text = await resp.text()
            async with session.get(f"http://{HOST}:{listen_port}/") as resp:
                assert resp.status == 404
            async with session.post(f"http://{HOST}:{listen_port}/metrics") as resp:
                assert resp.status == 405
        families = {f.name: f for f in text_string_to_metric_families(text)}
        [build] = families["clusteracme_agent_build_info"].samples
        assert (build.labels, build.value) == ({"version": __version__}, 1.0)
        # the contract's names (README "Agent metrics"); counters drop _total in the family name
        assert {"clusteracme_agent_tokens_served", "clusteracme_agent_front_requests", "clusteracme_agent_reloads",
                "clusteracme_agent_certificate_not_after_seconds", "clusteracme_agent_build_info"} <= families.keys()
        assert families["clusteracme_agent_tokens_served"].type == "counter"
        assert families["clusteracme_agent_certificate_not_after_seconds"].type == "gauge"
    finally:
        await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(f"http://{HOST}:{listen_port}/metrics"):
            pass


async def test_the_listener_holds_at_most_its_cap() -> None:
    server = MetricsServer(f"{HOST}:{free_port()}", max_connections=1)
    port = await server.start()
    _, holder = await asyncio.open_connection(HOST, port)
    try:
        await wait_for(lambda: server.connections == 1)
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""  # reset or closed, never answered
        except ConnectionResetError:
            pass
        finally:
            writer.close()
    finally:
        holder.close()
        await server.stop()


async def test_a_taken_address_is_a_clear_error() -> None:
    port = free_port()
    first = MetricsServer(f"{HOST}:{port}")
    await first.start()
    try:
        with pytest.raises(FrontError, match=rf"metrics listener on {HOST}:{port}"):
            await MetricsServer(f"{HOST}:{port}").start()
    finally:
        await first.stop()


# --- the setting ------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["9465", "localhost", "127.0.0.1:0", "127.0.0.1:70000", "::1:9465",
                                    "bad host:9465"])
def test_a_bad_metrics_listen_is_refused_when_the_settings_are_read(listen: str) -> None:
    with pytest.raises(InvalidArgument, match="metrics_listen"):
        AgentSettings(peer_id="p", metrics_listen=listen)


def test_the_daemon_exits_2_on_a_bad_metrics_listen_before_it_touches_anything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(f'peer_id = "p"\nstate_dir = "{state}"\nmetrics_listen = "127.0.0.1"\n')
    result = subprocess.run([sys.executable, "-m", "clusteracme.peer_agent.app", "--config", str(config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2
    assert "metrics_listen: '127.0.0.1' is not host:port" in result.stderr
    assert not state.exists()


def test_the_metrics_listener_counts_in_the_open_file_budget() -> None:
    base = AgentSettings(peer_id="p", front=FrontSettings(max_connections=10),
                         challenge=ChallengeSettings(max_connections=5))
    with_metrics = AgentSettings(peer_id="p", front=FrontSettings(max_connections=10),
                                 challenge=ChallengeSettings(max_connections=5), metrics_listen=f"{HOST}:9465")
    assert open_files_needed(with_metrics)[0] == open_files_needed(base)[0] + METRICS_MAX_CONNECTIONS
    assert "metrics 16" in open_files_needed(with_metrics)[1]
    assert open_files_needed(base)[0] > RESERVED_FILES
