"""A peer's /api/v1/services answer, checked against the documented shape, and what to probe.

A peer is trusted for nothing but the list of its own declared services: anything
outside the shape makes the whole answer invalid, and only declared private or public
TCP services on the peer's non-loopback addresses this host routes to are probed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bindscope.config.load import SERVICE_NAME_RE
from bindscope.model import Exposure, Protocol

SERVICES_VERSION = 1
MAX_ADDRESSES = 64
MAX_SERVICES = 1024


class InvalidAnswer(ValueError):
    pass


@dataclass(frozen=True)
class Declared:
    name: str
    port: int
    protocol: Protocol
    expose: Exposure
    status: str


@dataclass(frozen=True)
class PeerServices:
    addresses: tuple[str, ...]
    services: tuple[Declared, ...]


def parse_services(doc: Any) -> PeerServices:
    if not isinstance(doc, dict) or doc.get("version") != SERVICES_VERSION:
        raise InvalidAnswer(f"not a version {SERVICES_VERSION} services document")
    addresses, services = doc.get("addresses"), doc.get("services")
    if not isinstance(addresses, list) or len(addresses) > MAX_ADDRESSES:
        raise InvalidAnswer(f"addresses: expected a list of at most {MAX_ADDRESSES}")
    if not isinstance(services, list) or len(services) > MAX_SERVICES:
        raise InvalidAnswer(f"services: expected a list of at most {MAX_SERVICES}")
    out = []
    for a in addresses:
        try:
            # a %zone names an interface of the peer's, meaningless here
            if not isinstance(a, str) or "%" in a:
                raise ValueError
            out.append(str(ipaddress.ip_address(a)))
        except ValueError:
            raise InvalidAnswer(f"addresses: {str(a)[:60]!r} is not an IP address") from None
    return PeerServices(tuple(dict.fromkeys(out)), tuple(_service(s) for s in services))


def _service(s: Any) -> Declared:
    if not isinstance(s, dict):
        raise InvalidAnswer("services: an entry is not an object")
    name, port = s.get("name"), s.get("port")
    if not isinstance(name, str) or not SERVICE_NAME_RE.fullmatch(name):
        raise InvalidAnswer("services: an entry has no valid name")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidAnswer(f"services: {name}: no valid port")
    try:
        protocol, expose = Protocol(s.get("protocol")), Exposure(s.get("expose"))
    except ValueError:
        raise InvalidAnswer(f"services: {name}: bad protocol or expose") from None
    status = s.get("status")
    if not isinstance(status, str):
        raise InvalidAnswer(f"services: {name}: no status")
    return Declared(name, port, protocol, expose, status)


def probe_plan(answer: PeerServices, routable: Callable[[str], bool]) -> list[tuple[Declared, str]]:
    """(service, address) to connect to: never a loopback or undeclared port, never an
    address this host has no route to (the connect would say nothing about the path)."""
    addresses = [a for a in answer.addresses if _other_host(a) and routable(a)]
    wanted = [
        s
        for s in answer.services
        if s.protocol is Protocol.TCP and s.expose in (Exposure.PRIVATE, Exposure.PUBLIC)
    ]
    return [(s, a) for s in wanted for a in addresses]


def _other_host(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # link-local needs a zone only the peer knows; multicast and 0.0.0.0 are nobody's
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)
