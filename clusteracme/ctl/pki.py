"""acmectl pki: the cluster CA and mTLS certificates (local files), the deny list."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from clusteracme import errors, pki
from clusteracme.ctl.base import Ctl, _one_line, _read_small_file
from clusteracme.v1 import coordinator_pb2 as pb

DENIED_HEADER = ["IDENTITY", "SERIAL", "NOT AFTER", "DENIED AT", "BY", "REASON", "SHA256"]
CERTIFICATE_FILE_MAX = 64 * 1024  # pki revoke: one certificate, PEM or DER
_TEMP = re.compile(r"\.(.+)\.[0-9a-f]{16}\.tmp")  # pki.open_unique_temp's names


# --- pki (init, issue, secret: local files; revoke, denied: the coordinator) ----------
def _denied_rows(identities: list[Any], *, wide: bool = False) -> list[list[str]]:
    """``wide``: the times to the second with their zone, the reason in full (its first line otherwise)."""
    cut = (lambda s: s) if wide else (lambda s: s[:19])
    return [[d.common_name, d.serial_hex, cut(d.not_after), cut(d.denied_at), d.denied_by,
             d.reason if wide else _one_line(d.reason), d.sha256] for d in identities]


def _denied_line(d: Any) -> str:
    return (f"certificate {d.serial_hex} of {d.common_name} denied (sha256 {d.sha256}): every coordinator and "
            f"agent refuses it from now on")


async def cmd_pki(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.pki_cmd not in ("init", "issue", "secret"):
        await _pki(ctl, a)
        return
    # Local files: what the system refuses (a directory that cannot be made, a FIFO as --out, a CA file that is
    # not one) is one sentence, as every other error.
    try:
        await _pki(ctl, a)
    except BrokenPipeError:
        raise  # stdout closed (| head): main ends quietly
    except OSError as exc:
        raise errors.ClusterAcmeError(f"pki {a.pki_cmd}: {_os_error(exc)}") from None
    except ValueError as exc:
        raise errors.InvalidArgument(f"pki {a.pki_cmd}: {' '.join(str(exc).split())}") from None


def _os_error(exc: OSError) -> str:
    """"PATH: reason"; a key file's temp file (pki.open_unique_temp) named as the file it was for."""
    path = exc.filename
    if path is not None and (temp := _TEMP.fullmatch(Path(path).name)):
        path = str(Path(path).parent / temp[1])
    # mkdir(exist_ok=True) refuses with EEXIST only what is there and not a directory.
    reason = "exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
    return f"{path}: {reason}" if path is not None else reason


async def _pki(ctl: Ctl, a: argparse.Namespace) -> None:
    # init, issue, secret: local files; -o json/yaml prints what was written, as data.
    if a.pki_cmd == "init":
        path = pki.init_ca(Path(a.dir), cluster=a.cluster)
        key = Path(a.dir) / pki.CA_KEY
        ctl.out({"ca_certificate": str(path), "ca_key": str(key), "cluster": a.cluster},
                lambda: print(f"cluster CA written to {path} (key {key}, mode 0600); keep this directory offline: "
                              "issue certificates here with --out DIR and copy only DIR and ca.pem to the nodes"))
    elif a.pki_cmd == "issue":
        identity = pki.Identity.parse(f"{a.role}:{a.name}")
        out = Path(a.out)
        pki.check_out_dir(Path(a.dir), out)
        cert, key = pki.issue(Path(a.dir), identity, out_dir=out, ips=a.ip, dns_names=a.dns)
        ctl.out({"identity": identity.common_name, "certificate": str(cert), "key": str(key)},
                lambda: print(f"{identity.common_name}: certificate {cert}, key {key}"))
    elif a.pki_cmd == "revoke":
        data = _read_small_file(a.certfile, "certificate file", CERTIFICATE_FILE_MAX)
        d = await ctl.call("RevokeIdentity", pb.RevokeIdentityRequest(certificate=data, reason=a.reason or ""))
        ctl.out(d, lambda: print(_denied_line(d)))
    elif a.pki_cmd == "denied":
        r = await ctl.call("ListDenied", pb.ListDeniedRequest())
        ctl.table(r, DENIED_HEADER, _denied_rows(list(r.identities)), wide_header=DENIED_HEADER,
                  wide_rows=_denied_rows(list(r.identities), wide=True), empty="no certificate is denied")
    elif a.pki_cmd == "secret":
        pki.create_secret(Path(a.file))
        ctl.out({"secret_file": a.file, "mode": "0600"},
                lambda: print(f"account-key encryption key written to {a.file} (mode 0600); keep a copy: without "
                              "it the stored ACME account keys cannot be opened"))
