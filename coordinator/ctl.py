"""acmectl: the operator CLI. Thin: parse, call the CoordinatorService, print.

Connection settings come from flags or the environment (ACMECTL_COORDINATOR,
ACMECTL_CA, ACMECTL_CERT, ACMECTL_KEY). ``--coordinator`` is a comma-separated
list of the coordinator replicas (like etcdctl's ``--endpoints``): every call
goes to whichever replica takes it, following a standby's redirect to the
leader (``clusteracme.failover`` holds the rule: what is retried where).
Every call has one deadline, ``--timeout``, across those retries. Errors
print one human sentence on stderr and exit non-zero; ``--json`` prints
machine-readable output instead of tables.

Everything the coordinator answers is remote text (a CA's problem details,
hook output from a peer, certificate subjects, error sentences): before it is
printed for a human, its control characters are escaped
(``clusteracme.safetext``); JSON output escapes them itself.
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

from google.protobuf.json_format import MessageToDict

from clusteracme import errors, pki
from clusteracme.failover import READ_METHODS, ReplicaClient, parse_endpoints
from clusteracme.rpcutil import TLSFiles
from clusteracme.safetext import safe_message, terminal_safe
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from coordinator import imports

KEY_TYPES = {
    "ec-p256": common_pb2.KEY_TYPE_EC_P256,
    "ec-p384": common_pb2.KEY_TYPE_EC_P384,
    "rsa-2048": common_pb2.KEY_TYPE_RSA_2048,
    "rsa-3072": common_pb2.KEY_TYPE_RSA_3072,
    "rsa-4096": common_pb2.KEY_TYPE_RSA_4096,
}
EAB_KEY_ENV = "ACMECTL_EAB_HMAC_KEY"
EAB_KEY_FILE_MAX = 4096
MULTILINE_FIELDS = ("clusteracme.v1.Alarm.detail",)  # shown by _one_line: its first line; *_pem fields keep lines too
EXIT_CODES = {errors.InvalidArgument: 2, errors.NotFound: 3, errors.FailedPrecondition: 4, errors.Unavailable: 5}


class CtlError(Exception):
    pass


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    rows = [[terminal_safe(str(c)) for c in row] for row in rows]  # one line per row, whatever a cell holds
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class Ctl:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._client: ReplicaClient | None = None

    @property
    def client(self) -> ReplicaClient:
        """The coordinator replicas of --coordinator, checked on first use (``pki`` needs none)."""
        if self._client is None:
            a = self.args
            endpoints = parse_endpoints(a.coordinator, "--coordinator (or ACMECTL_COORDINATOR)")
            missing = [n for n, v in (("--ca", a.ca), ("--cert", a.cert), ("--key", a.key)) if not v]
            if missing:
                raise CtlError("missing " + ", ".join(missing) + " (or ACMECTL_CA/ACMECTL_CERT/ACMECTL_KEY)")
            self._client = ReplicaClient(TLSFiles(Path(a.ca), Path(a.cert), Path(a.key)), endpoints,
                                         pki.COORDINATOR_SERVER_NAME)
        return self._client

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return self.shown(await self.client.unary(method, request, read=method in READ_METHODS,
                                                  timeout=timeout or self.args.timeout))

    def shown(self, msg: Any) -> Any:
        """An answer as it may be printed: for human output, a copy whose
        strings have their control characters escaped (remote text never
        drives the terminal); ``--json`` output is escaped by json.dumps."""
        return msg if self.args.json else safe_message(msg, MULTILINE_FIELDS)

    @property
    def answered_last(self) -> str | None:
        """The endpoint of the replica that answered last (None before any call)."""
        return self._client.answered_last if self._client is not None else None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    def out(self, msg: Any, human: Callable[[], None]) -> None:
        if self.args.json:
            print(json.dumps(_dict(msg), indent=2))
        else:
            human()


# --- pki (init, issue, secret: local files; revoke, denied: the coordinator) ----------
def _denied_rows(identities: list[Any]) -> None:
    _print_table([[d.common_name, d.serial_hex, d.not_after[:19], d.denied_at[:19], d.denied_by, _one_line(d.reason),
                   d.sha256] for d in identities],
                 ["IDENTITY", "SERIAL", "NOT AFTER", "DENIED AT", "BY", "REASON", "SHA256"])


def _denied_line(d: Any) -> str:
    return (f"certificate {d.serial_hex} of {d.common_name} denied (sha256 {d.sha256}): every coordinator and "
            f"agent refuses it from now on")


async def cmd_pki(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.pki_cmd == "init":
        path = pki.init_ca(Path(a.dir), cluster=a.cluster)
        print(f"cluster CA written to {path} (key {Path(a.dir) / pki.CA_KEY}, mode 0600); keep this directory "
              "offline: issue certificates here with --out DIR and copy only DIR and ca.pem to the nodes")
    elif a.pki_cmd == "issue":
        identity = pki.Identity.parse(f"{a.role}:{a.name}")
        out = Path(a.out)
        pki.check_out_dir(Path(a.dir), out)
        cert, key = pki.issue(Path(a.dir), identity, out_dir=out, ips=a.ip, dns_names=a.dns)
        print(f"{identity.common_name}: certificate {cert}, key {key}")
    elif a.pki_cmd == "revoke":
        data = _read_small_file(a.certfile, "certificate file", 64 * 1024)
        d = await ctl.call("RevokeIdentity", pb.RevokeIdentityRequest(certificate=data, reason=a.reason or ""))
        ctl.out(d, lambda: print(_denied_line(d)))
    elif a.pki_cmd == "denied":
        r = await ctl.call("ListDenied", pb.ListDeniedRequest())
        ctl.out(r, lambda: _denied_rows(list(r.identities)) if r.identities else
                print("no certificate is denied"))
    elif a.pki_cmd == "secret":
        pki.create_secret(Path(a.file))
        print(f"account-key encryption key written to {a.file} (mode 0600); keep a copy: without it the "
              "stored ACME account keys cannot be opened")


# --- providers and accounts -----------------------------------------------------
def _provider_rows(providers: list[Any]) -> None:
    _print_table([[p.name, "yes" if p.is_default else "", p.directory_url, p.account_url or "-",
                   p.account_status or "no account"] for p in providers],
                 ["PROVIDER", "DEFAULT", "DIRECTORY", "ACCOUNT", "STATUS"])


def _no_account_note(name: str, providers: list[Any]) -> str:
    """" (no account yet: ...)" when the provider just chosen cannot sign yet
    (it is accepted all the same: the account may be registered next)."""
    if not name or any(p.name == name and p.account_url for p in providers):
        return ""
    return f" (no account yet: acmectl account register --provider {name})"


async def _provider_note(ctl: Ctl, name: str) -> str:
    """``_no_account_note`` for a provider given on the command line ("" for
    none or "default": nothing is saved then). Best effort: asked after the
    change succeeded, so a failed lookup never turns it into an error."""
    if not name or name == "default":
        return ""
    try:
        r = await ctl.call("ListProviders", pb.ListProvidersRequest())
    except Exception:  # noqa: BLE001 (the command succeeded; only its note is missing)
        return ""
    return _no_account_note(name, list(r.providers))


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
    elif a.provider_cmd == "default":
        if bool(a.name) == a.clear:
            raise CtlError("provider default takes a provider NAME, or --clear")
        r = await ctl.call("SetDefaultProvider", pb.SetDefaultProviderRequest(provider=a.name or ""))
        note = _no_account_note(r.default_provider, list(r.providers))
        ctl.out(r, lambda: print(f"cluster default provider: {r.default_provider} (signs for every slot that has "
                                 f"no provider of its own){note}" if r.default_provider else
                                 "no cluster default provider: slots without a provider of their own sign with the "
                                 "only provider that has an account"))
    else:
        r = await ctl.call("ListProviders", pb.ListProvidersRequest())
        ctl.out(r, lambda: _provider_rows(list(r.providers)))


def _eab_hmac_key(a: argparse.Namespace) -> str:
    """The EAB MAC key from --eab-hmac-key-file, else from $ACMECTL_EAB_HMAC_KEY ("" for none):
    never from the command line, where every local user reads it (ps, /proc/PID/cmdline)."""
    if a.eab_hmac_key is not None:
        raise CtlError("--eab-hmac-key is not taken: a key on the command line is visible to every local user "
                       f"(ps); give it with --eab-hmac-key-file FILE or in {EAB_KEY_ENV}")
    if a.eab_hmac_key_file is not None:
        source = f"the EAB MAC key file {a.eab_hmac_key_file}"
        try:
            with open(a.eab_hmac_key_file, "rb") as f:
                raw = f.read(EAB_KEY_FILE_MAX + 1)
        except OSError as exc:
            raise CtlError(f"cannot read {source}: {exc.strerror or exc}") from None
        if len(raw) > EAB_KEY_FILE_MAX:
            raise CtlError(f"{source} is larger than {EAB_KEY_FILE_MAX} bytes; it should hold only the MAC key")
        try:
            key = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise CtlError(f"{source} is not text: it should hold only the base64url MAC key") from None
        if not key:
            raise CtlError(f"{source} is empty")
    else:
        source = f"${EAB_KEY_ENV}"
        key = (os.environ.get(EAB_KEY_ENV) or "").strip()
        if not key:
            if a.eab_kid and os.environ.get(EAB_KEY_ENV) is not None:
                raise CtlError(f"{source} is empty")
            if a.eab_kid:
                raise CtlError(f"--eab-kid needs the MAC key: --eab-hmac-key-file FILE or {EAB_KEY_ENV}")
            return ""
    if not key.isascii() or not key.isprintable() or " " in key:
        raise CtlError(f"{source} holds more than one word or a control character; it should hold only the "
                       "base64url MAC key")
    if not a.eab_kid:
        raise CtlError(f"the EAB MAC key ({source}) needs --eab-kid, the key id the CA issued with it"
                       + (f"; or unset {EAB_KEY_ENV}" if a.eab_hmac_key_file is None else ""))
    return key


async def cmd_account(ctl: Ctl, a: argparse.Namespace) -> None:
    p = await ctl.call("RegisterAccount", pb.RegisterAccountRequest(
        provider=a.provider, email=a.email, agree_tos=a.agree_tos, eab_kid=a.eab_kid or "",
        eab_hmac_key=_eab_hmac_key(a)))
    ctl.out(p, lambda: print(f"account registered with {p.name}: {p.account_url} ({p.account_status})"))


# --- peers ------------------------------------------------------------------------
async def cmd_peer(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.peer_cmd == "list":
        r = await ctl.call("ListPeers", pb.ListPeersRequest())
        ctl.out(r, lambda: _print_table(
            [[p.peer_id, "BLOCKED" if p.blocked else "alive" if p.alive else "DEAD",
              "enabled" if p.enabled else "disabled", ",".join(p.addresses),
              p.http_front, p.front_mode, p.grpc_endpoint, p.version] for p in r.peers],
            ["PEER", "LIVENESS", "ACME", "ADDRESSES", "FRONT", "MODE", "GRPC", "VERSION"]))
    elif a.peer_cmd in ("enable", "disable"):
        p = await ctl.call("SetPeerEnabled", pb.SetPeerEnabledRequest(peer_id=a.peer, enabled=a.peer_cmd == "enable"))
        ctl.out(p, lambda: print(f"ACME {'enabled' if p.enabled else 'disabled'} on peer {p.peer_id}"))
    elif a.peer_cmd == "block":
        d = await ctl.call("BlockPeer", pb.BlockPeerRequest(peer_id=a.peer, reason=a.reason or ""))
        ctl.out(d, lambda: print(f"peer {a.peer} blocked: {_denied_line(d)}; it stays listed (dead once its "
                                 f"lease runs out); acmectl peer remove {a.peer} removes it"))
    else:
        r = await ctl.call("RemovePeer", pb.RemovePeerRequest(peer_id=a.peer, force=a.force))
        ctl.out(r, lambda: print(f"peer {a.peer} removed" + (" (its certificate denied)" if a.force else "")))


# --- CSR, sign, orders, pending -----------------------------------------------------
def _slot(a: argparse.Namespace) -> common_pb2.Slot:
    return common_pb2.Slot(domain=getattr(a, "domain", "") or "")


# (option, CsrSubject field, RFC 4514 name)
SUBJECT_OPTIONS = (("org", "organization", "O"), ("ou", "organizational_unit", "OU"), ("locality", "locality", "L"),
                   ("state", "state", "ST"), ("country", "country", "C"))
SUBJECT_NOTE = ("The CA may drop O, OU, L, ST and C: Let's Encrypt (like every domain-validated CA) issues "
                "certificates whose subject holds no such attribute.")


def _csr_lines(r: Any) -> None:
    print(f"CSR of peer {r.peer_id}" + (f" (domain {r.slot.domain})" if r.slot.domain else ""))
    rows = [("subject", r.subject_text)]
    rows += [(f"  {short}", getattr(r.subject, field)) for _, field, short in SUBJECT_OPTIONS
             if getattr(r.subject, field)]
    rows += [("names", ", ".join(r.names)), ("key type", r.key_type), ("key sha256", r.public_key_sha256),
             ("created at", r.created_at), ("provider", r.provider or "- (none saved: the cluster default applies)")]
    for label, value in rows:
        print(f"  {label + ':':13} {value}")


async def cmd_csr(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.csr_cmd == "show":
        r = await ctl.call("GetCSR", pb.GetCSRRequest(peer_id=a.peer, slot=_slot(a)))
        if a.pem and not ctl.args.json:  # --json wins, as for pending show: the JSON holds csr_pem
            print(r.csr_pem, end="")  # just the PEM, for any CA: acmectl csr show PEER --pem > peer.csr
            return
        ctl.out(r, lambda: _csr_lines(r))
        return
    if a.key_type not in KEY_TYPES:
        raise errors.InvalidArgument(f"unknown key type {a.key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    subject = {}
    for option, field, _ in SUBJECT_OPTIONS:
        value = getattr(a, option)
        if value == "":
            raise errors.InvalidArgument(f"--{option} is empty; give a value or leave the option out")
        if value is not None:
            subject[field] = value
    r = await ctl.call("CreateCSR", pb.CreateCSRRequest(
        peer_id=a.peer, slot=_slot(a), common_name=a.cn, sans=a.san, key_type=KEY_TYPES[a.key_type],
        subject=common_pb2.CsrSubject(**subject), provider=a.provider or ""), timeout=60)
    note = "" if ctl.args.json else await _provider_note(ctl, a.provider or "")

    def human() -> None:
        print(f"CSR created on peer {r.peer_id} ({r.key_type}, key kept on the peer) for {', '.join(r.names)}")
        if subject:
            print(f"  subject: {r.subject_text} (the CA may drop O, OU, L, ST, C)")
        else:
            print(f"  subject: {r.subject_text} (no O, OU, L, ST or C: a new CSR has only the attributes given)")
        if r.provider:
            print(f"  provider: {r.provider} (saved with the slot){note}")
        elif a.provider == "default":
            print("  provider: none saved (the cluster default applies)")
        print(r.csr_pem, end="")

    ctl.out(r, human)


def _dns_lines(reports: list[Any]) -> list[str]:
    """Per name, each address DNS gives (A, then AAAA) and the peers it
    belongs to: "A 127.0.0.2 -> peer1", "AAAA 2001:db8::9 -> no registered peer"."""
    lines = []
    for r in reports:
        lines.append(f"  dns {r.name}:")
        for x in r.addresses:
            if not x.address:  # an order from before the addresses were kept: its peers only
                lines.append(f"    -> {', '.join(x.peer_ids) or 'no peer'} (addresses not recorded)")
                continue
            rdtype = "AAAA" if x.family == "IPv6" else "A"
            owners = ", ".join(x.peer_ids) or "no registered peer"
            lines.append(f"    {rdtype} {x.address} -> {owners}")
        if r.problem:
            lines.append(f"    problem: {r.problem}")
    return lines


def _order_lines(o: Any) -> list[str]:
    phase = o.phase + (f" (position {o.queue_position} in the admission queue)" if o.queue_position else "")
    lines = [f"order {o.order_id} for peer {o.peer_id}: {phase}" + (f" - {o.error}" if o.error else "")]
    for z in o.authorizations:
        if z.name:
            lines.append(f"  authorization {z.name}: {z.status}")
    lines += _dns_lines(list(o.dns))
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


async def cmd_preflight(ctl: Ctl, a: argparse.Namespace) -> None:
    """A sign's dry run: the sign's own preconditions that are not met (the
    reports without a name), then what DNS says now about the slot's names,
    per name and family; exits 4 (like a refused sign) when a sign would be
    refused."""
    r = await ctl.call("Preflight", pb.PreflightRequest(peer_id=a.peer, slot=_slot(a)))
    slot = f" (domain {a.domain})" if a.domain else ""
    refusals = [n.problem for n in r.names if not n.name]
    names = [n for n in r.names if n.name]
    problems = [n for n in names if n.problem]
    why = [f"{len(refusals)} precondition(s) not met"] if refusals else []
    why += [f"{len(problems)} name(s) would stop an order"] if problems else []
    ctl.out(r, lambda: print("\n".join([
        f"preflight of peer {a.peer}{slot}: " + ("ok" if r.ok else "a sign would be refused: " + ", ".join(why)),
        *(f"  cannot sign: {refusal}" for refusal in refusals),
        *_dns_lines(names)])))
    if not r.ok:
        raise errors.FailedPrecondition("a sign would be refused: " + "; ".join(
            [*refusals, *(f"{n.name}: {n.problem}" for n in problems)]))


async def cmd_order(ctl: Ctl, a: argparse.Namespace) -> None:
    o = await ctl.call("GetOrder", pb.GetOrderRequest(order_id=a.order_id, refresh=a.refresh))
    ctl.out(o, lambda: print("\n".join([*_order_lines(o), f"  order URL: {o.order_url or '-'}"])))


def _pending_lines(p: Any, pem: bool) -> None:
    c = p.certificate
    print(f"pending certificate of peer {p.peer_id}" + (f" (domain {p.slot.domain})" if p.slot.domain else ""))
    rows = [("subject", c.subject), ("requested subject", p.requested_subject or "-"), ("names", ", ".join(c.sans)),
            ("issuer", c.issuer), ("serial", c.serial_hex), ("valid from", c.not_before), ("valid until", c.not_after),
            ("key type", c.key_type),
            ("peer's key", ("MATCHES" if c.matches_peer_key else "DOES NOT MATCH") + f" ({c.key_check})"),
            ("sha256", c.sha256_fingerprint), ("provider", p.provider), ("signed at", p.signed_at)]
    if p.imported:
        rows.append(("imported", "yes (signed outside ACME; never renewed automatically)"))
    for label, value in rows:
        print(f"  {label + ':':19} {value}")
    if pem:
        print(p.chain_pem, end="")


async def cmd_pending(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.pending_cmd == "discard":
        r = await ctl.call("DiscardPending", pb.DiscardPendingRequest(peer_id=a.peer, slot=_slot(a)))
        ctl.out(r, lambda: print(f"pending certificate of {a.peer} discarded"))
        return
    if a.pending_cmd == "import":
        chain = _read_small_file(a.file, "certificate file", imports.MAX_FILE)
        p = await ctl.call("ImportPending", pb.ImportPendingRequest(peer_id=a.peer, slot=_slot(a), chain=chain))
        if p.chain_pem.count("-----BEGIN CERTIFICATE-----") == 1:
            # On stderr: visible with --json too.
            print("acmectl: note: the file held the leaf only, no intermediate certificates were given; clients "
                  "that lack them cannot build the chain (import the full chain if the CA provides one: acmectl "
                  "pending discard, then import again)", file=sys.stderr)

        def imported() -> None:
            print(f"certificate {p.certificate.serial_hex} imported as the pending certificate (provider manual)")
            _pending_lines(p, False)
            domain = f" --domain {p.slot.domain}" if p.slot.domain else ""
            print(f"next: acmectl trust verify {p.peer_id}{domain}; acmectl deploy {p.peer_id}{domain}")

        ctl.out(p, imported)
        return
    p = await ctl.call("GetPending", pb.GetPendingRequest(peer_id=a.peer, slot=_slot(a)))
    ctl.out(p, lambda: _pending_lines(p, a.pem))


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
    failed = ended = False
    stages: dict[str, list[str]] = {}  # peer -> the stages it reached, in plan order
    # Sent to the leader; redirected or retried only until the first event arrives.
    try:
        async for raw in ctl.client.stream("Rollout", request, read=False, timeout=a.rollout_timeout):
            event = ctl.shown(raw)
            failed = failed or event.stage in ("failed", "stopped")
            if event.peer_id:
                stages.setdefault(event.peer_id, []).append(event.stage)
            else:
                ended = ended or event.stage in ("stopped", "done")  # every rollback it runs is behind it
            if ctl.args.json:
                print(json.dumps(_dict(event)), flush=True)
            else:
                who = f"{event.peer_id}: " if event.peer_id else ""
                serial = f" [{event.serial_hex}]" if event.serial_hex else ""
                print(f"{who}{event.stage}{serial}" + (f" - {event.detail}" if event.detail else ""), flush=True)
    except errors.ClusterAcmeError as exc:
        if not stages:
            raise
        # The stream broke under way (the leader died, the deadline): say exactly where it stopped.
        where = _rollout_where(stages, rollback_on_failure=a.rollback_on_failure and not ended)
        raise type(exc)(f"{exc.message}; the rollout was cut: {where}") from None
    if failed:
        raise errors.FailedPrecondition("the rollout stopped at a failure (see above)")


def _rollout_where(stages: dict[str, list[str]], *, rollback_on_failure: bool) -> str:
    """Where a cut rollout stopped, from the stages each peer reached.

    With ``rollback_on_failure`` a peer whose new certificate went in (it
    reached "reloading") and then "failed" is rolled back next: its rollback
    may be under way when the stream is cut. A second "failed" is the
    rollback's own failure: finished."""
    last = {p: st[-1] for p, st in stages.items() if st}
    rollback_due = {p for p, st in stages.items() if rollback_on_failure and st and st[-1] == "failed"
                    and st.count("failed") == 1 and ("reloading" in st or "verifying" in st)}
    done = [p for p, st in last.items()
            if st in ("verified", "rolled-back", "failed", "skipped") and p not in rollback_due]
    untouched = [p for p, st in last.items() if st == "planned"]
    under_way = [p for p in last if p not in done and p not in untouched]

    def shown(p: str) -> str:
        return f"{p} (failed; its rollback may be under way)" if p in rollback_due else f"{p} ({last[p]})"

    parts = []
    if done:
        parts.append("finished: " + ", ".join(f"{p} ({last[p]})" for p in done))
    if under_way:
        parts.append("under way: " + ", ".join(shown(p) for p in under_way)
                     + " (the leader records what its agent did; check with acmectl status)")
    if untouched:
        parts.append("not touched: " + ", ".join(untouched))
    return "; ".join(parts) + "; run the rollout again for the rest"


