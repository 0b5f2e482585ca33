"""Slot policy on real daemons (issue 9, items 4-7 and the renewal side of 1):
automatic mode's first certificate, a peer with ACME disabled, domains with
ACME on or off, an imported certificate in automatic mode, and the provider of
a slot with several accounts.

The coordinator ticks every 0.3 s and draws two sign opportunities per
4-second "day", so what takes days in production takes seconds here; the
logic is the production one. Outcomes are read in etcd and from the agents'
TLS endpoints.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.localcluster.cluster import LocalCluster, served_serial
from tests.integration.conftest import ctl_json, keyspace, make_cluster, record, register_account, wait_for

pytestmark = pytest.mark.integration
PREFIX = "/clusteracme/local/"
PERIOD = 4
PAUSE_WAIT = 3 * PERIOD  # long enough for several opportunities to pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    settings = {"renewal": {"tick_seconds": 0.3, "period_seconds": PERIOD, "backoff_base_seconds": 1.0,
                            "backoff_cap_seconds": 4.0, "deploy_retry_seconds": 1.0, "ari_recheck_seconds": 2.0}}
    for c in make_cluster(tmp_path_factory, "slotpolicy", peers=2, coordinator_settings=settings):
        register_account(c)
        for i in (1, 2):
            c.ctl("peer", "enable", f"peer{i}")
        yield c


def name(tag: str) -> str:
    """A name pointed at both peers."""
    return f"{tag}.slots.example"


def dns(cluster: LocalCluster, *tags: str) -> list[str]:
    names = [name(t) for t in tags]
    for n in names:
        cluster.set_dns(n, [1, 2])
    return names


def slot(cluster: LocalCluster, peer: str, domain: str = "") -> dict[str, Any]:
    return record(cluster, f"certs/{peer}/" + (f"domain/{domain}" if domain else "server"))



def orders_of(cluster: LocalCluster, peer: str, domain: str = "") -> list[dict[str, Any]]:
    found = []
    for key, value, _ in keyspace(cluster):
        if key.startswith(PREFIX + "orders/"):
            order = json.loads(value)
            if order.get("peer_id") == peer and order.get("domain", "") == domain:
                found.append(order)
    return found


def fails(cluster: LocalCluster, *args: str, code: int, fragments: tuple[str, ...]) -> str:
    result = cluster.ctl(*args, check=False)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("acmectl: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


def schedule_of(cluster: LocalCluster, peer: str, domain: str = "") -> dict[str, Any]:
    slots = ctl_json(cluster, "schedule", "show", peer)["slots"]
    return next(s for s in slots if s["slot"].get("domain", "") == domain)


def assert_paused_without_failures(cluster: LocalCluster, peer: str, domain: str, paused: str) -> None:
    """Several opportunities pass: no order, no failure, no backoff; the reason is recorded and shown."""
    orders_before = len(orders_of(cluster, peer, domain))
    time.sleep(PAUSE_WAIT)
    state = slot(cluster, peer, domain).get("renewal") or {}
    assert len(orders_of(cluster, peer, domain)) == orders_before
    assert state.get("failures", 0) == 0 and not state.get("retry_at") and not state.get("last_error")
    assert state.get("paused", "").startswith(paused) and state.get("handled_opportunity")
    shown = schedule_of(cluster, peer, domain)
    assert shown["paused"].startswith(paused) and shown["failures"] == 0 and not shown["next_sign_opportunity"]


# --- item 6: automatic mode's first certificate ------------------------------------------
def test_automatic_mode_signs_the_first_certificate_at_the_next_opportunity_and_deploys_at_the_slot(
        cluster: LocalCluster) -> None:
    (cn,) = dns(cluster, "first")
    cluster.ctl("csr", "create", "peer1", "--cn", cn)
    # A deploy slot 30 s from now (UTC, to the second): the sign comes first, at an opportunity within seconds.
    deploy_at = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30)).replace(microsecond=0)
    shown = ctl_json(cluster, "schedule", "set", "peer1", "--auto", "on", "--time", deploy_at.strftime("%H:%M:%S"),
                     "--tz", "UTC")
    assert shown["auto"] and shown["provider"] == "pebble" and shown["paused"] == ""
    assert shown["renewal_reason"] == "no certificate deployed yet"
    opportunity = datetime.datetime.fromisoformat(shown["next_sign_opportunity"])
    assert datetime.datetime.fromisoformat(shown["next_deploy_slot"]) == deploy_at
    human = cluster.ctl("schedule", "show", "peer1").stdout.splitlines()  # a table: a row per slot
    assert human[0].split()[-3:] == ["DUE", "NEXT", "DEPLOY"] and "PROVIDER" in human[0]
    row = human[1].split()
    assert row[:2] == ["server", "auto"] and "pebble" in row and row[-1] == shown["next_deploy_slot"]

    pending = wait_for("the automatic sign", lambda: (slot(cluster, "peer1").get("pending") or {}).get("auto")
                       and slot(cluster, "peer1")["pending"])
    (order,) = orders_of(cluster, "peer1")
    assert order["auto"] and order["provider"] == "pebble" and order["requested_by"] == "coordinator:c1"
    # Signed at the opportunity status announced, not at one that passed before "auto on".
    assert datetime.datetime.fromisoformat(order["created_at"]) >= opportunity
    assert slot(cluster, "peer1").get("active") is None  # deployed at the slot, not before
    assert schedule_of(cluster, "peer1")["next_deploy_slot"] == shown["next_deploy_slot"]

    active = wait_for("the scheduled deploy", lambda: slot(cluster, "peer1").get("active"), timeout=120)
    assert active["serial_hex"] == pending["serial_hex"]
    deploys = [e for e in ctl_json(cluster, "events", "peer1")["events"] if e["what"] == "deploy"]
    assert len(deploys) == 1 and deploys[0]["who"] == "coordinator:c1"
    assert datetime.datetime.fromisoformat(deploys[0]["at"]) >= deploy_at
    assert served_serial(cluster.agent(1).tls_endpoint, cn) == pending["serial_hex"]
    assert slot(cluster, "peer1")["renewal"].get("failures", 0) == 0
    cluster.ctl("schedule", "set", "peer1", "--auto", "off")


# --- item 7: a peer with ACME disabled pauses its automatic mode ---------------------------
def test_a_peer_with_acme_disabled_pauses_automatic_mode_and_resumes_when_enabled(cluster: LocalCluster) -> None:
    (cn,) = dns(cluster, "paused")
    cluster.ctl("csr", "create", "peer2", "--cn", cn)
    cluster.ctl("peer", "disable", "peer2")
    try:
        shown = ctl_json(cluster, "schedule", "set", "peer2", "--auto", "on", "--time", "now")
        assert shown["paused"] == "ACME disabled on the peer" and not shown["next_sign_opportunity"]
        assert_paused_without_failures(cluster, "peer2", "", "ACME disabled on the peer")
        status = cluster.ctl("-o", "wide", "status", "peer2").stdout
        assert "auto (paused)" in status and "peer2 server: paused: ACME disabled on the peer" in status
        assert slot(cluster, "peer2").get("pending") is None and slot(cluster, "peer2").get("active") is None
    finally:
        cluster.ctl("peer", "enable", "peer2")
    shown = schedule_of(cluster, "peer2")
    assert shown["paused"] == "" and shown["next_sign_opportunity"]
    active = wait_for("the renewal after re-enabling", lambda: slot(cluster, "peer2").get("active"), timeout=120)
    assert served_serial(cluster.agent(2).tls_endpoint, cn) == active["serial_hex"]
    state = slot(cluster, "peer2")["renewal"]
    assert state.get("failures", 0) == 0 and state["paused"] == ""
    cluster.ctl("schedule", "set", "peer2", "--auto", "off")


# --- item 4: domains with ACME on or off ---------------------------------------------------
def test_a_domain_with_acme_disabled_is_never_signed_and_keeps_serving(cluster: LocalCluster) -> None:
    served, fresh = dns(cluster, "dom", "dom2")
    for domain in (served, fresh):
        cluster.ctl("csr", "create", "peer1", "--cn", domain, "--domain", domain)
    assert ctl_json(cluster, "sign", "peer1", "--domain", served, "--wait")["succeeded"]
    listed = {d["slot"].get("domain") or "server": d for d in ctl_json(cluster, "domain", "list", "peer1")["slots"]}
    assert {served, fresh} <= set(listed) <= {"server", served, fresh}
    assert all(listed[d]["acme_enabled"] and listed[d]["days_left"] == -1 and listed[d]["mode"] == "manual"
               for d in (served, fresh))
    assert listed[served]["names"] == served and listed[served]["active_serial"] == ""

    # Switched off with a pending certificate: deploying what exists is still allowed.
    off = ctl_json(cluster, "domain", "disable", "peer1", served.upper())
    assert off["acme_enabled"] is False and slot(cluster, "peer1", served)["acme_enabled"] is False
    serial = ctl_json(cluster, "deploy", "peer1", "--domain", served)["active_serial_hex"]
    assert served_serial(cluster.agent(1).tls_endpoint, served) == serial
    fails(cluster, "sign", "peer1", "--domain", served, code=4,
          fragments=(f"ACME is disabled for domain {served} on peer peer1 (acmectl domain enable peer1 {served})",))
    fails(cluster, "domain", "disable", "peer1", "nowhere.slots.example", code=3,
          fragments=("peer peer1 has no slot for domain nowhere.slots.example",))
    shown = ctl_json(cluster, "schedule", "set", "peer1", "--domain", served, "--auto", "on", "--time", "now")
    assert shown["paused"] == "ACME disabled for this domain" and not shown["next_sign_opportunity"]

    # A switched-off slot due for its first certificate, in automatic mode: nothing signed, no failure.
    ctl_json(cluster, "domain", "disable", "peer1", fresh)
    cluster.ctl("schedule", "set", "peer1", "--domain", fresh, "--auto", "on", "--time", "now")
    assert_paused_without_failures(cluster, "peer1", fresh, "ACME disabled for this domain")
    listed = {d["slot"].get("domain") or "server": d for d in ctl_json(cluster, "domain", "list", "peer1")["slots"]}
    for domain in (served, fresh):
        assert listed[domain]["acme_enabled"] is False and listed[domain]["paused"] == "ACME disabled for this domain"
        assert listed[domain]["mode"] == "auto"
    assert listed[served]["active_serial"] == serial and listed[served]["days_left"] >= 0
    assert listed[served]["active_provider"] == "pebble"
    by_slot = {s["slot"].get("domain", ""): s for s in ctl_json(cluster, "status", "peer1")["peers"][0]["slots"]}
    assert by_slot[served]["acme_enabled"] is False and by_slot[fresh]["acme_enabled"] is False
    assert all(s["acme_enabled"] for d, s in by_slot.items() if d not in (served, fresh))
    human = cluster.ctl("domain", "list", "peer1").stdout
    assert any(line.split()[:2] == [served, "OFF"] for line in human.splitlines()), human
    assert "off (slot)" in cluster.ctl("-o", "wide", "status", "peer1").stdout
    assert served_serial(cluster.agent(1).tls_endpoint, served) == serial  # still serving what it has

    # Switched on again: automatic mode signs at the next opportunity, a manual sign works.
    assert ctl_json(cluster, "domain", "enable", "peer1", fresh)["acme_enabled"] is True
    active = wait_for("the first certificate once ACME is on", lambda: slot(cluster, "peer1", fresh).get("active"),
                      timeout=120)
    assert served_serial(cluster.agent(1).tls_endpoint, fresh) == active["serial_hex"]
    cluster.ctl("schedule", "set", "peer1", "--domain", fresh, "--auto", "off")
    cluster.ctl("schedule", "set", "peer1", "--domain", served, "--auto", "off")
    assert ctl_json(cluster, "domain", "enable", "peer1", served)["acme_enabled"] is True
    assert ctl_json(cluster, "sign", "peer1", "--domain", served, "--wait")["succeeded"]
    cluster.ctl("pending", "discard", "peer1", "--domain", served)


# --- item 1 (renewal side): an imported certificate is never signed over ----------------------
class LocalCA:
    """Any CA outside ACME: a root that signs a CSR as it is."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Slot Policy Test Root")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=400))
                     .not_valid_after(now + datetime.timedelta(days=400))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))

    def sign(self, csr_pem: str, not_before: datetime.datetime, not_after: datetime.datetime) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        leaf = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self.cert.subject)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, self.cert))


