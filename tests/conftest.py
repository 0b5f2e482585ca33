"""Shared test fixtures: a real etcd on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"


def start_etcd(
    tmp_path: Path, *, client_port: int | None = None, extra_args: Sequence[str] = ()
) -> tuple[str, Callable[[], None]]:
    """Start a one-member etcd on 127.0.0.1 with its data in ``tmp_path/etcd``.

    Returns the client endpoint (``127.0.0.1:port``) and a function that stops
    this process (by PID). Calling again with the same ``tmp_path`` and
    ``client_port`` restarts the same member with its data.
    """

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    client_port = client_port or free_port()
    peer = f"http://127.0.0.1:{free_port()}"
    client = f"http://127.0.0.1:{client_port}"
    data_dir = tmp_path / "etcd"
    log = (tmp_path / "etcd.log").open("ab")
    proc = subprocess.Popen(
        [
            ETCD_BINARY, "--name", "test", "--data-dir", str(data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--logger", "zap", "--log-level", "warn",
            *extra_args,
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{client}/health", timeout=1) as resp:
                if json.load(resp).get("health") == "true":
                    return f"127.0.0.1:{client_port}", stop
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"etcd did not start; see {tmp_path / 'etcd.log'}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real etcd for the module; isolate tests with distinct key prefixes."""
    endpoint, stop = start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield endpoint
    finally:
        stop()
