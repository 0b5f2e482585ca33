"""acmectl's shared parts: the client (:class:`Ctl`), output, files, errors."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from google.protobuf.json_format import MessageToDict

from clusteracme import errors, pki
from clusteracme.ctl.validate import ReadableFile
from clusteracme.failover import READ_METHODS, ReplicaClient, parse_endpoints
from clusteracme.rpcutil import TLSFiles
from clusteracme.safetext import safe_message, terminal_safe
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb

OUTPUT_FORMATS = ("table", "wide", "json", "yaml")  # -o/--output; --json is -o json

KEY_TYPES = {
    "ec-p256": common_pb2.KEY_TYPE_EC_P256,
    "ec-p384": common_pb2.KEY_TYPE_EC_P384,
    "rsa-2048": common_pb2.KEY_TYPE_RSA_2048,
    "rsa-3072": common_pb2.KEY_TYPE_RSA_3072,
    "rsa-4096": common_pb2.KEY_TYPE_RSA_4096,
}
EAB_KEY_ENV = "ACMECTL_EAB_HMAC_KEY"
EAB_KEY_FILE_MAX = 4096
TLS_FILE_MAX = 1024 * 1024  # --ca, --cert, --key: PEM files of a few KiB
MULTILINE_FIELDS = ("clusteracme.v1.Alarm.detail",)  # shown by _one_line: its first line; *_pem fields keep lines too

EXIT_CODES = {errors.InvalidArgument: 2, errors.NotFound: 3, errors.FailedPrecondition: 4, errors.Unavailable: 5}


class CtlError(Exception):
    pass


def _print_table(rows: list[list[str]], header: list[str], *, no_headers: bool = False) -> None:
    rows = [[terminal_safe(str(c)) for c in row] for row in rows]  # one line per row, whatever a cell holds
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in rows if no_headers else [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _dict(msg: Any) -> dict[str, Any]:
    """An answer as data: a protobuf message as its JSON mapping; a dict (a local command's result) as it is."""
    if isinstance(msg, dict):
        return msg
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _pem_certificates(option: str, path: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(_read_small_file(path, f"{option} file", TLS_FILE_MAX))
    except ValueError:
        certificates = []
    if not certificates:
        raise CtlError(f"the {option} file {terminal_safe(path)} holds no PEM certificate")
    return certificates


def check_tls_files(ca: str, cert: str, key: str) -> None:
    """The TLS files hold what they should, before gRPC is given them (its
    C core would log each failure on stderr, then every call fail as
    unavailable): certificates in PEM in --ca and --cert, an unencrypted PEM
    private key in --key, and that key the one of --cert's certificate."""
    _pem_certificates("--ca", ca)
    leaf = _pem_certificates("--cert", cert)[0]
    try:
        private = serialization.load_pem_private_key(_read_small_file(key, "--key file", TLS_FILE_MAX), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CtlError(f"the --key file {terminal_safe(key)} holds no unencrypted PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise CtlError(f"the --key file {terminal_safe(key)} is not the key of the --cert file "
                       f"{terminal_safe(cert)}'s certificate")


class Ctl:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._client: ReplicaClient | None = None

    @property
    def client(self) -> ReplicaClient:
        """The coordinator replicas of --coordinator and the TLS files, checked
        on first use (``main`` touches it before a command that calls runs;
        ``pki init``, ``completion`` need none)."""
        if self._client is None:
            a = self.args
            endpoints = parse_endpoints(a.coordinator, "--coordinator (or ACMECTL_COORDINATOR)")
            missing = [n for n, v in (("--ca", a.ca), ("--cert", a.cert), ("--key", a.key)) if not v]
            if missing:
                raise CtlError("missing " + ", ".join(missing) + " (or ACMECTL_CA/ACMECTL_CERT/ACMECTL_KEY)")
            for option, path in (("--ca", a.ca), ("--cert", a.cert), ("--key", a.key)):
                try:
                    ReadableFile(f"{option} file", TLS_FILE_MAX)(path)
                except argparse.ArgumentTypeError as exc:
                    raise CtlError(str(exc)) from None
            check_tls_files(a.ca, a.cert, a.key)
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
        return msg if self.machine else safe_message(msg, MULTILINE_FIELDS)

    @property
    def output(self) -> str:
        """One of OUTPUT_FORMATS (-o; --json is -o json)."""
        return getattr(self.args, "output", None) or ("json" if getattr(self.args, "json", False) else "table")

    @property
    def no_headers(self) -> bool:
        """--no-headers: tables without their header line (and without notes around them)."""
        return bool(getattr(self.args, "no_headers", False))

    @property
    def machine(self) -> bool:
        """JSON or YAML output: the answer as data, no human sentences on stdout."""
        return self.output in ("json", "yaml")

    def table(self, msg: Any, header: list[str], rows: list[list[str]], *, wide_header: list[str] | None = None,
              wide_rows: list[list[str]] | None = None, empty: str | None = None) -> None:
        """A listing: the answer as JSON/YAML, or a table (``-o wide``: the
        wide columns when given), headers left out with --no-headers; ``empty``
        is printed instead of an empty table (not with --no-headers)."""
        if self.machine:
            self.out(msg, lambda: None)
            return
        if self.output == "wide" and wide_header is not None and wide_rows is not None:
            header, rows = wide_header, wide_rows
        no_headers = self.no_headers
        if not rows and empty is not None:
            if not no_headers:
                print(empty)
            return
        _print_table(rows, header, no_headers=no_headers)

    @property
    def answered_last(self) -> str | None:
        """The endpoint of the replica that answered last (None before any call)."""
        return self._client.answered_last if self._client is not None else None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    def out(self, msg: Any, human: Callable[[], None]) -> None:
        if self.output == "json":
            print(json.dumps(_dict(msg), indent=2))
        elif self.output == "yaml":
            print(yaml.safe_dump(_dict(msg), sort_keys=False, allow_unicode=False), end="")
        else:
            human()


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


# --- CSR, sign, orders, pending -----------------------------------------------------
def _slot(a: argparse.Namespace) -> common_pb2.Slot:
    return common_pb2.Slot(domain=getattr(a, "domain", "") or "")


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
        raise errors.InvalidArgument(f"the {what} {path} is larger than {limit // 1024} KiB")
    return data


def _one_line(text: str) -> str:
    """A detail (an automatic sign's last error may span lines) on one line:
    its first line, control characters escaped, " [...]" when more follows."""
    first, _, rest = text.strip().partition("\n")
    return terminal_safe(first.rstrip("\r")) + (" [...]" if rest.strip() else "")