def test_automatic_mode_never_signs_over_an_imported_certificate_and_warns_past_two_thirds(
        cluster: LocalCluster) -> None:
    (domain,) = dns(cluster, "imported")
    cluster.ctl("csr", "create", "peer2", "--cn", domain, "--domain", domain)
    csr_pem = cluster.ctl("csr", "show", "peer2", "--domain", domain, "--pem").stdout
    now = datetime.datetime.now(datetime.UTC)
    # 30 of its 40 days have passed: past 2/3 of its lifetime.
    chain = LocalCA().sign(csr_pem, now - datetime.timedelta(days=30), now + datetime.timedelta(days=10))
    path = Path(cluster.run_dir / "imported-chain.pem")
    path.write_bytes(chain)
    imported = ctl_json(cluster, "pending", "import", "peer2", "--domain", domain, str(path))
    serial = ctl_json(cluster, "deploy", "peer2", "--domain", domain)["active_serial_hex"]
    assert serial == imported["certificate"]["serial_hex"]
    active = slot(cluster, "peer2", domain)["active"]
    assert active["provider"] == "manual" and active.get("imported") is True

    shown = ctl_json(cluster, "schedule", "set", "peer2", "--domain", domain, "--auto", "on", "--time", "now")
    assert shown["paused"].startswith("imported certificate: renew it by hand")
    assert shown["warning"].startswith(f"imported certificate {serial} passed 2/3 of its lifetime")
    assert_paused_without_failures(cluster, "peer2", domain, "imported certificate")
    assert slot(cluster, "peer2", domain).get("pending") is None
    assert served_serial(cluster.agent(2).tls_endpoint, domain) == serial
    warned = [line for line in (cluster.run_dir / "coordinator.log").read_text().splitlines()
              if "clusteracme.coordinator.scheduler" in line and f"imported certificate {serial} passed 2/3" in line]
    assert len(warned) == 1  # once per serial
    status = cluster.ctl("status", "peer2").stdout
    # Said once: as the slot's warning, or as its imported-aging alarm once the alarm job raised it.
    said = [line for line in status.splitlines() if line.startswith(f"peer2 {domain}: ")
            and f"imported certificate {serial} passed 2/3 of its lifetime" in line]
    assert len(said) == 1 and (": WARNING: " in said[0] or ": ALARM imported-aging " in said[0]), status
    # An explicit sign is the operator's choice: it works.
    cluster.ctl("schedule", "set", "peer2", "--domain", domain, "--auto", "off")
    order = ctl_json(cluster, "sign", "peer2", "--domain", domain, "--wait")
    assert order["succeeded"] and order["provider"] == "pebble"
    cluster.ctl("pending", "discard", "peer2", "--domain", domain)


