"""The order state machine (SPEC R5, DESIGN "The order, step by step"). Pure: no I/O.

An order record is what etcd holds under ``orders/<id>``; the driver
(``clusteracme.coordinator.issuance``) asks :func:`next_step` what to do, performs it,
and moves the record with :func:`advance`, which refuses any transition not
in :data:`TRANSITIONS`. Because the record is saved before every external
step, a coordinator that starts with a saved record resumes exactly where the
previous one stopped (no second order at the CA).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = 1
IPV4, IPV6 = "IPv4", "IPv6"  # the families, as the API and the messages name them
CHALLENGE_PATH = "/.well-known/acme-challenge/"
# Every error kept in a record is bounded: a failed order's record, its slot's
# last_sign and its history event are written in one etcd transaction, which
# etcd refuses above 1.5 MiB (100 names x 16 addresses x 30 peers of
# messages would not fit).
MAX_ERROR = 4096       # the order's error (and so last_sign.error and the history's detail)
MAX_PEER_ERROR = 4096  # one peer's error in ``peers``
MAX_NAMES_SHOWN = 5    # names listed in "DNS points ... at it"


class AcmeStatus(str, Enum):
    """Statuses of RFC 8555 objects (section 7.1.6), as the CA reports them."""

    PENDING = "pending"
    READY = "ready"
    PROCESSING = "processing"
    VALID = "valid"
    INVALID = "invalid"
    EXPIRED = "expired"
    DEACTIVATED = "deactivated"
    REVOKED = "revoked"


class Phase(str, Enum):
    """Our own progress through one order; saved before the step it leads to."""

    QUEUED = "queued"            # record saved; waiting for admission (a free slot, the provider's budget)
    NEW = "new"                  # admitted; nothing asked of the CA yet
    ORDERED = "ordered"          # order exists at the CA (URL saved)
    AUTHORIZED = "authorized"    # authorizations and challenges known
    PRESENTED = "presented"      # tokens pushed to every serving peer
    CHECKED = "checked"          # every token seen through every peer's port 80
    ANSWERED = "answered"        # challenges answered at the CA; polling
    READY = "ready"              # every authorization valid
    FINALIZING = "finalizing"    # finalize (CSR) sent or about to be
    ISSUED = "issued"            # chain downloaded and stored as pending
    DONE = "done"                # issued and cleaned up
    FAILED = "failed"            # ended without a certificate, cleaned up


TERMINAL = frozenset({Phase.DONE, Phase.FAILED})

TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.QUEUED: frozenset({Phase.NEW, Phase.FAILED}),
    Phase.NEW: frozenset({Phase.ORDERED, Phase.FAILED}),
    # ORDERED -> READY: the CA reused valid authorizations for every name.
    Phase.ORDERED: frozenset({Phase.AUTHORIZED, Phase.READY, Phase.FAILED}),
    Phase.AUTHORIZED: frozenset({Phase.PRESENTED, Phase.FAILED}),
    Phase.PRESENTED: frozenset({Phase.CHECKED, Phase.FAILED}),
    Phase.CHECKED: frozenset({Phase.ANSWERED, Phase.FAILED}),
    Phase.ANSWERED: frozenset({Phase.READY, Phase.FAILED}),
    # READY -> DONE: an authorization-only order (revocation by fresh
    # authorizations) ends once every name is validated; nothing is issued.
    Phase.READY: frozenset({Phase.FINALIZING, Phase.DONE, Phase.FAILED}),
    Phase.FINALIZING: frozenset({Phase.ISSUED, Phase.FAILED}),
    Phase.ISSUED: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
}


# Phases that must be in etcd before the driver takes its next step, because
# what comes next cannot be repeated safely without them: the order URL (a
# second new-order burns rate limits), FINALIZING (finalize is not
# idempotent: a resumed order polls instead of sending it twice), the stored
# certificate, and the end. The other phases only show progress; the driver
# writes them behind itself, and a resumed order repeats their (idempotent)
# steps: re-fetching authorizations, re-pushing tokens, re-checking, and
# re-answering challenges the CA already took.
#
# NEW (admitted) is durable too: it is a fenced write, so a coordinator that
# lost leadership cannot go on opening the orders of its queue at the CA.
DURABLE = frozenset({Phase.NEW, Phase.ORDERED, Phase.FINALIZING, Phase.ISSUED, Phase.DONE, Phase.FAILED})


class Step(str, Enum):
    """What the driver must do next for a record."""

    ADMIT = "admit"
    CREATE_ORDER = "create_order"
    FETCH_AUTHORIZATIONS = "fetch_authorizations"
    PUSH_TOKENS = "push_tokens"
    SELF_CHECK = "self_check"
    ANSWER_CHALLENGES = "answer_challenges"
    POLL_AUTHORIZATIONS = "poll_authorizations"
    FINALIZE = "finalize"
    POLL_ORDER = "poll_order"
    CLEANUP = "cleanup"
    NOTHING = "nothing"


class IllegalTransition(Exception):
    """A bug: the driver tried a move the table does not allow."""


@dataclass(frozen=True)
class Authz:
    """One authorization of the order and its HTTP-01 challenge."""

    name: str
    url: str
    status: AcmeStatus
    challenge_url: str = ""
    challenge_status: AcmeStatus = AcmeStatus.PENDING
    token: str = ""
    key_authorization: str = ""
    error: str = ""


@dataclass(frozen=True)
class PeerProgress:
    peer_id: str
    acknowledged: bool = False
    self_checked: bool = False
    error: str = ""
    required: bool = True
    """DNS points at this peer for a name of the order (or DNS was not
    checked): the CA may validate there, so it must serve."""
    skipped: bool = False
    """Not required and could not serve: reported, not fatal."""
    timed_out: bool = False
    """Its last failure was a timeout (a busy node, not a wrong answer):
    worth another try before it fails the order."""


@dataclass(frozen=True)
class DnsAddress:
    """One address a name resolves to: an A record (IPv4) or an AAAA record
    (IPv6), and the registered peers with that address (empty: none, which
    stops the order in the preflight)."""

    address: str
    family: str
    peers: tuple[str, ...] = ()

    @property
    def rdtype(self) -> str:
        return "AAAA" if self.family == IPV6 else "A"


@dataclass(frozen=True)
class OrderRecord:
    order_id: str
    peer_id: str
    domain: str                  # "" = the server slot
    provider: str
    names: tuple[str, ...]
    csr_pem: str
    phase: Phase = Phase.NEW
    order_url: str = ""
    finalize_url: str = ""
    certificate_url: str = ""
    chain_pem: str = ""          # the issued chain, once downloaded
    authorizations: tuple[Authz, ...] = ()
    peers: tuple[PeerProgress, ...] = ()
    error: str = ""
    cleaned: bool = False        # every peer confirmed the tokens are gone
    created_at: str = ""
    updated_at: str = ""
    requested_by: str = ""       # the identity that started the order (history)
    auto: bool = False           # started by the renewal scheduler (deployed at the peer's next slot)
    replaces: str = ""           # RFC 9773 id of the certificate this order renews
    retry_after: float = 0.0     # when it failed on a CA rate limit: seconds the CA asked to wait
    authorize_only: bool = False  # validate the names, then stop (no CSR, no certificate, no slot)
    dns: dict[str, tuple[str, ...]] | None = None
    """Per name, the peers DNS points it at, per the preflight's own
    resolution; None when DNS was not checked (--force): every peer is required."""
    dns_addresses: dict[str, tuple[DnsAddress, ...]] | None = None
    """Per name, what the peers in ``dns`` come from: the A then the AAAA
    records, in DNS order, with their owners; the self-check fetches every
    token through each. None with --force, and in records older than it."""
    ordered_at: str = ""         # when the order was opened at the CA (the provider's hourly budget)
    schema: int = SCHEMA

    # --- queries -------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Ended and cleaned up: nothing left to do on any peer or at the CA."""
        return self.phase in TERMINAL and self.cleaned

    @property
    def open_challenges(self) -> tuple[Authz, ...]:
        """Authorizations the peers must serve (the CA has not validated them)."""
        return tuple(a for a in self.authorizations if a.status != AcmeStatus.VALID)

    @property
    def tokens(self) -> dict[str, str]:
        return {a.token: a.key_authorization for a in self.authorizations if a.token}

    # --- (de)serialisation ---------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        # Shallow copies, not dataclasses.asdict: the driver encodes a record
        # at every step of hundreds of concurrent orders, and asdict's deep
        # copy was a tenth of the leader's event loop in bench.fleet.
        data = dict(self.__dict__)
        data["phase"] = self.phase.value
        data["names"] = list(self.names)
        data["authorizations"] = [{**a.__dict__, "status": a.status.value,
                                   "challenge_status": a.challenge_status.value} for a in self.authorizations]
        data["peers"] = [dict(p.__dict__) for p in self.peers]
        if self.dns is not None:
            data["dns"] = {name: list(peers) for name, peers in self.dns.items()}
        if self.dns_addresses is not None:
            # Each address's family and owners once (``dns_owners``), per name
            # only the addresses: 100 names on the same 16 addresses repeat
            # them 100 times otherwise. (The owners of an address come from
            # one registry snapshot, so they are the same under every name.)
            owners: dict[str, dict[str, Any]] = {}
            per_name: dict[str, list[str]] = {}
            for name, addresses in self.dns_addresses.items():
                per_name[name] = [a.address for a in addresses]
                for a in addresses:
                    if a.address not in owners:
                        owners[a.address] = {"family": a.family, "peers": list(a.peers)}
            data["dns_addresses"], data["dns_owners"] = per_name, owners
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OrderRecord:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"unsupported order record schema {data.get('schema')!r}")
        fields = _known(cls, data, "order record", extra=("dns_owners",))
        fields["phase"] = Phase(data["phase"])
        fields["names"] = tuple(data["names"])
        fields["authorizations"] = tuple(
            Authz(**{**_known(Authz, a, "authorization"), "status": AcmeStatus(a["status"]),
                     "challenge_status": AcmeStatus(a["challenge_status"])})
            for a in data["authorizations"]
        )
        fields["peers"] = tuple(PeerProgress(**_known(PeerProgress, p, "peer progress")) for p in data["peers"])
        if fields.get("dns") is not None:
            fields["dns"] = {name: tuple(peers) for name, peers in fields["dns"].items()}
        if fields.get("dns_addresses") is not None:
            fields["dns_addresses"] = _dns_addresses_from_json(fields["dns_addresses"], data.get("dns_owners") or {})
        return cls(**fields)


