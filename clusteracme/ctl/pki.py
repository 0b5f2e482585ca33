"""acmectl pki: the cluster CA and mTLS certificates (local files), the deny list."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clusteracme import pki
from clusteracme.ctl.base import Ctl, _one_line, _print_table, _read_small_file
from clusteracme.v1 import coordinator_pb2 as pb


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