# --- item 5: the provider belongs to the slot (last: it adds a second account) ---------------
def test_several_accounts_pause_until_a_provider_is_chosen_then_the_choice_signs(cluster: LocalCluster) -> None:
    assert cluster.infra is not None
    cluster.ctl("provider", "add", "pebble2", "--directory", cluster.directory_url, "--ca-bundle",
                str(cluster.ca_bundle))
    cluster.ctl("account", "register", "--provider", "pebble2", "--email", "ops2@test.example", "--agree-tos")
    (domain,) = dns(cluster, "choice")
    cluster.ctl("csr", "create", "peer1", "--cn", domain, "--domain", domain)

    fails(cluster, "sign", "peer1", "--domain", domain, code=4,
          fragments=("no provider chosen: providers pebble, pebble2 have accounts",))
    fails(cluster, "schedule", "set", "peer1", "--domain", domain, "--provider", "nope", code=3,
          fragments=("no provider named 'nope'",))
    fails(cluster, "provider", "default", "nope", code=3, fragments=("no provider named 'nope'",))
    shown = ctl_json(cluster, "schedule", "set", "peer1", "--domain", domain, "--auto", "on", "--time", "now")
    why = "no provider chosen: providers pebble, pebble2 have accounts; choose with acmectl schedule set --provider " \
          "or acmectl provider default"
    assert shown["paused"] == why and shown["provider"] == ""
    assert_paused_without_failures(cluster, "peer1", domain, why)
    assert f"peer1 {domain}: paused: {why}" in cluster.ctl("status", "peer1").stdout

    # The cluster default decides for every slot without a provider of its own.
    listed = ctl_json(cluster, "provider", "default", "pebble2")
    assert listed["default_provider"] == "pebble2"
    assert {p["name"]: p["is_default"] for p in listed["providers"]} == {"pebble": False, "pebble2": True}
    assert "yes" in next(line for line in cluster.ctl("provider", "list").stdout.splitlines() if "pebble2" in line)
    assert record(cluster, "settings/default_provider")["provider"] == "pebble2"
    shown = schedule_of(cluster, "peer1", domain)
    assert shown["provider"] == "pebble2" and shown["paused"] == ""
    pending = wait_for("the automatic sign with the default provider",
                       lambda: slot(cluster, "peer1", domain).get("active") or slot(cluster, "peer1", domain).get(
                           "pending"), timeout=120)
    assert pending["provider"] == "pebble2"
    assert (slot(cluster, "peer1", domain).get("renewal") or {}).get("failures", 0) == 0
    cluster.ctl("schedule", "set", "peer1", "--domain", domain, "--auto", "off")

    # The slot's own provider wins over the default; "default" gives the slot back to it.
    shown = ctl_json(cluster, "schedule", "set", "peer1", "--domain", domain, "--provider", "pebble")
    assert shown["provider"] == "pebble" and slot(cluster, "peer1", domain)["provider"] == "pebble"
    listed = {d["slot"].get("domain", ""): d for d in ctl_json(cluster, "domain", "list", "peer1")["slots"]}
    assert listed[domain]["provider"] == "pebble" and listed[domain]["active_provider"] in ("", "pebble2")
    shown = ctl_json(cluster, "schedule", "set", "peer1", "--domain", domain, "--provider", "default")
    assert shown["provider"] == "pebble2" and "provider" not in slot(cluster, "peer1", domain)
    cluster.ctl("provider", "default", "--clear")
    assert ctl_json(cluster, "provider", "list")["default_provider"] == ""

    # A provider without an account is accepted, with a note; `csr create --provider default` clears as
    # `schedule set --provider default` does.
    cluster.ctl("provider", "add", "pebble3", "--directory", cluster.directory_url, "--ca-bundle",
                str(cluster.ca_bundle))
    note = "(no account yet: acmectl account register --provider pebble3)"
    assert note in cluster.ctl("schedule", "set", "peer1", "--domain", domain, "--provider", "pebble3").stdout
    assert slot(cluster, "peer1", domain)["provider"] == "pebble3"
    assert note in cluster.ctl("provider", "default", "pebble3").stdout
    cluster.ctl("provider", "default", "--clear")
    out = cluster.ctl("csr", "create", "peer1", "--cn", domain, "--domain", domain, "--provider", "default").stdout
    assert "provider: none saved (the cluster default applies)" in out
    assert "provider" not in slot(cluster, "peer1", domain)
