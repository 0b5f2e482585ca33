"""The agent's copy of the cluster's deny list: the SHA-256 of every denied
cluster certificate, as the last registration or heartbeat reply gave it.

Entries are only ever added (a denial is final). The AgentService refuses a caller whose certificate is on it (it is the
servicer's ``deny_list``, checked by ``rpcutil.rpc_method``); only
coordinators may call, so in effect it refuses denied coordinator
certificates. The copy is kept in ``<state_dir>/denied-certificates`` (one
fingerprint a line, rewritten atomically when it changes) and read at start,
so a restarted agent refuses a denied coordinator before it has reached one.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from clusteracme.pki import write_private
from clusteracme.rpcutil import DeniedSet

log = logging.getLogger(__name__)
DENIED_FILE = "denied-certificates"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class AgentDenyList(DeniedSet):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path
        try:
            lines = path.read_text().split()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            log.error("cannot read the deny list %s (%s); starting without it", path, exc)
            return
        good = [line for line in lines if _SHA256.fullmatch(line)]
        if len(good) != len(lines):
            log.error("%s: %d line(s) that are not SHA-256 fingerprints ignored", path, len(lines) - len(good))
        self.replace(good)

    async def update(self, fingerprints: Iterable[str]) -> None:
        """Add what a coordinator sent; saved when it grew. Entries are never
        removed: a denial is final, and a reply without them (an older
        coordinator, or a denied one answering in the middle) must not lift
        one."""
        new = sorted(set(self.fingerprints()) | {f for f in fingerprints if _SHA256.fullmatch(f)})
        if new == self.fingerprints():
            return
        self.replace(new)
        log.info("deny list: %d denied certificate(s)", len(new))
        try:
            await asyncio.to_thread(write_private, self._path, "".join(f"{f}\n" for f in new).encode())
        except OSError as exc:  # kept in memory all the same
            log.error("cannot save the deny list to %s: %s", self._path, exc.strerror or exc)
