"""Which IP addresses the proxy refuses to connect to, and why."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_CARRIER_GRADE_NAT = IPv4Network("100.64.0.0/10")
_NAT64 = IPv6Network("64:ff9b::/96")

_CHECKS: tuple[tuple[str, str], ...] = (
    ("is_unspecified", "an unspecified address"),
    ("is_loopback", "a loopback address"),
    ("is_link_local", "a link-local address"),
    ("is_multicast", "a multicast address"),
    ("is_reserved", "a reserved address"),
    ("is_private", "a private address"),
)


def embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, Teredo), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def blocked_reason(
    address: IPAddress,
    *,
    allow_loopback: bool = False,
    trusted: tuple[IPNetwork, ...] = (),
) -> str | None:
    """Why the proxy must not connect to `address`, or None when it may.

    `trusted` networks (an operator's internal mirrors) pass even when private or reserved;
    the metadata addresses never do."""
    if isinstance(address, IPv6Address) and (inner := embedded_ipv4(address)) is not None:
        reason = blocked_reason(inner, allow_loopback=allow_loopback, trusted=trusted)
        return f"{reason} (embedded in {address})" if reason else None
    if address in METADATA_ADDRESSES:
        return "the cloud metadata address"
    if address.is_loopback and allow_loopback:
        return None
    if any(address in network for network in trusted):
        return None
    if isinstance(address, IPv4Address) and address in _CARRIER_GRADE_NAT:
        return "a carrier-grade NAT address"
    for attribute, reason in _CHECKS:
        if getattr(address, attribute):
            return reason
    return None if address.is_global else "not a globally routable address"


def first_blocked(
    addresses: list[IPAddress],
    *,
    allow_loopback: bool = False,
    trusted: tuple[IPNetwork, ...] = (),
) -> tuple[IPAddress, str] | None:
    """The first address in `addresses` that is blocked, with its reason."""
    for address in addresses:
        reason = blocked_reason(address, allow_loopback=allow_loopback, trusted=trusted)
        if reason is not None:
            return address, reason
    return None
