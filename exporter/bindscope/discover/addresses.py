"""The addresses of the namespace's interfaces, read afresh on every scan."""

from __future__ import annotations

import socket

import psutil

from bindscope.model import InterfaceAddress

_FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 6}


def interface_addresses() -> list[InterfaceAddress]:
    """(interface, address, family) for every IP address; IPv6 zones stripped."""
    found = []
    for ifname, addrs in psutil.net_if_addrs().items():
        try:
            index = socket.if_nametoindex(ifname)
        except OSError:  # gone since it was listed
            continue
        for a in addrs:
            family = _FAMILIES.get(a.family)
            if family is not None:
                found.append(InterfaceAddress(ifname, a.address.split("%", 1)[0], family, index))
    return found
