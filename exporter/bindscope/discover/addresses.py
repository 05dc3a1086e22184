"""The addresses of the namespace's interfaces, and a watch that tells when they changed."""

from __future__ import annotations

import errno
import select
import socket
import struct

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


NETLINK_ROUTE = 0
# RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR (linux/rtnetlink.h)
_GROUPS = 0x1 | 0x10 | 0x100
_DRAIN = 256  # reads per check at most; what is left is read at the next check
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_IFA_CACHEINFO = 6  # remaining lifetimes: they move every second, the address does not
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_ATTR = struct.Struct("=HH")
_IFADDRMSG = 8
_TIMEOUT = 1.0


class AddressWatch:
    """A route netlink socket in the namespace it was opened in (it stays there,
    whichever thread reads it), subscribed to its address and link changes.

    changed() tells whether the addresses must be read again: a notification arrived
    (a link renamed, an address added or removed), or the kernel's list of addresses,
    asked through the same socket, differs from the last one (an IPv6 address is
    notified only once its duplicate address detection ran, after it already shows).
    When nothing happened that is one non-blocking read and one small dump. Call it
    before reading the addresses, so that a change made meanwhile is seen next time.
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
        # the last list of address records, lifetimes left out
        self._listed: tuple[bytes, ...] | None = None
        self._seq = 0

    def changed(self) -> bool:
        dirty, self._dirty = self._dirty, False
        try:
            dirty |= self._drain()
            listed, notified = self._list()
        except OSError:  # a broken socket: read every time rather than trust it
            self._dirty = True
            self._listed = None
            return True
        dirty |= notified or listed != self._listed
        self._listed = listed
        return dirty

    def _drain(self) -> bool:
        arrived = False
        for _ in range(_DRAIN):
            try:
                self._sock.recv(1 << 16)
            except BlockingIOError:
                return arrived
            except OSError as e:  # ENOBUFS: notifications were lost, so something changed
                if e.errno != errno.ENOBUFS:
                    raise
            arrived = True
        self._dirty = True  # more pending than drained: not known to be quiet yet
        return True

    def _list(self) -> tuple[tuple[bytes, ...], bool]:
        """Every address record of the namespace, lifetimes left out; and whether a
        notification came in between."""
        self._seq += 1
        body = struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0)
        request = _HEADER.pack(_HEADER.size + len(body), _RTM_GETADDR, 0x301, self._seq, 0)
        self._sock.send(request + body)
        records: list[bytes] = []
        notified = False
        for _ in range(_DRAIN):
            if not select.select([self._sock], [], [], _TIMEOUT)[0]:
                raise TimeoutError("no answer to the address list request")
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, mtype, _flags, seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    break
                end = offset + length
                if seq != self._seq:
                    notified = True
                elif mtype in (_NLMSG_DONE, _NLMSG_ERROR):
                    return tuple(records), notified
                elif mtype == _RTM_NEWADDR:
                    records.append(_without_lifetimes(data, offset + _HEADER.size, end))
                offset = (end + 3) & ~3
        raise OSError(errno.EMSGSIZE, "address list did not end")

    def invalidate(self) -> None:
        """The read that followed changed() failed: read again next time."""
        self._dirty = True

    def close(self) -> None:
        self._sock.close()


def _without_lifetimes(data: bytes, start: int, end: int) -> bytes:
    parts = [data[start : start + _IFADDRMSG]]
    offset = start + _IFADDRMSG
    while offset + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            break
        if kind != _IFA_CACHEINFO:
            parts.append(data[offset : offset + length])
        offset += (length + 3) & ~3
    return b"".join(parts)
