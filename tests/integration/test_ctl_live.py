"""acmectl against a real cluster, the way an operator sees it (issue 13,
items 1-3): ``sign --wait`` and ``rollout`` drawn live on a terminal (a
pseudo-terminal here), as plain lines when piped and as JSON lines with
``-o json``; ``status`` coloured on a terminal only; ``order list``."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest

from clusteracme.localcluster.cluster import LocalCluster
from tests.integration.conftest import ctl_json, register_account

pytestmark = pytest.mark.integration

VALIDITY = 5 * 86400  # pebble's certificates live 5 days: status shows 4 days left, in red on a terminal
COLUMNS = 120
RED = "\x1b[31m"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    run_dir = tmp_path_factory.mktemp("ctl-live")
    with LocalCluster(run_dir, peers=3, pebble_config={"certificateValidityPeriod": VALIDITY}) as c:
        register_account(c)
        for i in (1, 2, 3):
            c.ctl("peer", "enable", f"peer{i}")
            name = f"www.p{i}.live.example"
            c.set_dns(name, [1, 2, 3])
            c.ctl("csr", "create", f"peer{i}", "--cn", name)
        yield c


def on_terminal(cluster: LocalCluster, *args: str, timeout: float = 120,
                env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run acmectl with its stdout on a pseudo-terminal of COLUMNS columns;
    its exit status, everything drawn on the terminal, and its stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, COLUMNS, 0, 0))
    environ = {k: v for k, v in cluster.ctl_env().items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    environ.update({"TERM": "xterm-256color", **(env or {})})
    proc = subprocess.Popen([sys.executable, "-m", "clusteracme.ctl", *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=subprocess.PIPE, env=environ)
    os.close(slave)
    drawn = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process and its terminal are gone
                break
            if not chunk:
                break
            drawn += chunk
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert proc.stderr is not None
    return code, drawn.decode("utf-8", errors="replace"), proc.stderr.read().decode()


def text_of(drawn: str) -> str:
    """What the terminal shows, its escape sequences (colours, cursor moves) left out."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn).replace("\r\n", "\n")


def pending_serial(cluster: LocalCluster, i: int) -> str:
    return ctl_json(cluster, "pending", "show", f"peer{i}")["certificate"]["serial_hex"]


# --- sign --wait -------------------------------------------------------------------------
def test_sign_wait_draws_the_order_live_on_a_terminal(cluster: LocalCluster) -> None:
    code, drawn, err = on_terminal(cluster, "sign", "peer1", "--wait")
    assert code == 0, err + drawn
    assert "\x1b[" in drawn  # redrawn in place
    drawn = text_of(drawn)
    assert "SELF-CHECK" in drawn and "AUTHORIZATION" in drawn and "www.p1.live.example" in drawn
    for peer in ("peer1", "peer2", "peer3"):
        assert re.search(rf"{peer}\s+sent\s+yes", drawn), drawn
    assert re.search(r"order [0-9a-f]{16}: \S+.*\s\d+\.\ds", drawn), drawn  # the phase and the elapsed time
    assert "valid" in drawn
    # The summary follows the live view, as when piped.
    assert re.search(r"order [0-9a-f]{16} for peer peer1: done", drawn) and "peer peer2: served+checked" in drawn


def test_sign_wait_prints_plain_lines_when_piped(cluster: LocalCluster) -> None:
    out = cluster.ctl("sign", "peer2", "--wait").stdout
    assert "\x1b" not in out
    lines = out.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("order "))
    assert all(re.fullmatch(r"  [a-z]+( \(position \d+\))?\.\.\.", line) for line in lines[:summary]), out
    assert re.fullmatch(r"order [0-9a-f]{16} for peer peer2: done", lines[summary])
    assert "  authorization www.p2.live.example: valid" in lines


def test_sign_wait_prints_json_lines_with_o_json(cluster: LocalCluster) -> None:
    result = cluster.ctl("-o", "json", "sign", "peer3", "--wait")
    orders = [json.loads(line) for line in result.stdout.splitlines()]  # every line one JSON object
    assert len(orders) >= 2 and not orders[0]["done"]
    assert len({o["order_id"] for o in orders}) == 1
    assert all(a != b for a, b in zip(orders, orders[1:], strict=False))  # one line per change
    assert orders[-1]["done"] and orders[-1]["succeeded"] and orders[-1]["phase"] == "done"
    assert {a["status"] for a in orders[-1]["authorizations"]} == {"valid"}


