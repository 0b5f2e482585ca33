"""Checking the addresses peers announce: IPs and host:port endpoints."""

from __future__ import annotations

import ipaddress
import re

from clusteracme.errors import InvalidArgument

# Used with fullmatch and \Z: "$" also matches before a final newline ("host\n" would pass).
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}|[0-9]{1,10}")  # an interface name (IFNAMSIZ) or index
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def check_ip(value: str, what: str) -> str:
    """An address others reach the node at, in its normalised form
    (``2001:0db8::1`` -> ``2001:db8::1``): what to store and compare."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidArgument(f"{what}: {value!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        # A zone (an interface) means something on this node only: DNS never
        # gives one, and it would never match an AAAA record.
        raise InvalidArgument(f"{what}: {value[:80]!r} has a zone id, which only means something on this node; "
                              "give the address as DNS gives it, without %zone")
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidArgument(f"{what}: {value} cannot be dialled (unspecified or multicast)")
    return str(ip)


def split_hostport(value: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` of a reachable endpoint; refuses 0.0.0.0 and ::."""
    host, port = split_bind(value, what)
    if is_unspecified(host):
        raise InvalidArgument(f"{what}: {value} is a wildcard bind address; give the address others reach it at")
    return host, port


def split_bind(value: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to listen on (wildcards allowed)."""
    if len(value) > 255 or ":" not in value:
        raise InvalidArgument(f"{what}: {value[:80]!r} is not host:port")
    host, _, port_text = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    # ASCII digits only: int() also takes " 80", "80\n" and other scripts' digits.
    port = int(port_text) if port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 else 0
    if not 0 < port < 65536:
        raise InvalidArgument(f"{what}: {value!r} has no valid port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if bracketed or not _HOSTNAME.fullmatch(host):
            raise InvalidArgument(f"{what}: {host!r} is neither an IP address nor a host name") from None
        return host, port
    if ip.version == 6 and not bracketed:
        raise InvalidArgument(f"{what}: write IPv6 endpoints as [address]:port")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None and not _ZONE.fullmatch(ip.scope_id):
        # ipaddress takes any text after "%" (spaces, newlines, escape sequences).
        raise InvalidArgument(f"{what}: {value[:80]!r} has a zone id that is not an interface name")
    return host, port
