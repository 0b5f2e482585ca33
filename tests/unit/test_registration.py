"""What an agent announces, and what the coordinator accepts as an address."""

from __future__ import annotations

import pytest
from clusteracme.peer_agent.app import registration
from clusteracme.peer_agent.settings import AgentSettings

from clusteracme import netaddr
from clusteracme.config import build
from clusteracme.errors import InvalidArgument


def settings(**data: object) -> AgentSettings:
    return build(AgentSettings, {"peer_id": "p1", **data})


def test_specific_addresses_are_announced_as_they_are() -> None:
    req = registration(settings(listen="10.0.0.5:7444", front={"host": "203.0.113.5", "port": 80}), 7444)
    assert (req.grpc_endpoint, req.http_front, list(req.addresses)) == ("10.0.0.5:7444", "203.0.113.5:80", ["203.0.113.5"])
    v6 = registration(settings(listen="[2001:db8::5]:7444", front={"host": "2001:db8::5", "port": 80}), 7444)
    assert (v6.grpc_endpoint, v6.http_front) == ("[2001:db8::5]:7444", "[2001:db8::5]:80")


@pytest.mark.parametrize(("data", "message"), [
    ({"listen": "0.0.0.0:7444", "front": {"host": "10.0.0.5"}}, "set advertise"),
    ({"listen": "10.0.0.5:7444", "front": {"host": "0.0.0.0"}}, "set front.advertise"),
    ({"listen": "10.0.0.5:7444", "front": {"host": "0.0.0.0", "advertise": "10.0.0.5:80"}}, "set addresses"),
    ({"listen": "10.0.0.5:7444", "addresses": ["example.com"], "front": {"host": "10.0.0.5"}}, "not an IP address"),
])
def test_wildcards_are_never_announced(data: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        registration(settings(**data), 7444)


def test_wildcard_binds_work_with_explicit_advertisements() -> None:
    req = registration(settings(listen="0.0.0.0:7444", advertise="10.0.0.5:7444", addresses=["203.0.113.5"],
                                front={"host": "::", "advertise": "[2001:db8::5]:80"}), 7444)
    assert (req.grpc_endpoint, req.http_front) == ("10.0.0.5:7444", "[2001:db8::5]:80")


@pytest.mark.parametrize("value", ["0.0.0.0:80", "[::]:80", "host", "h:0", "h:70000", "2001:db8::1:80", "bad_host:80",
                                   "[h]:80", "x" * 300 + ":80"])
def test_bad_endpoints_are_refused(value: str) -> None:
    with pytest.raises(InvalidArgument):
        netaddr.split_hostport(value, "endpoint")


def test_good_endpoints() -> None:
    assert netaddr.split_hostport("edge-1.internal:7444", "e") == ("edge-1.internal", 7444)
    assert netaddr.split_hostport("[2001:db8::1]:80", "e") == ("2001:db8::1", 80)
    assert netaddr.check_ip("2001:0db8::1", "a") == "2001:db8::1"
    for bad in ("0.0.0.0", "224.0.0.1", "example.com"):
        with pytest.raises(InvalidArgument):
            netaddr.check_ip(bad, "a")


def test_shipped_example_builds_a_deployer_and_announces_its_endpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from clusteracme.peer_agent.app import build_deployer, tls_endpoints
    from clusteracme.peer_agent.keys import KeyStore

    from clusteracme.config import load_toml

    example = build(AgentSettings, {**load_toml(Path(__file__).resolve().parents[2] / "deploy/config/agent.toml"),
                                    "state_dir": str(tmp_path)})
    assert tls_endpoints(example) == ["10.0.0.31:443"]
    deployer = build_deployer(example, KeyStore(tmp_path))
    assert deployer.endpoints == ["0.0.0.0:443"]
    with pytest.raises(InvalidArgument, match="hook"):
        build_deployer(build(AgentSettings, {"hooks": [{"kind": "signal"}]}), KeyStore(tmp_path))
