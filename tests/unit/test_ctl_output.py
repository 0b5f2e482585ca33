"""acmectl's human output for every shape of answer (the integration tests use --json)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from clusteracme.ctl import base as ctl_base
from clusteracme.ctl import deploys as ctl_deploys
from clusteracme.ctl import status as ctl_status
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb


class FakeCtl(ctl_base.Ctl):
    def __init__(self, answers: dict[str, Any]) -> None:
        super().__init__(argparse.Namespace(json=False, timeout=5, coordinator="c:1"))
        self.answers = answers

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return self.answers[method]


PEER = pb.Peer(peer_id="p1", alive=True, enabled=True, addresses=["127.0.0.2"])
SLOT = pb.SlotStatus(slot=common_pb2.Slot(), csr_names="a.example", active_serial="ab", active_not_after="2030",
                     last_deploy_status="failed", last_deploy_error="reload x failed", agent_matches=False,
                     agent_state="agent holds active -, previous -")


@pytest.mark.parametrize("peers", [
    [pb.PeerStatus(peer=PEER)],                                      # a peer without any slot yet
    [pb.PeerStatus(peer=PEER, slots=[SLOT, pb.SlotStatus(slot=common_pb2.Slot(domain="b.example"))])],
])
async def test_status_table(peers: list[pb.PeerStatus], capsys: pytest.CaptureFixture[str]) -> None:
    await ctl_status.cmd_status(FakeCtl({"Status": pb.StatusResponse(peers=peers)}), argparse.Namespace(peer=""))
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == " ".join(ctl_status.STATUS_HEADER).split()
    assert "p1" in out
    if len(peers[0].slots):
        assert "reload x failed" in out and "agent holds active -" in out


async def test_events_and_deploy_output(capsys: pytest.CaptureFixture[str]) -> None:
    events = pb.ListEventsResponse(events=[pb.HistoryEvent(at="t", what="deploy", result="ok", serial_hex="ab",
                                                           who="operator:a", detail="x" * 200)])
    await ctl_status.cmd_events(FakeCtl({"ListEvents": events}), argparse.Namespace(peer="p1", limit=0))
    result = pb.DeployResult(peer_id="p1", ok=False, error="boom", active_serial_hex="ab",
                             reloads=[common_pb2.ReloadResult(target="command x", ok=False, detail="exit 3")])
    with pytest.raises(Exception, match="boom"):
        await ctl_deploys.cmd_deploy(FakeCtl({"Deploy": result}), argparse.Namespace(peer="p1", domain=""))
    out = capsys.readouterr().out
    assert "deploy" in out and "reload command x: FAILED" in out
