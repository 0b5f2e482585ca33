"""Calls to "whichever coordinator replica answers": the client side of high
availability, used by acmectl.

A cluster runs several coordinator replicas. One leads and runs every
command; the others are standbys that serve the reads in ``READ_METHODS``
themselves (from etcd) and refuse every other method (a command) with
``UNAVAILABLE`` and the leader's address in the trailing metadata
(``LEADER_ADDRESS_KEY``, ``LEADER_NAME_KEY``), before doing anything.
``ReplicaClient`` hides this: it is given the replicas' endpoints and finds
one that takes the call, under one deadline for the whole call.

The retry rule: a request is sent again only where it is known that it did
nothing, or when it is a read (nothing to do twice).

* Endpoints are tried in the order given, starting from the one that answered
  last in this process (sticky: after a redirect that is the leader, even if
  its address is not in the list).
* ``UNAVAILABLE`` with ``clusteracme-leader`` metadata (a standby; nothing was
  done): the call goes to that address next, at once the first time, after a
  pause when the same leader is named again within the call (a stale record:
  that leader just died, and its lease has not ended yet).
* Any other ``UNAVAILABLE`` from a standby before it did anything: it carries
  ``clusteracme-standby`` metadata (``STANDBY_KEY``; older replicas: the "no
  coordinator leads right now" sentence). Nobody leads (an election), or the
  standby cannot tell who does (etcd unreachable from it); nothing was done:
  pause (0.2 s doubling to 1 s) and ask the next replica (the same one when
  it is the only one, or was the leader a standby named).
* The connection could not be made (refused, DNS, TLS handshake, no handshake
  in time): the request never left this process, so the next endpoint is
  tried; when the unreachable one was a leader a standby named, the client
  asks that standby again (the election will replace the leader; meanwhile
  the standby names the same one, which pauses as above).
  When every endpoint failed in a row, the call fails at once naming them.
* The connection broke after the request may have been sent (socket closed,
  connection reset, the server shutting down under the call, no answer to
  keepalive pings): a read is tried on the next endpoint (so is a read a
  replica refused with an ``UNAVAILABLE`` of its own, e.g. its etcd is
  unreachable); a command is not, and the error says it may have reached that
  coordinator and how to check.
* One deadline (``timeout``) covers all attempts and pauses. A command's
  attempt gets all that is left (it is never sent twice). A unary read's
  attempt gets at most ``max(READ_ATTEMPT_MIN, timeout * READ_ATTEMPT_SHARE)``
  when there is another endpoint to try: a replica that stopped answering
  (frozen, its connection still open) does not take the whole deadline; when
  that share runs out with time left, the read goes to the next endpoint (and
  back to this one later: it may answer again). A deadline that runs out
  during a command's attempt reports that the command may have reached the
  coordinator.
* The channels send keepalive pings (``rpcutil.KEEPALIVE_TIME_MS``): a
  connection to a replica that went silent ends after the ping's timeout, so
  a call there fails as "lost" (above) instead of waiting out its deadline,
  and the next call connects afresh.
* Any other answer (a refusal, not found, ...) is the replica's answer: raised
  as our error (``rpcutil.error_from_rpc``), never retried.
* A server stream (Rollout, Backup) follows the same rule until its first
  message; a failure after that is raised, never retried (part of it has
  happened).
* A client stream (Restore, a command) is opened without a message: the
  leader accepts it by sending its response headers with ``ACCEPTED_KEY``
  before it reads anything, while a standby's redirect or refusal ends the
  call without reading. Until accepted, the rule above applies (the messages
  are sent again, in full, to the next replica); once accepted, the call is
  never sent again.

How a failure is recognised: grpc 1.x reports transport failures only as the
sentence in the status details (its debug string carries no more since 1.50).
What grpc 1.85 says, measured on loopback:

* a refused connection: ``failed to connect to all addresses; last error:
  UNKNOWN: ipv4:127.0.0.1:P: Failed to connect to remote host: Connection
  refused``; a TLS handshake refused or not finished in time: the same prefix,
  then ``Tls handshake failed (...)`` or ``Handshake read failed (Endpoint
  closing)``; an unknown host: ``errors resolving H:P: [...]`` (older versions:
  ``DNS resolution failed``). All are said before the call is put on a
  connection: "not connected".
* a server killed under the call: ``Stream removed (Socket closed)``; a
  connection reset: ``Stream removed (recvmsg:Connection reset by peer
  (104))`` or, when grpc was writing, ``Stream removed (sendmsg: Broken pipe
  (32))``; a server stopping without grace: ``Cancelling all calls`` (its
  GOAWAY text); no ack to a keepalive ping in time: ``Stream removed (ping
  timeout)``: "lost".
* our own deadline: ``DEADLINE_EXCEEDED`` with details exactly ``Deadline
  Exceeded`` (a server's DeadlineExceeded carries its own sentence).

The sentences are matched at the start of the details only: a replica's own
error may quote one further in ("etcd put failed: UNAVAILABLE failed to
connect to all addresses") and is then the replica's answer, not ours. An
``UNAVAILABLE`` whose sentence is none of these is taken as the replica's
answer: a command is not repeated on it (a read is, as above).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

from clusteracme import errors, netaddr
from clusteracme.rpcutil import TLSFiles, channel, error_from_rpc
from clusteracme.v1 import coordinator_pb2_grpc

# Trailing metadata of a standby's redirect: the leader's advertised host:port and its name.
LEADER_ADDRESS_KEY = "clusteracme-leader"
LEADER_NAME_KEY = "clusteracme-leader-name"
# Every standby refusal carries it: the name of the replica that refused.
STANDBY_KEY = "clusteracme-standby"
# In the details of a standby's refusal while nobody leads (an election under way).
NO_LEADER_MARK = "no coordinator leads right now"
# Initial metadata of a client-streaming command the leader has taken: the client may send its messages.
ACCEPTED_KEY = "clusteracme-accepted"

# Methods every replica serves itself, from etcd: the reads, plus the agents'
# RegisterPeer and Heartbeat (idempotent). They may be sent again anywhere.
# Every other method is a command: only the leader runs it.
READ_METHODS: frozenset[str] = frozenset({
    "RegisterPeer", "Heartbeat", "ListProviders", "ListPeers", "GetCSR", "Preflight", "GetOrder", "ListOrders",
    "GetPending", "ListDomains", "GetSchedule", "TrustList", "TrustVerify", "Status", "ListEvents", "ListAlarms",
    "ListCoordinators", "ListDenied", "Backup",
})

# A unary read's attempt gets at most max(READ_ATTEMPT_MIN, timeout * READ_ATTEMPT_SHARE) seconds when another
# endpoint could answer: at least two tries within the deadline, never so short that a busy replica's slow answer
# (a status over many peers) is cut.
READ_ATTEMPT_MIN = 2.0
READ_ATTEMPT_SHARE = 1 / 3

PAUSE_FIRST = 0.2  # seconds; doubles up to PAUSE_MAX while no replica names a leader that takes the call
PAUSE_MAX = 1.0

# What an operator runs to learn whether a command that may have arrived took effect.
CHECK_HINT = "check with acmectl status (or acmectl events PEER) before repeating it"

_NOT_CONNECTED = ("failed to connect to all addresses", "errors resolving", "dns resolution failed",
                  "name resolution failure", "failed to connect to remote host", "connection refused")
_LOST = ("stream removed", "socket closed", "connection reset", "broken pipe", "cancelling all calls",
         "goaway received", "received rst_stream", "endpoint closing", "transport closed",
         "keepalive watchdog timeout", "connection closed", "too many pings")


class Kind(enum.Enum):
    """What a failed attempt tells about the request."""

    REDIRECT = "redirect"            # a standby named the leader; nothing was done
    NO_LEADER = "no leader"          # a standby, nobody leads; nothing was done
    NOT_CONNECTED = "not connected"  # no connection: the request never left this process
    LOST = "lost"                    # the connection broke; the request may have arrived
    TIMED_OUT = "timed out"          # our deadline ran out, possibly under the call
    ANSWER = "answer"                # the replica's own error


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    reason: str              # a few words for error messages: "connection refused"
    leader_address: str = ""
    leader_name: str = ""


def classify(code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, Any]] = ()) -> Verdict:
    """Sort a failed call by what it tells about the request (module docstring)."""
    meta = {k: v for k, v in trailing if isinstance(v, str)}
    text = details.strip()
    low = text.lower()
    if code == grpc.StatusCode.UNAVAILABLE and meta.get(LEADER_ADDRESS_KEY):
        address, name = meta[LEADER_ADDRESS_KEY], meta.get(LEADER_NAME_KEY, "")
        return Verdict(Kind.REDIRECT, f"standby; the leader is {name or '?'} at {address}", address, name)
    if code == grpc.StatusCode.UNAVAILABLE and (meta.get(STANDBY_KEY) or NO_LEADER_MARK in low):
        # A standby refused before doing anything and named no leader to go to.
        return Verdict(Kind.NO_LEADER, _first_line(text) or f"standby {meta.get(STANDBY_KEY, '')}; no leader named")
    if code == grpc.StatusCode.UNAVAILABLE and low.startswith(_NOT_CONNECTED):
        return Verdict(Kind.NOT_CONNECTED, _connect_gist(low, text))
    if low.startswith(_LOST):
        return Verdict(Kind.LOST, "connection lost: " + _lost_gist(low, text))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and low == "deadline exceeded":
        return Verdict(Kind.TIMED_OUT, "no answer in time")
    return Verdict(Kind.ANSWER, _first_line(text) or code.name.lower())


def _connect_gist(low: str, text: str) -> str:
    if "connection refused" in low:
        return "connection refused"
    if "certificate_verify_failed" in low:
        return "TLS handshake failed: certificate not trusted"
    if "handshake" in low:
        return "TLS handshake failed" + (" (no answer in time)" if "endpoint closing" in low else "")
    if "resolv" in low or "dns" in low:
        return "host name not resolved"
    return _first_line(text)


def _lost_gist(low: str, text: str) -> str:
    for marker, gist in (("connection reset", "connection reset"), ("socket closed", "socket closed"),
                         ("cancelling all calls", "the server shut down"), ("too many pings", "too many pings"),
                         ("goaway", "the server shut down"), ("broken pipe", "broken pipe"),
                         ("ping timeout", "no answer to keepalive pings"),
                         ("keepalive watchdog", "no answer to keepalive pings")):
        if marker in low:
            return gist
    return _first_line(text)


def _first_line(text: str) -> str:
    return text.splitlines()[0][:160] if text else ""


def parse_endpoints(text: str, what: str) -> list[str]:
    """A comma-separated list of ``host:port`` (``[v6]:port``), like etcdctl's
    ``--endpoints``: each checked, duplicates dropped, order kept."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise errors.InvalidArgument(f"{what}: no endpoint given (host:port[,host:port...])")
    if "" in items:
        raise errors.InvalidArgument(f"{what}: {text[:200]!r} has an empty item; separate host:port endpoints "
                                     "with single commas")
    for item in items:
        netaddr.split_hostport(item, what)
    return list(dict.fromkeys(items))


