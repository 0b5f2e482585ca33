"""acmectl: the operator CLI. Thin: parse, call the CoordinatorService, print.

Connection settings come from flags or the environment (ACMECTL_COORDINATOR,
ACMECTL_CA, ACMECTL_CERT, ACMECTL_KEY). Every call has a deadline. Errors
print one human sentence on stderr and exit non-zero; ``--json`` prints
machine-readable output instead of tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf.json_format import MessageToDict

from clusteracme import errors, pki
from clusteracme.rpcutil import TLSFiles, channel, error_from_rpc
from clusteracme.v1 import common_pb2, coordinator_pb2_grpc
from clusteracme.v1 import coordinator_pb2 as pb

KEY_TYPES = {
    "ec-p256": common_pb2.KEY_TYPE_EC_P256,
    "ec-p384": common_pb2.KEY_TYPE_EC_P384,
    "rsa-2048": common_pb2.KEY_TYPE_RSA_2048,
    "rsa-3072": common_pb2.KEY_TYPE_RSA_3072,
    "rsa-4096": common_pb2.KEY_TYPE_RSA_4096,
}
EXIT_CODES = {errors.InvalidArgument: 2, errors.NotFound: 3, errors.FailedPrecondition: 4, errors.Unavailable: 5}


class CtlError(Exception):
    pass


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class Ctl:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._channel: grpc.aio.Channel | None = None

    @property
    def stub(self) -> coordinator_pb2_grpc.CoordinatorServiceStub:
        if self._channel is None:
            a = self.args
            missing = [n for n, v in (("--ca", a.ca), ("--cert", a.cert), ("--key", a.key)) if not v]
            if missing:
                raise CtlError("missing " + ", ".join(missing) + " (or ACMECTL_CA/ACMECTL_CERT/ACMECTL_KEY)")
            self._channel = channel(TLSFiles(Path(a.ca), Path(a.cert), Path(a.key)), a.coordinator,
                                    pki.COORDINATOR_SERVER_NAME)
        return coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=timeout or self.args.timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"coordinator {self.args.coordinator}") from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def out(self, msg: Any, human: Callable[[], None]) -> None:
        if self.args.json:
            print(json.dumps(_dict(msg), indent=2))
        else:
            human()


# --- pki (local files; no coordinator involved) ------------------------------
def cmd_pki(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.pki_cmd == "init":
        path = pki.init_ca(Path(a.dir), cluster=a.cluster)
        print(f"cluster CA written to {path} (key {Path(a.dir) / pki.CA_KEY}, mode 0600)")
    elif a.pki_cmd == "issue":
        identity = pki.Identity.parse(f"{a.role}:{a.name}")
        cert, key = pki.issue(Path(a.dir), identity, out_dir=Path(a.out or a.dir), ips=a.ip, dns_names=a.dns)
        print(f"{identity.common_name}: certificate {cert}, key {key}")
    elif a.pki_cmd == "secret":
        pki.create_secret(Path(a.file))
        print(f"account-key encryption key written to {a.file} (mode 0600); keep a copy: without it the "
              "stored ACME account keys cannot be opened")


# --- providers and accounts -----------------------------------------------------
def _provider_rows(providers: list[Any]) -> None:
    _print_table([[p.name, p.directory_url, p.account_url or "-", p.account_status or "no account"] for p in providers],
                 ["PROVIDER", "DIRECTORY", "ACCOUNT", "STATUS"])


async def cmd_provider(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.provider_cmd == "add":
        bundle = ""
        if a.ca_bundle:
            try:
                bundle = Path(a.ca_bundle).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise CtlError(f"cannot read the CA bundle {a.ca_bundle}: {exc}") from None
        p = await ctl.call("AddProvider", pb.AddProviderRequest(name=a.name, directory_url=a.directory or "",
                                                                 ca_bundle_pem=bundle))
        ctl.out(p, lambda: print(f"provider {p.name} added: {p.directory_url}\n"
                                 f"terms of service: {p.terms_of_service or '(none published)'}"))
    else:
        r = await ctl.call("ListProviders", pb.ListProvidersRequest())
        ctl.out(r, lambda: _provider_rows(list(r.providers)))


async def cmd_account(ctl: Ctl, a: argparse.Namespace) -> None:
    p = await ctl.call("RegisterAccount", pb.RegisterAccountRequest(
        provider=a.provider, email=a.email, agree_tos=a.agree_tos, eab_kid=a.eab_kid or "",
        eab_hmac_key=a.eab_hmac_key or ""))
    ctl.out(p, lambda: print(f"account registered with {p.name}: {p.account_url} ({p.account_status})"))


# --- peers ------------------------------------------------------------------------
async def cmd_peer(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.peer_cmd == "list":
        r = await ctl.call("ListPeers", pb.ListPeersRequest())
        ctl.out(r, lambda: _print_table(
            [[p.peer_id, "alive" if p.alive else "DEAD", "enabled" if p.enabled else "disabled", ",".join(p.addresses),
              p.http_front, p.front_mode, p.grpc_endpoint, p.version] for p in r.peers],
            ["PEER", "LIVENESS", "ACME", "ADDRESSES", "FRONT", "MODE", "GRPC", "VERSION"]))
    elif a.peer_cmd in ("enable", "disable"):
        p = await ctl.call("SetPeerEnabled", pb.SetPeerEnabledRequest(peer_id=a.peer, enabled=a.peer_cmd == "enable"))
        ctl.out(p, lambda: print(f"ACME {'enabled' if p.enabled else 'disabled'} on peer {p.peer_id}"))
    else:
        r = await ctl.call("RemovePeer", pb.RemovePeerRequest(peer_id=a.peer))
        ctl.out(r, lambda: print(f"peer {a.peer} removed"))


# --- CSR, sign, orders, pending -----------------------------------------------------
def _slot(a: argparse.Namespace) -> common_pb2.Slot:
    return common_pb2.Slot(domain=getattr(a, "domain", "") or "")


async def cmd_csr(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.key_type not in KEY_TYPES:
        raise errors.InvalidArgument(f"unknown key type {a.key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    r = await ctl.call("CreateCSR", pb.CreateCSRRequest(peer_id=a.peer, slot=_slot(a), common_name=a.cn,
                                                        sans=a.san, key_type=KEY_TYPES[a.key_type]), timeout=60)
    ctl.out(r, lambda: print(f"CSR created on peer {r.peer_id} ({r.key_type}, key kept on the peer) for "
                             f"{', '.join(r.names)}\n{r.csr_pem}", end=""))


def _order_lines(o: Any) -> list[str]:
    phase = o.phase + (f" (position {o.queue_position} in the admission queue)" if o.queue_position else "")
    lines = [f"order {o.order_id} for peer {o.peer_id}: {phase}" + (f" - {o.error}" if o.error else "")]
    for z in o.authorizations:
        if z.name:
            lines.append(f"  authorization {z.name}: {z.status}")
    for p in o.peers:
        if p.skipped:
            state = "skipped (not in DNS for this order, could not serve)"
        elif not p.required and p.self_checked:
            state = "served (best effort: not in DNS for this order; its front probed with one token)"
        else:
            state = "served+checked" if p.self_checked else ("acknowledged" if p.acknowledged else "not acknowledged")
        lines.append(f"  peer {p.peer_id}: {state}" + (f" ({p.error})" if p.error else ""))
    return lines


async def cmd_sign(ctl: Ctl, a: argparse.Namespace) -> None:
    o = await ctl.call("Sign", pb.SignRequest(peer_id=a.peer, slot=_slot(a), force=a.force, provider=a.provider or ""))
    if not a.wait:
        ctl.out(o, lambda: print(f"order {o.order_id} started for peer {o.peer_id} "
                                 f"(acmectl order show {o.order_id})"))
        return
    seen = ""
    deadline = time.monotonic() + a.wait_timeout
    while not o.done:
        shown = o.phase + (f" (position {o.queue_position})" if o.queue_position else "")
        if o.phase == "queued" and not o.queue_position:
            shown = seen  # admitted already: it starts at once, nothing to say yet
        if not a.json and shown != seen:
            print(f"  {shown}...", flush=True)
            seen = shown
        if time.monotonic() > deadline:
            raise errors.DeadlineExceeded(f"order {o.order_id} still running after {a.wait_timeout:g}s ({o.phase})")
        await asyncio.sleep(0.2)
        o = await ctl.call("GetOrder", pb.GetOrderRequest(order_id=o.order_id))
    ctl.out(o, lambda: print("\n".join(_order_lines(o))))
    if not o.succeeded:
        raise errors.FailedPrecondition(f"signing failed: {o.error}")


async def cmd_order(ctl: Ctl, a: argparse.Namespace) -> None:
    o = await ctl.call("GetOrder", pb.GetOrderRequest(order_id=a.order_id, refresh=a.refresh))
    ctl.out(o, lambda: print("\n".join([*_order_lines(o), f"  order URL: {o.order_url or '-'}"])))


async def cmd_pending(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.pending_cmd == "discard":
        r = await ctl.call("DiscardPending", pb.DiscardPendingRequest(peer_id=a.peer, slot=_slot(a)))
        ctl.out(r, lambda: print(f"pending certificate of {a.peer} discarded"))
        return
    p = await ctl.call("GetPending", pb.GetPendingRequest(peer_id=a.peer, slot=_slot(a)))
    c = p.certificate

    def human() -> None:
        print(f"pending certificate of peer {p.peer_id}" + (f" (domain {p.slot.domain})" if p.slot.domain else ""))
        for label, value in (("subject", c.subject), ("names", ", ".join(c.sans)), ("issuer", c.issuer),
                             ("serial", c.serial_hex), ("valid from", c.not_before), ("valid until", c.not_after),
                             ("key type", c.key_type),
                             ("peer's key", ("MATCHES" if c.matches_peer_key else "DOES NOT MATCH") + f" ({c.key_check})"),
                             ("sha256", c.sha256_fingerprint), ("provider", p.provider), ("signed at", p.signed_at)):
            print(f"  {label + ':':13} {value}")
        if a.pem:
            print(p.chain_pem, end="")

    ctl.out(p, human)


def _deploy_lines(r: Any, verb: str) -> None:
    state = "ok" if r.ok else "FAILED"
    print(f"{verb} on peer {r.peer_id}" + (f" (domain {r.slot.domain})" if r.slot.domain else "")
          + f": {state}; active {r.active_serial_hex or '-'}, previous {r.previous_serial_hex or '-'}")
    for reload in r.reloads:
        print(f"  reload {reload.target}: {'ok' if reload.ok else 'FAILED'} ({reload.seconds * 1000:.0f} ms)"
              + (f" {reload.detail}" if reload.detail else ""))


async def cmd_deploy(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("Deploy", pb.DeployRequest(peer_id=a.peer, slot=_slot(a)), timeout=max(ctl.args.timeout, 120))
    ctl.out(r, lambda: _deploy_lines(r, "deployed"))
    if not r.ok:
        raise errors.FailedPrecondition(f"deploy on {a.peer}: {r.error}")


async def cmd_rollback(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("Rollback", pb.RollbackRequest(peer_id=a.peer, slot=_slot(a)), timeout=max(ctl.args.timeout, 120))
    ctl.out(r, lambda: _deploy_lines(r, "rolled back"))
    if not r.ok:
        raise errors.FailedPrecondition(f"rollback on {a.peer}: {r.error}")


async def cmd_rollout(ctl: Ctl, a: argparse.Namespace) -> None:
    peers = [p for p in (a.peers or "").split(",") if p]
    request = pb.RolloutRequest(peer_ids=peers, all=a.all, batch=a.batch, rollback_on_failure=a.rollback_on_failure,
                                slot=_slot(a))
    failed = False
    try:
        async for event in ctl.stub.Rollout(request, timeout=a.rollout_timeout):
            failed = failed or event.stage in ("failed", "stopped")
            if ctl.args.json:
                print(json.dumps(_dict(event)), flush=True)
            else:
                who = f"{event.peer_id}: " if event.peer_id else ""
                serial = f" [{event.serial_hex}]" if event.serial_hex else ""
                print(f"{who}{event.stage}{serial}" + (f" - {event.detail}" if event.detail else ""), flush=True)
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc, f"coordinator {ctl.args.coordinator}") from None
    if failed:
        raise errors.FailedPrecondition("the rollout stopped at a failure (see above)")


async def cmd_events(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("ListEvents", pb.ListEventsRequest(peer_id=a.peer, limit=a.limit))
    ctl.out(r, lambda: _print_table(
        [[e.at, e.slot.domain or "server", e.what, e.result, e.serial_hex or "-", e.previous_serial_hex or "-", e.who,
          e.detail[:80]] for e in r.events],
        ["AT", "SLOT", "WHAT", "RESULT", "SERIAL", "PREVIOUS", "WHO", "DETAIL"]))


def _schedule_lines(s: Any) -> None:
    slot = s.slot.domain or "server"
    mode = "automatic" if s.auto else "manual"
    print(f"{s.peer_id} {slot}: {mode}; deploy on {s.days} at {s.time} ({s.tz}); key policy {s.key_policy}")
    for label, value in (("renewal due", f"{s.renewal_due_at} ({s.renewal_reason})" if s.renewal_due_at else "-"),
                         ("next sign opportunity", s.next_sign_opportunity or "-"),
                         ("next deploy slot", s.next_deploy_slot or "-"),
                         ("last sign", f"{s.last_sign_status} {s.last_sign_at}".strip() or "-"),
                         ("last deploy", f"{s.last_deploy_status} {s.last_deploy_at}".strip() or "-")):
        print(f"  {label + ':':23} {value}")
    if s.failures:
        print(f"  {'failures:':23} {s.failures}, next try not before {s.retry_at}")
    if s.warning:
        print(f"  WARNING: {s.warning}")


async def cmd_schedule(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.schedule_cmd == "set":
        r = await ctl.call("SetSchedule", pb.SetScheduleRequest(
            peer_id=a.peer, slot=_slot(a), auto=a.auto or "", days=a.days or "", time=a.time or "", tz=a.tz or "",
            key_policy=a.key_policy or ""))
        ctl.out(r, lambda: _schedule_lines(r))
    else:
        r = await ctl.call("GetSchedule", pb.GetScheduleRequest(peer_id=a.peer))
        ctl.out(r, lambda: [_schedule_lines(s) for s in r.slots] or print(f"peer {a.peer} has no certificate slot yet"))


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CtlError(f"cannot read the {what} {path}: {exc.strerror}") from None


async def cmd_revoke(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("Revoke", pb.RevokeRequest(certificate=_read_file(a.certfile, "certificate file"),
                                                  provider=a.provider or "", reason=a.reason, force=a.force),
                       timeout=max(ctl.args.timeout, 300))
    ctl.out(r, lambda: print(f"certificate {r.serial_hex} revoked at provider {r.provider} (reason {r.reason})\n"
                             f"  authorised by: {r.authorization}\n  the CA answered: {r.ca_answer}"))


def _trust_rows(certs: list[Any]) -> None:
    _print_table([[c.sha256, "root" if c.self_signed else "intermediate", c.subject, c.not_after[:19],
                   "" if c.added else "(already trusted)"] for c in certs],
                 ["SHA256", "KIND", "SUBJECT", "NOT AFTER", ""])


async def cmd_trust(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.trust_cmd == "add":
        r = await ctl.call("TrustAdd", pb.TrustAddRequest(certificates=_read_file(a.file, "certificate file")))
        ctl.out(r, lambda: _trust_rows(list(r.certificates)))
    elif a.trust_cmd == "list":
        r = await ctl.call("TrustList", pb.TrustListRequest())
        ctl.out(r, lambda: _trust_rows(list(r.certificates)) if r.certificates else print("the trust store is empty"))
    elif a.trust_cmd == "remove":
        r = await ctl.call("TrustRemove", pb.TrustRemoveRequest(sha256=a.sha256))
        ctl.out(r, lambda: print(f"removed {r.certificates[0].subject} ({r.certificates[0].sha256})"))
    else:
        r = await ctl.call("TrustVerify", pb.TrustVerifyRequest(peer_id=a.peer, slot=_slot(a), active=a.active))
        ctl.out(r, lambda: print(f"{r.which} certificate {r.serial_hex} of {a.peer}: "
                                 + ("VALID: " + " <- ".join(r.path) if r.ok else f"NOT VALID: {r.reason}")))
        if not r.ok:
            raise errors.FailedPrecondition(f"the chain does not validate against the trust store: {r.reason}")


STATUS_HEADER = ["PEER", "LIVENESS", "ACME", "SLOT", "CSR NAMES", "ACTIVE", "PENDING", "LAST SIGN", "LAST DEPLOY",
                 "DISK=ETCD", "MODE", "RENEWAL DUE", "NEXT"]


async def cmd_status(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("Status", pb.StatusRequest(peer_id=a.peer or ""))

    def human() -> None:
        rows = []
        for ps in r.peers:
            p = ps.peer
            base = [p.peer_id, "alive" if p.alive else "DEAD", "enabled" if p.enabled else "disabled"]
            if not ps.slots:
                rows.append([*base] + ["-"] * (len(STATUS_HEADER) - len(base)))
            for s in ps.slots:
                last = f"{s.last_sign_status} {s.last_sign_at}" if s.last_sign_status else "-"
                pending = f"{s.pending_serial} until {s.pending_not_after}" if s.pending_serial else "-"
                active = f"{s.active_serial} until {s.active_not_after}" if s.active_serial else "-"
                deployed = f"{s.last_deploy_status} {s.last_deploy_at}" if s.last_deploy_status else "-"
                sched = s.schedule
                mode = "auto" if sched.auto else "manual"
                due = sched.renewal_due_at or "-"
                upcoming = sched.next_sign_opportunity or (f"deploy {sched.next_deploy_slot}" if sched.next_deploy_slot else "-")
                rows.append([*base, s.slot.domain or "server", s.csr_names or "-", active, pending, last, deployed,
                             "yes" if s.agent_matches else "NO", mode, due, upcoming])
        _print_table(rows, STATUS_HEADER)
        for ps in r.peers:
            for s in ps.slots:
                slot = f"{ps.peer.peer_id} {s.slot.domain or 'server'}"
                if s.last_sign_error:
                    print(f"{slot}: last sign failed: {s.last_sign_error}")
                if s.last_deploy_error:
                    print(f"{slot}: last deploy: {s.last_deploy_error}")
                if not s.agent_matches and s.agent_state:
                    print(f"{slot}: {s.agent_state}")
                if s.schedule.warning:
                    print(f"{slot}: WARNING: {s.schedule.warning}")

    ctl.out(r, human)


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="acmectl", description="Operate a clusteracme cluster.")
    p.add_argument("--coordinator", default=env("ACMECTL_COORDINATOR", "127.0.0.1:7443"), help="host:port")
    p.add_argument("--ca", default=env("ACMECTL_CA"), help="cluster CA certificate (PEM)")
    p.add_argument("--cert", default=env("ACMECTL_CERT"), help="operator certificate (PEM)")
    p.add_argument("--key", default=env("ACMECTL_KEY"), help="operator key (PEM)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("pki", help="cluster CA and mTLS certificates").add_subparsers(dest="pki_cmd", required=True)
    x = s.add_parser("init", help="create the cluster CA")
    x.add_argument("dir")
    x.add_argument("--cluster", default="clusteracme")
    x = s.add_parser("issue", help="issue a certificate for a coordinator, agent or operator")
    x.add_argument("dir", help="directory of the cluster CA")
    x.add_argument("--role", required=True, choices=[r.value for r in pki.Role])
    x.add_argument("--name", required=True)
    x.add_argument("--ip", action="append", default=[], help="IP address SAN (repeatable)")
    x.add_argument("--dns", action="append", default=[], help="DNS name SAN (repeatable)")
    x.add_argument("--out", help="output directory (default: the CA directory)")
    x = s.add_parser("secret", help="create the account-key encryption key file")
    x.add_argument("file")

    s = sub.add_parser("provider", help="ACME providers").add_subparsers(dest="provider_cmd", required=True)
    x = s.add_parser("add")
    x.add_argument("name", help="a name, or a preset: letsencrypt, letsencrypt-staging")
    x.add_argument("--directory", help="ACME directory URL (optional for presets)")
    x.add_argument("--ca-bundle", help="PEM file of CAs that verify the directory's TLS")
    s.add_parser("list")

    s = sub.add_parser("account", help="ACME accounts").add_subparsers(dest="account_cmd", required=True)
    x = s.add_parser("register")
    x.add_argument("--provider", required=True)
    x.add_argument("--email", required=True)
    x.add_argument("--agree-tos", action="store_true", help="accept the provider's terms of service")
    x.add_argument("--eab-kid", help="External Account Binding key id (CAs that require EAB)")
    x.add_argument("--eab-hmac-key", help="External Account Binding MAC key, base64url")

    s = sub.add_parser("peer", help="peers").add_subparsers(dest="peer_cmd", required=True)
    s.add_parser("list")
    for name in ("enable", "disable", "remove"):
        s.add_parser(name).add_argument("peer")

    s = sub.add_parser("csr", help="certificate signing requests").add_subparsers(dest="csr_cmd", required=True)
    x = s.add_parser("create", help="have the peer generate a key and a CSR")
    x.add_argument("peer")
    x.add_argument("--cn", required=True)
    x.add_argument("--san", action="append", default=[])
    x.add_argument("--key-type", default="ec-p256", help=", ".join(KEY_TYPES))
    x.add_argument("--domain", help="a domain (SNI) slot instead of the server certificate")

    x = sub.add_parser("sign", help="sign the peer's CSR through ACME")
    x.add_argument("peer")
    x.add_argument("--wait", action="store_true", help="follow the order until it ends")
    x.add_argument("--wait-timeout", type=float, default=600.0)
    x.add_argument("--force", action="store_true", help="skip the DNS part of the preflight")
    x.add_argument("--provider")
    x.add_argument("--domain")

    s = sub.add_parser("order", help="orders").add_subparsers(dest="order_cmd", required=True)
    x = s.add_parser("show")
    x.add_argument("order_id")
    x.add_argument("--refresh", action="store_true", help="ask the CA for the live authorization statuses")

    s = sub.add_parser("pending", help="pending certificates").add_subparsers(dest="pending_cmd", required=True)
    for name in ("show", "discard"):
        x = s.add_parser(name)
        x.add_argument("peer")
        x.add_argument("--domain")
        if name == "show":
            x.add_argument("--pem", action="store_true", help="also print the chain")

    for name, text in (("deploy", "install the pending certificate as the active one, without restarts"),
                       ("rollback", "swap the previous certificate back in")):
        x = sub.add_parser(name, help=text)
        x.add_argument("peer")
        x.add_argument("--domain")

    x = sub.add_parser("rollout", help="deploy pending certificates peer by peer, verifying each by a TLS handshake")
    x.add_argument("--peers", help="comma-separated peer ids, in order")
    x.add_argument("--all", action="store_true", help="every peer with a pending certificate")
    x.add_argument("--batch", type=int, default=1, help="peers deployed at once")
    x.add_argument("--rollback-on-failure", action="store_true")
    x.add_argument("--domain")
    x.add_argument("--rollout-timeout", type=float, default=3600.0)

    s = sub.add_parser("schedule", help="automatic renewal").add_subparsers(dest="schedule_cmd", required=True)
    x = s.add_parser("set", help="automatic mode, deploy days and time, key policy")
    x.add_argument("peer")
    x.add_argument("--domain")
    x.add_argument("--auto", choices=("on", "off"))
    x.add_argument("--days", help="mon,tue,... or all, weekdays, weekend")
    x.add_argument("--time", help="HH:MM[:SS] deploy time, or 'now' (deploy as soon as signed)")
    x.add_argument("--tz", help="IANA time zone of days and time, e.g. Europe/Paris")
    x.add_argument("--key-policy", choices=("rotate", "reuse"))
    x = s.add_parser("show")
    x.add_argument("peer")

    x = sub.add_parser("revoke", help="revoke a certificate (PEM or DER, leaf or chain)")
    x.add_argument("certfile")
    x.add_argument("--provider", help="the CA to ask (default: the one that issued it)")
    x.add_argument("--reason", default="unspecified",
                   choices=("unspecified", "keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged"))
    x.add_argument("--force", action="store_true", help="revoke even if it is active on a peer")

    s = sub.add_parser("trust", help="the CA certificates the cluster trusts").add_subparsers(dest="trust_cmd",
                                                                                              required=True)
    s.add_parser("add").add_argument("file", help="PEM file with one or more CA certificates, or one DER certificate")
    s.add_parser("list")
    s.add_parser("remove").add_argument("sha256")
    x = s.add_parser("verify", help="validate a peer's pending (or --active) chain against the trust store")
    x.add_argument("peer")
    x.add_argument("--domain")
    x.add_argument("--active", action="store_true")

    x = sub.add_parser("events", help="a peer's history: signs, deploys, rollbacks, discards")
    x.add_argument("peer")
    x.add_argument("--limit", type=int, default=0)

    x = sub.add_parser("status", help="per-peer status")
    x.add_argument("peer", nargs="?")
    return p


COMMANDS = {"provider": cmd_provider, "account": cmd_account, "peer": cmd_peer, "csr": cmd_csr, "sign": cmd_sign,
            "order": cmd_order, "pending": cmd_pending, "status": cmd_status, "deploy": cmd_deploy,
            "rollback": cmd_rollback, "rollout": cmd_rollout, "events": cmd_events, "schedule": cmd_schedule,
            "revoke": cmd_revoke, "trust": cmd_trust}


async def _run(args: argparse.Namespace) -> None:
    ctl = Ctl(args)
    try:
        if args.cmd == "pki":
            cmd_pki(ctl, args)
        else:
            await COMMANDS[args.cmd](ctl, args)
    finally:
        await ctl.close()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        asyncio.run(_run(args))
    except errors.ClusterAcmeError as exc:
        print(f"acmectl: {exc.message}", file=sys.stderr)
        sys.exit(next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 1))
    except CtlError as exc:
        print(f"acmectl: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
