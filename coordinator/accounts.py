"""ACME providers and accounts (SPEC R1).

A provider is a directory URL with a name (and optionally the CA bundle that
verifies the directory's TLS). Its account key is generated once, sealed with
the coordinator's key file and stored in ``providers/<name>`` so every replica
can sign as the account.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from clusteracme.coordinator import records
from clusteracme.coordinator.acme_client import AcmeClient, generate_account_key
from clusteracme.coordinator.secretbox import BindingChanged, SecretBox, is_legacy
from clusteracme.coordinator.slots import is_imported
from clusteracme.coordinator.store.base import Conflict, Store
from clusteracme.coordinator.store.keys import Keys
from cryptography import x509

from clusteracme import errors

log = logging.getLogger(__name__)

_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # fullmatch: "$" would take "name\n"
# A pragmatic address check: RFC 5322 in full is not what CAs accept either
# (Let's Encrypt refuses quoted local parts, IP literals and unknown TLDs).
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")

# "default" means "no provider of its own" (schedule set --provider default);
# "manual" is the provider recorded with an imported certificate.
RESERVED_NAMES = frozenset({"default", "manual"})
DEFAULT_PROVIDER_SETTING = "default_provider"

PRESETS = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}


@dataclass(frozen=True)
class ProviderView:
    name: str
    directory_url: str
    terms_of_service: str
    account_url: str
    account_status: str
    contact: str
    has_ca_bundle: bool


def _view(data: dict[str, Any]) -> ProviderView:
    return ProviderView(
        data["name"], data["directory_url"], data.get("terms_of_service", ""), data.get("account_url", ""),
        data.get("account_status", ""), data.get("contact", ""), bool(data.get("ca_bundle_pem")),
    )


class ProviderUnresolved(errors.FailedPrecondition):
    """No provider can sign: none is chosen among several accounts, none has
    an account, or the chosen one has no account (any more). Automatic renewal
    treats it as a pause, not as a failure: only an operator can fix it."""


@dataclass(frozen=True)
class ProviderBook:
    """The providers (with whether each has an account) and the cluster
    default: all that the choice of a provider depends on."""

    default: str
    accounts: dict[str, bool]

    def choose(self, *, explicit: str = "", slot: dict[str, Any] | None = None, renewal: bool = False) -> str:
        """The provider that signs for a slot, by the one rule of the cluster:
        the request's ``--provider``, else the slot's saved provider, else the
        cluster default, else (renewal only) the provider of the certificate in
        service unless it was imported, else the only provider with an account.

        Raises ``NotFound`` for an explicit name that does not exist and
        ``ProviderUnresolved`` (FailedPrecondition) when nothing can sign:
        several accounts and no choice anywhere, no account at all, or a
        chosen provider without an account (or gone).
        """
        slot = slot or {}
        if explicit:
            return self._with_account(explicit, "")
        saved = slot.get("provider") or ""
        if saved:
            return self._with_account(saved, "the slot's provider")
        if self.default:
            return self._with_account(self.default, "the cluster default provider")
        if renewal:
            active = slot.get("active") or {}
            active_provider = active.get("provider") or ""
            # An imported certificate has no provider to follow. A reserved
            # name is followed only when such a provider exists (one added
            # before the names were reserved: it signs with ACME), and then
            # only the ``imported`` flag makes its certificate imported.
            if active_provider in RESERVED_NAMES:
                followable = active_provider in self.accounts and active.get("imported") is not True
            else:
                followable = not is_imported(active)
            if active_provider and followable:
                return self._with_account(active_provider, "the provider of the certificate in service")
        with_account = sorted(name for name, has in self.accounts.items() if has)
        if len(with_account) == 1:
            return with_account[0]
        if not with_account:
            raise ProviderUnresolved(
                "no ACME account registered yet (acmectl provider add, then acmectl account register)")
        listed = ", ".join(with_account)
        if renewal:
            raise ProviderUnresolved(
                f"no provider chosen: providers {listed} have accounts; choose with acmectl schedule set "
                "--provider or acmectl provider default")
        raise ProviderUnresolved(
            f"no provider chosen: providers {listed} have accounts; give --provider, save one with the slot "
            "(acmectl schedule set --provider) or set the cluster default (acmectl provider default)")

    def _with_account(self, name: str, chosen_as: str) -> str:
        if name not in self.accounts:
            if not chosen_as:
                raise errors.NotFound(f"no provider named {name[:64]!r} (acmectl provider list)")
            raise ProviderUnresolved(f"{chosen_as} {name!r} does not exist (acmectl provider list)")
        if not self.accounts[name]:
            what = f"{chosen_as} {name}" if chosen_as else f"provider {name}"
            raise ProviderUnresolved(f"{what} has no account yet (acmectl account register --provider {name})")
        return name


class ProviderRecordChanged(errors.FailedPrecondition):
    """A provider's directory URL or CA bundle is not the one its account key
    was sealed with (changed in etcd since the account was registered): the
    key is not used."""


def account_binding(data: dict[str, Any]) -> dict[str, str]:
    """What a provider's account key is sealed with besides its name (AES-GCM
    associated data, see ``clusteracme.coordinator.secretbox``): the directory URL and
    the SHA-256 of the CA bundle ("" without one). The key is used only with
    the record it was registered for."""
    pem = data.get("ca_bundle_pem") or ""
    return {"directory_url": data.get("directory_url", ""),
            "ca_bundle_sha256": hashlib.sha256(pem.encode()).hexdigest() if pem else ""}


_BOUND_LABELS = {"directory_url": "directory URL", "ca_bundle_sha256": "CA bundle (SHA-256)"}


def _record_changed(name: str, changed: dict[str, tuple[str, str]]) -> ProviderRecordChanged:
    def shown(field: str, value: str) -> str:
        if not value:
            return "(none)"
        return value[:16] if field == "ca_bundle_sha256" else repr(value[:200])

    what = "; ".join(f"{_BOUND_LABELS.get(f, f)} was {shown(f, old)}, is now {shown(f, new)}"
                     for f, (old, new) in sorted(changed.items()))
    return ProviderRecordChanged(
        f"provider {name}'s record changed since its account was registered: {what}; its account key was not "
        f"used. Restore the record, or, if the change is intended, re-register: add the provider again under a "
        f"new name (acmectl provider add NAME --directory URL) and register its account")


def check_ca_bundle(pem: str) -> None:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        certs = []
    if not certs:
        raise errors.InvalidArgument("the CA bundle holds no PEM certificate")


class Accounts:
    def __init__(self, store: Store, keys: Keys, box: SecretBox, *, acme_timeout: float,
                 migrate_unbound_keys: bool = False) -> None:
        """``migrate_unbound_keys`` (setting ``migrate_unbound_account_keys``,
        from the config file, never from etcd): open account keys sealed by
        an older version without their provider record bound, and seal them
        again bound to the record as it is now. Off, such a key is refused:
        an etcd writer could have changed the record (or put back an old
        sealed value from etcd's history) before the first use."""
        self._migrate_unbound = migrate_unbound_keys
        self._store = store
        self._keys = keys
        self._box = box
        self._timeout = acme_timeout
        self._bundle_dir = Path(tempfile.mkdtemp(prefix="clusteracme-ca-"))
        self._reserved_warned: set[str] = set()
        self._resealed: set[str] = set()

    def _bundle_path(self, pem: str) -> str | None:
        """The CA bundle as a file for ``requests`` (written once per content)."""
        if not pem:
            return None
        path = self._bundle_dir / (hashlib.sha256(pem.encode()).hexdigest()[:16] + ".pem")
        if not path.exists():
            path.write_text(pem)
        return str(path)

    async def add_provider(self, name: str, directory_url: str, ca_bundle_pem: str) -> ProviderView:
        if not _PROVIDER_NAME.fullmatch(name):
            raise errors.InvalidArgument(
                f"{name!r} is not a valid provider name (lowercase letters, digits, '-' and '_', up to 63)"
            )
        if name in RESERVED_NAMES:
            raise errors.InvalidArgument(f"{name!r} is reserved ('default': the cluster default, "
                                         "'manual': imported certificates); choose another provider name")
        directory_url = directory_url or PRESETS.get(name, "")
        parts = urlsplit(directory_url)
        if parts.scheme != "https" or not parts.hostname:
            raise errors.InvalidArgument(f"{directory_url!r} is not an https:// URL (ACME requires HTTPS)")
        if ca_bundle_pem:
            check_ca_bundle(ca_bundle_pem)
        if await self._store.get(self._keys.provider(name)) is not None:
            raise errors.AlreadyExists(f"provider {name!r} already exists")
        # Fetch the directory before storing anything: a URL that is not an
        # ACME directory is refused and leaves etcd untouched.
        client = AcmeClient(directory_url, ca_bundle=self._bundle_path(ca_bundle_pem), timeout=self._timeout)
        info = await asyncio.to_thread(client.directory)
        record = {
            "name": name, "directory_url": directory_url, "ca_bundle_pem": ca_bundle_pem,
            "terms_of_service": info.terms_of_service, "external_account_required": info.external_account_required,
        }
        await self._store.put_if(self._keys.provider(name), records.encode(record), expect_mod_revision=0)
        return _view(record)

    async def list(self) -> list[ProviderView]:
        entries = await self._store.range(self._keys.providers())
        views = [_view(records.decode(e.value, e.key)) for e in entries]
        self._warn_reserved(views)
        return views

    def _warn_reserved(self, views: list[ProviderView]) -> None:
        """A provider named "default" or "manual" (added before the names were
        reserved) still signs, but ``--provider default`` means the cluster
        default and "manual" reads as "imported": say so once per process."""
        for view in views:
            if view.name in RESERVED_NAMES and view.name not in self._reserved_warned:
                self._reserved_warned.add(view.name)
                log.error("provider %r has a reserved name ('default': the cluster default, 'manual': imported "
                          "certificates); it still signs, but add it again under another name (acmectl provider "
                          "add NAME --directory %s), register its account and move the slots to it "
                          "(acmectl schedule set --provider NAME)", view.name, view.directory_url)

    async def warn_reserved(self) -> None:
        """Log the providers with a reserved name (at the scheduler's start)."""
        await self.list()

    async def _get(self, name: str) -> tuple[dict[str, Any], int]:
        data, rev = await records.read(self._store, self._keys.provider(name))
        if data is None:
            raise errors.NotFound(f"no provider named {name!r} (acmectl provider add {name} --directory URL)")
        return data, rev

    async def register(self, name: str, email: str, agree_tos: bool, eab_kid: str = "",
                       eab_hmac_key: str = "") -> ProviderView:
        data, rev = await self._get(name)
        if not agree_tos:
            tos = data.get("terms_of_service") or "(the CA publishes no terms URL)"
            raise errors.FailedPrecondition(
                f"registering with {name} requires accepting its terms of service: {tos} "
                "-- read them, then repeat with --agree-tos"
            )
        if not _EMAIL.fullmatch(email or ""):
            raise errors.InvalidArgument(f"{email!r} is not a valid contact e-mail address")
        if data.get("account_url"):
            raise errors.AlreadyExists(f"provider {name} already has an account: {data['account_url']}")
        if data.get("external_account_required") and not (eab_kid and eab_hmac_key):
            raise errors.FailedPrecondition(
                f"provider {name} requires External Account Binding: give --eab-kid and --eab-hmac-key-file "
                "FILE or ACMECTL_EAB_HMAC_KEY (the key id and MAC key your CA issued for this account)")
        if bool(eab_kid) != bool(eab_hmac_key):
            raise errors.InvalidArgument("the EAB key id and MAC key go together (--eab-kid with "
                                         "--eab-hmac-key-file or ACMECTL_EAB_HMAC_KEY)")
        if len(eab_kid) > 256 or len(eab_hmac_key) > 512:
            raise errors.InvalidArgument("the EAB key id or MAC key is too long")
        key_pem = generate_account_key()
        client = AcmeClient(data["directory_url"], ca_bundle=self._bundle_path(data.get("ca_bundle_pem", "")),
                            key_pem=key_pem, timeout=self._timeout)
        account_url, status = await asyncio.to_thread(client.register, email, eab_kid, eab_hmac_key)
        record = {
            **data, "account_url": account_url, "account_status": status, "contact": email,
            "account_key": self._box.seal(key_pem, f"provider/{name}", account_binding(data)), "eab_kid": eab_kid,
        }
        await self._store.put_if(self._keys.provider(name), records.encode(record), expect_mod_revision=rev)
        return _view(record)

    async def resolve(self, name: str) -> str:
        """The provider to sign with: the named one, or the only one with an account."""
        return await self.choose(explicit=name)

    async def exists(self, name: str) -> str:
        """``name`` if such a provider exists (raises NotFound otherwise)."""
        if not _PROVIDER_NAME.fullmatch(name):
            raise errors.NotFound(f"no provider named {name[:64]!r} (acmectl provider list)")
        await self._get(name)
        return name

    # --- which provider signs (the one rule, for sign and for renewal) ----------
    async def default_provider(self) -> str:
        """The cluster default (``acmectl provider default``), "" when none is set."""
        data, _ = await records.read(self._store, self._keys.setting(DEFAULT_PROVIDER_SETTING))
        return (data or {}).get("provider", "")

    async def set_default(self, name: str) -> str:
        """Make ``name`` the cluster default ("" clears it); it must exist."""
        key = self._keys.setting(DEFAULT_PROVIDER_SETTING)
        if not name:
            await self._store.delete_if(key, expect_mod_revision=None)
            return ""
        await self.exists(name)

        def change(current: dict[str, Any] | None) -> dict[str, Any]:
            return current if current is not None and current.get("provider") == name else {"provider": name}

        await records.update(self._store, key, change)
        return name

    async def book(self) -> ProviderBook:
        """What the provider choice depends on, read once (two reads)."""
        providers = await self.list()
        return ProviderBook(await self.default_provider(), {p.name: bool(p.account_url) for p in providers})

    async def choose(self, *, explicit: str = "", slot: dict[str, Any] | None = None, renewal: bool = False) -> str:
        """The provider that signs for a slot (see :meth:`ProviderBook.choose`)."""
        return (await self.book()).choose(explicit=explicit, slot=slot, renewal=renewal)

    async def client(self, name: str) -> AcmeClient:
        """A fresh ACME session as the provider's account (one per order)."""
        data, rev = await self._get(name)
        if not data.get("account_url"):
            raise errors.FailedPrecondition(f"provider {name} has no account yet (acmectl account register)")
        binding = account_binding(data)
        try:
            key_pem = self._box.open(data["account_key"], f"provider/{name}", binding)
        except BindingChanged as exc:
            raise _record_changed(name, exc.changed) from None
        if is_legacy(data["account_key"]):
            if not self._migrate_unbound:
                raise errors.FailedPrecondition(
                    f"provider {name}: its account key was sealed by an older version without the provider's "
                    f"directory URL and CA bundle bound to it, so a change of its record in etcd could not be "
                    f"detected; it was not used. Check the record (acmectl provider list: directory "
                    f"{data['directory_url']}), then set migrate_unbound_account_keys = true in the coordinator's "
                    f"config for one start to seal it again, bound to the record as it is")
            await self._reseal(name, data, rev, key_pem)
        return AcmeClient(data["directory_url"], ca_bundle=self._bundle_path(data.get("ca_bundle_pem", "")),
                          key_pem=key_pem, account_url=data["account_url"], timeout=self._timeout)

    async def _reseal(self, name: str, data: dict[str, Any], rev: int, key_pem: bytes) -> None:
        """Seal an account key of the v1 format (sealed before the provider
        record was bound to it) again, bound to the record as it is now. A
        lost race or a failed write is left for the next use."""
        binding = account_binding(data)
        record = {**data, "account_key": self._box.seal(key_pem, f"provider/{name}", binding)}
        try:
            await self._store.put_if(self._keys.provider(name), records.encode(record), expect_mod_revision=rev)
        except Conflict:
            return
        except errors.ClusterAcmeError as exc:
            log.warning("provider %s: cannot seal its account key again with its record bound: %s", name,
                        exc.message)
            return
        if name not in self._resealed:
            self._resealed.add(name)
            log.warning("provider %s: its account key was sealed without its directory URL and CA bundle (before "
                        "they were bound to it); sealed again, bound to directory URL %r and CA bundle %s: check "
                        "with acmectl provider list that they are the ones you registered", name,
                        binding["directory_url"], binding["ca_bundle_sha256"][:16] or "(none)")
