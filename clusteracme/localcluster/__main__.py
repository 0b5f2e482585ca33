"""``python -m clusteracme.localcluster demo``: the end-to-end demo behind ``make demo``.

Brings up etcd, pebble (+ challtestsrv as DNS), a coordinator and N agents on
loopback, then drives the main job through acmectl exactly as an operator
would (account, CSR on the peer, sign with every peer serving the
challenges, the orders kept, pending certificate, deploy without restart,
status, history),
printing each command and its output, and stops everything. Every replica
serves the web status page (its URLs and token file are printed first); at
the end headless Chromium takes a screenshot of it, ``status-page.png``,
which stays in the run directory (a temporary one is emptied of everything
else) when the demo is done.

``--coordinators N --etcd-members M`` runs it highly available: N
coordinator replicas (one leads, the others stand by and answer too) on an
M-member etcd cluster; the demo starts by listing both, and acmectl is
given every replica.

``--ipv6`` runs the same demo dual-stack (root only): the cluster lives in a
network namespace of its own, each peer also has an IPv6 address, DNS gives
A and AAAA records, and the demo ends by showing which addresses the CA's
validation requests came in on (``clusteracme.localcluster.netns``).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from clusteracme.localcluster import browser
from clusteracme.localcluster.cluster import LocalCluster, peer_address, peer_ipv6_address, served_serial
from clusteracme.localcluster.netns import unavailable_reason

NAMES = ("www.demo.example", "api.demo.example")
SCREENSHOT = "status-page.png"


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
        # The temporary run dir goes, but for the status page's screenshot (no keys or state are left behind).
        for entry in run_dir.iterdir():
            if entry.name == SCREENSHOT:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if not any(run_dir.iterdir()):
            run_dir.rmdir()
    if (run_dir / SCREENSHOT).exists():
        print(f"== the status page's screenshot is kept at {run_dir / SCREENSHOT}", flush=True)


def _plural(count: int, one: str, many: str) -> str:
    return one if count == 1 else f"{count} {many}"


def _demo(args: argparse.Namespace, run_dir: Path) -> None:
    where = " in a network namespace (dual-stack)" if args.ipv6 else ""
    etcd = _plural(args.etcd_members, "etcd", "etcd members")
    coordinators = _plural(args.coordinators, "a coordinator", "coordinator replicas")
    print(f"== starting {etcd}, pebble, challtestsrv, {coordinators} and {args.peers} agents{where} in {run_dir}",
          flush=True)
    started = time.monotonic()
    with LocalCluster(run_dir, peers=args.peers, front_mode=args.front_mode, ipv6=args.ipv6,
                      coordinators=args.coordinators, etcd_members=args.etcd_members, web=True) as cluster:
        peers = range(1, args.peers + 1)
        addresses = [f"{peer_address(i)} + {peer_ipv6_address(i)}" if args.ipv6 else peer_address(i) for i in peers]
        if cluster.netns is not None:
            print(f"== network namespace {cluster.netns.name}", flush=True)
        print(f"== cluster up in {time.monotonic() - started:.1f}s; peers on " + ", ".join(addresses)
              + f", port-80 fronts on port {cluster.front_port}", flush=True)
        show_etcd_members(cluster)
        print("== status page: " + ", ".join(r.web_url or "" for r in cluster.replicas)
              + f" (log in with the token in {cluster.web_token_file}, or an operator certificate)", flush=True)
        step(cluster, "coordinators")
        for name in NAMES:
            cluster.set_dns(name, peers)
        records = "A and AAAA" if args.ipv6 else "A"
        print("== DNS: " + ", ".join(NAMES) + f" -> every peer ({records} records)", flush=True)
        step(cluster, "provider", "add", "pebble", "--directory", cluster.directory_url,
             "--ca-bundle", str(cluster.ca_bundle))
        step(cluster, "account", "register", "--provider", "pebble", "--email", "ops@demo.example", "--agree-tos")
        step(cluster, "peer", "list")
        step(cluster, "peer", "enable", "peer1")
        step(cluster, "csr", "create", "peer1", "--cn", NAMES[0], "--san", NAMES[1])
        step(cluster, "sign", "peer1", "--wait")
        step(cluster, "order", "list")
        if args.ipv6:
            show_validations(cluster)
        step(cluster, "pending", "show", "peer1")
        agent = cluster.agent(1)
        step(cluster, "deploy", "peer1")
        print(f"\n== TLS handshake with peer1's endpoint {agent.tls_endpoint} (SNI {NAMES[0]}): "
              f"serial {cluster.inside(served_serial, agent.tls_endpoint, NAMES[0])}", flush=True)
        step(cluster, "status")
        step(cluster, "events", "peer1")
        screenshot_status_page(cluster)
        print("\n== stopping the cluster", flush=True)
    print("== demo finished", flush=True)


def screenshot_status_page(cluster: LocalCluster) -> None:
    """A PNG of the status page as headless Chromium shows it, in the run dir;
    without Chromium (or with a dual-stack cluster, whose pages live inside
    its namespace), says so and goes on."""
    out = cluster.run_dir / SCREENSHOT
    reason = browser.unavailable_reason()
    if reason is None and cluster.netns is not None:
        reason = "the dual-stack cluster's status page is inside its network namespace"
    if reason is not None:
        print(f"\n== no screenshot of the status page: {reason}", flush=True)
        return
    url = cluster.replicas[0].web_url or ""
    try:
        browser.screenshot(url, cluster.web_token_file.read_text().strip(),
                           [cluster.pki_dir / f"coordinator-{r.name}.pem" for r in cluster.replicas], out)
    except Exception as exc:  # the demo goes on without its picture
        print(f"\n== no screenshot of the status page: {exc}", flush=True)
        return
    print(f"\n== status page {url} as headless Chromium shows it: {out}", flush=True)


def show_etcd_members(cluster: LocalCluster) -> None:
    """Every etcd member: its client endpoint, and which one is the raft leader."""
    assert cluster.infra is not None
    members = cluster.infra.etcd_cluster.members
    leader = cluster.etcd_leader_index() if len(members) > 1 else None
    described = [f"{m.name} {m.endpoint}" + (" (raft leader)" if j == leader else "")
                 for j, m in enumerate(members, start=1)]
    print("== etcd: " + ", ".join(described), flush=True)


_VALIDATION = re.compile(r"challenge (\S+) requested by (\S+) \(LetsEncrypt-Pebble-VA")


def show_validations(cluster: LocalCluster) -> None:
    """Which address each of pebble's validation requests came in on (the agents' logs)."""
    print("\n== pebble's validation requests, as the fronts saw them:", flush=True)
    for agent in cluster.agents:
        log = (cluster.run_dir / f"agent-{agent.peer_id}.log").read_text(errors="replace")
        remotes = [m.group(2) for m in _VALIDATION.finditer(log)]
        families = sorted({"IPv6" if ":" in remote else "IPv4" for remote in remotes})
        print(f"   {agent.peer_id}: {len(remotes)} request(s)" + (f" over {', '.join(families)}" if remotes else ""),
              flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m clusteracme.localcluster")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the end-to-end demo")
    d.add_argument("--peers", type=int, default=3)
    d.add_argument("--front-mode", choices=("closed", "redirect"), default="closed")
    d.add_argument("--coordinators", type=_positive, default=1,
                   help="coordinator replicas (c1..cN; one leads, the others stand by)")
    d.add_argument("--etcd-members", type=_positive, default=1, help="members of the etcd cluster")
    d.add_argument("--run-dir", help="keep logs and state here (default: a new temp dir)")
    d.add_argument("--ipv6", action="store_true",
                   help="dual-stack: run in a network namespace where every peer also has an IPv6 address (root)")
    args = parser.parse_args()
    if args.ipv6 and (reason := unavailable_reason()) is not None:
        parser.error(f"--ipv6: {reason}")
    demo(args)


if __name__ == "__main__":
    main()