_UNKNOWN_LOGGED: set[tuple[str, str]] = set()


def _known(cls: Any, data: dict[str, Any], what: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` without the keys ``cls`` does not have: a record written by a
    newer replica (a rolling upgrade) still loads; each unknown key is logged
    once, at debug."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in names and key not in extra]
    for key in unknown:
        if (what, key) not in _UNKNOWN_LOGGED:
            _UNKNOWN_LOGGED.add((what, key))
            log.debug("%s: ignoring the unknown key %r (written by a newer version?)", what, key)
    return {k: v for k, v in data.items() if k in names} if unknown or extra else dict(data)


def _dns_addresses_from_json(per_name: dict[str, Any], owners: dict[str, Any]) -> dict[str, tuple[DnsAddress, ...]]:
    """Per name, its addresses (``to_json``'s shape: address strings, their
    family and owners in ``owners``; the first shape of these records had
    {address, family, peers} under every name, which still loads)."""
    shared: dict[str, DnsAddress] = {}

    def one(item: Any) -> DnsAddress:
        if isinstance(item, dict):
            return DnsAddress(item["address"], item["family"], tuple(item["peers"]))
        if item not in shared:
            owner = owners.get(item) or {}
            shared[item] = DnsAddress(item, owner.get("family") or address_family(item), tuple(owner.get("peers", ())))
        return shared[item]

    return {name: tuple(one(item) for item in items) for name, items in per_name.items()}


def next_step(rec: OrderRecord) -> Step:
    """What to do next for a saved record; the heart of resumption."""
    if rec.phase is Phase.ISSUED or (rec.phase is Phase.FAILED and not rec.cleaned):
        return Step.CLEANUP
    if rec.phase is Phase.READY and rec.authorize_only:
        return Step.CLEANUP
    if rec.phase in TERMINAL:
        return Step.NOTHING
    return {
        Phase.QUEUED: Step.ADMIT,
        Phase.NEW: Step.CREATE_ORDER,
        Phase.ORDERED: Step.FETCH_AUTHORIZATIONS,
        Phase.AUTHORIZED: Step.PUSH_TOKENS,
        Phase.PRESENTED: Step.SELF_CHECK,
        Phase.CHECKED: Step.ANSWER_CHALLENGES,
        Phase.ANSWERED: Step.POLL_AUTHORIZATIONS,
        Phase.READY: Step.FINALIZE,
        Phase.FINALIZING: Step.POLL_ORDER,
    }[rec.phase]


def resume_point(rec: OrderRecord) -> OrderRecord:
    """Where a driver starting on a saved record (after a crash, a restart or
    a new leader) must begin.

    Tokens live only in the agents' memory and expire: a resumed order that
    has not answered the CA yet pushes and self-checks again (both are
    idempotent) before anything is asked of the CA, so the CA is never asked
    to validate a token no peer serves. This is a restart, not a transition:
    the phase goes back to AUTHORIZED without the table's blessing.

    An admitted order that had not opened at the CA yet (NEW) goes back to
    the queue: the new leader admits it again, in submission order, within
    the concurrency limit and the provider's budget.
    """
    if rec.phase is Phase.NEW:
        return dataclasses.replace(rec, phase=Phase.QUEUED)
    if rec.phase in (Phase.PRESENTED, Phase.CHECKED):
        return dataclasses.replace(rec, phase=Phase.AUTHORIZED,
                                   peers=tuple(dataclasses.replace(p, self_checked=False) for p in rec.peers))
    return rec


def advance(rec: OrderRecord, to: Phase, **changes: Any) -> OrderRecord:
    """The record moved to phase ``to`` with ``changes``; illegal moves raise."""
    if to is not rec.phase and to not in TRANSITIONS[rec.phase]:
        raise IllegalTransition(f"order {rec.order_id}: {rec.phase.value} -> {to.value} is not allowed")
    # Every record change comes through here: the errors it keeps stay bounded.
    if "error" in changes:
        changes["error"] = clip(changes["error"], MAX_ERROR)
    if "peers" in changes:
        changes["peers"] = tuple(p if len(p.error) <= MAX_PEER_ERROR
                                 else dataclasses.replace(p, error=clip(p.error, MAX_PEER_ERROR))
                                 for p in changes["peers"])
    return dataclasses.replace(rec, phase=to, **changes)


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    cut = limit - 40
    return f"{text[:cut]} ... ({len(text) - cut} more characters)"


def join_bounded(parts: Iterable[str], limit: int, what: str, sep: str = "; ") -> str:
    """The parts joined while they fit in ``limit`` characters, then "and N
    more <what>"; a first part longer than the limit is clipped."""
    items = list(parts)
    out: list[str] = []
    size = 0
    for index, item in enumerate(items):
        after = len(items) - index - 1
        tail = len(f"{sep}and {after} more {what}") if after else 0
        room = limit - size - (len(sep) if out else 0) - tail
        if len(item) <= room:
            out.append(item)
            size += len(item) + (len(sep) if len(out) > 1 else 0)
            continue
        if not out and room > 80:  # one long item: part of it rather than nothing
            out.append(clip(item, room))
        left = len(items) - len(out)
        if left:
            out.append(f"and {left} more {what}")
        break
    return sep.join(out)


def after_authorizations(rec: OrderRecord, authzs: tuple[Authz, ...]) -> OrderRecord:
    """Record the authorizations; skip straight to READY when the CA already
    holds valid ones for every name (CAs reuse authorizations)."""
    invalid = [a for a in authzs if a.status not in (AcmeStatus.PENDING, AcmeStatus.VALID)]
    if invalid:
        reasons = "; ".join(f"{a.name}: authorization is {a.status.value}" for a in invalid)
        return advance(rec, Phase.FAILED, authorizations=authzs, error=reasons)
    missing = [a.name for a in authzs if a.status is AcmeStatus.PENDING and not a.token]
    if missing:
        return advance(
            rec, Phase.FAILED, authorizations=authzs,
            error="the CA offered no http-01 challenge for " + ", ".join(missing),
        )
    to = Phase.READY if all(a.status is AcmeStatus.VALID for a in authzs) else Phase.AUTHORIZED
    return advance(rec, to, authorizations=authzs)


def after_push(rec: OrderRecord, peers: tuple[PeerProgress, ...]) -> OrderRecord:
    """Tokens pushed. A peer that did not acknowledge will fail the self-check,
    which reports every peer at once; we keep going to produce that report."""
    return advance(rec, Phase.PRESENTED, peers=peers)


def is_required(rec: OrderRecord, peer_id: str) -> bool:
    """Whether ``peer_id`` must serve this order's tokens: DNS points at it
    for some name (the CA may validate there), or DNS was not checked."""
    return rec.dns is None or any(peer_id in peers for peers in rec.dns.values())


def dns_names(rec: OrderRecord, peer_id: str) -> list[str]:
    """The order's names DNS points at ``peer_id`` (empty when DNS was not checked)."""
    return sorted(name for name, peers in (rec.dns or {}).items() if peer_id in peers)


def names_shown(names: Sequence[str]) -> str:
    """A few names for a message: "a, b, c and 97 more names"."""
    if len(names) <= MAX_NAMES_SHOWN:
        return ", ".join(names)
    return f"{', '.join(names[:MAX_NAMES_SHOWN])} and {len(names) - MAX_NAMES_SHOWN} more names"


def dns_key(name: str) -> str:
    """A name as the DNS maps of a record are compared: lower case, no trailing dot."""
    return name.lower().rstrip(".")


@dataclass(frozen=True)
class Fetch:
    """One self-check request, as the CA would send it: the token of
    ``name`` through ``address`` (a literal IP; for a best-effort probe, the
    host of the peer's front) on the peer's front port, with ``Host: name:80``."""

    peer_id: str
    name: str
    address: str
    family: str  # IPV4, IPV6, or "" for a host name
    port: int
    token: str
    key_authorization: str

    @property
    def key(self) -> tuple[str, int, str, str]:
        """What makes two fetches the same request, whichever peer they are
        for (several peers behind one address: fetched once)."""
        return (self.address, self.port, dns_key(self.name), self.token)

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if self.family == IPV6 else self.address
        return f"http://{host}:{self.port}{CHALLENGE_PATH}{self.token}"

    @property
    def label(self) -> str:
        """The request in a problem: the address with its family, and the name."""
        family = f"{self.family}, " if self.family else ""
        return f"{self.url} ({family}Host {self.name})"


@dataclass(frozen=True)
class SelfCheckPlan:
    """What the self-check must fetch (``fetches``: per registered required
    peer) and what fails without fetching (``gone``: per peer DNS gave an
    address of that is no longer registered, the reasons)."""

    fetches: dict[str, tuple[Fetch, ...]]
    gone: dict[str, tuple[str, ...]]


def self_check_plan(rec: OrderRecord, fronts: Mapping[str, tuple[Sequence[str], int]]) -> SelfCheckPlan:
    """The self-check of every required peer, mirroring the CA: per open
    challenge, the token through every address DNS gave for its name (the
    record's ``dns_addresses``, not the registry of now), IPv4 and IPv6
    alike, on the front port of each peer the address belonged to. An
    IPv4-mapped AAAA (``::ffff:a.b.c.d``) is fetched as the IPv4 address it
    is. An owner no longer registered is a failure: the CA would still
    validate at that address, and no one serves there.

    ``fronts``: peer id -> (its registered addresses, its front port) for
    every registered peer; the front listens on every address of the node,
    on the same port. Without DNS (--force) every registered address of
    every peer is fetched, for every token. Peers not required are left out
    (their best-effort probe is the driver's). Pure: the driver does the I/O.
    """
    fetches: dict[str, list[Fetch]] = {pid: [] for pid in fronts if is_required(rec, pid)}
    gone: dict[str, list[str]] = {}
    seen: set[tuple[str, tuple[str, int, str, str]]] = set()

    def add(peer_id: str, authz: Authz, address: str) -> None:
        address = unmapped(address)
        f = Fetch(peer_id, authz.name, address, address_family(address), fronts[peer_id][1], authz.token,
                  authz.key_authorization)
        if (peer_id, f.key) not in seen:  # one address written two ways, or given as A and mapped AAAA
            seen.add((peer_id, f.key))
            fetches.setdefault(peer_id, []).append(f)

    by_name = None if rec.dns_addresses is None else {dns_key(n): a for n, a in rec.dns_addresses.items()}
    dns = None if rec.dns is None else {dns_key(n): peers for n, peers in rec.dns.items()}
    for authz in rec.open_challenges:
        if by_name is not None:
            for a in by_name.get(dns_key(authz.name), ()):
                for owner in a.peers:
                    if owner in fronts:
                        add(owner, authz, a.address)
                    else:
                        gone.setdefault(owner, []).append(
                            f"DNS gives {a.address} ({a.family}) for {authz.name}, the address of {owner}, "
                            "which is no longer registered")
            continue
        # --force, or a record from before ``dns_addresses`` (the driver
        # resolves those again first): the registered addresses.
        for peer_id in list(fetches):
            if dns is None or peer_id in dns.get(dns_key(authz.name), ()):
                for address in fronts[peer_id][0]:
                    add(peer_id, authz, address)
    return SelfCheckPlan({pid: tuple(f) for pid, f in fetches.items()},
                         {pid: tuple(reasons) for pid, reasons in gone.items()})


def names_without_dns(rec: OrderRecord) -> list[str]:
    """Open challenges whose name the record's DNS view does not have: where
    the CA validates them is unknown, so the self-check cannot pass (fail
    closed rather than "nothing to fetch")."""
    if rec.dns is None:
        return []
    known = {dns_key(n) for n in (rec.dns_addresses if rec.dns_addresses is not None else rec.dns)}
    return [a.name for a in rec.open_challenges if dns_key(a.name) not in known]


def ip_key(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """An address as addresses are compared: parsed (``::1`` is ``0:0::1``),
    an IPv4-mapped IPv6 address as its IPv4 address; a host name as is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def unmapped(address: str) -> str:
    """An IP address in its normalised form (``2001:0db8::2`` as
    ``2001:db8::2``), ``::ffff:a.b.c.d`` as ``a.b.c.d``; a host name unchanged."""
    return str(ip_key(address))


def address_family(address: str) -> str:
    """IPV4 or IPV6 for an IP literal, "" for a host name."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    return IPV6 if ip.version == 6 else IPV4


def after_self_check(rec: OrderRecord, peers: tuple[PeerProgress, ...]) -> OrderRecord:
    """A required peer that does not serve fails the order before the CA is
    asked, and so does an open name the record has no DNS view of. The
    others were asked to serve as a best effort: one that could not is
    marked skipped."""
    peers = tuple(
        dataclasses.replace(p, skipped=not p.required and not p.self_checked) for p in peers
    )
    failed = [f"peer {p.peer_id}: {p.error}" for p in peers if not p.self_checked and p.required]
    unknown = names_without_dns(rec)
    if unknown:
        failed.insert(0, f"the order's DNS check has no answer for {names_shown(unknown)}, so where the CA "
                         "validates is unknown")
    if failed:
        prefix = "self-check failed, the CA was not asked to validate: "
        return advance(rec, Phase.FAILED, peers=peers,
                       error=prefix + join_bounded(failed, MAX_ERROR - len(prefix), "failed peers"))
    return advance(rec, Phase.CHECKED, peers=peers)


def after_poll(rec: OrderRecord, authzs: tuple[Authz, ...]) -> OrderRecord | None:
    """Fold one polling round in; None means "still pending, poll again"."""
    bad = [a for a in authzs if a.status not in (AcmeStatus.PENDING, AcmeStatus.VALID)]
    if bad:
        detail = "; ".join(f"{a.name}: {a.status.value}" + (f" ({a.error})" if a.error else "") for a in bad)
        return advance(rec, Phase.FAILED, authorizations=authzs, error=f"the CA did not validate: {detail}")
    if all(a.status is AcmeStatus.VALID for a in authzs):
        return advance(rec, Phase.READY, authorizations=authzs)
    return None
