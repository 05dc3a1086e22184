"""Address -> scope, and socket + the namespace's addresses -> exposure. Pure functions."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from functools import lru_cache

from bindscope.model import Exposure, Firewall, HostAddress, Scope, Socket

_SCOPE_EXPOSURE = {
    Scope.LOOPBACK: Exposure.LOOPBACK,
    Scope.LINK_LOCAL: Exposure.PRIVATE,  # reachable from the link: a private network
    Scope.PRIVATE: Exposure.PRIVATE,
    Scope.PUBLIC: Exposure.PUBLIC,
}


@lru_cache(maxsize=4096)
def scope_of(address: str) -> Scope:
    """What the bind address alone says; IPv4-mapped IPv6 is judged as its IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return Scope.WILDCARD
    if ip.is_loopback:
        return Scope.LOOPBACK
    if ip.is_multicast:
        return _multicast_scope(ip)
    if ip.is_link_local:
        return Scope.LINK_LOCAL
    # is_global is False for RFC 1918, ULA, CGNAT and the documentation ranges alike:
    # none of them is reachable from the internet at large
    if ip.is_global:
        return Scope.PUBLIC
    return Scope.PRIVATE


# IPv4 groups by the scope routers keep them in: 224.0.0.0/24 never leaves the link
# (RFC 5771), 239.0.0.0/8 stays inside the organisation (RFC 2365)
_V4_GROUPS = (
    (ipaddress.ip_network("224.0.0.0/24"), Scope.LINK_LOCAL),
    (ipaddress.ip_network("239.0.0.0/8"), Scope.PRIVATE),
)


def _multicast_scope(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Scope:
    """A group's reach: a datagram to it travels no further than its scope."""
    if isinstance(ip, ipaddress.IPv4Address):
        for net, scope in _V4_GROUPS:
            if ip in net:
                return scope
        return Scope.PUBLIC
    scope = ip.packed[1] & 0x0F  # RFC 4291: ff0S::, S the scope
    if scope <= 2:  # interface- and link-local
        return Scope.LINK_LOCAL
    return Scope.PUBLIC if scope == 0x0E else Scope.PRIVATE


def host_address(interface: str, address: str, family: int) -> HostAddress:
    return HostAddress(address=address, interface=interface, family=family, scope=scope_of(address))


def accepted_families(sock: Socket) -> frozenset[int]:
    """Which IP families a socket accepts: an IPv6 wildcard without v6only takes IPv4 too.

    v6only unknown (psutil, /proc/net fallbacks) counts as off, Linux's default
    (net.ipv6.bindv6only=0): over-reporting exposure is safer than missing it.
    """
    if sock.family == 4:
        return frozenset({4})
    if scope_of(sock.address) is Scope.WILDCARD and not sock.v6only:
        return frozenset({4, 6})
    return frozenset({6})


def exposure_of(sock: Socket, addresses: Iterable[HostAddress]) -> Exposure:
    """Who can reach the socket: the widest address it accepts connections on."""
    scope = scope_of(sock.address)
    if scope is not Scope.WILDCARD:
        return _SCOPE_EXPOSURE[scope]
    families = accepted_families(sock)
    widest = Exposure.LOOPBACK  # a wildcard always takes loopback
    for a in _on_device(sock, addresses):
        if a.family in families:
            widest = max(widest, _SCOPE_EXPOSURE[a.scope])
    return widest


def reachable_addresses(sock: Socket, addresses: Iterable[HostAddress]) -> list[HostAddress]:
    """The namespace's addresses on which the socket accepts connections."""
    scope = scope_of(sock.address)
    addresses = _on_device(sock, addresses)
    if scope is Scope.WILDCARD:
        families = accepted_families(sock)
        return [a for a in addresses if a.family in families]
    target = _canonical(sock.address)
    return [a for a in addresses if _canonical(a.address) == target]


def _on_device(sock: Socket, addresses: Iterable[HostAddress]) -> list[HostAddress]:
    """The addresses a socket can be reached on: a socket bound to a device takes only
    packets arriving on it, so only that device's addresses."""
    if not sock.device:
        return list(addresses)
    return [a for a in addresses if a.interface == sock.device]


@lru_cache(maxsize=4096)
def _canonical(address: str) -> str:
    """One spelling per address, IPv4-mapped IPv6 as its IPv4; cached: every scan asks
    for every socket and address again, and parsing is the costly part."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def accepts_on(sock: Socket, address: str, interface: str = "") -> bool:
    """Whether a connection to `address` (one of the namespace's) reaches the socket;
    a link-local address may carry its zone (`fe80::1%eth0`, as probes name it).
    `interface`: the device holding the address, where its packets arrive; a socket
    bound to a device (SO_BINDTODEVICE) takes them only when it is that device."""
    address = address.split("%", 1)[0]
    family = 6 if ":" in address else 4
    target = host_address(interface, address, family)
    return bool(reachable_addresses(sock, [target]))


def loopback_only(sock: Socket) -> bool:
    """Whether only loopback traffic reaches the socket: bound to a loopback address, or
    to the loopback device (whatever its address, it takes what arrives on lo alone)."""
    return scope_of(sock.address) is Scope.LOOPBACK or sock.device == "lo"


def after_firewall(
    sock: Socket,
    addresses: Iterable[HostAddress],
    decide: Callable[[HostAddress], Firewall],
) -> tuple[Firewall | None, Exposure]:
    """What the packet filter leaves of a socket's exposure.

    `decide` answers for a new connection from another host to one address. The
    socket's verdict is accept if any address accepts, drop if every one drops, else
    unknown; an unknown address counts as reachable, so over-exposure is never hidden.
    None when the socket is reachable on no address beyond loopback.
    """
    outside = [a for a in reachable_addresses(sock, addresses) if a.scope is not Scope.LOOPBACK]
    if not outside:
        return None, exposure_of(sock, addresses)
    verdicts = {a: decide(a) for a in outside}
    effective = Exposure.LOOPBACK
    for a, v in verdicts.items():
        if v is not Firewall.DROP:
            effective = max(effective, _SCOPE_EXPOSURE[a.scope])
    seen = set(verdicts.values())
    if Firewall.ACCEPT in seen:
        return Firewall.ACCEPT, effective
    if seen == {Firewall.DROP}:
        return Firewall.DROP, effective
    return Firewall.UNKNOWN, effective
