"""The provider record is bound into the sealed account key (issue 12 item 5):
an etcd writer who changes a provider's directory URL or CA bundle gets its
account key refused, naming what changed; keys sealed before the binding
(format v1) still open and are sealed again, bound. Over the in-memory store;
no ACME server is contacted (``Accounts.client`` only builds the client)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from pathlib import Path

import josepy as jose
import pytest
from clusteracme.coordinator import records
from clusteracme.coordinator.accounts import Accounts, ProviderRecordChanged, account_binding
from clusteracme.coordinator.acme_client import AcmeClient, generate_account_key
from clusteracme.coordinator.secretbox import BindingChanged, SecretBox, is_legacy
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from clusteracme import errors

KEYS = Keys("/t/")
DIRECTORY = "https://ca.test/dir"
BUNDLE = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"  # never parsed by client()


def thumbprint(key_pem: bytes) -> bytes:
    return jose.JWKEC(key=serialization.load_pem_private_key(key_pem, None)).thumbprint()


def client_thumbprint(client: AcmeClient) -> bytes:
    return client._net.key.thumbprint()  # the key the ACME session signs with


@pytest.fixture
def key_bytes() -> bytes:
    return os.urandom(32)


@pytest.fixture
def box(key_bytes: bytes) -> SecretBox:
    return SecretBox(key_bytes)


def accounts(store: MemoryStore, box: SecretBox, *, migrate: bool = False) -> Accounts:
    return Accounts(store, KEYS, box, acme_timeout=1, migrate_unbound_keys=migrate)


async def put(store: MemoryStore, name: str, record: dict) -> None:
    await store.put_if(KEYS.provider(name), records.encode(record), expect_mod_revision=None)


async def get(store: MemoryStore, name: str) -> dict:
    data, _ = await records.read(store, KEYS.provider(name))
    assert data is not None
    return data


async def registered(store: MemoryStore, box: SecretBox, monkeypatch: pytest.MonkeyPatch, *,
                     name: str = "pebble", bundle: str = BUNDLE) -> bytes:
    """A provider registered through ``Accounts.register`` (the ACME exchange
    itself answered here); returns the account key it generated."""
    await put(store, name, {"name": name, "directory_url": DIRECTORY, "ca_bundle_pem": bundle,
                            "terms_of_service": "", "external_account_required": False})
    seen: dict[str, bytes] = {}

    def register(self: AcmeClient, email: str, kid: str, hmac: str) -> tuple[str, str]:
        seen["thumbprint"] = self._net.key.thumbprint()
        return f"https://ca.test/acct/{name}", "valid"

    monkeypatch.setattr(AcmeClient, "register", register)
    await accounts(store, box).register(name, "ops@test.example", True)
    return seen["thumbprint"]


async def test_register_seals_the_key_bound_to_the_record(box: SecretBox, monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    registered_key = await registered(store, box, monkeypatch)
    data = await get(store, "pebble")
    sealed = data["account_key"]
    assert sealed.startswith("v2:") and not is_legacy(sealed)
    # The binding: the directory URL and the CA bundle's SHA-256, as AES-GCM associated data.
    assert account_binding(data) == {"directory_url": DIRECTORY,
                                     "ca_bundle_sha256": hashlib.sha256(BUNDLE.encode()).hexdigest()}
    with pytest.raises(BindingChanged):
        box.open(sealed, "provider/pebble", {})
    client = await accounts(store, box).client("pebble")
    assert client_thumbprint(client) == registered_key


@pytest.mark.parametrize("field, value, said", [
    ("directory_url", "https://evil.test/dir",
     "directory URL was 'https://ca.test/dir', is now 'https://evil.test/dir'"),
    ("ca_bundle_pem", BUNDLE.replace("MIIB", "MIIC"), "CA bundle (SHA-256) was "),
    ("ca_bundle_pem", "", "is now (none)"),
])
async def test_a_changed_record_is_refused_naming_what_changed(
        box: SecretBox, monkeypatch: pytest.MonkeyPatch, field: str, value: str, said: str) -> None:
    store = MemoryStore()
    key = await registered(store, box, monkeypatch)
    original = await get(store, "pebble")
    await put(store, "pebble", {**original, field: value})  # an etcd writer, behind the coordinator's back
    built: list[str] = []
    real_init = AcmeClient.__init__

    def counting_init(self: AcmeClient, directory_url: str, **kwargs: object) -> None:
        built.append(directory_url)
        real_init(self, directory_url, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(AcmeClient, "__init__", counting_init)
    with pytest.raises(ProviderRecordChanged) as refused:
        await accounts(store, box).client("pebble")
    message = refused.value.message
    assert message.startswith("provider pebble's record changed since its account was registered: ")
    assert said in message and "re-register" in message and "not used" in message
    assert isinstance(refused.value, errors.FailedPrecondition)
    assert built == []  # no ACME client was made with the key
    assert (await get(store, "pebble"))[field] == value  # and nothing was rewritten
    # Restored: the key opens again.
    await put(store, "pebble", original)
    assert client_thumbprint(await accounts(store, box).client("pebble")) == key


async def test_both_fields_changed_are_both_named(box: SecretBox, monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    await registered(store, box, monkeypatch)
    data = await get(store, "pebble")
    await put(store, "pebble", {**data, "directory_url": "https://evil.test/dir", "ca_bundle_pem": ""})
    with pytest.raises(ProviderRecordChanged, match=r"CA bundle \(SHA-256\) was [0-9a-f]{16}, is now \(none\); "
                                                    r"directory URL was 'https://ca.test/dir'"):
        await accounts(store, box).client("pebble")


async def test_a_forged_binding_does_not_open_either(box: SecretBox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The binding copy in the blob only words the refusal: rewriting it to
    match a changed record does not make the key open."""
    store = MemoryStore()
    await registered(store, box, monkeypatch)
    data = await get(store, "pebble")
    changed = {**data, "directory_url": "https://evil.test/dir"}
    _, clear, boxed = data["account_key"].split(":")
    forged = base64.b64encode(json.dumps(account_binding(changed), sort_keys=True,
                                         separators=(",", ":")).encode()).decode()
    await put(store, "pebble", {**changed, "account_key": f"v2:{forged}:{boxed}"})
    with pytest.raises(errors.FailedPrecondition, match="does not open with this coordinator's key file") as refused:
        await accounts(store, box).client("pebble")
    assert not isinstance(refused.value, ProviderRecordChanged)


