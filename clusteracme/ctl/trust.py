"""acmectl revoke / trust: revocation and the trust store."""

from __future__ import annotations

import argparse
from typing import Any

from clusteracme import errors
from clusteracme.ctl.base import Ctl, CtlError, _read_small_file, _slot
from clusteracme.v1 import coordinator_pb2 as pb

REVOKE_TIMEOUT = 900.0  # two orders (fresh authorizations, then a new order) and the CA's answers
REVOKE_FILE_MAX = 64 * 1024  # a certificate or its chain, PEM or DER
TRUST_FILE_MAX = 1024 * 1024  # trust add: a PEM bundle of CA certificates
TRUST_HEADER = ["TYPE", "SUBJECT", "ISSUER", "NOT AFTER", "SHA256", ""]
TRUST_WIDE_HEADER = ["TYPE", "SUBJECT", "ISSUER", "NOT BEFORE", "NOT AFTER", "SHA256", ""]


async def cmd_revoke(ctl: Ctl, a: argparse.Namespace) -> None:
    try:
        r = await ctl.call("Revoke", pb.RevokeRequest(certificate=_read_small_file(a.certfile, "certificate file",
                                                                                    REVOKE_FILE_MAX),
                                                      provider=a.provider or "", reason=a.reason, force=a.force),
                           timeout=max(ctl.args.timeout, REVOKE_TIMEOUT))
    except errors.DeadlineExceeded as exc:
        raise errors.DeadlineExceeded(
            f"{exc.message}; the revocation goes on at the coordinator and its outcome is recorded in the "
            "history (acmectl events PEER)") from None
    ctl.out(r, lambda: print(f"certificate {r.serial_hex} revoked at provider {r.provider} (reason {r.reason})\n"
                             + "".join(f"  refused: {why}\n" for why in r.refused)
                             + f"  authorised by: {r.authorization}\n  the CA answered: {r.ca_answer}"))


def _trust_rows(certs: list[Any], *, add: bool = False, wide: bool = False) -> list[list[str]]:
    """The trust store table; an add answer marks what was already there."""
    return [[c.type or ("root" if c.self_signed else "intermediate"), c.subject, c.issuer,
             *([c.not_before[:19]] if wide else []), c.not_after[:19], c.sha256,
             "" if c.added or not add else "(already trusted)"] for c in certs]


def _trust_table(ctl: Ctl, r: Any, *, add: bool = False) -> None:
    certs = list(r.certificates)
    ctl.table(r, TRUST_HEADER, _trust_rows(certs, add=add), wide_header=TRUST_WIDE_HEADER,
              wide_rows=_trust_rows(certs, add=add, wide=True), empty=None if add else "the trust store is empty")


def check_trust_add(a: argparse.Namespace) -> None:
    """Before any call (``main`` runs it): FILE or --preset, not both, not neither."""
    if (a.file is None) == (a.preset is None):
        raise CtlError("trust add takes exactly one of FILE and --preset NAME")


async def cmd_trust(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.trust_cmd == "add":
        check_trust_add(a)
        request = (pb.TrustAddRequest(preset=a.preset) if a.preset is not None
                   else pb.TrustAddRequest(certificates=_read_small_file(a.file, "certificate file", TRUST_FILE_MAX)))
        r = await ctl.call("TrustAdd", request)
        _trust_table(ctl, r, add=True)
    elif a.trust_cmd == "list":
        r = await ctl.call("TrustList", pb.TrustListRequest())
        _trust_table(ctl, r)
    elif a.trust_cmd == "remove":
        r = await ctl.call("TrustRemove", pb.TrustRemoveRequest(sha256=a.sha256))
        ctl.out(r, lambda: print(f"removed {r.certificates[0].subject} ({r.certificates[0].sha256})"))
    else:
        r = await ctl.call("TrustVerify", pb.TrustVerifyRequest(peer_id=a.peer, slot=_slot(a), active=a.active))
        ctl.out(r, lambda: print(f"{r.which} certificate {r.serial_hex} of {a.peer}: "
                                 + ("VALID: " + " <- ".join(r.path) if r.ok else f"NOT VALID: {r.reason}")))
        if not r.ok:
            raise errors.FailedPrecondition(f"the chain does not validate against the trust store: {r.reason}")
