"""The agent's key store: keys stay on disk (0600), CSRs carry the names and the optional
subject attributes; keys no longer in use are retired, then deleted after the retention."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import pytest
from clusteracme.coordinator import imports
from clusteracme.peer_agent import keys as keys_module
from clusteracme.peer_agent.certs import CertStore
from clusteracme.peer_agent.errors import BrokenPair, InvalidSlot, KeyNotHeld, UnknownKeyType
from clusteracme.peer_agent.keys import TOMBSTONE_SECONDS, InvalidSubject, KeyStore, rfc3339, validate_subject
from clusteracme.peer_agent.revocation import sign_revocation
from clusteracme.peer_agent.rpc.servicer import AgentServicer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clusteracme import certinfo
from clusteracme.errors import FailedPrecondition, InvalidArgument
from clusteracme.v1 import agent_pb2, common_pb2
from tests.unit.test_cert_store import CertFactory, issue

UTC = datetime.UTC


@pytest.mark.parametrize(("key_type", "label"), [
    (common_pb2.KEY_TYPE_EC_P256, "ec-p256"), (common_pb2.KEY_TYPE_EC_P384, "ec-p384"),
    (common_pb2.KEY_TYPE_RSA_2048, "rsa-2048"),
])
def test_csr_for_each_key_type(tmp_path: Path, key_type: int, label: str) -> None:
    store = KeyStore(tmp_path)
    csr_pem, spki = store.generate_csr("", "a.example", ["b.example", "a.example"], key_type)
    csr = certinfo.load_csr(csr_pem)
    assert certinfo.csr_names(csr) == ["a.example", "b.example"]
    assert certinfo.spki_sha256(csr.public_key()) == spki
    assert certinfo.key_label(csr.public_key()) == label
    key_file = store.key_file("", spki)
    assert key_file is not None and key_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "slots" / "server").stat().st_mode & 0o777 == 0o700
    [info] = store.slots()
    assert (info.domain, info.public_key_sha256, info.key_type, info.held_keys) == ("", spki, label, (spki,))


def test_refusals_leave_the_previous_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    _, spki = store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    with pytest.raises(UnknownKeyType, match="ec-p256"):
        store.generate_csr("", "a.example", [], 99)
    with pytest.raises(InvalidSlot):
        store.generate_csr("", "bad_name.example", [], common_pb2.KEY_TYPE_EC_P256)
    with pytest.raises(InvalidSlot):
        store.generate_csr("../etc", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    assert [s.public_key_sha256 for s in store.slots()] == [spki]


def test_a_new_csr_keeps_the_earlier_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    _, first = store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    _, second = store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P384)
    [info] = store.slots()
    assert info.public_key_sha256 == second and set(info.held_keys) == {first, second}
    assert store.key_file("", first) is not None and store.key_file("", "../x") is None


def test_domain_slots_are_separate(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    store.generate_csr("shop.example", "shop.example", [], common_pb2.KEY_TYPE_EC_P256)
    assert sorted(s.domain for s in store.slots()) == ["", "shop.example"]
    assert isinstance(x509.load_pem_x509_csr((tmp_path / "slots" / "domain-shop.example" / "csr.pem").read_bytes()),
                      x509.CertificateSigningRequest)


# --- CSR subject attributes (issue 9 item 2) ------------------------------------------


def subject_of(csr_pem: str) -> list[tuple[str, str]]:
    return [(a.rfc4514_attribute_name, str(a.value)) for a in certinfo.load_csr(csr_pem).subject]


def test_subject_attributes_go_into_the_csr_in_order(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    csr_pem, _ = store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256, {
        "organization": "Acme Co., Ltd.", "organizational_unit": "Web", "locality": "Chiyoda-ku",
        "state": "Tōkyō", "country": "jp"})
    assert subject_of(csr_pem) == [("C", "JP"), ("ST", "Tōkyō"), ("L", "Chiyoda-ku"), ("O", "Acme Co., Ltd."),
                                   ("OU", "Web"), ("CN", "a.example")]
    # empty values are absent; none at all is the plain CN subject
    csr_pem, _ = store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256,
                                    {"organization": "Acme", "state": "", "country": ""})
    assert subject_of(csr_pem) == [("O", "Acme"), ("CN", "a.example")]
    csr_pem, _ = store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    assert subject_of(csr_pem) == [("CN", "a.example")]


@pytest.mark.parametrize(("subject", "fragment"), [
    ({"country": "JPN"}, "C must be two letters"),
    ({"country": "J1"}, "C must be two letters"),
    ({"country": "日本"}, "C must be two letters"),
    ({"organization": "x" * 65}, "O has 65 characters, more than 64"),
    ({"organizational_unit": "x" * 65}, "OU has 65 characters, more than 64"),
    ({"locality": "x" * 129}, "L has 129 characters, more than 128"),
    ({"state": "x" * 129}, "ST has 129 characters, more than 128"),
    ({"locality": "Paris\nCN=evil.example"}, "L holds a control"),
    ({"organization": "Acme\x00"}, "O holds a control"),
    ({"organizational_unit": "   "}, "OU is blank"),
    ({"organizational_unit": "\u3000"}, "OU is blank"),
    ({"organization": "Ac\u200bme"}, r"O holds a control or non-printable character \(U\+200B\)"),  # Cf
    ({"organization": "Acme\u202e"}, r"\(U\+202E\)"),  # bidi override (Cf)
    ({"locality": "Paris\u2028Lyon"}, r"L holds a control .*\(U\+2028\)"),  # Zl
    ({"locality": "Paris\u2029"}, r"\(U\+2029\)"),  # Zp
    ({"state": "\ue000"}, r"\(U\+E000\)"),  # private use
    ({"state": "\u0378"}, r"\(U\+0378\)"),  # unassigned
    ({"email": "a@b.example"}, "unknown CSR subject attribute"),
])
def test_bad_subject_attributes_are_refused_before_anything_changes(
        tmp_path: Path, subject: dict[str, str], fragment: str) -> None:
    store = KeyStore(tmp_path)
    _, spki = store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    before = (tmp_path / "slots" / "server" / "csr.pem").read_bytes()
    with pytest.raises(InvalidSubject, match=fragment):
        store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256, subject)
    [info] = store.slots()
    assert (info.public_key_sha256, info.held_keys) == (spki, (spki,))
    assert (tmp_path / "slots" / "server" / "csr.pem").read_bytes() == before


def test_names_with_any_kind_of_space_are_accepted_and_trimmed(tmp_path: Path) -> None:
    """NBSP and the ideographic space (Unicode Zs) are ordinary in names; the
    agent trims surrounding spaces as the coordinator does."""
    csr_pem, _ = KeyStore(tmp_path).generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256, {
        "organization": "株式会社\u3000例示", "organizational_unit": "R\u00a0&\u00a0D", "locality": " Chiyoda-ku\u3000",
        "country": " jp "})
    assert subject_of(csr_pem) == [("C", "JP"), ("L", "Chiyoda-ku"), ("O", "株式会社\u3000例示"),
                                   ("OU", "R\u00a0&\u00a0D"), ("CN", "a.example")]


@pytest.mark.parametrize(("value", "accepted"), [
    ("株式会社\u3000例示", "株式会社\u3000例示"),  # ideographic space (Zs)
    ("R\u00a0&\u00a0D", "R\u00a0&\u00a0D"),  # no-break space (Zs)
    ("\u3000Acme\u00a0 ", "Acme"),  # trimmed on both sides
    ("Ac\u200bme", None),  # zero-width space (Cf)
    ("Acme\u202e", None),  # right-to-left override (Cf)
    ("Acme\u2028", None),  # line separator (Zl)
    ("Acme\u2029", None),  # paragraph separator (Zp)
    ("\ue000", None),  # private use (Co)
    ("\u0378", None),  # unassigned (Cn)
    ("Acme\x7f", None),  # control (Cc)
])
def test_the_agent_and_the_coordinator_agree_on_subject_values(value: str, accepted: str | None) -> None:
    """``imports.check_subject`` (the coordinator, before it asks) and
    ``validate_subject`` (the agent) take and refuse the same values, and
    trim alike: the coordinator compares the CSR's subject with its own."""
    given = {"organization": value}
    if accepted is None:
        with pytest.raises(InvalidArgument, match="non-printable|control"):
            imports.check_subject(given)
        with pytest.raises(InvalidSubject, match="control or non-printable"):
            validate_subject(given)
        return
    assert imports.check_subject(given) == validate_subject(given) == {"organization": accepted}


