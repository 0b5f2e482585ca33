"""Benchmark: connections during a rolling deployment of 3 peers.

Brings up the local cluster (3 peers, each with its in-process TLS
endpoint), deploys a first certificate everywhere, signs a second one, then
runs ``rollout --all --batch 1`` while

- N client threads open new TLS connections to the 3 endpoints in a loop
  (handshake + one HTTP request each), and
- M long-lived keep-alive connections (opened before the rollout) each send
  a request every 50 ms for the whole rollout.

It prints handshakes attempted and failed, and long-lived connections
dropped (a request on them that got no answer). Expected: 0 failed, 0 dropped.

    python -m bench.rollout_connections [--clients 4] [--long-lived 6]
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from clusteracme.localcluster.cluster import LocalCluster

PEERS = 3


def _context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pebble root is not in this host's store; the serial is what matters
    return ctx


def _request(sock: ssl.SSLSocket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by the server")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed mid-response")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    return body


@dataclass
class Counters:
    attempted: int = 0
    failed: int = 0
    long_requests: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def _new_connections(targets: list[tuple[str, int, str]], stop: threading.Event, counters: Counters, n: int) -> None:
    ctx = _context()
    i = n
    while not stop.is_set():
        host, port, sni = targets[i % len(targets)]
        i += 1
        try:
            with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=sni) as s:
                _request(s)
            counters.add(attempted=1)
        except (OSError, ConnectionError) as exc:
            counters.add(attempted=1, failed=1)
            counters.errors.append(f"new {host}:{port}: {exc}")


def _long_lived(target: tuple[str, int, str], stop: threading.Event, counters: Counters) -> None:
    host, port, sni = target
    sock = _context().wrap_socket(socket.create_connection((host, port), timeout=5), server_hostname=sni)
    try:
        while not stop.is_set():
            try:
                _request(sock)
                counters.add(long_requests=1)
            except (OSError, ConnectionError) as exc:
                counters.add(dropped=1)
                counters.errors.append(f"long-lived {host}:{port}: {exc}")
                return
            time.sleep(0.05)
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="threads opening new connections")
    parser.add_argument("--long-lived", type=int, default=6, help="keep-alive connections held through the rollout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clusteracme-bench-") as tmp, \
            LocalCluster(Path(tmp), peers=PEERS, log_level="warning") as cluster:
        cluster.ctl("provider", "add", "pebble", "--directory", cluster.directory_url, "--ca-bundle", str(cluster.ca_bundle))
        cluster.ctl("account", "register", "--provider", "pebble", "--email", "bench@bench.example", "--agree-tos")
        targets = []
        for i in range(1, PEERS + 1):
            name = f"www.p{i}.rollout.bench.example"
            cluster.set_dns(name, range(1, PEERS + 1))
            cluster.ctl("peer", "enable", f"peer{i}")
            cluster.ctl("csr", "create", f"peer{i}", "--cn", name)
            cluster.ctl("sign", f"peer{i}", "--wait")
            cluster.ctl("deploy", f"peer{i}")
            cluster.ctl("sign", f"peer{i}", "--wait")
            agent = cluster.agent(i)
            targets.append((agent.address, agent.tls_port, name))

        counters, stop = Counters(), threading.Event()
        threads = [threading.Thread(target=_long_lived, args=(targets[k % PEERS], stop, counters))
                   for k in range(args.long_lived)]
        threads += [threading.Thread(target=_new_connections, args=(targets, stop, counters, k))
                    for k in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # traffic flowing before the rollout starts
        started = time.monotonic()
        result = cluster.ctl("--json", "rollout", "--all", "--batch", "1", check=False)
        took = time.monotonic() - started
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        stages = [json.loads(line)["stage"] for line in result.stdout.splitlines() if line.strip()]
        print(f"rollout --all --batch 1 over {PEERS} peers: exit {result.returncode}, {took:.2f}s, "
              f"{stages.count('verified')} verified")
        print(f"new TLS connections: {counters.attempted} attempted, {counters.failed} failed "
              f"({args.clients} client threads)")
        print(f"long-lived connections: {args.long_lived} held, {counters.long_requests} requests answered, "
              f"{counters.dropped} dropped")
        for line in counters.errors[:10]:
            print("  " + line)
        if result.returncode != 0 or counters.failed or counters.dropped:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
