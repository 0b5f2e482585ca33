"""What a certificate slot allows, and why automatic renewal leaves it alone.

Pure: no I/O, time is an argument. A slot (``certs/<peer>/server`` or
``certs/<peer>/domain/<name>``) may have ACME switched off (``acme_enabled``
false: never signed, manually or automatically; it keeps serving what it has
and its pending certificate may still be deployed), may hold an imported
certificate (signed outside ACME, marked ``imported``: automatic renewal
never signs over it and warns once it passes 2/3 of its lifetime), and belongs
to a peer that may have ACME disabled. The scheduler and ``Issuance.start_sign``
ask these functions; status and ``acmectl domain list`` show their answers.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from clusteracme.coordinator import renewal
from clusteracme.coordinator.errors import CoordinatorError
from clusteracme.coordinator.names import normalize_names

from clusteracme import certinfo
from clusteracme.errors import FailedPrecondition

SERVER = "server"  # what `acmectl domain enable|disable PEER server` calls the server slot
IMPORTED_PROVIDER = "manual"

PAUSED_PEER = "ACME disabled on the peer"
PAUSED_DOMAIN = "ACME disabled for this domain"
PAUSED_IMPORTED = "imported certificate: renew it by hand (pending import) or sign with ACME explicitly"


class SigningPaused(CoordinatorError, FailedPrecondition):
    """ACME is off for the peer or the slot: nothing may be signed for it.
    Automatic renewal takes it as a pause (no failure, no backoff)."""

    def __init__(self, message: str, paused: str) -> None:
        super().__init__(message)
        self.paused = paused


def label(domain: str) -> str:
    """How messages name a slot: ``server`` or the domain."""
    return domain or SERVER


def parse_slot(text: str) -> str:
    """The domain of a slot named on the command line: "" for ``server``,
    otherwise the domain in its A-label form (as every command takes it)."""
    cleaned = (text or "").strip()
    if cleaned.lower() == SERVER or not cleaned:
        return ""
    return normalize_names(cleaned, [])[0]


def acme_enabled(slot: dict[str, Any]) -> bool:
    return slot.get("acme_enabled", True) is not False


def is_imported(cert: dict[str, Any] | None) -> bool:
    """A pending or active record of a certificate signed outside ACME: the
    ``imported`` flag when the record has one (every import writes it, every
    deploy copies it), else the provider ``manual``. (Choosing a provider asks
    the flag alone: a provider named "manual" from before the name was
    reserved signs with ACME, ``accounts.ProviderBook.choose``.)"""
    if not cert:
        return False
    if "imported" in cert:
        return bool(cert["imported"])
    return cert.get("provider") == IMPORTED_PROVIDER


_OFF_ON_PEER = "ACME is disabled on peer "
_OFF_FOR_SLOT = "ACME is disabled for "


def check_may_sign(peer_id: str, peer_enabled: bool, slot: dict[str, Any] | None, *, renewal: bool = False) -> None:
    """Raise ``SigningPaused`` when ACME is off for the peer or for the slot,
    and for an automatic renewal (``renewal``) when the certificate in service
    was imported."""
    if not peer_enabled:
        raise SigningPaused(f"{_OFF_ON_PEER}{peer_id} (acmectl peer enable {peer_id})", PAUSED_PEER)
    if slot is None:
        return
    domain = slot.get("domain", "")
    what = f"domain {domain}" if domain else "the server certificate"
    if not acme_enabled(slot):
        raise SigningPaused(f"{_OFF_FOR_SLOT}{what} on peer {peer_id} "
                            f"(acmectl domain enable {peer_id} {label(domain)})", PAUSED_DOMAIN)
    if renewal and is_imported(slot.get("active")):
        raise SigningPaused(f"the certificate in service for {what} on peer {peer_id} was imported: automatic "
                            "renewal never signs over it (import a renewed one, or sign explicitly: acmectl sign)",
                            PAUSED_IMPORTED)


def pause_of_order_error(error: str) -> str:
    """The pause an ended order's error stands for ("" for a real failure):
    an order whose peer or slot had ACME switched off before the CA was asked
    anything ends with ``check_may_sign``'s message, and automatic renewal
    counts that as a pause, not as a failure."""
    if error.startswith(_OFF_ON_PEER):
        return PAUSED_PEER
    if error.startswith(_OFF_FOR_SLOT):
        return PAUSED_DOMAIN
    return ""


def standing_pause(peer_enabled: bool, slot: dict[str, Any]) -> str:
    """Why automatic renewal signs nothing for the slot whatever the time
    ("" when it may): ACME off for the peer or the slot, or an imported
    certificate in service. (The provider is asked separately: it needs I/O.)"""
    if not peer_enabled:
        return PAUSED_PEER
    if not acme_enabled(slot):
        return PAUSED_DOMAIN
    if is_imported(slot.get("active")):
        return PAUSED_IMPORTED
    return ""


@dataclass(frozen=True)
class Aging:
    """An imported certificate in service past 2/3 of its lifetime."""

    serial_hex: str
    since: datetime.datetime
    not_after: datetime.datetime

    def warning(self) -> str:
        return (f"imported certificate {self.serial_hex} passed 2/3 of its lifetime at "
                f"{self.since.isoformat(timespec='seconds')} (valid until {self.not_after.isoformat(timespec='seconds')})"
                ": automatic renewal does not replace imported certificates; import a renewed one "
                "(acmectl pending import) or sign with ACME (acmectl sign)")


def imported_aging(slot: dict[str, Any], now: datetime.datetime) -> Aging | None:
    """The active certificate, when it is imported and past 2/3 of its lifetime."""
    active = slot.get("active")
    if not is_imported(active):
        return None
    cert = certinfo.leaf(active["chain_pem"])  # type: ignore[index]
    since = renewal.due_by_fraction(cert.not_valid_before_utc, cert.not_valid_after_utc)
    if now < since:
        return None
    return Aging(active["serial_hex"], since, cert.not_valid_after_utc)  # type: ignore[index]


def days_left(not_after: str, now: datetime.datetime) -> int:
    """Whole days until ``not_after`` (0 once expired); -1 without a certificate."""
    if not not_after:
        return -1
    left = datetime.datetime.fromisoformat(not_after) - now
    return max(0, int(left.total_seconds() // 86400))


@dataclass(frozen=True)
class DomainView:
    """One certificate slot as ``acmectl domain list`` shows it."""

    domain: str
    acme_enabled: bool
    names: str
    active_serial: str
    active_not_after: str
    days_left: int
    mode: str
    provider: str
    active_provider: str
    paused: str


def view(slot: dict[str, Any], now: datetime.datetime, *, mode: str, paused: str) -> DomainView:
    active = slot.get("active") or {}
    return DomainView(
        domain=slot.get("domain", ""), acme_enabled=acme_enabled(slot),
        names=",".join((slot.get("csr") or {}).get("names", [])), active_serial=active.get("serial_hex", ""),
        active_not_after=active.get("not_after", ""), days_left=days_left(active.get("not_after", ""), now),
        mode=mode, provider=slot.get("provider") or "", active_provider=active.get("provider", ""), paused=paused)