T = TypeVar("T")
Attempt = Callable[[coordinator_pb2_grpc.CoordinatorServiceStub, float], Awaitable[T]]


def _after_start(exc: grpc.aio.AioRpcError, method: str, target: str, timeout: float,
                 broke: str) -> errors.ClusterAcmeError:
    """The error of a call that ended after the coordinator took it (it may
    go on there, so it is never sent again): ``broke`` says what broke when
    the connection was lost."""
    verdict = classify(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
    if verdict.kind is Kind.LOST:
        return errors.Unavailable(f"{broke} ({verdict.reason}); it may go on there: {CHECK_HINT}")
    if verdict.kind is Kind.TIMED_OUT:
        return errors.DeadlineExceeded(f"{method} at coordinator {target} did not end within {timeout:g} s; "
                                       f"it may go on there: {CHECK_HINT}")
    return error_from_rpc(exc, f"coordinator {target}")


class ReplicaClient:
    """Calls CoordinatorService methods on whichever replica takes them.

    One grpc.aio channel per endpoint, opened on first use and kept until
    ``close``. Errors are our error tree (``clusteracme.errors``) and name the
    endpoints tried. Cancelling a call cancels the attempt under way.
    """

    def __init__(self, tls: TLSFiles, endpoints: Sequence[str], server_name: str) -> None:
        if not endpoints:
            raise errors.InvalidArgument("no coordinator endpoint given")
        self._tls = tls
        self._endpoints = tuple(dict.fromkeys(endpoints))
        self._server_name = server_name
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, coordinator_pb2_grpc.CoordinatorServiceStub] = {}
        self._last: str | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._endpoints

    @property
    def answered_last(self) -> str | None:
        """The endpoint that answered last (the first one tried next), None before any answer."""
        return self._last

    async def unary(self, method: str, request: Any, *, read: bool, timeout: float) -> Any:
        """Call the unary method ``method`` (its name in the service); ``read``
        says whether it may be sent again after it may have arrived."""

        async def attempt(stub: coordinator_pb2_grpc.CoordinatorServiceStub, remaining: float) -> Any:
            return await getattr(stub, method)(request, timeout=remaining)

        share = max(READ_ATTEMPT_MIN, timeout * READ_ATTEMPT_SHARE) if read else None
        _, response = await self._first_answer(method, read, timeout, attempt, share)
        return response

    async def stream(self, method: str, request: Any, *, read: bool, timeout: float) -> AsyncIterator[Any]:
        """The messages of the server-streaming method ``method``: redirected and
        retried like ``unary`` until the first message arrives, never after."""

        async def attempt(stub: coordinator_pb2_grpc.CoordinatorServiceStub,
                          remaining: float) -> tuple[grpc.aio.UnaryStreamCall, Any]:
            call = getattr(stub, method)(request, timeout=remaining)
            try:
                return call, await call.read()
            except BaseException:
                call.cancel()
                raise

        # No share per attempt: the attempt's timeout is the whole stream's.
        target, (call, message) = await self._first_answer(method, read, timeout, attempt, None)
        try:
            while message is not grpc.aio.EOF:
                yield message
                message = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise _after_start(exc, method, target, timeout,
                               f"the connection to coordinator {target} broke during {method}, after it started") \
                from None
        finally:
            call.cancel()  # a no-op once the stream ended; stops it when the reader stopped early

    async def client_stream(self, method: str, messages: Callable[[], Iterable[Any]], *, timeout: float) -> Any:
        """Call the client-streaming command ``method`` with ``messages()``
        (called once per attempt): redirected and retried like ``unary``
        until the leader accepts the call (module docstring), before any
        message is sent; never sent again once accepted."""

        async def attempt(stub: coordinator_pb2_grpc.CoordinatorServiceStub,
                          remaining: float) -> grpc.aio.StreamUnaryCall:
            call = getattr(stub, method)(timeout=remaining)
            try:
                headers = await call.initial_metadata()
                if not any(key == ACCEPTED_KEY for key, _ in headers or ()):
                    await call  # refused before reading (a redirect, say): raises what the replica said
                    raise errors.Unavailable(f"coordinator answered {method} without taking it")
                return call
            except BaseException:
                call.cancel()
                raise

        # Until accepted, no message has left this process: like a read, the call may go to another replica
        # even when a connection broke under it.
        target, call = await self._first_answer(method, True, timeout, attempt, None)
        try:
            try:
                for message in messages():
                    await call.write(message)
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # a failed write says little ("Internal error from Core"): the call's status says what happened
            return await call
        except grpc.aio.AioRpcError as exc:
            raise _after_start(exc, method, target, timeout,
                               f"{method}: the connection to coordinator {target} broke after it took the command") \
                from None
        finally:
            call.cancel()  # a no-op once it ended; stops it when this task is cancelled

    async def close(self) -> None:
        channels, self._channels, self._stubs = list(self._channels.values()), {}, {}
        for ch in channels:
            await ch.close()

    async def __aenter__(self) -> ReplicaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _stub(self, target: str) -> coordinator_pb2_grpc.CoordinatorServiceStub:
        if target not in self._stubs:
            self._channels[target] = channel(self._tls, target, self._server_name, keepalive=True)
            self._stubs[target] = coordinator_pb2_grpc.CoordinatorServiceStub(self._channels[target])
        return self._stubs[target]

    def _order(self) -> list[str]:
        if self._last is None:
            return list(self._endpoints)
        return [self._last, *(e for e in self._endpoints if e != self._last)]

    async def _first_answer(self, method: str, read: bool, timeout: float, attempt: Attempt[T],
                            share: float | None) -> tuple[str, T]:
        """Run ``attempt`` on replicas by the module's rule until one answers:
        (the endpoint that did, the attempt's result). ``share``: the most one
        attempt may take when another endpoint could answer (reads only)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        order = self._order()
        index = 0
        redirect: str | None = None   # the leader a standby named, tried next
        followed: set[str] = set()    # leaders named and tried in this call
        pause = PAUSE_FIRST
        tried: dict[str, str] = {}    # endpoint -> what its latest attempt gave, oldest attempt first
        failing: set[str] = set()     # endpoints that failed in a row, with no replica answering in between

        async def wait() -> None:
            nonlocal pause
            await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))
            pause = min(pause * 2, PAUSE_MAX)

        while True:
            target = redirect or order[index]
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise errors.DeadlineExceeded(f"no coordinator took {method} within {timeout:g} s "
                                              f"({_tried_text(tried)})")
            if share is not None and len(order) > 1:
                remaining = min(remaining, share)
            try:
                result = await attempt(self._stub(target), remaining)
            except grpc.aio.AioRpcError as exc:
                verdict = classify(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
                failure = exc
            else:
                self._last = target
                return target, result
            tried.pop(target, None)  # keep the order of the latest attempts
            tried[target] = verdict.reason
            kind = verdict.kind
            if kind is Kind.REDIRECT and verdict.leader_address == target:
                kind = Kind.NO_LEADER  # names itself: a leader record about to change
            if kind is Kind.ANSWER and read and failure.code() == grpc.StatusCode.UNAVAILABLE:
                kind = Kind.LOST  # this replica cannot serve the read now (its etcd, say); another may

            if kind is Kind.REDIRECT:
                _check_leader_address(target, verdict)
                failing.clear()
                if verdict.leader_address in followed:
                    await wait()  # named again: a stale record (the leader just died) or standbys naming each other
                followed.add(verdict.leader_address)
                redirect = verdict.leader_address
            elif kind is Kind.NO_LEADER:
                failing.clear()
                await wait()
                if target != redirect:
                    index = (index + 1) % len(order)  # another replica may lead, or read who does
            elif kind is Kind.NOT_CONNECTED or (kind is Kind.LOST and read):
                failing.add(target)
                if failing.issuperset(order):
                    raise errors.Unavailable(f"no coordinator answered {method} ({_tried_text(tried)})")
                if target == redirect:
                    redirect = None  # the named leader is gone: ask the standby again (it pauses if it names it again)
                else:
                    index = (index + 1) % len(order)
            elif kind is Kind.TIMED_OUT and read and deadline - loop.time() > 0:
                # Only this attempt's share ran out: the replica may be frozen, another may answer. Not
                # counted as failing: the call goes round the endpoints until one answers or time is up.
                tried[target] = f"no answer within {remaining:.3g} s"
                if target == redirect:
                    redirect = None
                else:
                    index = (index + 1) % len(order)
            elif kind is Kind.LOST:
                raise errors.Unavailable(
                    f"{method}: the connection to coordinator {target} broke after the command may have reached "
                    f"it ({verdict.reason}); it may have taken effect: {CHECK_HINT}{_before(tried, target)}")
            elif kind is Kind.TIMED_OUT:
                if read:
                    raise errors.DeadlineExceeded(f"no coordinator answered {method} within {timeout:g} s "
                                                  f"({_tried_text(tried)})")
                raise errors.DeadlineExceeded(
                    f"coordinator {target} did not answer {method} within {timeout:g} s; the command may have "
                    f"reached it and may still take effect: {CHECK_HINT}{_before(tried, target)}")
            else:
                self._last = target  # it answered, with an error of its own
                raise error_from_rpc(failure, f"coordinator {target}") from None


def _check_leader_address(target: str, verdict: Verdict) -> None:
    try:
        netaddr.split_hostport(verdict.leader_address, "leader address")
    except errors.InvalidArgument:
        raise errors.Unavailable(
            f"coordinator {target} names the leader {verdict.leader_name or '?'} at "
            f"{verdict.leader_address[:80]!r}, which is not host:port: check that replica's advertise "
            "setting") from None


def _tried_text(tried: dict[str, str]) -> str:
    if not tried:
        return "no time left to try any"
    return "tried " + "; ".join(f"{endpoint}: {reason}" for endpoint, reason in tried.items())


def _before(tried: dict[str, str], target: str) -> str:
    earlier = {e: r for e, r in tried.items() if e != target}
    return f" (before it, {_tried_text(earlier)})" if earlier else ""
