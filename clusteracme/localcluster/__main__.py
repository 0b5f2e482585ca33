"""``python -m clusteracme.localcluster demo``: the end-to-end demo behind ``make demo``.

Brings up etcd, pebble (+ challtestsrv as DNS), a coordinator and N agents on
loopback, then drives the main job through acmectl exactly as an operator
would (account, CSR on the peer, sign with every peer serving the
challenges, pending certificate, deploy without restart, status, history),
printing each command and its output, and stops everything.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from clusteracme.localcluster.cluster import LocalCluster, peer_address, served_serial

NAMES = ("www.demo.example", "api.demo.example")


def step(cluster: LocalCluster, *args: str) -> None:
    print(f"\n$ acmectl {shlex.join(args)}", flush=True)
    result = cluster.ctl(*args, check=False)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.stdout.write(result.stderr)
        raise SystemExit(f"demo failed at: acmectl {shlex.join(args)}")


def demo(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="clusteracme-demo-"))
    try:
        _demo(args, run_dir)
    except BaseException:
        print(f"== logs and state kept in {run_dir}", flush=True)
        raise
    if not args.run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)


def _demo(args: argparse.Namespace, run_dir: Path) -> None:
    print(f"== starting etcd, pebble, challtestsrv, a coordinator and {args.peers} agents in {run_dir}", flush=True)
    started = time.monotonic()
    with LocalCluster(run_dir, peers=args.peers, front_mode=args.front_mode) as cluster:
        print(f"== cluster up in {time.monotonic() - started:.1f}s; peers on "
              + ", ".join(peer_address(i) for i in range(1, args.peers + 1))
              + f", port-80 fronts on port {cluster.front_port}", flush=True)
        for name in NAMES:
            cluster.set_dns(name, range(1, args.peers + 1))
        print("== DNS: " + ", ".join(NAMES) + " -> every peer", flush=True)
        step(cluster, "provider", "add", "pebble", "--directory", cluster.directory_url,
             "--ca-bundle", str(cluster.ca_bundle))
        step(cluster, "account", "register", "--provider", "pebble", "--email", "ops@demo.example", "--agree-tos")
        step(cluster, "peer", "list")
        step(cluster, "peer", "enable", "peer1")
        step(cluster, "csr", "create", "peer1", "--cn", NAMES[0], "--san", NAMES[1])
        step(cluster, "sign", "peer1", "--wait")
        step(cluster, "pending", "show", "peer1")
        agent = cluster.agent(1)
        step(cluster, "deploy", "peer1")
        print(f"\n== TLS handshake with peer1's endpoint {agent.tls_endpoint} (SNI {NAMES[0]}): "
              f"serial {served_serial(agent.tls_endpoint, NAMES[0])}", flush=True)
        step(cluster, "status")
        step(cluster, "events", "peer1")
        print("\n== stopping the cluster", flush=True)
    print("== demo finished", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m clusteracme.localcluster")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the end-to-end demo")
    d.add_argument("--peers", type=int, default=3)
    d.add_argument("--front-mode", choices=("closed", "redirect"), default="closed")
    d.add_argument("--run-dir", help="keep logs and state here (default: a new temp dir)")
    args = parser.parse_args()
    demo(args)


if __name__ == "__main__":
    main()
