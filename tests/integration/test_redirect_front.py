"""Redirect mode as the appliance guide has it (issue 9 item 8): while a
challenge is open only ``GET`` of an open token on the challenge path reaches
the challenge server; every other request there (another method, an unknown
or closed token, a sub-path) is redirected to https like any other path.

Raw HTTP requests, sent to a real agent's port-80 front; the challenge is
opened through the agent's own PresentTokens RPC with the coordinator's
identity, then a real signing against pebble goes through the same front.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator

import pytest

from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.integration.conftest import agent_log, agent_stub, ctl_json, make_cluster, register_account

pytestmark = pytest.mark.integration

THUMB = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
TOKEN = "redirectModeToken-0123456789_abcdefghijkl"
KEY_AUTH = f"{TOKEN}.{THUMB}"
PATH = f"/.well-known/acme-challenge/{TOKEN}"
HOST = "www.redirect.example"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from make_cluster(tmp_path_factory, "redirect", peers=2, front_mode="redirect")


@pytest.fixture(scope="module")
def agent(cluster: LocalCluster) -> Iterator[agent_pb2_grpc.AgentServiceStub]:
    """Peer 1's AgentService as the coordinator calls it (coordinator identity)."""
    with agent_stub(cluster, 1) as stub:
        yield stub


def send(cluster: LocalCluster, method: str, target: str, host: str = f"{HOST}:80",
         peer: int = 1) -> tuple[int, dict[str, str], bytes]:
    """One raw request to a peer's front; (status, headers lower-cased, body)."""
    conn = http.client.HTTPConnection(cluster.agent(peer).address, cluster.front_port, timeout=10)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        if method in ("POST", "PUT"):
            conn.putheader("Content-Length", "0")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw(cluster: LocalCluster, data: bytes, peer: int = 1) -> bytes:
    """Bytes as they are (no client-side normalisation of the path)."""
    with socket.create_connection((cluster.agent(peer).address, cluster.front_port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def assert_redirected(response: tuple[int, dict[str, str], bytes], target: str) -> None:
    status, headers, body = response
    assert (status, headers.get("location")) == (301, f"https://{HOST}{target}"), (status, headers)
    assert KEY_AUTH.encode() not in body


def present(agent: agent_pb2_grpc.AgentServiceStub, order_id: str = "redirect-test") -> None:
    reply = agent.PresentTokens(agent_pb2.PresentTokensRequest(
        order_id=order_id, ttl_seconds=300,
        tokens=[common_pb2.ChallengeToken(token=TOKEN, key_authorization=KEY_AUTH)]), timeout=10)
    assert reply.open_tokens == 1


def test_outside_a_challenge_everything_is_redirected(cluster: LocalCluster) -> None:
    for method, target in (("GET", "/"), ("GET", PATH), ("HEAD", PATH), ("POST", "/login")):
        assert_redirected(send(cluster, method, target), target)


def test_during_a_challenge_only_get_of_the_open_token_is_served(
        cluster: LocalCluster, agent: agent_pb2_grpc.AgentServiceStub) -> None:
    present(agent)
    try:
        status, headers, body = send(cluster, "GET", PATH)
        assert (status, body) == (200, KEY_AUTH.encode())
        assert headers["content-type"].startswith("text/plain") and "location" not in headers
        # the same token with any other method: redirected like the rest (HEAD included)
        for method in ("HEAD", "POST", "PUT", "DELETE", "OPTIONS"):
            assert_redirected(send(cluster, method, PATH), PATH)
        # other tokens and other paths under the challenge prefix
        for target in ("/.well-known/acme-challenge/unknownToken123", "/.well-known/acme-challenge/",
                       PATH + "/", PATH + "/x", PATH + "x", "/.well-known/acme-challenge/" + "A" * 129,
                       "/.well-known/acme-challenge/%2e%2e/%2e%2e/etc/passwd"):
            assert_redirected(send(cluster, "GET", target), target)
        # and everything else, as always
        for target in ("/", "/index.html?a=b", "/.well-known/acme-challenge"):
            assert_redirected(send(cluster, "GET", target), target)
        # a path a client library would normalise, sent byte for byte
        answer = raw(cluster, f"GET /x/../.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: {HOST}\r\n"
                              "Connection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 301 ") and KEY_AUTH.encode() not in answer
        assert f"Location: https://{HOST}/x/../.well-known/acme-challenge/{TOKEN}".encode() in answer
        # the query string does not matter to the one exception
        status, _, body = send(cluster, "GET", PATH + "?probe=1")
        assert (status, body) == (200, KEY_AUTH.encode())
        # the second peer serves nothing it was not given
        assert_redirected(send(cluster, "GET", PATH, peer=2), PATH)
    finally:
        agent.RemoveTokens(agent_pb2.RemoveTokensRequest(order_id="redirect-test"), timeout=10)
    # closed: the token is redirected again, like any path
    assert_redirected(send(cluster, "GET", PATH), PATH)
    status = agent.Status(agent_pb2.AgentStatusRequest(), timeout=10)
    assert (status.front_mode, status.front_listening, status.open_tokens) == ("redirect", True, 0)


def test_a_token_closed_while_another_stays_open_is_redirected(
        cluster: LocalCluster, agent: agent_pb2_grpc.AgentServiceStub) -> None:
    other = "anotherOpenToken"
    present(agent, "first")
    agent.PresentTokens(agent_pb2.PresentTokensRequest(
        order_id="second", ttl_seconds=300,
        tokens=[common_pb2.ChallengeToken(token=other, key_authorization=f"{other}.{THUMB}")]), timeout=10)
    try:
        agent.RemoveTokens(agent_pb2.RemoveTokensRequest(order_id="first"), timeout=10)
        assert agent.Status(agent_pb2.AgentStatusRequest(), timeout=10).challenge_server_listening
        assert_redirected(send(cluster, "GET", PATH), PATH)
        status, _, body = send(cluster, "GET", f"/.well-known/acme-challenge/{other}")
        assert (status, body) == (200, f"{other}.{THUMB}".encode())
    finally:
        agent.RemoveTokens(agent_pb2.RemoveTokensRequest(order_id="second"), timeout=10)


def test_signing_through_redirect_fronts(cluster: LocalCluster) -> None:
    """The CA's validator and the coordinator's self-check use GET of open
    tokens: a real order is validated through the redirect fronts."""
    register_account(cluster)
    cluster.ctl("peer", "enable", "peer1")
    name = "sign.redirect.example"
    cluster.set_dns(name, [1, 2])
    cluster.ctl("csr", "create", "peer1", "--cn", name)
    order = ctl_json(cluster, "sign", "peer1", "--wait")
    assert order["succeeded"], order
    served = [line for line in agent_log(cluster, 1).splitlines()
              if "challenge " in line and "Pebble" in line and "HTTP 200" in line]
    assert served, "pebble's validation did not reach peer1's front"
    # the order is over: its tokens are redirected again
    token = served[0].split("challenge ")[1].split()[0]
    status, headers, _ = send(cluster, "GET", f"/.well-known/acme-challenge/{token}", host=f"{name}:80")
    assert status == 301 and headers["location"].startswith(f"https://{name}/.well-known/acme-challenge/")
