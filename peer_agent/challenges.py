"""The challenge service: one façade over the token store, the localhost
challenge server and the port-80 front, and the only place that decides when
they listen.

In ``redirect`` and ``closed`` mode the challenge server (and, in ``closed``
mode, the front) listens exactly while at least one token is open; an expiry
task closes them when the last token expires, so a coordinator that never
cleans up cannot leave port 80 open. In ``external`` mode the challenge server
is what the node's web server proxies to, at an address it cannot be told
afresh each time: the agent takes it at start and holds it until it stops
(404 while no token is open), so no other local process can take it between
two challenges; an agent that cannot take it does not start. Every open/close
transition happens under one lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from clusteracme.peer_agent import challenge_server, front
from clusteracme.peer_agent.challenge_server import ChallengeServer
from clusteracme.peer_agent.errors import NotStarted
from clusteracme.peer_agent.front import Front, FrontMode
from clusteracme.peer_agent.tokens import DEFAULT_MAX_TTL, OrderTokens, TokenStore

log = logging.getLogger(__name__)

EXPIRY_TASK_NAME = "challenge-token-expiry"


class ChallengeService:
    """Present and remove HTTP-01 tokens on this peer.

    ``front_hosts``: every address the front listens on (a string: one); in
    ``redirect`` mode all of them listen from ``start``, in ``closed`` mode
    all of them open and close together with the challenge server. In
    ``external`` mode there is no front, and the challenge server listens
    from ``start`` to ``stop`` on ``challenge_port`` (fixed) or on the Unix
    socket ``challenge_socket`` (``external`` mode only).

    When ``present`` returns, the tokens are servable through the front; when
    ``remove`` (or expiry) takes the last one away, the challenge server is
    closed and a ``closed``-mode front stops listening.
    """

    def __init__(
        self,
        front_hosts: str | Sequence[str],
        front_port: int,
        front_mode: FrontMode | str,
        https_port: int = 443,
        challenge_host: str = "127.0.0.1",
        challenge_port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        max_ttl: float = DEFAULT_MAX_TTL,
        *,
        challenge_socket: Path | None = None,
        challenge_socket_group: str = "",
        front_max_connections: int = front.DEFAULT_MAX_CONNECTIONS,
        challenge_max_connections: int = challenge_server.DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        mode = FrontMode(front_mode)
        if mode is FrontMode.EXTERNAL:
            if challenge_socket is not None and challenge_port:
                raise ValueError("set either challenge.socket (recommended) or challenge.port for the web server "
                                 "to proxy to, not both")
            if challenge_socket is None and not challenge_port:
                raise ValueError('front.mode = "external" needs challenge.socket (recommended) or a fixed '
                                 "challenge.port for the web server to proxy to")
        elif challenge_socket is not None:
            raise ValueError('challenge.socket is for front.mode = "external" (the web server proxies to it); '
                             f"the {mode.value} front forwards over loopback TCP")
        self._clock = clock
        self._store = TokenStore(clock=clock, max_ttl=max_ttl)
        self._server = ChallengeServer(
            self._store, challenge_host, challenge_port, socket_path=challenge_socket,
            socket_group=challenge_socket_group, max_connections=challenge_max_connections,
            count_requests=mode is FrontMode.EXTERNAL,  # then it is the front (behind the web server)
        )
        self._front = Front(
            front_hosts, front_port, mode,
            upstream_port=lambda: self._server.port,
            is_open=lambda token: self._store.get(token) is not None,
            https_port=https_port, upstream_host=challenge_host, max_connections=front_max_connections,
        )
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._expiry_task: asyncio.Task[None] | None = None

    @property
    def front_mode(self) -> FrontMode:
        return self._front.mode

    @property
    def open_tokens(self) -> int:
        """Tokens held, including expired ones the expiry task has not purged yet."""
        return len(self._store)

    @property
    def front_listening(self) -> bool:
        return self._front.listening

    @property
    def front_port(self) -> int | None:
        return self._front.port

    @property
    def challenge_listening(self) -> bool:
        return self._server.listening

    @property
    def challenge_port(self) -> int | None:
        return self._server.port

    async def start(self) -> None:
        """Start the expiry task and, in ``redirect`` mode, the front; in
        ``external`` mode the challenge server (FrontError when its address
        is taken: the agent must not run without it)."""
        async with self._lock:
            if self._expiry_task is not None:
                return
            if self._front.mode is FrontMode.REDIRECT:
                await self._front.start()
            elif self._front.mode is FrontMode.EXTERNAL:
                port = await self._server.start()
                if self._server.socket_path is None and port >= _unprivileged_port_start():
                    log.warning("challenge.port %d is the agent's while it runs, but any local user can bind it "
                                "while the agent is down and answer what the web server forwards: prefer "
                                "challenge.socket", port)
            self._expiry_task = asyncio.create_task(
                self._expire_loop(), name=EXPIRY_TASK_NAME
            )
            self._expiry_task.add_done_callback(_log_death)

    async def stop(self) -> None:
        """Forget every token and close everything; ``start`` may follow."""
        task, self._expiry_task = self._expiry_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with self._lock:
            self._store.remove_all()
            await self._front.stop()
            await self._server.stop()

    async def present(self, order_id: str, tokens: Mapping[str, str], ttl: float) -> int:
        """Open ``tokens`` (token -> key authorization) for ``order_id``.

        Everything is validated before anything changes: a rejected call opens
        nothing. Re-presenting the same tokens only extends their expiry.
        Returns how many tokens the order now holds.
        """
        held, _ = await self._open([(order_id, tokens)], ttl)
        return held[order_id]

    async def present_batch(self, orders: Sequence[OrderTokens], ttl: float) -> int:
        """Open the tokens of several orders at once, each as ``present``
        would, all with the same ``ttl``; the listeners open once for the batch.

        All or nothing: one invalid token or conflict refuses the whole batch
        and opens none. Returns how many tokens are open after the call.
        """
        _, open_now = await self._open(orders, ttl)
        return open_now

    async def _open(self, orders: Sequence[OrderTokens], ttl: float) -> tuple[dict[str, int], int]:
        """Validate and open ``orders``; (tokens held per order, tokens open)."""
        async with self._lock:
            if self._expiry_task is None:
                raise NotStarted("the challenge service is not started")
            self._store.validate_batch(orders, ttl)
            try:
                await self._server.start()
                if self._front.mode is FrontMode.CLOSED:
                    await self._front.start()
                open_now = self._store.add_batch(orders, ttl)
            finally:
                await self._close_if_idle()
            held = {order_id: self._store.held(order_id) for order_id, _ in orders}
        self._wake.set()
        for order_id, count in held.items():
            log.info("order %s: %d challenge token(s) open", order_id, count, extra={"order_id": order_id})
        return held, open_now

    async def remove(self, order_id: str, tokens: list[str] | None = None) -> int:
        """Release ``order_id``'s tokens (all when None); unknown ones are
        ignored so cleanup can be repeated. Returns how many were released."""
        async with self._lock:
            released = self._store.remove(order_id, tokens)
            await self._close_if_idle()
        if released:
            log.info("order %s: %d challenge token(s) removed", order_id, released, extra={"order_id": order_id})
        return released

    async def remove_batch(self, removals: Iterable[tuple[str, list[str] | None]]) -> int:
        """Release the tokens of several orders at once, each as ``remove``
        would (a None token list: all the order's tokens); the listeners close
        at most once, after the whole batch. Returns how many tokens are still
        open after the call."""
        released: dict[str, int] = {}
        async with self._lock:
            for order_id, tokens in removals:
                released[order_id] = released.get(order_id, 0) + self._store.remove(order_id, tokens)
            await self._close_if_idle()
            open_now = self._store.live_count()
        for order_id, count in released.items():
            if count:
                log.info("order %s: %d challenge token(s) removed", order_id, count, extra={"order_id": order_id})
        return open_now

    async def purge_expired(self) -> int:
        """Drop expired tokens now (the expiry task calls this on time)."""
        async with self._lock:
            purged = self._store.purge_expired()
            await self._close_if_idle()
        if purged:
            log.info("%d challenge token(s) expired", purged)
        return purged

    async def _close_if_idle(self) -> None:
        if len(self._store) or self._front.mode is FrontMode.EXTERNAL:
            return
        if self._front.mode is FrontMode.CLOSED:
            await self._front.stop()
        await self._server.stop()

    async def _expire_loop(self) -> None:
        while True:
            self._wake.clear()
            next_expiry = self._store.next_expiry()
            delay = None if next_expiry is None else max(0.0, next_expiry - self._clock())
            try:
                # a present() may bring an earlier expiry: it wakes us to recompute
                await asyncio.wait_for(self._wake.wait(), delay)
                continue
            except TimeoutError:
                pass
            try:
                await self.purge_expired()
            except Exception:
                # keep the loop alive: it is what closes port 80 after a lost cleanup
                log.exception("purging expired challenge tokens failed")
                await asyncio.sleep(1.0)


def _unprivileged_port_start() -> int:
    """The lowest port any user may bind (Linux: ip_unprivileged_port_start)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _log_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s died", task.get_name(), exc_info=task.exception())
