"""acmectl peer / coordinators: the peers and the coordinator replicas."""

from __future__ import annotations

import argparse

from clusteracme.ctl.base import Ctl, _print_table
from clusteracme.ctl.pki import _denied_line
from clusteracme.v1 import coordinator_pb2 as pb


# --- peers ------------------------------------------------------------------------
async def cmd_peer(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.peer_cmd == "list":
        r = await ctl.call("ListPeers", pb.ListPeersRequest())
        ctl.out(r, lambda: _print_table(
            [[p.peer_id, "BLOCKED" if p.blocked else "alive" if p.alive else "DEAD",
              "enabled" if p.enabled else "disabled", ",".join(p.addresses),
              p.http_front, p.front_mode, p.grpc_endpoint, p.version] for p in r.peers],
            ["PEER", "LIVENESS", "ACME", "ADDRESSES", "FRONT", "MODE", "GRPC", "VERSION"]))
    elif a.peer_cmd in ("enable", "disable"):
        p = await ctl.call("SetPeerEnabled", pb.SetPeerEnabledRequest(peer_id=a.peer, enabled=a.peer_cmd == "enable"))
        ctl.out(p, lambda: print(f"ACME {'enabled' if p.enabled else 'disabled'} on peer {p.peer_id}"))
    elif a.peer_cmd == "block":
        d = await ctl.call("BlockPeer", pb.BlockPeerRequest(peer_id=a.peer, reason=a.reason or ""))
        ctl.out(d, lambda: print(f"peer {a.peer} blocked: {_denied_line(d)}; it stays listed (dead once its "
                                 f"lease runs out); acmectl peer remove {a.peer} removes it"))
    else:
        r = await ctl.call("RemovePeer", pb.RemovePeerRequest(peer_id=a.peer, force=a.force))
        ctl.out(r, lambda: print(f"peer {a.peer} removed" + (" (its certificate denied)" if a.force else "")))


COORDINATORS_HEADER = ["NAME", "ADDRESS", "ROLE", "VERSION", "SINCE"]


async def cmd_coordinators(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("ListCoordinators", pb.ListCoordinatorsRequest())

    def human() -> None:
        _print_table([[c.name + (" *" if c.name == r.answered_by else ""), c.address, c.role, c.version,
                       c.role_since] for c in r.coordinators], COORDINATORS_HEADER)
        print(f"* answered: {r.answered_by or '?'}" + (f" at {ctl.answered_last}" if ctl.answered_last else ""))
        if not r.leader:
            print("no coordinator leads right now (an election is under way): commands wait for one")

    ctl.out(r, human)
