"""Every etcd key the coordinator uses, built in this one module.

Layout under the cluster prefix (``/clusteracme/<cluster>/`` by default), as
DESIGN.md "State in etcd" gives it::

    providers/<name>                 ACME provider and account
    peers/<peer>                     registration
    peers/<peer>/alive               liveness, attached to a lease
    certs/<peer>/server              the peer's server certificate slot
    certs/<peer>/domain/<name>       a domain certificate slot
    orders/<id>                      an order; ended ones are compacted after the retention
    schedule/<peer>/<period start>   the period's sign times (YYYY-MM-DDTHH:MM:SSZ)
    events/<peer>/<seq:020d>         history; zero-padded so key order is seq order
    trust/<sha256>                   trusted CA certificate
    denied/<sha256>                  a cluster certificate (of any identity) on the deny list; sha256 of its DER
    settings/<name>                  a cluster-wide setting (e.g. default_provider)
    alarms/<kind>/<peer>/<slot>      an alarm: raised and cleared times (slot: server, or the domain;
                                     "-" for alarms of the peer itself)
    coordinators/<name>              a running replica: address, version, role (attached to its lease)
    meta/schema                      the record schema of the cluster (records.SchemaMarker)
    meta/restoring                   a restore under way or cut halfway (backup.RestoreMarker)
    meta/fence_epoch                 the epoch of the agents' leader fence, set by each restore (backup)
    leader                           election key

``peers/<peer>`` and ``peers/<peer>/alive`` share the ``peers/`` prefix (the
design's layout is kept): one range over :meth:`Keys.peers` returns both, and
:meth:`Keys.parse_peer` tells them apart. Every prefix method returns a string
ending in ``/`` so ``peers/a`` never matches ``peers/ab``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from clusteracme.errors import InvalidArgument

DEFAULT_PREFIX = "/clusteracme/default/"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ALIVE = "/alive"


def _component(kind: str, value: str) -> str:
    """One path component: non-empty, printable, no ``/``."""
    if not value or "/" in value or not value.isprintable():
        raise InvalidArgument(f"invalid {kind} {value!r}: must be non-empty, printable, without '/'")
    return value


class Keys:
    """Builds the keys of one cluster. ``prefix`` must start and end with ``/``."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/") or "//" in prefix:
            raise InvalidArgument(f"invalid key prefix {prefix!r}: must start and end with '/'")
        self.prefix = prefix

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    # providers/<name>
    def provider(self, name: str) -> str:
        return self._key("providers", _component("provider name", name))

    def providers(self) -> str:
        return self._key("providers", "")

    # peers/<peer> and peers/<peer>/alive
    def peer(self, peer_id: str) -> str:
        return self._key("peers", _component("peer id", peer_id))

    def peer_alive(self, peer_id: str) -> str:
        return self.peer(peer_id) + _ALIVE

    def peers(self) -> str:
        """Prefix of both registrations and liveness keys; see parse_peer."""
        return self._key("peers", "")

    def parse_peer(self, key: str) -> tuple[str, bool]:
        """For a key under ``peers()``: ``(peer_id, is_alive_key)``."""
        rest = key.removeprefix(self.peers())
        if rest == key:
            raise InvalidArgument(f"{key!r} is not a peer key")
        alive = rest.endswith(_ALIVE)
        peer_id = rest.removesuffix(_ALIVE) if alive else rest
        return _component("peer id", peer_id), alive

    # certs/<peer>/<slot>
    def cert(self, peer_id: str, slot: str) -> str:
        """``slot`` is ``"server"`` or ``"domain/<name>"``."""
        if slot != "server":
            kind, _, name = slot.partition("/")
            if kind != "domain":
                raise InvalidArgument(f"invalid certificate slot {slot!r}: 'server' or 'domain/<name>'")
            slot = "domain/" + _component("domain name", name)
        return self.certs(peer_id) + slot

    def certs(self, peer_id: str) -> str:
        return self._key("certs", _component("peer id", peer_id), "")

    def all_certs(self) -> str:
        return self._key("certs", "")

    def slot_of(self, peer_id: str, key: str) -> str:
        """The slot (``server`` or ``domain/<name>``) of a key under ``certs(peer_id)``."""
        slot = key.removeprefix(self.certs(peer_id))
        if slot == key:
            raise InvalidArgument(f"{key!r} is not a certificate key of {peer_id!r}")
        return slot

    # orders/<id>
    def order(self, order_id: str) -> str:
        return self._key("orders", _component("order id", order_id))

    def orders(self) -> str:
        return self._key("orders", "")

    # schedule/<peer>/<date>
    def schedule(self, peer_id: str, period_start: datetime) -> str:
        """The sign opportunities of one period (a day, or a shorter test period)."""
        return self.schedules(peer_id) + period_start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def schedules(self, peer_id: str) -> str:
        return self._key("schedule", _component("peer id", peer_id), "")

    def all_schedules(self) -> str:
        return self._key("schedule", "")

    def parse_schedule(self, key: str) -> tuple[str, datetime]:
        """For a key under ``all_schedules()``: ``(peer_id, period_start)``."""
        peer_id, sep, stamp = key.removeprefix(self.all_schedules()).partition("/")
        if key == key.removeprefix(self.all_schedules()) or not sep:
            raise InvalidArgument(f"{key!r} is not a schedule key")
        try:
            start = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            raise InvalidArgument(f"{key!r} is not a schedule key: bad period start {stamp!r}") from None
        return _component("peer id", peer_id), start

    # events/<peer>/<seq>
    def event(self, peer_id: str, seq: int) -> str:
        if seq < 0:
            raise InvalidArgument(f"invalid event sequence {seq}")
        return self.events(peer_id) + f"{seq:020d}"

    def events(self, peer_id: str) -> str:
        return self._key("events", _component("peer id", peer_id), "")

    # trust/<sha256>
    def trust(self, sha256: str) -> str:
        if not _SHA256.fullmatch(sha256):
            raise InvalidArgument(f"invalid certificate fingerprint {sha256!r}: 64 lowercase hex digits")
        return self._key("trust", sha256)

    def trusts(self) -> str:
        return self._key("trust", "")

    # denied/<sha256>
    def denied(self, sha256: str) -> str:
        if not _SHA256.fullmatch(sha256):
            raise InvalidArgument(f"invalid certificate fingerprint {sha256!r}: 64 lowercase hex digits")
        return self._key("denied", sha256)

    def denials(self) -> str:
        return self._key("denied", "")

    # settings/<name>
    def setting(self, name: str) -> str:
        return self._key("settings", _component("setting name", name))

    # alarms/<kind>/<peer>/<slot>
    def alarm(self, kind: str, peer_id: str, domain: str | None) -> str:
        """``domain``: "" for the server slot, None for an alarm of the peer itself."""
        slot = "-" if domain is None else (_component("domain name", domain) if domain else "server")
        return self._key("alarms", _component("alarm kind", kind), _component("peer id", peer_id), slot)

    def alarms(self) -> str:
        return self._key("alarms", "")

    def parse_alarm(self, key: str) -> tuple[str, str, str | None]:
        """For a key under ``alarms()``: ``(kind, peer_id, domain)`` as :meth:`alarm` takes them."""
        rest = key.removeprefix(self.alarms())
        parts = rest.split("/")
        if rest == key or len(parts) != 3:
            raise InvalidArgument(f"{key!r} is not an alarm key")
        kind, peer_id, slot = parts
        return kind, peer_id, None if slot == "-" else ("" if slot == "server" else slot)

    # coordinators/<name>
    def coordinator(self, name: str) -> str:
        return self._key("coordinators", _component("coordinator name", name))

    def coordinators(self) -> str:
        return self._key("coordinators", "")

    # meta/<name>
    def meta(self, name: str) -> str:
        return self._key("meta", _component("meta key", name))

    def schema_marker(self) -> str:
        """The highest record schema of the coordinators that have led (``records``)."""
        return self.meta("schema")

    def restoring(self) -> str:
        """A restore under way, or cut before it ended (``backup``)."""
        return self.meta("restoring")

    def fence_epoch(self) -> str:
        """The epoch of the leader fence agents are sent, set by each restore (``backup``)."""
        return self.meta("fence_epoch")

    # leader
    def leader(self) -> str:
        return self._key("leader")

    def last(self, key: str) -> str:
        """The final component of ``key`` (a name, id, date or seq)."""
        return key.rsplit("/", 1)[-1]
