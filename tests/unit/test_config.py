"""Configuration: the shipped examples parse; mistakes are refused by name."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from clusteracme.coordinator.settings import CoordinatorSettings
from clusteracme.peer_agent.settings import AgentSettings

from clusteracme.config import apply_overrides, build, load_toml
from clusteracme.daemon import load_settings
from clusteracme.errors import InvalidArgument

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "config"


def test_shipped_examples_parse() -> None:
    coord = build(CoordinatorSettings, load_toml(DEPLOY / "coordinator.toml"))
    assert coord.etcd.endpoints[0] == "10.0.0.21:2379" and coord.tls.key.name.endswith(".key")
    agent = build(AgentSettings, load_toml(DEPLOY / "agent.toml"))
    assert agent.front.mode == "closed" and agent.addresses == ("203.0.113.31", "2001:db8::31")
    assert agent.endpoints[0].advertise == "10.0.0.31:443" and agent.hooks[1].signal == "USR2"
    assert [h.kind for h in agent.hooks] == ["command", "signal"]


def test_unknown_keys_and_wrong_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"unknown setting\(s\) in \[front\]: prot"):
        build(AgentSettings, {"front": {"prot": 80}})
    with pytest.raises(InvalidArgument, match="front.port must be int"):
        build(AgentSettings, {"front": {"port": "80"}})
    with pytest.raises(InvalidArgument, match="must be a list"):
        build(AgentSettings, {"addresses": "1.2.3.4"})
    bad = tmp_path / "bad.toml"
    bad.write_text("peer_id = \n")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        load_toml(bad)


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('peer_id = "a"\n[front]\nport = 80\n')
    args = argparse.Namespace(config=path, set=["front.port=8080", "front.mode=redirect", "peer_id=b"])
    settings = load_settings(AgentSettings, args)
    assert (settings.peer_id, settings.front.port, settings.front.mode) == ("b", 8080, "redirect")
    with pytest.raises(InvalidArgument, match="expected section.key=value"):
        apply_overrides({}, ["front.port"])