async def test_a_key_copied_to_another_provider_does_not_open(box: SecretBox,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    await registered(store, box, monkeypatch, name="pebble")
    await registered(store, box, monkeypatch, name="other")
    first, second = await get(store, "pebble"), await get(store, "other")
    await put(store, "other", {**second, "account_key": first["account_key"]})
    with pytest.raises(errors.FailedPrecondition, match="does not open"):
        await accounts(store, box).client("other")


async def test_another_key_file_does_not_open(box: SecretBox, monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    await registered(store, box, monkeypatch)
    with pytest.raises(errors.FailedPrecondition, match="a different --account-key-file"):
        await accounts(store, SecretBox(os.urandom(32))).client("pebble")


def seal_v1(key_bytes: bytes, plaintext: bytes, context: str) -> str:
    """What the coordinator wrote before the binding (format v1): AAD = the context alone."""
    nonce = os.urandom(12)
    return "v1:" + base64.b64encode(nonce + AESGCM(key_bytes).encrypt(nonce, plaintext, context.encode())).decode()


async def test_a_v1_key_still_opens_and_is_sealed_again_bound(key_bytes: bytes, box: SecretBox,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    key_pem = generate_account_key()
    await put(store, "pebble", {"name": "pebble", "directory_url": DIRECTORY, "ca_bundle_pem": "",
                                "account_url": "https://ca.test/acct/1", "account_status": "valid",
                                "account_key": seal_v1(key_bytes, key_pem, "provider/pebble")})
    caplog.set_level(logging.WARNING)
    # Without the migration setting an unbound key is refused and nothing is written.
    with pytest.raises(errors.FailedPrecondition, match="migrate_unbound_account_keys"):
        await accounts(store, box).client("pebble")
    assert (await get(store, "pebble"))["account_key"].startswith("v1:")
    client = await accounts(store, box, migrate=True).client("pebble")
    assert client_thumbprint(client) == thumbprint(key_pem)
    resealed = await get(store, "pebble")
    assert resealed["account_key"].startswith("v2:")
    assert box.open(resealed["account_key"], "provider/pebble", account_binding(resealed)) == key_pem
    assert "sealed again, bound to directory URL 'https://ca.test/dir'" in caplog.text
    # From now on the record is bound.
    await put(store, "pebble", {**resealed, "directory_url": "https://evil.test/dir"})
    with pytest.raises(ProviderRecordChanged, match="directory URL was 'https://ca.test/dir'"):
        await accounts(store, box).client("pebble")


async def test_a_v1_key_opens_with_a_lost_reseal_race(key_bytes: bytes, box: SecretBox,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A record rewritten between the read and the re-seal is not overwritten;
    the key still serves this use."""
    store = MemoryStore()
    key_pem = generate_account_key()
    legacy = seal_v1(key_bytes, key_pem, "provider/pebble")
    await put(store, "pebble", {"name": "pebble", "directory_url": DIRECTORY, "ca_bundle_pem": "",
                                "account_url": "https://ca.test/acct/1", "account_key": legacy})
    real_put_if = store.put_if

    async def racing_put_if(key: str, value: bytes, *, expect_mod_revision: int | None, lease: int = 0) -> int:
        await real_put_if(key, records.encode({**records.decode(value), "note": "another writer"}),
                          expect_mod_revision=None)
        return await real_put_if(key, value, expect_mod_revision=expect_mod_revision, lease=lease)

    monkeypatch.setattr(store, "put_if", racing_put_if)
    client = await accounts(store, box, migrate=True).client("pebble")
    assert client_thumbprint(client) == thumbprint(key_pem)
    monkeypatch.undo()
    assert (await get(store, "pebble"))["note"] == "another writer"


def test_secretbox_formats(box: SecretBox) -> None:
    sealed = box.seal(b"secret", "provider/a", {"directory_url": "https://a/"})
    assert b"secret" not in base64.b64decode(sealed.split(":")[2])
    assert box.open(sealed, "provider/a", {"directory_url": "https://a/"}) == b"secret"
    with pytest.raises(BindingChanged) as changed:
        box.open(sealed, "provider/a", {"directory_url": "https://b/"})
    assert changed.value.changed == {"directory_url": ("https://a/", "https://b/")}
    for damaged in ("v2:!!:AAAA", "v2:e30=", "v3:abc", "v1:%%%"):
        with pytest.raises(errors.FailedPrecondition, match="unknown format|damaged"):
            box.open(damaged, "provider/a", {})


def test_the_account_key_file_check_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o644)
    with pytest.raises(errors.InvalidArgument, match="readable by others"):
        SecretBox.from_file(path)
