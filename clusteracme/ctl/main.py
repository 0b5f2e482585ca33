# PYTHON_ARGCOMPLETE_OK (argcomplete's global completion looks for this mark in the module of main)
"""acmectl: the operator CLI. Thin: parse, call the CoordinatorService, print.

The global options (:func:`global_options`: connection, --timeout, -o, --json,
--no-headers) are taken anywhere on the line, like kubectl's: the walk at the
end of :func:`parser` copies them onto every subcommand, with a default of
SUPPRESS, so a copy given after the subcommand overrides the top level's and
one left out does not reset it. Every argument is checked while the line is
parsed (``clusteracme.ctl.validate``), the connection settings before the
first call; a refusal is one line, ``acmectl: ...``, exit status 2, and
nothing was called.

Connection settings come from flags or the environment (ACMECTL_COORDINATOR,
ACMECTL_CA, ACMECTL_CERT, ACMECTL_KEY). ``--coordinator`` is a comma-separated
list of the coordinator replicas (like etcdctl's ``--endpoints``): every call
goes to whichever replica takes it, following a standby's redirect to the
leader (``clusteracme.failover`` holds the rule: what is retried where).
Every call has one deadline, ``--timeout``, across those retries. Errors
print one human sentence on stderr and exit non-zero; ``--json`` (the same
as ``-o json``: the last of the two on the line wins) prints
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
from collections.abc import Iterator
from typing import Any, NoReturn

import argcomplete

from clusteracme import __version__, errors, pki
from clusteracme.coordinator import imports
from clusteracme.ctl import completion
from clusteracme.ctl.backup import MAX_FILE_BYTES as BACKUP_FILE_MAX
from clusteracme.ctl.backup import cmd_backup, cmd_restore
from clusteracme.ctl.base import EAB_KEY_ENV, EAB_KEY_FILE_MAX, EXIT_CODES, KEY_TYPES, OUTPUT_FORMATS, Ctl, CtlError
from clusteracme.ctl.completion import cmd_completion
from clusteracme.ctl.csr import CSR_TIMEOUT, SUBJECT_NOTE, cmd_csr, cmd_pending
from clusteracme.ctl.deploys import cmd_deploy, cmd_rollback, cmd_rollout
from clusteracme.ctl.orders import cmd_order, cmd_preflight, cmd_sign, order_list_arguments
from clusteracme.ctl.peers import cmd_coordinators, cmd_peer, cmd_version
from clusteracme.ctl.pki import CERTIFICATE_FILE_MAX, cmd_pki
from clusteracme.ctl.providers import (
    CA_BUNDLE_MAX,
    check_account_register,
    check_provider_default,
    cmd_account,
    cmd_provider,
)
from clusteracme.ctl.slots import cmd_domain, cmd_schedule
from clusteracme.ctl.status import cmd_alarms, cmd_events, cmd_status
from clusteracme.ctl.trust import (
    REVOKE_FILE_MAX,
    REVOKE_TIMEOUT,
    TRUST_FILE_MAX,
    check_trust_add,
    cmd_revoke,
    cmd_trust,
)
from clusteracme.ctl.validate import (
    UNATTACHED,
    Choice,
    ClusterName,
    Domain,
    Hostname,
    Integer,
    LocalPath,
    PeerId,
    PeerList,
    ReadableFile,
    Seconds,
    Sha256,
    Word,
)
from clusteracme.safetext import terminal_safe

DEFAULT_TIMEOUT = 30.0
DAY = 86400.0
MAX_BATCH = 10000  # rollout --batch
MAX_LIMIT = 100000  # events --limit (a peer keeps 500 events, the unattached history 5,000)
EXIT_STATUS = ("exit status: 0 done; 1 another error; 2 invalid input (refused before any call); 3 not found; "
               "4 not possible now (a precondition); 5 unavailable (no coordinator answered)")


class CtlParser(argparse.ArgumentParser):
    """argparse, with its refusals as acmectl's: one line ``acmectl: ...`` on
    stderr, exit status 2 (argparse prints the usage first and prefixes the
    program's name). Options are never abbreviated: with the global options
    on every command, ``--ca`` or ``--key`` would otherwise stand for another
    option of some commands (``--ca-bundle``, ``--key-type``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # First of all: an argument that is not UTF-8 reaches Python as surrogate escapes (PEP 383), which no
        # request, file name or printed line can carry.
        for value in sys.argv[1:] if args is None else args:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                try:
                    raw = value.encode("utf-8", "surrogateescape")  # the bytes given
                except UnicodeEncodeError:
                    raw = value.encode("utf-8", "backslashreplace")
                cut = raw if len(raw) <= 60 else raw[:60] + b"..."
                self.error(f"an argument is not valid UTF-8: {cut!r}; give every argument as UTF-8 text")
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        # Named with the command: "acmectl: events --limit: ...", "acmectl: peer: the following arguments ...".
        command = self.prog.partition(" ")[2]
        text = " ".join(message.split())
        if text.startswith("argument "):
            text = (f"{command} " if command else "") + text.removeprefix("argument ")
        elif command:
            text = f"{command}: {text}"
        self.exit(2, f"acmectl: {terminal_safe(text)}\n")


def global_options() -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """The options every command takes, anywhere on the line: (flags, add_argument keywords with the real default)."""
    env = os.environ.get
    return [
        (("--coordinator",), dict(
            default=env("ACMECTL_COORDINATOR", "127.0.0.1:7443"), metavar="HOST:PORT[,...]",
            help="host:port of the coordinator, or of each replica: host:port,host:port,... (any replica answers; "
                 "commands follow the leader); or ACMECTL_COORDINATOR")),
        (("--ca",), dict(default=env("ACMECTL_CA"), metavar="FILE",
                         help="cluster CA certificate (PEM); or ACMECTL_CA")),
        (("--cert",), dict(default=env("ACMECTL_CERT"), metavar="FILE",
                           help="operator certificate (PEM); or ACMECTL_CERT")),
        (("--key",), dict(default=env("ACMECTL_KEY"), metavar="FILE", help="operator key (PEM); or ACMECTL_KEY")),
        (("--timeout",), dict(type=Seconds(DAY), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                              help=f"deadline of each call, seconds, across replicas and retries (default "
                                   f"{DEFAULT_TIMEOUT:g}; more than 0, at most {DAY:g})")),
        (("-o", "--output"), dict(choices=OUTPUT_FORMATS, help="output format: table (default), wide (every "
                                                               "column), json or yaml (the answer as data)")),
        # The same destination as -o: whichever of the two comes last on the line wins.
        (("--json",), dict(action="store_const", const="json", dest="output",
                           help="the same as -o json (of -o and --json, the last on the line wins)")),
        (("--no-headers",), dict(action="store_true", help="listings without their header line (and notes)")),
    ]


def _add_global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """On the top parser with their defaults; on a subcommand as a copy whose
    default is SUPPRESS (absent: the top level's value stays). An option the
    subcommand defines itself keeps its own meaning there."""
    target = p if top else p.add_argument_group("global options (also before the command)")
    for flags, options in global_options():
        if not top and any(flag in p._option_string_actions for flag in flags):
            continue
        target.add_argument(*flags, **(options if top else {**options, "default": argparse.SUPPRESS}))


def subcommands(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every subcommand parser below ``p``, depth first: (its words, the
    parser, its help line). Aliases are given once."""
    for action in p._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        seen: set[int] = set()
        for name, child in action.choices.items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            yield (*path, name), child, helps.get(name)
            yield from subcommands(child, (*path, name))


def _finish(p: argparse.ArgumentParser) -> None:
    """After the whole tree is built (entries added by any module included):
    the global options on every subcommand, COMMAND and upper-case metavars,
    a description from the help line where none is given, completers for
    peer ids and domains."""
    every = [p, *(child for _, child, _ in subcommands(p))]
    for _, child, help_line in subcommands(p):
        _add_global_options(child, top=False)
        if child.description is None and help_line:
            child.description = help_line[0].upper() + help_line[1:] + ("" if help_line.endswith(".") else ".")
    for parser_ in every:
        for action in parser_._actions:
            if isinstance(action, argparse._SubParsersAction):
                action.metavar = action.metavar or "COMMAND"
            elif not action.option_strings and action.metavar is None:
                action.metavar = action.dest.upper()
            completion.attach(action)


def parser() -> argparse.ArgumentParser:
    p = CtlParser(prog="acmectl", description="Operate a clusteracme cluster. Global options go anywhere on the "
                                              "line: acmectl status --json, acmectl --json status.",
                  epilog=EXIT_STATUS)
    p.add_argument("--version", action="version", version=f"acmectl {__version__}",
                   help="print acmectl's version and exit (acmectl version: the coordinators' too)")
    _add_global_options(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("pki", help="the cluster CA, mTLS certificates, the deny list").add_subparsers(
        dest="pki_cmd", required=True)
    x = s.add_parser("init", help="create the cluster CA (refuses to overwrite one)")
    x.add_argument("dir", type=LocalPath("CA directory"), help="directory of the new cluster CA (keep it offline)")
    x.add_argument("--cluster", default="clusteracme", type=ClusterName(), metavar="NAME",
                   help=f"the cluster's name, in the CA certificate's subject (default clusteracme; 1 to "
                        f"{pki.MAX_CLUSTER_NAME} printable characters)")
    x = s.add_parser("issue", help="issue a certificate for a coordinator, agent or operator")
    x.add_argument("dir", type=LocalPath("CA directory"), help="directory of the cluster CA")
    x.add_argument("--role", required=True, choices=[r.value for r in pki.Role], help="what the identity is")
    x.add_argument("--name", required=True, type=PeerId(), metavar="NAME",
                   help="the identity's name (an agent's: its peer id); " + PeerId.RULE)
    x.add_argument("--ip", action="append", default=[], help="IP address SAN (repeatable)")
    x.add_argument("--dns", action="append", default=[], type=Hostname(), metavar="NAME",
                   help="DNS name SAN (repeatable; " + Hostname.RULE + "); never a name of another identity "
                        "(coordinator.clusteracme, X.agent.clusteracme, ...)")
    x.add_argument("--out", default=".", type=LocalPath("output directory"), metavar="DIR",
                   help="output directory (default: the current directory); never the CA's directory: the pair is "
                        "copied to the node, the CA key is not")
    x = s.add_parser("secret", help="create the account-key encryption key file")
    x.add_argument("file", type=LocalPath("key file"), help="the new key file (mode 0600; refuses to overwrite one)")
    x = s.add_parser("revoke", help="deny a cluster certificate (operator, coordinator or agent; PEM or DER, issued "
                                    "by the cluster CA): every coordinator and agent refuses it from then on")
    x.add_argument("certfile", type=ReadableFile("certificate file", CERTIFICATE_FILE_MAX),
                   help=f"the certificate, PEM or DER, at most {CERTIFICATE_FILE_MAX // 1024} KiB")
    x.add_argument("--reason", default="", help="why (kept with the entry, shown to the refused caller)")
    s.add_parser("denied", help="the denied cluster certificates")

    s = sub.add_parser("provider", help="ACME providers").add_subparsers(dest="provider_cmd", required=True)
    x = s.add_parser("add", help="add an ACME CA; its directory is fetched first (not an ACME directory: refused)")
    x.add_argument("name", help="a name, or a preset: letsencrypt, letsencrypt-staging")
    x.add_argument("--directory", help="ACME directory URL (optional for presets)")
    x.add_argument("--ca-bundle", type=ReadableFile("CA bundle", CA_BUNDLE_MAX), metavar="FILE",
                   help="PEM file of CAs that verify the directory's TLS")
    s.add_parser("list", help="providers, their accounts, and which is the cluster default")
    x = s.add_parser("default", help="the provider that signs for slots without a provider of their own")
    x.add_argument("name", nargs="?", help="the provider (or --clear)")
    x.add_argument("--clear", action="store_true", help="no cluster default")
    x.set_defaults(precheck=check_provider_default)

    s = sub.add_parser("account", help="ACME accounts").add_subparsers(dest="account_cmd", required=True)
    x = s.add_parser("register", help="create the provider's ACME account (one per provider)")
    x.set_defaults(precheck=check_account_register)
    x.add_argument("--provider", required=True, help="the provider (acmectl provider list)")
    x.add_argument("--email", required=True, help="contact e-mail address given to the CA")
    x.add_argument("--agree-tos", action="store_true", help="accept the provider's terms of service")
    x.add_argument("--eab-kid", help="External Account Binding key id (CAs that require EAB)")
    x.add_argument("--eab-hmac-key-file", metavar="FILE", type=ReadableFile("EAB MAC key file", EAB_KEY_FILE_MAX),
                   help=f"file holding the External Account Binding MAC key, base64url (surrounding whitespace "
                        f"ignored); or give the key in {EAB_KEY_ENV}. Never on the command line (ps shows it)")
    x.add_argument("--eab-hmac-key", help=argparse.SUPPRESS)  # refused with a pointer to the two ways above

    s = sub.add_parser("peer", help="peers: membership, liveness, ACME on/off").add_subparsers(dest="peer_cmd",
                                                                                                required=True)
    s.add_parser("list", help="every registered peer: liveness, ACME on/off, addresses, front, version")
    for name, text in (("enable", "sign and renew certificates of this peer through ACME"),
                       ("disable", "never sign nor renew certificates of this peer (it keeps serving what it has)")):
        s.add_parser(name, help=text).add_argument("peer", type=PeerId(), help="the peer id")
    x = s.add_parser("remove", help="remove a dead peer; --force: a live one too, its agent certificate denied first")
    x.add_argument("peer", type=PeerId(), help="the peer id")
    x.add_argument("--force", action="store_true", help="also a live peer: deny its agent certificate (it could "
                                                        "register again otherwise), then remove it")
    x = s.add_parser("block", help="deny the peer's agent certificate; the peer stays listed, blocked: its calls "
                                   "are refused, no certificate may register for it until it is removed")
    x.add_argument("peer", type=PeerId(), help="the peer id")
    x.add_argument("--reason", default="", help="why (kept with the deny-list entry)")

    s = sub.add_parser("csr", help="certificate signing requests").add_subparsers(dest="csr_cmd", required=True)
    x = s.add_parser("create", help="have the peer generate a key and a CSR",
                     description="Have the peer generate a key (kept on the peer) and a CSR for the names, "
                                 "optionally with subject attributes. The subject is part of the CSR: the new "
                                 "CSR has exactly the attributes given here (none given: none, even if the "
                                 "previous CSR had some); a key rotation repeats the saved ones. The provider "
                                 "belongs to the slot: left out, the slot keeps its saved provider. "
                                 + SUBJECT_NOTE + f" It waits up to {CSR_TIMEOUT:g} s (a key made on a slow peer) "
                                 "or --timeout if longer.")
    x.add_argument("peer", type=PeerId(), help="the peer id")
    x.add_argument("--cn", required=True, help="the certificate's first name (its common name)")
    x.add_argument("--san", action="append", default=[], help="another DNS name (repeatable)")
    x.add_argument("--key-type", default="ec-p256", type=Choice("key type", KEY_TYPES), choices=list(KEY_TYPES),
                   help="the key the peer makes: " + ", ".join(KEY_TYPES) + " (default ec-p256)")
    x.add_argument("--domain", type=Domain(), help="a domain (SNI) slot instead of the server certificate")
    for option, text in (("org", "organization (O), at most 64 characters"),
                         ("ou", "organizational unit (OU), at most 64 characters"),
                         ("locality", "locality or city (L), at most 128 characters"),
                         ("state", "state or province (ST), at most 128 characters"),
                         ("country", "country (C): an ISO 3166-1 two-letter code, e.g. FR or GB (not UK)")):
        x.add_argument(f"--{option}", help=f"subject {text}; the CA may drop it")
    x.add_argument("--provider", help="ACME provider saved with the slot (left out: the slot keeps its saved one)")
    x = s.add_parser("show", help="the stored CSR, decoded (or --pem: just the PEM, to send to any CA)")
    x.add_argument("peer", type=PeerId(), help="the peer id")
    x.add_argument("--domain", type=Domain(), help="a domain (SNI) slot instead of the server certificate")
    x.add_argument("--pem", action="store_true", help="print only the CSR in PEM (acmectl csr show P --pem > p.csr); "
                                                      "with --json, the JSON (it holds the PEM as csr_pem)")

    x = sub.add_parser("sign", help="sign the peer's CSR through ACME")
    x.add_argument("peer", type=PeerId(), help="the peer id")
    x.add_argument("--wait", action="store_true", help="follow the order until it ends")
    x.add_argument("--wait-timeout", type=Seconds(DAY), default=600.0, metavar="SECONDS",
                   help=f"with --wait: give up following after this long (default 600; at most {DAY:g}); the "
                        "order goes on")
    x.add_argument("--force", action="store_true", help="skip the DNS part of the preflight")
    x.add_argument("--provider", help="the ACME provider for this order (default: the slot's, else the cluster "
                                      "default)")
    x.add_argument("--domain", type=Domain(), help="a domain (SNI) slot instead of the server certificate")

    x = sub.add_parser("preflight", help="a sign's dry run: its preconditions (ACME on for the peer and the slot, "
                                         "a provider, a CSR, no pending certificate, no order running) and what "
                                         "DNS says now about the slot's names: A and AAAA records and the peer of "
                                         "each address (exit status 4 when a sign would be refused)")
    x.add_argument("peer", type=PeerId(), help="the peer id")
    x.add_argument("--domain", type=Domain(), help="a domain (SNI) slot instead of the server certificate")

    s = sub.add_parser("order", help="ACME orders").add_subparsers(dest="order_cmd", required=True)
    x = s.add_parser("show", help="an order's phase, authorizations, DNS as the preflight saw it, per-peer progress")
    x.add_argument("order_id", type=Word("an order id", 64), help="the order id (acmectl sign prints it)")
    x.add_argument("--refresh", action="store_true", help="ask the CA for the live authorization statuses")
    order_list_arguments(s.add_parser("list", help="the orders kept (unfinished, or ended within the retention), "
                                                   "newest first; --peer, --domain, --state, --limit narrow it"))

    s = sub.add_parser("pending", help="pending certificates").add_subparsers(dest="pending_cmd", required=True)
    for name, text in (("show", "the pending certificate, decoded (--pem: with its chain)"),
                       ("discard", "drop the pending certificate")):
        x = s.add_parser(name, help=text)
        x.add_argument("peer", type=PeerId(), help="the peer id")
        x.add_argument("--domain", type=Domain(), help="a domain (SNI) slot instead of the server certificate")
        if name == "show":
            x.add_argument("--pem", action="store_true", help="also print the chain; with --json, the JSON (it holds "
                                                              "the chain as chain_pem)")
    x = s.add_parser("import", help="store a certificate any CA signed for the slot's CSR as pending (provider "
                                    "manual); then review and deploy as usual")
    x.add_argument("peer", type=PeerId(), help="the peer id")
    x.add_argument("--domain", type=Domain(), help="a domain (SNI) slot instead of the server certificate")
    x.add_argument("file", type=ReadableFile("certificate file", imports.MAX_FILE), help="the leaf and its intermediates: PEM, DER (the leaf alone) or PKCS#7 (PEM or DER), "
                                "at most 64 KiB; the leaf must be for the key of the slot's current CSR")

    for name, text in (("deploy", "install the pending certificate as the active one, without restarts"),
                       ("rollback", "swap the previous certificate back in")):
        x = sub.add_parser(name, help=text)
        x.add_argument("peer", type=PeerId(), help="the peer id")
        x.add_argument("--domain", type=Domain(), help="a domain (SNI) slot instead of the server certificate")

    x = sub.add_parser("rollout", help="deploy pending certificates peer by peer, verifying each by a TLS handshake")
    which = x.add_mutually_exclusive_group(required=True)  # exactly one: refused before the call otherwise
    which.add_argument("--peers", type=PeerList(), metavar="P,...",
                       help="comma-separated peer ids, in order, each once (or --all)")
    which.add_argument("--all", action="store_true", help="every peer with a pending certificate (or --peers)")
    x.add_argument("--batch", type=Integer(1, MAX_BATCH), default=1, metavar="N",
                   help=f"peers deployed at once (default 1, at most {MAX_BATCH})")
    x.add_argument("--rollback-on-failure", action="store_true",
                   help="a peer that fails after its new certificate went in gets its previous one back")
    x.add_argument("--domain", type=Domain(), help="a domain (SNI) slot instead of the server certificate")
    x.add_argument("--rollout-timeout", type=Seconds(7 * DAY), default=3600.0, metavar="SECONDS",
                   help=f"deadline of the whole rollout (default 3600; at most {7 * DAY:g})")

    s = sub.add_parser("schedule", help="automatic renewal").add_subparsers(dest="schedule_cmd", required=True)
    x = s.add_parser("set", help="automatic mode, deploy days and time, key policy")
    x.add_argument("peer", type=PeerId(), help="the peer id")
    x.add_argument("--domain", type=Domain(), help="a domain (SNI) slot instead of the server certificate")
    x.add_argument("--auto", choices=("on", "off"), help="automatic renewal on or off")
    x.add_argument("--days", help="mon,tue,... or all, weekdays, weekend")
    x.add_argument("--time", help="HH:MM[:SS] deploy time, or 'now' (deploy as soon as signed)")
    x.add_argument("--tz", help="IANA time zone of days and time, e.g. Europe/Paris")
    x.add_argument("--key-policy", choices=("rotate", "reuse"), help="a new key at each renewal, or the same one")
    x.add_argument("--provider", help="ACME provider saved with the slot; 'default': follow the cluster default")
    x = s.add_parser("show", help="per slot: mode, deploy days and time, key policy, provider, renewal due, next "
                                  "deploy (-o wide: why due, next sign, last sign and deploy, failures)")
    x.add_argument("peer", type=PeerId(), help="the peer id")

    s = sub.add_parser("domain", help="certificate slots of a peer, ACME on/off per slot").add_subparsers(
        dest="domain_cmd", required=True)
    s.add_parser("list", help="every slot: ACME on/off, names, active certificate, days left, mode, provider") \
        .add_argument("peer", type=PeerId(), help="the peer id")
    for name, text in (("enable", "sign and renew this slot through ACME again"),
                       ("disable", "never sign nor renew this slot (it keeps serving what it has; refused while "
                                   "an order runs for it)")):
        x = s.add_parser(name, help=text)
        x.add_argument("peer", type=PeerId(), help="the peer id")
        x.add_argument("domain", type=Domain(server=True),
                       help="the domain of the slot, or 'server' for the server certificate")

    x = sub.add_parser("revoke", help="revoke a certificate (PEM or DER, leaf or chain); waits up to "
                       f"{REVOKE_TIMEOUT:g} s or --timeout if longer (it may take two orders); a revocation "
                       "cut off by the deadline still ends at the coordinator and is recorded in the history")
    x.add_argument("certfile", type=ReadableFile("certificate file", REVOKE_FILE_MAX),
                   help=f"the certificate (or its chain, leaf first), PEM or DER, at most {REVOKE_FILE_MAX // 1024} KiB")
    x.add_argument("--provider", help="the CA to ask (default: the one that issued it); required for a "
                   "certificate the cluster did not obtain (another CA, or before a reset)")
    x.add_argument("--reason", default="unspecified",
                   choices=("unspecified", "keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged"),
                   help="the RFC 5280 reason given to the CA (default unspecified)")
    x.add_argument("--force", action="store_true", help="revoke even if it is active on a peer (or, for a "
                   "certificate not in the records, while a peer cannot be asked whether it serves it)")

    s = sub.add_parser("trust", help="the CA certificates the cluster trusts").add_subparsers(dest="trust_cmd",
                                                                                              required=True)
    x = s.add_parser("add", help="trust the CA certificates of FILE, or of a preset shipped with clusteracme")
    x.add_argument("file", nargs="?", type=ReadableFile("certificate file", TRUST_FILE_MAX),
                   help="PEM file with one or more CA certificates, or one DER certificate")
    x.add_argument("--preset", metavar="NAME",
                   help="instead of FILE: letsencrypt (Let's Encrypt's roots ISRG Root X1 and ISRG Root X2)")
    x.set_defaults(precheck=check_trust_add)
    s.add_parser("list", help="the trusted CA certificates: type, subject, issuer, expiry, SHA-256")
    s.add_parser("remove", help="stop trusting a CA certificate").add_argument(
        "sha256", type=Sha256(), help="its SHA-256 fingerprint (trust list; openssl's AB:CD:... form too)")
    x = s.add_parser("verify", help="validate a peer's pending (or --active) chain against the trust store")
    x.add_argument("peer", type=PeerId(), help="the peer id")
    x.add_argument("--domain", type=Domain(), help="a domain (SNI) slot instead of the server certificate")
    x.add_argument("--active", action="store_true", help="the active chain instead of the pending one")

    x = sub.add_parser("events", help="a peer's history: signs, deploys, rollbacks, discards")
    x.add_argument("peer", type=PeerId(extra=[UNATTACHED]),
                   help=f"the peer id, or {UNATTACHED} (certificates no slot held)")
    x.add_argument("--limit", type=Integer(0, MAX_LIMIT, " (all)"), default=0, metavar="N",
                   help=f"the newest N events (default 0: all kept; at most {MAX_LIMIT})")

    x = sub.add_parser("alarms", help="raised alarms: renewal overdue, automatic sign failing, expiring, peer dead, "
                                      "disk differs from etcd, imported certificate aging (exit status 0 either "
                                      "way: a listing)")
    x.add_argument("--peer", type=PeerId(), help="one peer's alarms only")
    x.add_argument("--all", action="store_true", help="cleared alarms too (kept alarms.cleared_retention_seconds)")

    x = sub.add_parser("status", help="per-peer status")
    x.add_argument("peer", nargs="?", type=PeerId(), help="one peer only")

    sub.add_parser("coordinators", help="the coordinator replicas: name, address, leader or standby, version, "
                                        "since when (* marks the replica that answered)")
    sub.add_parser("version", help="acmectl's version and each coordinator replica's (the client's is printed even "
                                   "when no coordinator answers)")
    x = sub.add_parser("backup", help="write every key of the cluster's etcd prefix, read at one revision, to FILE "
                                      "(mode 0600; -o json prints its manifest)",
                       description="Write the cluster's state (every key under its etcd prefix at one revision, "
                                   "but the lease-bound ones: elections, replicas, liveness) to FILE, with a "
                                   "manifest. Account keys stay sealed. Keep FILE with the account-key secret file "
                                   "and the cluster CA (README: Backup and restore).")
    x.add_argument("file", type=LocalPath("backup file"),
                   help="the backup file to write (refused if it exists, unless --force)")
    x.add_argument("--force", action="store_true", help="replace FILE if it exists")
    x = sub.add_parser("restore", help="load a backup FILE into the cluster's empty etcd prefix; the leader then "
                                       "steps down and a fresh term reads it",
                       description="Check FILE in full (size, format, digests), then load it into the cluster's "
                                   "etcd prefix, which must be empty but for what the running processes write by "
                                   "themselves (README: Backup and restore). Waits until a leader serves again.")
    x.add_argument("file", type=ReadableFile("backup file", BACKUP_FILE_MAX), help="a file acmectl backup wrote")
    x.add_argument("--check", action="store_true", help="only check FILE and print its manifest; restore nothing")
    x = sub.add_parser("completion", help="print the shell completion script: source <(acmectl completion bash)",
                       description="Print the completion script of SHELL (argcomplete). bash: "
                                   "source <(acmectl completion bash), or save it in "
                                   "/etc/bash_completion.d/acmectl. zsh: source <(acmectl completion zsh) after "
                                   "compinit. Peer ids and domains are completed from the coordinator of the line "
                                   "(or ACMECTL_*), asked for at most 2 s.")
    x.add_argument("shell", choices=completion.SHELLS, help="bash or zsh")
    _finish(p)  # last: covers every entry above, whoever added it
    return p


COMMANDS = {"provider": cmd_provider, "account": cmd_account, "peer": cmd_peer, "csr": cmd_csr, "sign": cmd_sign,
            "order": cmd_order, "pending": cmd_pending, "status": cmd_status, "deploy": cmd_deploy,
            "rollback": cmd_rollback, "rollout": cmd_rollout, "events": cmd_events, "schedule": cmd_schedule,
            "revoke": cmd_revoke, "trust": cmd_trust, "domain": cmd_domain, "alarms": cmd_alarms,
            "preflight": cmd_preflight, "coordinators": cmd_coordinators, "version": cmd_version,
            "completion": cmd_completion, "backup": cmd_backup, "restore": cmd_restore}
# Commands that never call the coordinator; every other has its connection settings checked before it runs.
# A second word "--FLAG": the command is local when given that flag (restore --check only reads FILE).
LOCAL = {("pki", "init"), ("pki", "issue"), ("pki", "secret"), ("completion", None), ("version", None),
         ("restore", "--check")}
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away (| head)


def is_local(args: argparse.Namespace) -> bool:
    word = getattr(args, f"{args.cmd}_cmd", None)
    flags = {f"--{name.replace('_', '-')}" for name, value in vars(args).items() if value is True}
    return (args.cmd, word) in LOCAL or any((args.cmd, flag) in LOCAL for flag in flags)


async def _run(args: argparse.Namespace) -> None:
    ctl = Ctl(args)
    try:
        if getattr(args, "precheck", None) is not None:
            args.precheck(args)  # what one argument's type cannot check alone (FILE or --preset, ...)
        if not is_local(args):
            ctl.client  # noqa: B018 (--coordinator and the TLS files, checked before the command's first call)
        if args.cmd == "pki":
            await cmd_pki(ctl, args)
        else:
            await COMMANDS[args.cmd](ctl, args)
    finally:
        await ctl.close()


def main(argv: list[str] | None = None) -> None:
    p = parser()
    # Under the shell's completion (_ARGCOMPLETE set) this answers and exits; otherwise it returns at once.
    argcomplete.autocomplete(p, always_complete_options=False)
    args = p.parse_args(argv)
    try:
        asyncio.run(_run(args))
        sys.stdout.flush()  # here, so that a closed pipe is caught below rather than at exit
    except BrokenPipeError:
        _quiet_stdout()
        sys.exit(EXIT_BROKEN_PIPE)
    except errors.ClusterAcmeError as exc:
        # The sentence may come from the coordinator, a CA or a peer: one line, control characters escaped.
        print(f"acmectl: {terminal_safe(exc.message)}", file=sys.stderr)
        sys.exit(next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 1))
    except CtlError as exc:
        print(f"acmectl: {terminal_safe(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _quiet_stdout() -> None:
    """stdout's reader went away (``acmectl ... | head -1``): the rest of the
    output, and Python's flush at exit, go to /dev/null instead of a
    BrokenPipeError traceback (the Python documentation's recipe, "Note on
    SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a file descriptor (a test's StringIO): replace the stream instead
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (stdout, until the process ends)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    main()