def test_subject_text_escapes_values_as_rfc_4514_says() -> None:
    """``O=X, CN=bank.example`` must not read as a second CN."""
    assert imports.subject_text({"organization": "X, CN=bank.example", "country": "FR"}) == \
        "O=X\\, CN=bank.example, C=FR"
    assert imports.subject_text({"organizational_unit": '#1 "web"+api; <edge>', "locality": " Lyon ",
                                 "state": "a\\b"}) == \
        'OU=\\#1 \\"web\\"\\+api\\; \\<edge\\>, L=\\ Lyon\\ , ST=a\\\\b'
    # the same escaping as the CSR's own subject
    subject = {"organization": "Acme, Inc.", "organizational_unit": "R+D"}
    attributes = [x509.NameAttribute(f.oid, subject[f.key]) for f in imports.SUBJECT_FIELDS if f.key in subject]
    assert imports.subject_text(subject) == ", ".join(a.rfc4514_string() for a in attributes) == \
        "O=Acme\\, Inc., OU=R\\+D"


def test_the_upper_bounds_themselves_are_accepted(tmp_path: Path) -> None:
    csr_pem, _ = KeyStore(tmp_path).generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256, {
        "organization": "o" * 64, "organizational_unit": "u" * 64, "locality": "l" * 128, "state": "s" * 128})
    assert [len(v) for _, v in subject_of(csr_pem)] == [128, 128, 64, 64, len("a.example")]


