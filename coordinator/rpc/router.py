"""Every replica answers: the one servicer the gRPC server holds routes each call.

A replica listens from the moment it starts. Until it leads, it is a
standby: the reads (``failover.READ_METHODS``: peer list, status, order list and
pending show, events, schedule show, ...) and the agents' registration and
heartbeat are served here from etcd, by a ``CoordinatorServicer`` built on
the unfenced store (the writes those make are compare-and-swap and
idempotent: a peer's record and liveness lease, a period's drawn sign
times). Every command is answered with ``UNAVAILABLE`` and, in the trailing
metadata, where the leader is; the client sends it there. The redirect is
decided before the command does anything, so it is always safe to retry.

Once the election is won and the previous leader's orders are resumed,
``promote`` hands every call to the leader's servicer (fenced store). Losing
leadership ends the process. A term ended on purpose (after a restore:
``coordinator.term``) ``demote``s the router back to a standby's. During a
restore the leader ``hold``s every other command (``UNAVAILABLE`` with the
standby mark: nothing was done, clients try again); a leader whose term
found a cut restore ``block``s every command but a restore
(``FAILED_PRECONDITION``). Reads are served throughout.

A client-streaming command (Restore) is routed like any other, on the
stream's arrival: a redirect or refusal never reads a message of it.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc.aio
from clusteracme.coordinator.replicas import Replicas
from clusteracme.coordinator.rpc.servicer import CoordinatorServicer

from clusteracme import errors
from clusteracme.failover import LEADER_ADDRESS_KEY, LEADER_NAME_KEY, NO_LEADER_MARK, READ_METHODS, STANDBY_KEY
from clusteracme.pki import Role
from clusteracme.rpcutil import caller, rpc_method, status_code_for
from clusteracme.v1 import coordinator_pb2, coordinator_pb2_grpc
from clusteracme.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)
SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"]
OWN_METHODS = frozenset({"ListCoordinators"})
"""Answered by the router itself, on every replica."""


class ReplicaRouter(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """Routes each call: to the leader's servicer once this replica leads;
    before that, reads to the standby's servicer and commands to a redirect."""

    def __init__(self, replicas: Replicas, standby: CoordinatorServicer) -> None:
        self._replicas = replicas
        self._standby = standby
        # The process's one deny list: refused here too (ListCoordinators, redirects).
        self.deny_list = standby.deny_list
        self._leader: CoordinatorServicer | None = None
        self._won = False
        self._held: str | None = None      # a restore under way: other commands wait
        self._blocked: str | None = None   # a cut restore: commands refused, but a restore

    @property
    def leading(self) -> bool:
        return self._leader is not None

    @property
    def reads(self) -> CoordinatorServicer:
        """The servicer reads go to now (the web status page reads through it)."""
        return self._leader if self._leader is not None else self._standby

    def taking_over(self) -> None:
        """The election is won; the previous leader's orders are being resumed."""
        self._won = True

    def promote(self, leader: CoordinatorServicer) -> None:
        self._leader = leader

    def demote(self) -> None:
        """The term ended on purpose (``coordinator.term``): a standby again, campaigning."""
        self._leader, self._won, self._held, self._blocked = None, False, None, None

    def hold(self, detail: str) -> None:
        """Until ``demote``: every command but those in flight waits (UNAVAILABLE, retried by clients)."""
        self._held = detail

    def block(self, detail: str) -> None:
        """Until ``demote``: every command but Restore is refused with ``detail``."""
        self._blocked = detail

    async def _dispatch(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self._leader is not None:
            if method not in READ_METHODS and (self._held is not None
                                               or (self._blocked is not None and method != "Restore")):
                await self._refuse(method, context)
                return None
            return await getattr(self._leader, method)(request, context)
        if method in READ_METHODS:
            return await getattr(self._standby, method)(request, context)
        await self._redirect(method, context)
        return None

    async def _operator(self, method: str, context: grpc.aio.ServicerContext) -> bool:
        """True when the caller is an operator; otherwise the call is aborted
        (PermissionDenied, or why its certificate is not taken) and False."""
        try:
            who = caller(context, self.deny_list)
            if who.role is not Role.OPERATOR:
                raise errors.PermissionDenied(f"{who.common_name} may not call {method}")
        except errors.ClusterAcmeError as exc:
            await context.abort(status_code_for(exc), exc.message)
            return False
        return True

    async def _refuse(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """A command this leader does not take now (``hold``, ``block``), refused before it does anything."""
        me = self._replicas.name
        if not await self._operator(method, context):
            return
        if self._held is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"coordinator {me} leads, and {self._held}: "
                                f"{NO_LEADER_MARK} for other commands; try again in a few seconds",
                                ((STANDBY_KEY, me),))
            return
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"coordinator {me} takes no command: "
                            f"{self._blocked}")

    async def _redirect(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """UNAVAILABLE, with the leader's address when there is one to go to."""
        me = self._replicas.name
        metadata: list[tuple[str, str]] = [(STANDBY_KEY, me)]
        if not await self._operator(method, context):
            return
        try:
            leader = await self._replicas.leader()
        except errors.ClusterAcmeError as exc:  # etcd unreachable from here: nothing was done, try elsewhere
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"coordinator {me} is a standby and cannot read who leads ({exc.message}): "
                                f"{NO_LEADER_MARK} for it; try again in a few seconds", tuple(metadata))
            return
        if leader.name == me and not self._won:
            detail = (f"coordinator {me} is a standby; the leader key still names its previous run (killed), "
                      f"which expires within the election TTL: {NO_LEADER_MARK}, try again in a few seconds")
        elif leader.name is None:
            detail = f"coordinator {me} is a standby and {NO_LEADER_MARK} (election under way); try again in a few seconds"
        elif leader.name == me:
            detail = (f"coordinator {me} has just won the election and is taking over (resuming the previous "
                      f"leader's orders); {NO_LEADER_MARK}: try again in a few seconds")
        elif not leader.address:
            detail = (f"coordinator {me} is a standby; the leader {leader.name} has not published its address "
                      f"yet: {NO_LEADER_MARK} for this client, try again in a few seconds")
        else:
            detail = f"coordinator {me} is a standby; commands go to the leader {leader.name} at {leader.address}"
            metadata += [(LEADER_ADDRESS_KEY, leader.address), (LEADER_NAME_KEY, leader.name)]
        await context.abort(grpc.StatusCode.UNAVAILABLE, detail, tuple(metadata))

    @rpc_method(Role.OPERATOR)
    async def ListCoordinators(self, request: pb.ListCoordinatorsRequest, context: grpc.aio.ServicerContext,
                               who: Any) -> Any:
        members, leader = await self._replicas.members()
        return pb.ListCoordinatorsResponse(
            coordinators=[pb.CoordinatorInfo(name=m.name, address=m.address, role=m.role, version=m.version,
                                             started_at=m.started_at, role_since=m.role_since) for m in members],
            leader=leader or "", answered_by=self._replicas.name)


def _route(method: str) -> Any:
    async def route(self: ReplicaRouter, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._dispatch(method, request, context)

    route.__name__ = route.__qualname__ = method
    return route


for _method in SERVICE.methods:
    if _method.name not in OWN_METHODS:
        setattr(ReplicaRouter, _method.name, _route(_method.name))
