"""The addresses of the namespace's interfaces, and a watch that tells when they changed."""

from __future__ import annotations

import socket

import psutil

from bindscope.model import InterfaceAddress

_FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 6}


def interface_addresses() -> list[InterfaceAddress]:
    """(interface, address, family) for every IP address; IPv6 zones stripped."""
    found = []
    for ifname, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            family = _FAMILIES.get(a.family)
            if family is not None:
                found.append(InterfaceAddress(ifname, a.address.split("%", 1)[0], family))
    return found


NETLINK_ROUTE = 0
# RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR (linux/rtnetlink.h)
_GROUPS = 0x1 | 0x10 | 0x100
_DRAIN = 256  # reads per check at most; what is left is read at the next check


class AddressWatch:
    """A route netlink socket subscribed to the address and link changes of the namespace
    it was opened in (the socket stays there, whichever thread reads it).

    changed() is one non-blocking read when nothing happened: the addresses need to be
    read again only when it says so. Call it before reading them, so that a change made
    meanwhile is seen at the next check.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self._sock.bind((0, _GROUPS))
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self._dirty = True  # nothing read yet

    def changed(self) -> bool:
        dirty, self._dirty = self._dirty, False
        for _ in range(_DRAIN):
            try:
                self._sock.recv(1 << 16)
            except BlockingIOError:
                return dirty
            except OSError:  # ENOBUFS: notifications were lost, so something changed
                pass
            dirty = True
        self._dirty = True  # more pending than drained: not known to be quiet yet
        return True

    def invalidate(self) -> None:
        """The read that followed changed() failed: read again next time."""
        self._dirty = True

    def close(self) -> None:
        self._sock.close()