# --- retired keys (issue 9 item 11) ----------------------------------------------------

DAY = 86400.0
RETENTION = 30 * DAY
INTERVAL = 600.0  # the coordinator's retention.interval_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 2_500_000_000.0  # 2049: after the key files' real mtimes

    def __call__(self) -> float:
        return self.now


def no_pairs(domain: str) -> set[str]:
    return set()


def keys_dir(tmp_path: Path, slot: str = "server") -> Path:
    return tmp_path / "slots" / slot / "keys"


def files(tmp_path: Path, slot: str = "server") -> set[str]:
    return {p.name for p in keys_dir(tmp_path, slot).iterdir()}


def new_key(store: KeyStore, domain: str = "") -> str:
    return store.generate_csr(domain, domain or "a.example", [], common_pb2.KEY_TYPE_EC_P256)[1]


def marker_of(tmp_path: Path, fingerprint: str, slot: str = "server") -> dict[str, object]:
    return json.loads((keys_dir(tmp_path, slot) / f"{fingerprint}.retired").read_text())


def ts(text: object) -> float:
    return datetime.datetime.fromisoformat(str(text)).timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_an_unused_key_is_retired_then_deleted_after_the_retention(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore(tmp_path, clock=clock)
    old, kept, on_disk, current = (new_key(store) for _ in range(4))
    pairs = {"": {on_disk}}

    result = store.prune([kept], RETENTION, lambda d: pairs[d])
    assert [(k.fingerprint, k.retired_at.timestamp()) for k in result.retired] == [(old, clock.now)]
    assert result.deleted == [] and result.skipped == []
    marker = keys_dir(tmp_path) / f"{old}.retired"
    assert marker.stat().st_mode & 0o777 == 0o600
    assert marker_of(tmp_path, old) == {"retired_at": rfc3339(datetime.datetime.fromtimestamp(clock.now, UTC)),
                                        "seen": 1, "last_seen": marker_of(tmp_path, old)["retired_at"]}
    assert ts(marker_of(tmp_path, old)["retired_at"]) == clock.now  # RFC 3339
    retired_at = clock.now

    clock.now += RETENTION - 1  # not yet: still waiting, retired when first seen
    result = store.prune([kept], RETENTION, lambda d: pairs[d])
    assert [(k.fingerprint, k.retired_at.timestamp()) for k in result.retired] == [(old, retired_at)]
    assert result.deleted == [] and store.key_file("", old) is not None
    assert marker_of(tmp_path, old)["seen"] == 2 and ts(marker_of(tmp_path, old)["last_seen"]) == clock.now

    clock.now += 1  # the retention is over: this call notes it, the next one deletes
    result = store.prune([kept], RETENTION, lambda d: pairs[d])
    assert [k.fingerprint for k in result.retired] == [old] and result.deleted == []
    assert ts(marker_of(tmp_path, old)["due_at"]) == clock.now and store.key_file("", old) is not None

    clock.now += INTERVAL
    result = store.prune([kept], RETENTION, lambda d: pairs[d])
    assert result.retired == []
    [gone] = result.deleted
    assert (gone.fingerprint, gone.retired_at.timestamp(), gone.deleted_at.timestamp()) == (  # type: ignore[union-attr]
        old, retired_at, clock.now)
    assert store.key_file("", old) is None and store.find_key(old) is None
    assert files(tmp_path) == {f"{k}.key" for k in (kept, on_disk, current)} | {f"{old}.deleted"}
    tombstone = keys_dir(tmp_path) / f"{old}.deleted"
    assert tombstone.stat().st_mode & 0o777 == 0o600 and len(tombstone.read_bytes()) < 200
    assert store.deleted_key(old) == gone
    assert store.retired() == [gone]
    [info] = store.slots()
    assert set(info.held_keys) == {kept, on_disk, current}


def retire_and_delete(store: KeyStore, clock: Clock, retention: float = 1, keep: list[str] | None = None,
                      pairs: Any = no_pairs) -> list[str]:
    """Three calls: retired, found due, deleted. The fingerprints deleted."""
    store.prune(keep or [], retention, pairs)
    clock.now += retention
    store.prune(keep or [], retention, pairs)
    clock.now += INTERVAL
    return [k.fingerprint for k in store.prune(keep or [], retention, pairs).deleted]


def test_a_key_back_in_use_loses_its_marker(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore(tmp_path, clock=clock)
    pending, _ = new_key(store), new_key(store)
    assert [k.fingerprint for k in store.prune([], RETENTION, no_pairs).retired] == [pending]
    clock.now += RETENTION + 1
    assert [k.fingerprint for k in store.prune([], RETENTION, no_pairs).retired] == [pending]  # due now
    clock.now += INTERVAL
    # the cluster refers to it again (say, a certificate for it came back as pending)
    result = store.prune([pending], RETENTION, no_pairs)
    assert (result.retired, result.deleted) == ([], [])
    assert not (keys_dir(tmp_path) / f"{pending}.retired").exists() and store.retired() == []
    # unused once more: the retention starts again from now
    retired = store.prune([], RETENTION, no_pairs).retired
    assert [k.retired_at.timestamp() for k in retired] == [clock.now]


def test_a_dry_run_reports_and_changes_nothing(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore(tmp_path, clock=clock)
    first, second, _ = new_key(store), new_key(store), new_key(store)
    before = files(tmp_path)
    result = store.prune([], RETENTION, no_pairs, dry_run=True)
    assert sorted(k.fingerprint for k in result.retired) == sorted([first, second])
    assert files(tmp_path) == before
    store.prune([second], RETENTION, no_pairs)  # first retired for real
    clock.now += RETENTION
    store.prune([second], RETENTION, no_pairs)  # and found due
    clock.now += INTERVAL
    snapshot = {p.name: p.read_bytes() for p in keys_dir(tmp_path).iterdir()}
    result = store.prune([], RETENTION, no_pairs, dry_run=True)
    assert [k.fingerprint for k in result.deleted] == [first]  # would be deleted
    assert [k.fingerprint for k in result.retired] == [second]  # would be retired now
    assert {p.name: p.read_bytes() for p in keys_dir(tmp_path).iterdir()} == snapshot


def test_the_current_csr_key_and_the_pairs_on_disk_are_never_retired(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore(tmp_path, clock=clock)
    active, previous, current = new_key(store), new_key(store), new_key(store)
    for _ in range(3):
        result = store.prune([], 1, lambda d: {active, previous})
        clock.now += DAY
        assert (result.retired, result.deleted, result.skipped) == ([], [], [])
    assert files(tmp_path) == {f"{k}.key" for k in (active, previous, current)}


@pytest.mark.parametrize("retention", [0, -1, 0.5, float("nan"), float("inf")])
def test_a_retention_under_a_second_is_refused(tmp_path: Path, clock: Clock, retention: float) -> None:
    """0 is what a PruneKeysRequest without retention_seconds carries."""
    store = KeyStore(tmp_path, clock=clock)
    new_key(store)
    new_key(store)
    before = files(tmp_path)
    with pytest.raises(InvalidArgument, match="must be at least 1 second"):
        store.prune([], retention, no_pairs)
    assert files(tmp_path) == before


def test_a_key_is_deleted_only_on_the_third_call_that_sees_it_unused(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore(tmp_path, clock=clock)
    old, _ = new_key(store), new_key(store)
    assert [k.fingerprint for k in store.prune([], 1, no_pairs).retired] == [old]
    clock.now += 5
    assert [k.fingerprint for k in store.prune([], 1, no_pairs).retired] == [old]  # over: noted
    assert store.key_file("", old) is not None
    clock.now += 5
    assert [k.fingerprint for k in store.prune([], 1, no_pairs).deleted] == [old]


def test_a_clock_jumping_forward_does_not_delete_on_the_next_call(tmp_path: Path, clock: Clock,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = KeyStore(tmp_path, clock=clock)
    old, _ = new_key(store), new_key(store)
    start = clock.now
    store.prune([], RETENTION, no_pairs)
    clock.now += INTERVAL
    store.prune([], RETENTION, no_pairs)  # seen twice, well within the retention
    clock.now += 10 * 365 * DAY  # the clock jumps ten years ahead
    result = store.prune([], RETENTION, no_pairs)
    assert result.deleted == [] and [k.fingerprint for k in result.retired] == [old]
    # the clock is put right before the next call: the marker is dated after now, the retention restarts
    clock.now = start + 2 * INTERVAL
    result = store.prune([], RETENTION, no_pairs)
    assert result.deleted == [] and [k.retired_at.timestamp() for k in result.retired] == [clock.now]
    assert "dated after now" in caplog.text and store.key_file("", old) is not None
    assert marker_of(tmp_path, old)["seen"] == 1 and "due_at" not in marker_of(tmp_path, old)


def test_a_marker_dated_after_now_restarts_the_retention(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore(tmp_path, clock=clock)
    old, _ = new_key(store), new_key(store)
    store.prune([], RETENTION, no_pairs)
    clock.now -= DAY  # stepped back
    [retired] = store.prune([], RETENTION, no_pairs).retired
    assert retired.retired_at.timestamp() == clock.now
    assert ts(marker_of(tmp_path, old)["retired_at"]) == clock.now


def test_a_marker_older_than_its_key_file_restarts_the_retention(tmp_path: Path, clock: Clock,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Written while the clock was far behind (a host that booted in 2000)."""
    store = KeyStore(tmp_path, clock=clock)
    old, _ = new_key(store), new_key(store)
    (keys_dir(tmp_path) / f"{old}.retired").write_text("2000-01-01T00:00:00.000+00:00\n")  # first release's format
    for _ in range(3):
        result = store.prune([], RETENTION, no_pairs)
        assert result.deleted == [] and store.key_file("", old) is not None
        clock.now += INTERVAL
    assert "older than the key file" in caplog.text
    assert ts(marker_of(tmp_path, old)["retired_at"]) == clock.now - 3 * INTERVAL


def test_a_first_release_marker_counts_as_seen_once(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore(tmp_path, clock=clock)
    old, _ = new_key(store), new_key(store)
    retired_at = rfc3339(datetime.datetime.fromtimestamp(clock.now - RETENTION - DAY, UTC))
    (keys_dir(tmp_path) / f"{old}.retired").write_text(retired_at + "\n")
    os.utime(keys_dir(tmp_path) / f"{old}.key", (clock.now - 2 * RETENTION, clock.now - 2 * RETENTION))
    assert [k.retired_at for k in store.prune([], RETENTION, no_pairs).retired] == [
        datetime.datetime.fromisoformat(retired_at)]  # over: noted, not deleted yet
    assert [k.fingerprint for k in store.prune([], RETENTION, no_pairs).deleted] == [old]


def test_a_marker_that_cannot_be_written_skips_that_key_only(tmp_path: Path, clock: Clock,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    store = KeyStore(tmp_path, clock=clock)
    first, second, _ = new_key(store), new_key(store), new_key(store)
    stuck = sorted([first, second])[0]
    other = sorted([first, second])[1]
    (keys_dir(tmp_path) / f"{stuck}.retired").mkdir()  # cannot be replaced by a file
    result = store.prune([], RETENTION, no_pairs)
    assert [k.fingerprint for k in result.retired] == [other]
    assert len(result.skipped) == 1 and stuck in result.skipped[0] and "cannot be written" in result.skipped[0]
    assert (keys_dir(tmp_path) / f"{other}.retired").is_file()
    assert "left alone" in caplog.text


def test_a_slot_whose_pairs_cannot_be_read_is_left_alone(tmp_path: Path, clock: Clock,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    store = KeyStore(tmp_path, clock=clock)
    server_old, _ = new_key(store), new_key(store)
    domain_old, _ = new_key(store, "shop.example"), new_key(store, "shop.example")

    def pairs(domain: str) -> set[str]:
        if domain:
            raise BrokenPair("domain-shop.example/active points to 'x', not to a certificate directory")
        return set()

    result = store.prune([], 1, pairs)
    assert [(k.domain, k.fingerprint) for k in result.retired] == [("", server_old)]
    assert len(result.skipped) == 1 and "domain shop.example" in result.skipped[0]
    assert "left alone" in caplog.text
    assert not (keys_dir(tmp_path, "domain-shop.example") / f"{domain_old}.retired").exists()
    # nor a slot whose current CSR key is not recorded
    (tmp_path / "slots" / "domain-shop.example" / "current").unlink()
    result = store.prune([], 1, no_pairs)
    assert "not recorded" in result.skipped[0]
    assert store.key_file("shop.example", domain_old) is not None


def test_keep_must_hold_fingerprints(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore(tmp_path, clock=clock)
    new_key(store)
    new_key(store)
    before = files(tmp_path)
    with pytest.raises(InvalidArgument, match="not SHA-256 fingerprints"):
        store.prune(["../../etc/passwd"], 1, no_pairs)
    assert files(tmp_path) == before


def test_markers_that_do_not_parse_restart_the_retention_and_stray_ones_go(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore(tmp_path, clock=clock)
    old, _ = new_key(store), new_key(store)
    (keys_dir(tmp_path) / f"{old}.retired").write_text("yesterday\n")
    (keys_dir(tmp_path) / f"{'0' * 64}.retired").write_text("2020-01-01T00:00:00+00:00\n")  # its key is gone
    result = store.prune([], RETENTION, no_pairs)
    assert [(k.fingerprint, k.retired_at.timestamp()) for k in result.retired] == [(old, clock.now)]
    assert f"{'0' * 64}.retired" not in files(tmp_path)
    for broken in ('{"retired_at": "2020-01-01T00:00:00+00:00"}', '{"retired_at": 1, "seen": 1, "last_seen": 1}',
                   '{"retired_at": "2020-01-01T00:00:00+00:00", "seen": 0, "last_seen": "2020-01-01T00:00:00+00:00"}',
                   "[]"):
        clock.now += 1
        (keys_dir(tmp_path) / f"{old}.retired").write_text(broken)
        assert [k.retired_at.timestamp() for k in store.prune([], RETENTION, no_pairs).retired] == [clock.now]


def test_tombstones_go_after_a_year(tmp_path: Path, clock: Clock) -> None:
    store = KeyStore(tmp_path, clock=clock)
    old, _ = new_key(store), new_key(store)
    assert retire_and_delete(store, clock) == [old]
    assert store.deleted_key(old) is not None
    clock.now += TOMBSTONE_SECONDS
    store.prune([], 1, no_pairs)
    assert store.deleted_key(old) is not None  # a year to the second: still there
    clock.now += 1
    store.prune([], 1, no_pairs)
    assert store.deleted_key(old) is None and store.retired() == []


def test_a_hard_linked_key_is_not_deleted(tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    store = KeyStore(tmp_path, clock=clock)
    old, _ = new_key(store), new_key(store)
    content = (keys_dir(tmp_path) / f"{old}.key").read_bytes()
    os.link(keys_dir(tmp_path) / f"{old}.key", tmp_path / "backup.key")
    assert retire_and_delete(store, clock) == []
    assert "hard links" in caplog.text
    assert (tmp_path / "backup.key").read_bytes() == content  # not overwritten through the other name
    assert store.key_file("", old) is not None and store.deleted_key(old) is None
    assert [k.fingerprint for k in store.retired()] == [old]


def test_a_deletion_cut_short_is_finished_by_the_next_call(tmp_path: Path, clock: Clock,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    keys = KeyStore(tmp_path, clock=clock)
    chain, leaf = issue(keys, CertFactory(), "", ["a.example"])
    old = certinfo.spki_sha256(leaf.public_key())
    new_key(keys)
    der = leaf.public_bytes(serialization.Encoding.DER)

    def crash(fd: int, size: int) -> None:
        os.pwrite(fd, b"\0" * (size // 2), 0)  # half overwritten, then the disk goes away
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(keys_module, "_overwrite", crash)
    assert retire_and_delete(keys, clock) == []
    assert files(tmp_path) >= {f"{old}.deleting", f"{old}.deleted", f"{old}.retired"}
    assert f"{old}.key" not in files(tmp_path)
    # meanwhile a revocation finds the tombstone: the deleted-key refusal, not INTERNAL
    with pytest.raises(KeyNotHeld, match=f"the key {old} .* was deleted on"):
        sign_revocation(keys, der, 4, "AAAA", "https://ca.example/revoke")
    monkeypatch.undo()
    clock.now += INTERVAL
    keys.prune([], 1, no_pairs)
    assert {f"{old}.deleting", f"{old}.retired"}.isdisjoint(files(tmp_path))
    assert keys.deleted_key(old) is not None and keys.find_key(old) is None
    # a .deleting left without a tombstone gets one
    (keys_dir(tmp_path) / f"{old}.deleted").unlink()
    (keys_dir(tmp_path) / f"{old}.deleting").write_bytes(b"\0" * 100)
    keys.prune([], 1, no_pairs)
    assert f"{old}.deleting" not in files(tmp_path) and keys.deleted_key(old) is not None


def test_the_pairs_on_disk_protect_their_keys_through_the_agent(tmp_path: Path, clock: Clock) -> None:
    """The servicer's view of the disk: the active and previous pairs' keys
    are in use even when the cluster's keep list forgets them."""
    keys = KeyStore(tmp_path, clock=clock)
    certs = CertStore(tmp_path, keys)
    factory = CertFactory()
    for _ in range(2):  # active, then previous
        chain, leaf = issue(keys, factory, "", ["a.example"])
        certs.install("", certs.validate("", chain, ["a.example"]))
    unused = new_key(keys)
    current = new_key(keys)
    servicer = AgentServicer("p1", None, keys, None, [], certs=certs)  # type: ignore[arg-type]
    active, previous = certs.active(""), certs.previous("")
    assert active is not None and previous is not None
    assert servicer._pairs_in_use("") == {certinfo.spki_sha256(leaf.public_key()),
                                          certinfo.spki_sha256(certinfo.leaf(previous.fullchain.read_text())
                                                               .public_key())}
    store_result = keys.prune([], 1, servicer._pairs_in_use)
    assert [k.fingerprint for k in store_result.retired] == [unused]
    clock.now += 1
    keys.prune([], 1, servicer._pairs_in_use)
    assert [k.fingerprint for k in keys.prune([], 1, servicer._pairs_in_use).deleted] == [unused]
    assert len(keys.slots()[0].held_keys) == 3 and keys.slots()[0].public_key_sha256 == current


def test_revoking_with_a_deleted_key_says_when_and_what_to_do_instead(tmp_path: Path, clock: Clock) -> None:
    keys = KeyStore(tmp_path, clock=clock)
    factory = CertFactory()
    chain, leaf = issue(keys, factory, "", ["a.example"])
    der = leaf.public_bytes(serialization.Encoding.DER)
    fingerprint = certinfo.spki_sha256(leaf.public_key())
    new_key(keys)
    # while the key is held (retired or not), the peer signs
    assert sign_revocation(keys, der, 4, "AAAA", "https://ca.example/revoke")
    keys.prune([], RETENTION, no_pairs)
    clock.now += RETENTION + 3 * 3600
    keys.prune([], RETENTION, no_pairs)
    clock.now += INTERVAL
    assert [k.fingerprint for k in keys.prune([], RETENTION, no_pairs).deleted] == [fingerprint]
    with pytest.raises(KeyNotHeld) as info:
        sign_revocation(keys, der, 4, "AAAA", "https://ca.example/revoke")
    deleted_on = datetime.datetime.fromtimestamp(clock.now, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    message = info.value.message
    assert f"the key {fingerprint} of certificate {leaf.serial_number:x}" in message
    assert f"was deleted on {deleted_on} UTC, 30 days after it was retired" in message
    assert "revoke it with the issuing account or by fresh authorizations instead" in message
    assert isinstance(info.value, FailedPrecondition)
    # a key this peer never had: the plain refusal
    other = factory.leaf(ec.generate_private_key(ec.SECP256R1()).public_key(), ["b.example"])
    with pytest.raises(KeyNotHeld, match="does not hold the key"):
        sign_revocation(keys, other.public_bytes(serialization.Encoding.DER), 4, "AAAA", "https://ca.example/r")


def test_revoking_with_a_key_file_that_vanishes_or_does_not_load_is_a_clear_refusal(
        tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = KeyStore(tmp_path, clock=clock)
    chain, leaf = issue(keys, CertFactory(), "", ["a.example"])
    der = leaf.public_bytes(serialization.Encoding.DER)
    fingerprint = certinfo.spki_sha256(leaf.public_key())
    key_file = keys_dir(tmp_path) / f"{fingerprint}.key"
    # a zero-filled key file (an older agent crashed while deleting it)
    key_file.write_bytes(b"\0" * 200)
    with pytest.raises(KeyNotHeld, match=f"key file for certificate {leaf.serial_number:x} .* does not load") as info:
        sign_revocation(keys, der, 4, "AAAA", "https://ca.example/revoke")
    assert isinstance(info.value, FailedPrecondition)
    # deleted between finding and reading it: the tombstone says so
    (keys_dir(tmp_path) / f"{fingerprint}.deleted").write_text(json.dumps(
        {"retired_at": "2049-01-01T00:00:00+00:00", "deleted_at": "2049-02-01T00:00:00+00:00"}))

    def vanished(fp: str) -> bytes:
        key_file.unlink()
        raise FileNotFoundError(2, "No such file or directory", str(key_file))

    monkeypatch.setattr(keys, "read_key", vanished)
    with pytest.raises(KeyNotHeld, match=f"the key {fingerprint} .* was deleted on 2049-02-01 00:00:00 UTC"):
        sign_revocation(keys, der, 4, "AAAA", "https://ca.example/revoke")
    # a key file holding another key
    monkeypatch.undo()
    other = new_key(keys)
    (keys_dir(tmp_path) / f"{other}.key").rename(key_file)
    with pytest.raises(KeyNotHeld, match="does not hold the key of certificate"):
        sign_revocation(keys, der, 4, "AAAA", "https://ca.example/revoke")


async def test_the_servicer_passes_the_subject_and_answers_prune_keys(tmp_path: Path, clock: Clock) -> None:
    keys = KeyStore(tmp_path, clock=clock)
    servicer = AgentServicer("p1", None, keys, None, [])  # type: ignore[arg-type]
    generate = AgentServicer.GenerateCSR.__wrapped__  # type: ignore[attr-defined]
    reply = await generate(servicer, agent_pb2.GenerateCSRRequest(
        common_name="a.example", key_type=common_pb2.KEY_TYPE_EC_P256,
        subject=common_pb2.CsrSubject(organization="Acme", country="fr")), None, None)
    assert subject_of(reply.csr_pem) == [("C", "FR"), ("O", "Acme"), ("CN", "a.example")]
    with pytest.raises(InvalidSubject, match="C must be two letters"):
        await generate(servicer, agent_pb2.GenerateCSRRequest(
            common_name="a.example", key_type=common_pb2.KEY_TYPE_EC_P256,
            subject=common_pb2.CsrSubject(country="FRA")), None, None)
    old = reply.public_key_sha256
    new_key(keys)
    prune = AgentServicer.PruneKeys.__wrapped__  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="at least 1 second"):  # the field left out
        await prune(servicer, agent_pb2.PruneKeysRequest(keep=[]), None, None)
    dry = await prune(servicer, agent_pb2.PruneKeysRequest(retention_seconds=10, dry_run=True), None, None)
    assert [k.public_key_sha256 for k in dry.retired] == [old] and not (keys_dir(tmp_path) / f"{old}.retired").exists()
    first = await prune(servicer, agent_pb2.PruneKeysRequest(retention_seconds=10), None, None)
    [retired] = first.retired
    assert (retired.slot.domain, retired.public_key_sha256, retired.deleted_at) == ("", old, "")
    assert datetime.datetime.fromisoformat(retired.retired_at).timestamp() == clock.now
    clock.now += 10
    second = await prune(servicer, agent_pb2.PruneKeysRequest(retention_seconds=10), None, None)
    assert [k.public_key_sha256 for k in second.retired] == [old] and not second.deleted
    clock.now += 10
    third = await prune(servicer, agent_pb2.PruneKeysRequest(retention_seconds=10), None, None)
    assert [(k.public_key_sha256, k.retired_at) for k in third.deleted] == [(old, retired.retired_at)]
    assert datetime.datetime.fromisoformat(third.deleted[0].deleted_at).timestamp() == clock.now
    assert (await prune(servicer, agent_pb2.PruneKeysRequest(keep=[old], retention_seconds=10), None, None)) \
        == agent_pb2.PruneKeysResponse()
