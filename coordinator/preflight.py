"""The coordinator's preflight before an order (SPEC R4): the names are valid
(``names.py``) and DNS points every one of them at registered peers only.

The only module that imports dnspython; its exceptions are translated here
into a per-lookup outcome, so callers see sentences, never tracebacks.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
from clusteracme.coordinator.errors import InvalidNames, PreflightFailed, ResolverFailed
from clusteracme.coordinator.names import NameProblem, normalize_names
from clusteracme.coordinator.orders import IPV4, IPV6, DnsAddress, ip_key

__all__ = [
    "DnsAddress", "DnsResolver", "Lookup", "NameReport", "Resolution", "SlotReport", "check_dns", "preflight",
    "resolve_names",
]

SYSTEM = "system"
DEFAULT_TIMEOUT = 2.0
_RESOLV_CONF = "/etc/resolv.conf"

# Plain words for the response codes a server may answer instead of records.
_RCODE_WORDS = {
    "SERVFAIL": "the DNS server could not resolve the name (SERVFAIL)",
    "REFUSED": "the DNS server refused the query (REFUSED)",
}


@dataclass(frozen=True)
class Lookup:
    """One lookup's outcome: the addresses found (possibly none: the name
    exists without records of that type), or ``error`` saying why none could
    be had."""

    addresses: tuple[str, ...] = ()
    error: str | None = None


class DnsResolver:
    """A stub resolver asking fixed nameservers, without search domains or
    cache, so the preflight sees what a CA's resolver would see now.

    ``nameservers``: ``host:port`` strings (``192.0.2.53``, ``192.0.2.53:5353``,
    ``[2001:db8::53]:53``; port 53 if omitted), or ``["system"]`` for the
    servers in /etc/resolv.conf. ``timeout`` bounds each lookup as a whole, in
    seconds. A bad specification raises ``ValueError`` (a configuration error).
    """

    def __init__(
        self, nameservers: Sequence[str] = (SYSTEM,), *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if isinstance(nameservers, str) or not nameservers:
            raise ValueError("nameservers must be a non-empty list of host:port or 'system'")
        self.timeout = timeout
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        if SYSTEM in nameservers and len(nameservers) > 1:
            raise ValueError("'system' cannot be combined with other nameservers")
        if list(nameservers) == [SYSTEM]:
            try:
                self._resolver.read_resolv_conf(_RESOLV_CONF)
            except dns.exception.DNSException as exc:
                raise ValueError(f"cannot use the system resolver: {exc}") from exc
            self.description = f"the system resolver ({_RESOLV_CONF})"
        else:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*_parse_nameserver(spec)) for spec in nameservers
            ]
            self.description = ", ".join(nameservers)
        # One knob for the operator: resolv.conf's own timeout/attempts are
        # overridden so a dead server costs at most `timeout`.
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout

    async def resolve(self, name: str, rdtype: str) -> Lookup:
        """Look up ``rdtype`` (``A`` or ``AAAA``) records of ``name``.

        Never raises for what DNS can answer (NXDOMAIN, SERVFAIL, no answer in
        time); raises ``ResolverFailed`` for anything else dnspython raises.
        """
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise InvalidNames([NameProblem(name, f"not a DNS name: {exc}")]) from exc
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return Lookup(error="the name does not exist (NXDOMAIN)")
        except dns.resolver.LifetimeTimeout:
            return Lookup(
                error=f"no answer from {self.description} within {self.timeout:g} s (timeout)"
            )
        except dns.resolver.NoNameservers as exc:
            return Lookup(error=_describe_failures(exc))
        except dns.exception.DNSException as exc:
            raise ResolverFailed(f"DNS lookup of {name} ({rdtype}) failed: {exc}") from exc
        if answer.rrset is None:
            return Lookup()
        return Lookup(addresses=tuple(record.to_text() for record in answer.rrset))


async def check_dns(
    names: Sequence[str],
    peer_addresses: Mapping[str, Sequence[str]],
    resolver: DnsResolver,
) -> list[NameProblem]:
    """Return one problem per name whose A/AAAA records are missing, cannot be
    read, or include an address no registered peer has; in ``names`` order.

    ``peer_addresses`` maps peer id to that peer's public addresses (IP
    literals). All lookups run concurrently, so the check takes about one
    round trip (or one timeout), whatever the number of names.
    """
    return (await resolve_names(names, peer_addresses, resolver)).problems


@dataclass(frozen=True)
class NameReport:
    """What DNS says about one name: its A records, then its AAAA records,
    in DNS order, each with its family and owners, and the problem that
    stops an order for it ("" when none)."""

    name: str
    addresses: tuple[DnsAddress, ...] = ()
    problem: str = ""


@dataclass(frozen=True)
class Resolution:
    """What DNS says about an order's names, per name in the order given."""

    names: tuple[NameReport, ...]

    @property
    def problems(self) -> list[NameProblem]:
        """One per name that stops an order (as ``check_dns``)."""
        return [NameProblem(r.name, r.problem) for r in self.names if r.problem]

    @property
    def peers_by_name(self) -> dict[str, tuple[str, ...]]:
        """Per name, the peers its A/AAAA records point at."""
        return {r.name: tuple(sorted({p for a in r.addresses for p in a.peers})) for r in self.names}

    @property
    def addresses_by_name(self) -> dict[str, tuple[DnsAddress, ...]]:
        """Per name, every address DNS gave (what the order record keeps)."""
        return {r.name: r.addresses for r in self.names}

    @property
    def peers(self) -> tuple[str, ...]:
        """Every peer DNS points at for some name: where the CA may validate."""
        return tuple(sorted({p for peers in self.peers_by_name.values() for p in peers}))


