"""Shell completion for bash and zsh, through argcomplete.

``acmectl completion bash|zsh`` prints the script a shell sources; the shell
then runs acmectl itself with ``_ARGCOMPLETE=1`` and the line in
``COMP_LINE``, and acmectl answers from its own parser (``main`` calls
``argcomplete.autocomplete`` before parsing). Subcommands, options and enum
values come from the parser; peer ids and domains from the coordinator named
on the line (or in ACMECTL_*), asked once with a short deadline: when it
cannot be asked, nothing is offered and nothing is printed. What the
coordinator answers is offered only when it passes the argument's own check
(a peer id, a domain), so remote text never reaches the shell's line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import argcomplete

from clusteracme.ctl.validate import Domain, PeerId, PeerList

SHELLS = ("bash", "zsh")
DEADLINE = 2.0  # seconds: a completion that waits longer is worse than none
PROG = "acmectl"


def script(shell: str) -> str:
    """The completion script of ``shell`` for acmectl (argcomplete's shellcode)."""
    return argcomplete.shellcode([PROG], shell=shell)


async def cmd_completion(ctl: Any, a: argparse.Namespace) -> None:
    print(script(a.shell), end="")


def _connection(parsed: argparse.Namespace) -> argparse.Namespace:
    """The connection settings given on the line so far, else the environment's."""
    env = os.environ.get

    def given(name: str, variable: str, default: str | None = None) -> str | None:
        return getattr(parsed, name, None) or env(variable, default)

    return argparse.Namespace(coordinator=given("coordinator", "ACMECTL_COORDINATOR", "127.0.0.1:7443"),
                              ca=given("ca", "ACMECTL_CA"), cert=given("cert", "ACMECTL_CERT"),
                              key=given("key", "ACMECTL_KEY"), timeout=DEADLINE, output="json")


def ask(parsed: argparse.Namespace, method: str, request: Any) -> Any | None:
    """One read of the coordinator for a completion, within DEADLINE
    seconds; None when it cannot be asked (no settings, unreachable, refused)."""
    from clusteracme.ctl.base import Ctl  # the gRPC client: loaded only when a completion needs it

    async def call() -> Any:
        ctl = Ctl(_connection(parsed))
        try:
            return await asyncio.wait_for(ctl.client.unary(method, request, read=True, timeout=DEADLINE), DEADLINE)
        finally:
            await ctl.close()

    try:
        return asyncio.run(call())
    except Exception:  # noqa: BLE001 (a completion offers nothing rather than fail)
        return None


def _valid(check: Any, value: str) -> bool:
    try:
        check(value)
    except (argparse.ArgumentTypeError, ValueError):
        return False
    return True


def _peer_ids(parsed: argparse.Namespace) -> list[str]:
    from clusteracme.v1 import coordinator_pb2 as pb

    r = ask(parsed, "ListPeers", pb.ListPeersRequest())
    return sorted(p.peer_id for p in r.peers if _valid(PeerId(), p.peer_id)) if r is not None else []


def complete_peer(prefix: str, parsed_args: argparse.Namespace, action: Any = None, **_: Any) -> list[str]:
    """The registered peers' ids, and the words the argument takes besides (events: _unattached)."""
    extra = sorted(action.type.extra) if action is not None and isinstance(action.type, PeerId) else []
    return [p for p in [*_peer_ids(parsed_args), *extra] if p.startswith(prefix)]


def complete_peer_list(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """``--peers a,b,<TAB>``: the next peer id after those already given."""
    head, _, last = prefix.rpartition(",")
    taken = set(head.split(",")) if head else set()
    return [f"{head},{p}" if head else p for p in _peer_ids(parsed_args) if p.startswith(last) and p not in taken]


def complete_domain(prefix: str, parsed_args: argparse.Namespace, action: Any = None, **_: Any) -> list[str]:
    """The domains of the peer given on the line, else of every peer."""
    from clusteracme.v1 import coordinator_pb2 as pb

    peer = getattr(parsed_args, "peer", None)
    check = action.type if action is not None and isinstance(action.type, Domain) else Domain()
    domains: set[str] = set()
    if isinstance(peer, str) and _valid(PeerId(), peer):
        r = ask(parsed_args, "ListDomains", pb.ListDomainsRequest(peer_id=peer))
        domains = {s.slot.domain for s in r.slots} if r is not None else set()
    else:
        r = ask(parsed_args, "Status", pb.StatusRequest())
        domains = {s.slot.domain for ps in r.peers for s in ps.slots} if r is not None else set()
    words = sorted(d for d in domains if d and _valid(Domain(), d))
    if check.server:
        words.insert(0, "server")
    return [w for w in words if w.startswith(prefix)]


def attach(action: argparse.Action) -> None:
    """Give an action the completer its type calls for (peer ids, domains)."""
    kind = action.type
    if isinstance(kind, PeerList):
        action.completer = complete_peer_list  # type: ignore[attr-defined]
    elif isinstance(kind, PeerId):
        action.completer = complete_peer  # type: ignore[attr-defined]
    elif isinstance(kind, Domain):
        action.completer = complete_domain  # type: ignore[attr-defined]