async def cmd_events(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("ListEvents", pb.ListEventsRequest(peer_id=a.peer, limit=a.limit))
    ctl.out(r, lambda: _print_table(
        [[e.at, e.slot.domain or "server", e.what, e.result, e.serial_hex or "-", e.previous_serial_hex or "-", e.who,
          e.detail[:80]] for e in r.events],
        ["AT", "SLOT", "WHAT", "RESULT", "SERIAL", "PREVIOUS", "WHO", "DETAIL"]))


def _domain_rows(slots: list[Any]) -> None:
    _print_table([[d.slot.domain or "server", "on" if d.acme_enabled else "OFF", d.names or "-",
                   d.active_serial or "-", str(d.days_left) if d.days_left >= 0 else "-", d.mode,
                   d.provider or "(default)", d.active_provider or "-", d.paused or "-"] for d in slots],
                 ["SLOT", "ACME", "NAMES", "ACTIVE", "DAYS LEFT", "MODE", "PROVIDER", "ISSUED BY", "PAUSED"])


async def cmd_domain(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.domain_cmd == "list":
        r = await ctl.call("ListDomains", pb.ListDomainsRequest(peer_id=a.peer))
        ctl.out(r, lambda: _domain_rows(list(r.slots)) if r.slots else
                print(f"peer {a.peer} has no certificate slot yet (acmectl csr create {a.peer} --cn NAME)"))
        return
    d = await ctl.call("SetDomainAcme", pb.SetDomainAcmeRequest(
        peer_id=a.peer, slot=common_pb2.Slot(domain="" if a.domain == "server" else a.domain),
        enabled=a.domain_cmd == "enable"))
    what = f"domain {d.slot.domain}" if d.slot.domain else "the server certificate"
    ctl.out(d, lambda: print(f"ACME {'enabled' if d.acme_enabled else 'disabled'} for {what} on peer {a.peer}"
                             + ("" if d.acme_enabled else ": never signed nor renewed; it keeps serving "
                                f"{d.active_serial or 'nothing yet'}")))


def _schedule_lines(s: Any) -> None:
    slot = s.slot.domain or "server"
    mode = "automatic" if s.auto else "manual"
    print(f"{s.peer_id} {slot}: {mode}; deploy on {s.days} at {s.time} ({s.tz}); key policy {s.key_policy}")
    if s.paused:
        print(f"  {'paused:':23} {s.paused}")
    for label, value in (("provider", s.provider or "- (none can be chosen)"),
                         ("renewal due", f"{s.renewal_due_at} ({s.renewal_reason})" if s.renewal_due_at else "-"),
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
            key_policy=a.key_policy or "", provider=a.provider or ""))
        note = "" if ctl.args.json else await _provider_note(ctl, a.provider or "")

        def human() -> None:
            _schedule_lines(r)
            if note:
                print(f"  provider {a.provider} saved with the slot{note}")

        ctl.out(r, human)
    else:
        r = await ctl.call("GetSchedule", pb.GetScheduleRequest(peer_id=a.peer))
        ctl.out(r, lambda: [_schedule_lines(s) for s in r.slots] or print(f"peer {a.peer} has no certificate slot yet"))


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CtlError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _read_small_file(path: str, what: str, limit: int) -> bytes:
    """A file of at most ``limit`` bytes; a larger one is refused after
    reading ``limit`` + 1 bytes, never read in full."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise CtlError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise errors.InvalidArgument(f"the {what} {path} is larger than {limit // 1024} KiB; not a certificate chain")
    return data


REVOKE_TIMEOUT = 900.0  # two orders (fresh authorizations, then a new order) and the CA's answers


async def cmd_revoke(ctl: Ctl, a: argparse.Namespace) -> None:
    try:
        r = await ctl.call("Revoke", pb.RevokeRequest(certificate=_read_file(a.certfile, "certificate file"),
                                                      provider=a.provider or "", reason=a.reason, force=a.force),
                           timeout=max(ctl.args.timeout, REVOKE_TIMEOUT))
    except errors.DeadlineExceeded as exc:
        raise errors.DeadlineExceeded(
            f"{exc.message}; the revocation goes on at the coordinator and its outcome is recorded in the "
            "history (acmectl events PEER)") from None
    ctl.out(r, lambda: print(f"certificate {r.serial_hex} revoked at provider {r.provider} (reason {r.reason})\n"
                             + "".join(f"  refused: {why}\n" for why in r.refused)
                             + f"  authorised by: {r.authorization}\n  the CA answered: {r.ca_answer}"))


def _trust_rows(certs: list[Any], *, add: bool = False) -> None:
    """The trust store table; an add answer marks what was already there."""
    _print_table([[c.type or ("root" if c.self_signed else "intermediate"), c.subject, c.issuer, c.not_after[:19],
                   c.sha256, "" if c.added or not add else "(already trusted)"] for c in certs],
                 ["TYPE", "SUBJECT", "ISSUER", "NOT AFTER", "SHA256", ""])


async def cmd_trust(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.trust_cmd == "add":
        if (a.file is None) == (a.preset is None):
            raise CtlError("trust add takes exactly one of FILE and --preset NAME")
        request = (pb.TrustAddRequest(preset=a.preset) if a.preset is not None
                   else pb.TrustAddRequest(certificates=_read_file(a.file, "certificate file")))
        r = await ctl.call("TrustAdd", request)
        ctl.out(r, lambda: _trust_rows(list(r.certificates), add=True))
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


def _alarm_slot(x: Any) -> str:
    return (x.slot.domain or "server") if x.HasField("slot") else "-"


def _one_line(text: str) -> str:
    """A detail (an automatic sign's last error may span lines) on one line:
    its first line, control characters escaped, " [...]" when more follows."""
    first, _, rest = text.strip().partition("\n")
    return terminal_safe(first.rstrip("\r")) + (" [...]" if rest.strip() else "")


def _alarm_line(x: Any) -> str:
    return f"ALARM {x.kind} ({x.severity}) since {x.raised_at}: {_one_line(x.detail)}"


async def cmd_alarms(ctl: Ctl, a: argparse.Namespace) -> None:
    """Exits 0 whether alarms are raised or not: it is a listing (checks read
    ``--json`` or the clusteracme_alarm metric)."""
    r = await ctl.call("ListAlarms", pb.ListAlarmsRequest(peer_id=a.peer or "", all=a.all))

    def human() -> None:
        if not r.alarms:
            print("no alarm " + ("raised or kept" if a.all else "raised") + (f" on peer {a.peer}" if a.peer else ""))
            return
        header = ["KIND", "PEER", "SLOT", "SEVERITY", "RAISED", *(["CLEARED"] if a.all else []), "DETAIL"]
        _print_table([[x.kind, x.peer_id, _alarm_slot(x), x.severity, x.raised_at,
                       *([x.cleared_at or "-"] if a.all else []), _one_line(x.detail)] for x in r.alarms], header)

    ctl.out(r, human)


STATUS_HEADER = ["PEER", "LIVENESS", "ACME", "SLOT", "CSR NAMES", "ACTIVE", "PENDING", "LAST SIGN", "LAST DEPLOY",
                 "DISK=ETCD", "MODE", "RENEWAL DUE", "NEXT"]


async def cmd_status(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("Status", pb.StatusRequest(peer_id=a.peer or ""))

    def human() -> None:
        rows = []
        for ps in r.peers:
            p = ps.peer
            base = [p.peer_id, "BLOCKED" if p.blocked else "alive" if p.alive else "DEAD",
                    "enabled" if p.enabled else "disabled"]
            if not ps.slots:
                rows.append([*base] + ["-"] * (len(STATUS_HEADER) - len(base)))
            for s in ps.slots:
                last = f"{s.last_sign_status} {s.last_sign_at}" if s.last_sign_status else "-"
                pending = f"{s.pending_serial} until {s.pending_not_after}" if s.pending_serial else "-"
                active = f"{s.active_serial} until {s.active_not_after}" if s.active_serial else "-"
                deployed = f"{s.last_deploy_status} {s.last_deploy_at}" if s.last_deploy_status else "-"
                sched = s.schedule
                mode = ("auto" + (" (paused)" if sched.paused else "")) if sched.auto else "manual"
                acme = base[2] if s.acme_enabled or not p.enabled else "off (slot)"
                due = sched.renewal_due_at or "-"
                upcoming = sched.next_sign_opportunity or (f"deploy {sched.next_deploy_slot}" if sched.next_deploy_slot else "-")
                rows.append([*base[:2], acme, s.slot.domain or "server", s.csr_names or "-", active, pending, last,
                             deployed, "yes" if s.agent_matches else "NO", mode, due, upcoming])
        _print_table(rows, STATUS_HEADER)
        for ps in r.peers:
            for x in ps.alarms:
                print(f"{ps.peer.peer_id}: {_alarm_line(x)}")
            for s in ps.slots:
                slot = f"{ps.peer.peer_id} {s.slot.domain or 'server'}"
                if s.last_sign_error:
                    print(f"{slot}: last sign failed: {s.last_sign_error}")
                if s.last_deploy_error:
                    print(f"{slot}: last deploy: {s.last_deploy_error}")
                if not s.agent_matches and s.agent_state:
                    print(f"{slot}: {s.agent_state}")
                if s.schedule.paused:
                    print(f"{slot}: paused: {s.schedule.paused}")
                # Once: a raised renewal-overdue or imported-aging alarm says the same.
                if s.schedule.warning and not any(x.kind in ("renewal-overdue", "imported-aging") for x in s.alarms):
                    print(f"{slot}: WARNING: {s.schedule.warning}")
                for x in s.alarms:
                    print(f"{slot}: {_alarm_line(x)}")

    ctl.out(r, human)


COORDINATORS_HEADER = ["NAME", "ADDRESS", "ROLE", "VERSION", "SINCE"]


async def cmd_coordinators(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("ListCoordinators", pb.ListCoordinatorsRequest())

    def human() -> None:
        _print_table([[c.name + (" *" if c.name == r.answered_by else ""), c.address, c.role, c.version,
                       c.role_since] for c in r.coordinators], COORDINATORS_HEADER)
        print(f"* answered: {r.answered_by or '?'}" + (f" at {ctl.answered_last}" if ctl.answered_last else ""))
        if not r.leader:
            print("no coordinator leads right now (an election is under way): commands wait for one")

    ctl.out(r, human)


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="acmectl", description="Operate a clusteracme cluster.")
    p.add_argument("--coordinator", default=env("ACMECTL_COORDINATOR", "127.0.0.1:7443"),
                   help="host:port of the coordinator, or of each replica: host:port,host:port,... (any replica "
                        "answers; commands follow the leader)")
    p.add_argument("--ca", default=env("ACMECTL_CA"), help="cluster CA certificate (PEM)")
    p.add_argument("--cert", default=env("ACMECTL_CERT"), help="operator certificate (PEM)")
    p.add_argument("--key", default=env("ACMECTL_KEY"), help="operator key (PEM)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="deadline of each call, seconds, across replicas and retries")
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
    x.add_argument("--dns", action="append", default=[],
                   help="DNS name SAN (repeatable); never a name of another identity (coordinator.clusteracme, "
                        "X.agent.clusteracme, ...)")
    x.add_argument("--out", default=".", help="output directory (default: the current directory); never the CA's "
                                              "directory: the pair is copied to the node, the CA key is not")
    x = s.add_parser("secret", help="create the account-key encryption key file")
    x.add_argument("file")
    x = s.add_parser("revoke", help="deny a cluster certificate (operator, coordinator or agent; PEM or DER, issued "
                                    "by the cluster CA): every coordinator and agent refuses it from then on")
    x.add_argument("certfile")
    x.add_argument("--reason", default="", help="why (kept with the entry, shown to the refused caller)")
    s.add_parser("denied", help="the denied cluster certificates")

    s = sub.add_parser("provider", help="ACME providers").add_subparsers(dest="provider_cmd", required=True)
    x = s.add_parser("add")
    x.add_argument("name", help="a name, or a preset: letsencrypt, letsencrypt-staging")
    x.add_argument("--directory", help="ACME directory URL (optional for presets)")
    x.add_argument("--ca-bundle", help="PEM file of CAs that verify the directory's TLS")
    s.add_parser("list", help="providers, their accounts, and which is the cluster default")
    x = s.add_parser("default", help="the provider that signs for slots without a provider of their own")
    x.add_argument("name", nargs="?")
    x.add_argument("--clear", action="store_true", help="no cluster default")

    s = sub.add_parser("account", help="ACME accounts").add_subparsers(dest="account_cmd", required=True)
    x = s.add_parser("register")
    x.add_argument("--provider", required=True)
    x.add_argument("--email", required=True)
    x.add_argument("--agree-tos", action="store_true", help="accept the provider's terms of service")
    x.add_argument("--eab-kid", help="External Account Binding key id (CAs that require EAB)")
    x.add_argument("--eab-hmac-key-file", metavar="FILE",
                   help=f"file holding the External Account Binding MAC key, base64url (surrounding whitespace "
                        f"ignored); or give the key in {EAB_KEY_ENV}. Never on the command line (ps shows it)")
    x.add_argument("--eab-hmac-key", help=argparse.SUPPRESS)  # refused with a pointer to the two ways above

    s = sub.add_parser("peer", help="peers").add_subparsers(dest="peer_cmd", required=True)
    s.add_parser("list")
    for name in ("enable", "disable"):
        s.add_parser(name).add_argument("peer")
    x = s.add_parser("remove", help="remove a dead peer; --force: a live one too, its agent certificate denied first")
    x.add_argument("peer")
    x.add_argument("--force", action="store_true", help="also a live peer: deny its agent certificate (it could "
                                                        "register again otherwise), then remove it")
    x = s.add_parser("block", help="deny the peer's agent certificate; the peer stays listed, blocked: its calls "
                                   "are refused, no certificate may register for it until it is removed")
    x.add_argument("peer")
    x.add_argument("--reason", default="", help="why (kept with the deny-list entry)")

    s = sub.add_parser("csr", help="certificate signing requests").add_subparsers(dest="csr_cmd", required=True)
    x = s.add_parser("create", help="have the peer generate a key and a CSR",
                     description="Have the peer generate a key (kept on the peer) and a CSR for the names, "
                                 "optionally with subject attributes. The subject is part of the CSR: the new "
                                 "CSR has exactly the attributes given here (none given: none, even if the "
                                 "previous CSR had some); a key rotation repeats the saved ones. The provider "
                                 "belongs to the slot: left out, the slot keeps its saved provider. "
                                 + SUBJECT_NOTE)
    x.add_argument("peer")
    x.add_argument("--cn", required=True)
    x.add_argument("--san", action="append", default=[])
    x.add_argument("--key-type", default="ec-p256", help=", ".join(KEY_TYPES))
    x.add_argument("--domain", help="a domain (SNI) slot instead of the server certificate")
    for option, text in (("org", "organization (O), at most 64 characters"),
                         ("ou", "organizational unit (OU), at most 64 characters"),
                         ("locality", "locality or city (L), at most 128 characters"),
                         ("state", "state or province (ST), at most 128 characters"),
                         ("country", "country (C): an ISO 3166-1 two-letter code, e.g. FR or GB (not UK)")):
        x.add_argument(f"--{option}", help=f"subject {text}; the CA may drop it")
    x.add_argument("--provider", help="ACME provider saved with the slot (left out: the slot keeps its saved one)")
    x = s.add_parser("show", help="the stored CSR, decoded (or --pem: just the PEM, to send to any CA)")
    x.add_argument("peer")
    x.add_argument("--domain")
    x.add_argument("--pem", action="store_true", help="print only the CSR in PEM (acmectl csr show P --pem > p.csr); "
                                                      "with --json, the JSON (it holds the PEM as csr_pem)")

    x = sub.add_parser("sign", help="sign the peer's CSR through ACME")
    x.add_argument("peer")
    x.add_argument("--wait", action="store_true", help="follow the order until it ends")
    x.add_argument("--wait-timeout", type=float, default=600.0)
    x.add_argument("--force", action="store_true", help="skip the DNS part of the preflight")
    x.add_argument("--provider")
    x.add_argument("--domain")

    x = sub.add_parser("preflight", help="a sign's dry run: its preconditions (ACME on for the peer and the slot, "
                                         "a provider, a CSR, no pending certificate, no order running) and what "
                                         "DNS says now about the slot's names: A and AAAA records and the peer of "
                                         "each address (exit status 4 when a sign would be refused)")
    x.add_argument("peer")
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
            x.add_argument("--pem", action="store_true", help="also print the chain; with --json, the JSON (it holds "
                                                              "the chain as chain_pem)")
    x = s.add_parser("import", help="store a certificate any CA signed for the slot's CSR as pending (provider "
                                    "manual); then review and deploy as usual")
    x.add_argument("peer")
    x.add_argument("--domain")
    x.add_argument("file", help="the leaf and its intermediates: PEM, DER (the leaf alone) or PKCS#7 (PEM or DER), "
                                "at most 64 KiB; the leaf must be for the key of the slot's current CSR")

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
    x.add_argument("--provider", help="ACME provider saved with the slot; 'default': follow the cluster default")
    x = s.add_parser("show")
    x.add_argument("peer")

    s = sub.add_parser("domain", help="certificate slots of a peer, ACME on/off per slot").add_subparsers(
        dest="domain_cmd", required=True)
    s.add_parser("list", help="every slot: ACME on/off, names, active certificate, days left, mode, provider") \
        .add_argument("peer")
    for name, text in (("enable", "sign and renew this slot through ACME again"),
                       ("disable", "never sign nor renew this slot (it keeps serving what it has; refused while "
                                   "an order runs for it)")):
        x = s.add_parser(name, help=text)
        x.add_argument("peer")
        x.add_argument("domain", help="the domain of the slot, or 'server' for the server certificate")

    x = sub.add_parser("revoke", help="revoke a certificate (PEM or DER, leaf or chain); waits up to "
                       f"{REVOKE_TIMEOUT:g} s or --timeout if longer (it may take two orders); a revocation "
                       "cut off by the deadline still ends at the coordinator and is recorded in the history")
    x.add_argument("certfile")
    x.add_argument("--provider", help="the CA to ask (default: the one that issued it); required for a "
                   "certificate the cluster did not obtain (another CA, or before a reset)")
    x.add_argument("--reason", default="unspecified",
                   choices=("unspecified", "keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged"))
    x.add_argument("--force", action="store_true", help="revoke even if it is active on a peer (or, for a "
                   "certificate not in the records, while a peer cannot be asked whether it serves it)")

    s = sub.add_parser("trust", help="the CA certificates the cluster trusts").add_subparsers(dest="trust_cmd",
                                                                                              required=True)
    x = s.add_parser("add", help="trust the CA certificates of FILE, or of a preset shipped with clusteracme")
    x.add_argument("file", nargs="?", help="PEM file with one or more CA certificates, or one DER certificate")
    x.add_argument("--preset", metavar="NAME",
                   help="instead of FILE: letsencrypt (Let's Encrypt's roots ISRG Root X1 and ISRG Root X2)")
    s.add_parser("list")
    s.add_parser("remove").add_argument("sha256")
    x = s.add_parser("verify", help="validate a peer's pending (or --active) chain against the trust store")
    x.add_argument("peer")
    x.add_argument("--domain")
    x.add_argument("--active", action="store_true")

    x = sub.add_parser("events", help="a peer's history: signs, deploys, rollbacks, discards")
    x.add_argument("peer")
    x.add_argument("--limit", type=int, default=0)

    x = sub.add_parser("alarms", help="raised alarms: renewal overdue, automatic sign failing, expiring, peer dead, "
                                      "disk differs from etcd, imported certificate aging (exit status 0 either "
                                      "way: a listing)")
    x.add_argument("--peer", help="one peer's alarms only")
    x.add_argument("--all", action="store_true", help="cleared alarms too (kept alarms.cleared_retention_seconds)")

    x = sub.add_parser("status", help="per-peer status")
    x.add_argument("peer", nargs="?")

    sub.add_parser("coordinators", help="the coordinator replicas: name, address, leader or standby, version, "
                                        "since when (* marks the replica that answered)")
    return p


COMMANDS = {"provider": cmd_provider, "account": cmd_account, "peer": cmd_peer, "csr": cmd_csr, "sign": cmd_sign,
            "order": cmd_order, "pending": cmd_pending, "status": cmd_status, "deploy": cmd_deploy,
            "rollback": cmd_rollback, "rollout": cmd_rollout, "events": cmd_events, "schedule": cmd_schedule,
            "revoke": cmd_revoke, "trust": cmd_trust, "domain": cmd_domain, "alarms": cmd_alarms,
            "preflight": cmd_preflight, "coordinators": cmd_coordinators}


async def _run(args: argparse.Namespace) -> None:
    ctl = Ctl(args)
    try:
        if args.cmd == "pki":
            await cmd_pki(ctl, args)
        else:
            await COMMANDS[args.cmd](ctl, args)
    finally:
        await ctl.close()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        asyncio.run(_run(args))
    except errors.ClusterAcmeError as exc:
        # The sentence may come from the coordinator, a CA or a peer: one line, control characters escaped.
        print(f"acmectl: {terminal_safe(exc.message)}", file=sys.stderr)
        sys.exit(next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 1))
    except CtlError as exc:
        print(f"acmectl: {terminal_safe(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
