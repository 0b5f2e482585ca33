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
import os
import sys

from clusteracme import errors, pki
from clusteracme.ctl.base import EAB_KEY_ENV, EXIT_CODES, KEY_TYPES, OUTPUT_FORMATS, Ctl, CtlError
from clusteracme.ctl.csr import SUBJECT_NOTE, cmd_csr, cmd_pending
from clusteracme.ctl.deploys import cmd_deploy, cmd_rollback, cmd_rollout
from clusteracme.ctl.orders import cmd_order, cmd_preflight, cmd_sign
from clusteracme.ctl.peers import cmd_coordinators, cmd_peer
from clusteracme.ctl.pki import cmd_pki
from clusteracme.ctl.providers import cmd_account, cmd_provider
from clusteracme.ctl.slots import cmd_domain, cmd_schedule
from clusteracme.ctl.status import cmd_alarms, cmd_events, cmd_status
from clusteracme.ctl.trust import REVOKE_TIMEOUT, cmd_revoke, cmd_trust
from clusteracme.safetext import terminal_safe


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
    p.add_argument("-o", "--output", choices=OUTPUT_FORMATS, help="output format (default table)")
    p.add_argument("--json", action="store_true", help="the same as -o json")
    p.add_argument("--no-headers", action="store_true", help="tables without their header line")
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
