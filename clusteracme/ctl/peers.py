"""acmectl peer / coordinators / version: the peers and the coordinator replicas."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from clusteracme import __version__, errors
from clusteracme.ctl.base import Ctl, CtlError, _dict
from clusteracme.ctl.pki import _denied_line
from clusteracme.v1 import coordinator_pb2 as pb

PEER_HEADER = ["PEER", "LIVENESS", "ACME", "ADDRESSES", "FRONT", "MODE", "GRPC", "VERSION"]
PEER_WIDE_HEADER = [*PEER_HEADER, "TLS ENDPOINTS", "REGISTERED", "BLOCKED"]


def _peer_rows(peers: list[Any], *, wide: bool = False) -> list[list[str]]:
    return [[p.peer_id, "BLOCKED" if p.blocked else "alive" if p.alive else "DEAD",
             "enabled" if p.enabled else "disabled", ",".join(p.addresses), p.http_front, p.front_mode,
             p.grpc_endpoint, p.version,
             *([",".join(p.tls_endpoints) or "-", p.registered_at or "-", p.blocked or "-"] if wide else [])]
            for p in peers]


# --- peers ------------------------------------------------------------------------
async def cmd_peer(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.peer_cmd == "list":
        r = await ctl.call("ListPeers", pb.ListPeersRequest())
        ctl.table(r, PEER_HEADER, _peer_rows(list(r.peers)), wide_header=PEER_WIDE_HEADER,
                  wide_rows=_peer_rows(list(r.peers), wide=True), empty="no peer has registered yet")
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
COORDINATORS_WIDE_HEADER = [*COORDINATORS_HEADER, "STARTED"]


async def cmd_coordinators(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("ListCoordinators", pb.ListCoordinatorsRequest())
    rows = [[c.name + (" *" if c.name == r.answered_by else ""), c.address, c.role, c.version, c.role_since]
            for c in r.coordinators]
    ctl.table(r, COORDINATORS_HEADER, rows, wide_header=COORDINATORS_WIDE_HEADER,
              wide_rows=[[*row, c.started_at] for row, c in zip(rows, r.coordinators, strict=True)])
    if not ctl.machine and not ctl.no_headers:  # the notes go with the headers: --no-headers is for scripts
        print(f"* answered: {r.answered_by or '?'}" + (f" at {ctl.answered_last}" if ctl.answered_last else ""))
        if not r.leader:
            print("no coordinator leads right now (an election is under way): commands wait for one")


# --- version ----------------------------------------------------------------------
async def cmd_version(ctl: Ctl, a: argparse.Namespace) -> None:
    """The client's version, then each coordinator replica's (ListCoordinators).
    Like kubectl: the client's version is printed even when the coordinator
    cannot be asked; that part then ends in the usual error and exit status."""
    client = {"client_version": __version__}
    if not ctl.machine:
        print(f"Client Version: {__version__}", flush=True)
    try:
        r = await ctl.call("ListCoordinators", pb.ListCoordinatorsRequest())
    except (errors.ClusterAcmeError, CtlError) as exc:
        if ctl.machine:
            ctl.out(client, lambda: None)
        sys.stdout.flush()
        said = exc.message if isinstance(exc, errors.ClusterAcmeError) else str(exc)
        message = f"the coordinator could not be asked its version: {said}"
        raise (type(exc)(message) if isinstance(exc, errors.ClusterAcmeError) else CtlError(message)) from None

    def human() -> None:
        for c in r.coordinators:
            print(f"Server Version: {c.version or '?'} (coordinator {c.name}, {c.role}, {c.address})")

    ctl.out({**client, **_dict(r)}, human)
