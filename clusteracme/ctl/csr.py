"""acmectl csr / pending: CSRs made on the peer, pending certificates."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from clusteracme import errors
from clusteracme.coordinator import imports
from clusteracme.ctl.base import KEY_TYPES, Ctl, _provider_note, _read_small_file, _slot
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb

# (option, CsrSubject field, RFC 4514 name)
SUBJECT_OPTIONS = (("org", "organization", "O"), ("ou", "organizational_unit", "OU"), ("locality", "locality", "L"),
                   ("state", "state", "ST"), ("country", "country", "C"))


CSR_TIMEOUT = 60.0  # the peer makes the key: RSA 4096 on a small machine takes seconds; --timeout if longer

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
        if a.pem and not ctl.machine:  # --json wins, as for pending show: the JSON holds csr_pem
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
        subject=common_pb2.CsrSubject(**subject), provider=a.provider or ""),
        timeout=max(ctl.args.timeout, CSR_TIMEOUT))
    note = "" if ctl.machine else await _provider_note(ctl, a.provider or "")

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