@dataclass(frozen=True)
class SlotReport:
    """``acmectl preflight``: a sign's dry run for one slot. ``refusals``: the
    sign's own preconditions that are not met (ACME off for the peer or the
    slot, no provider, no CSR, a pending certificate, an order running);
    ``resolution``: what DNS says now about the CSR's names (None without a
    CSR). ``ok``: a sign now would not be refused."""

    refusals: tuple[str, ...]
    resolution: Resolution | None

    @property
    def ok(self) -> bool:
        return not self.refusals and self.resolution is not None and not self.resolution.problems


async def resolve_names(
    names: Sequence[str],
    peer_addresses: Mapping[str, Sequence[str]],
    resolver: DnsResolver,
) -> Resolution:
    """Resolve every name once (A and AAAA, concurrently) and judge it."""
    owners = _owners(peer_addresses)
    lookups = await asyncio.gather(
        *(resolver.resolve(name, rdtype) for name in names for rdtype in ("A", "AAAA"))
    )
    reports: list[NameReport] = []
    for index, name in enumerate(names):
        a, aaaa = lookups[2 * index], lookups[2 * index + 1]
        addresses = tuple(
            DnsAddress(address, family, tuple(sorted(owners.get(_parse(address), ()))))
            for family, lookup in ((IPV4, a), (IPV6, aaaa))
            for address in lookup.addresses
        )
        reports.append(NameReport(name, addresses, _judge(a, aaaa, addresses) or ""))
    return Resolution(tuple(reports))


async def preflight(
    common_name: str,
    sans: Sequence[str],
    peer_addresses: Mapping[str, Sequence[str]],
    resolver: DnsResolver,
    *,
    force: bool,
) -> list[str]:
    """Normalize the names (``InvalidNames``) and, unless ``force``, check that
    DNS points each at registered peers (``PreflightFailed`` listing every
    problem). Returns the normalized names, CN first."""
    names = normalize_names(common_name, sans)
    if not force:
        problems = await check_dns(names, peer_addresses, resolver)
        if problems:
            raise PreflightFailed(problems)
    return names


def _judge(a: Lookup, aaaa: Lookup, addresses: tuple[DnsAddress, ...]) -> str | None:
    """The reason one name fails, from its A and AAAA lookups, or None."""
    # One failed type is enough: the unseen records could point anywhere.
    if a.error and a.error == aaaa.error:
        return a.error
    failed = [
        f"{rdtype} lookup: {lookup.error}"
        for rdtype, lookup in (("A", a), ("AAAA", aaaa))
        if lookup.error
    ]
    if failed:
        return "; ".join(failed)
    if not addresses:
        return "no A/AAAA record"
    # The family says which record to fix: an AAAA nobody thought of is the
    # usual culprit, and the CA tries IPv6 first.
    unknown = [f"{x.address} ({x.family}, {x.rdtype})" for x in addresses if not x.peers]
    if not unknown:
        return None
    if len(unknown) == 1:
        return f"resolves to {unknown[0]}, which is not a registered peer"
    return f"resolves to {', '.join(unknown)}, which are not registered peers"


def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    # Parsed, so that equal addresses written differently (::1, 0:0::1) match,
    # and an IPv4-mapped AAAA (::ffff:a.b.c.d) matches the IPv4 registration
    # (a connection to it reaches that IPv4 address); a record that does not
    # parse (never from dnspython) owns nothing.
    return ip_key(address)


def _owners(
    peer_addresses: Mapping[str, Sequence[str]],
) -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address | str, set[str]]:
    """Address -> the peers registered with it (several peers may share an
    address: one front behind it)."""
    owners: dict[ipaddress.IPv4Address | ipaddress.IPv6Address | str, set[str]] = {}
    for peer, addresses in peer_addresses.items():
        for address in addresses:
            ip = ip_key(address)
            if isinstance(ip, str):
                raise ValueError(f"peer {peer} has a public address that is not an IP address: {address!r}")
            owners.setdefault(ip, set()).add(peer)
    return owners


def _parse_nameserver(spec: str) -> tuple[str, int]:
    """``host[:port]`` or ``[v6][:port]`` to (host, port)."""
    invalid = ValueError(
        f"invalid nameserver {spec!r}: expected IPv4[:port], [IPv6][:port] or 'system'"
    )
    if spec.startswith("["):
        host, closed, rest = spec[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise invalid
        port = rest[1:] if rest else "53"
    elif spec.count(":") > 1:
        host, port = spec, "53"  # a bare IPv6 address
    else:
        host, _, port = spec.partition(":")
        port = port or "53"
    if not (port.isascii() and port.isdigit() and len(port) <= 5):  # int() takes "53\n" and " 53"
        raise invalid
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise invalid from None
    if not 0 < number < 65536:
        raise invalid
    return host, number


def _describe_failures(exc: dns.resolver.NoNameservers) -> str:
    """Every server failed: say how, once per distinct failure."""
    reasons: list[str] = []
    # dnspython records one (server, tcp, port, error, response) per attempt;
    # error is the rcode text when the server answered, else the exception.
    for _server, _tcp, _port, error, _response in exc.kwargs.get("errors") or ():
        if isinstance(error, str):
            reason = _RCODE_WORDS.get(error, f"the DNS server answered {error}")
        else:
            reason = f"the DNS server could not be reached ({error})"
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) or "no DNS server could answer"
