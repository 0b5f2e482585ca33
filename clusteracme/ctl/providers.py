"""acmectl provider / account: ACME providers and their accounts."""

from __future__ import annotations

import argparse
import os
from typing import Any

from clusteracme.ctl.base import EAB_KEY_ENV, EAB_KEY_FILE_MAX, Ctl, CtlError, _no_account_note, _read_small_file
from clusteracme.v1 import coordinator_pb2 as pb

PROVIDER_HEADER = ["PROVIDER", "DEFAULT", "DIRECTORY", "ACCOUNT", "STATUS"]
PROVIDER_WIDE_HEADER = [*PROVIDER_HEADER, "CONTACT", "CA BUNDLE", "TERMS OF SERVICE"]
CA_BUNDLE_MAX = 1024 * 1024  # provider add --ca-bundle: a PEM bundle of a few CAs


# --- providers and accounts -----------------------------------------------------
def _provider_rows(providers: list[Any], *, wide: bool = False) -> list[list[str]]:
    return [[p.name, "yes" if p.is_default else "", p.directory_url, p.account_url or "-",
             p.account_status or "no account",
             *([p.contact or "-", "yes" if p.has_ca_bundle else "-", p.terms_of_service or "-"] if wide else [])]
            for p in providers]


async def cmd_provider(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.provider_cmd == "add":
        bundle = ""
        if a.ca_bundle:
            try:
                bundle = _read_small_file(a.ca_bundle, "CA bundle", CA_BUNDLE_MAX).decode()
            except UnicodeDecodeError as exc:
                raise CtlError(f"cannot read the CA bundle {a.ca_bundle}: {exc}") from None
        p = await ctl.call("AddProvider", pb.AddProviderRequest(name=a.name, directory_url=a.directory or "",
                                                                 ca_bundle_pem=bundle))
        ctl.out(p, lambda: print(f"provider {p.name} added: {p.directory_url}\n"
                                 f"terms of service: {p.terms_of_service or '(none published)'}"))
    elif a.provider_cmd == "default":
        check_provider_default(a)
        r = await ctl.call("SetDefaultProvider", pb.SetDefaultProviderRequest(provider=a.name or ""))
        note = _no_account_note(r.default_provider, list(r.providers))
        ctl.out(r, lambda: print(f"cluster default provider: {r.default_provider} (signs for every slot that has "
                                 f"no provider of its own){note}" if r.default_provider else
                                 "no cluster default provider: slots without a provider of their own sign with the "
                                 "only provider that has an account"))
    else:
        r = await ctl.call("ListProviders", pb.ListProvidersRequest())
        ctl.table(r, PROVIDER_HEADER, _provider_rows(list(r.providers)), wide_header=PROVIDER_WIDE_HEADER,
                  wide_rows=_provider_rows(list(r.providers), wide=True), empty="no provider yet (acmectl provider add)")


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


def check_provider_default(a: argparse.Namespace) -> None:
    """Before any call (``main`` runs it): a NAME or --clear."""
    if bool(a.name) == a.clear:
        raise CtlError("provider default takes a provider NAME, or --clear")


def check_account_register(a: argparse.Namespace) -> None:
    """Before any call (``main`` runs it): the EAB MAC key and its key id, read and checked."""
    _eab_hmac_key(a)


async def cmd_account(ctl: Ctl, a: argparse.Namespace) -> None:
    p = await ctl.call("RegisterAccount", pb.RegisterAccountRequest(
        provider=a.provider, email=a.email, agree_tos=a.agree_tos, eab_kid=a.eab_kid or "",
        eab_hmac_key=_eab_hmac_key(a)))
    ctl.out(p, lambda: print(f"account registered with {p.name}: {p.account_url} ({p.account_status})"))