# --- rollout ------------------------------------------------------------------------------
def test_rollout_draws_each_peer_live_on_a_terminal(cluster: LocalCluster) -> None:
    serial = pending_serial(cluster, 1)
    code, drawn, err = on_terminal(cluster, "rollout", "--peers", "peer1")
    assert code == 0, err + drawn
    assert "\x1b[" in drawn
    drawn = text_of(drawn)
    assert "DEPLOY" in drawn and "RELOAD" in drawn and "VERIFY" in drawn
    assert re.search(rf"peer1\s+{serial[:7]}\S*\s+ok\s+ok\s+ok\s+verified", drawn), drawn
    assert re.search(r"rollout: 1/1 peer\(s\) done\s+\d+\.\ds", drawn), drawn
    assert "done: 1 peer(s) deployed and verified" in drawn


def test_rollout_prints_plain_lines_when_piped(cluster: LocalCluster) -> None:
    serial = pending_serial(cluster, 2)
    out = cluster.ctl("rollout", "--peers", "peer2").stdout
    assert "\x1b" not in out
    assert out.splitlines() == [
        f"peer2: planned [{serial}]", f"peer2: deploying [{serial}]",
        *[line for line in out.splitlines() if line.startswith(f"peer2: reloading [{serial}]")],
        f"peer2: verifying [{serial}] - TLS handshake with SNI www.p2.live.example",
        f"peer2: verified [{serial}] - serves {serial}", "done - 1 peer(s) deployed and verified"]


def test_rollout_prints_json_lines_with_o_json(cluster: LocalCluster) -> None:
    serial = pending_serial(cluster, 3)
    result = cluster.ctl("-o", "json", "rollout", "--peers", "peer3")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["stage"] for e in events] == ["planned", "deploying", "reloading", "verifying", "verified", "done"]
    assert {e["serial_hex"] for e in events if e["peer_id"]} == {serial}


# --- status -------------------------------------------------------------------------------
def test_status_colours_days_left_on_a_terminal_only(cluster: LocalCluster) -> None:
    code, drawn, err = on_terminal(cluster, "status")
    assert code == 0, err
    rows = [line for line in drawn.splitlines() if line.startswith("peer")]
    assert len(rows) == 3 and all(f"{RED}4\x1b[0m" in row for row in rows), drawn  # 5-day certificates
    piped = cluster.ctl("status").stdout
    assert "\x1b" not in piped
    lines = piped.splitlines()
    assert lines[0].split("  ")[0] == "PEER" and all(len(line) <= COLUMNS for line in lines)
    for i, line in enumerate(lines[1:4], start=1):
        cells = line.split()
        assert cells[:3] == [f"peer{i}", "alive", "on"] and cells[5] == "4", line
    code, drawn, _ = on_terminal(cluster, "status", env={"NO_COLOR": "1"})
    assert code == 0 and "\x1b[" not in drawn and "peer1" in drawn


# --- order list ---------------------------------------------------------------------------
def test_order_list(cluster: LocalCluster) -> None:
    listed = ctl_json(cluster, "order", "list")["orders"]
    assert [o["peer_id"] for o in listed] == ["peer3", "peer2", "peer1"]  # newest first
    assert all(o["succeeded"] for o in listed)
    table = cluster.ctl("order", "list").stdout.splitlines()
    assert table[0].split() == ["ORDER", "PEER", "SLOT", "STATE", "PROVIDER", "NAMES", "CREATED", "UPDATED", "ERROR"]
    assert [line.split()[:6] for line in table[1:]] == [
        [o["order_id"], f"peer{i}", "server", "succeeded", "pebble", f"www.p{i}.live.example"]
        for o, i in zip(listed, (3, 2, 1), strict=True)]
    mine = cluster.ctl("order", "list", "--peer", "peer1", "--no-headers").stdout.splitlines()
    assert len(mine) == 1 and mine[0].split()[:2] == [listed[2]["order_id"], "peer1"]
    assert [o["order_id"] for o in ctl_json(cluster, "order", "list", "--limit", "2")["orders"]] == \
        [listed[0]["order_id"], listed[1]["order_id"]]
    assert len(ctl_json(cluster, "order", "list", "--domain", "server", "--state", "succeeded")["orders"]) == 3
    assert cluster.ctl("order", "list", "--state", "failed").stdout == "no order matches\n"
    assert ctl_json(cluster, "order", "list", "--domain", "nothing.live.example")["orders"] == []
    wide = cluster.ctl("-o", "wide", "order", "list", "--peer", "peer2").stdout.splitlines()
    assert listed[1]["created_at"] in wide[1]
    bad = cluster.ctl("order", "list", "--limit", "-1", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--limit" in bad.stderr
