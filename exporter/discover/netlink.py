"""Listening sockets from the kernel through netlink sock_diag (linux/inet_diag.h).

The request asks for the LISTEN state bit alone (TCP) and the CLOSE bit alone (UDP, bound
and unconnected): any other bit makes the kernel walk every connection on the host, so
the cost of a dump grows with listeners, not with established connections.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

from bindscope.model import HOST_NETNS, Protocol, Socket

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
TCP_CLOSE = 7
INET_DIAG_SKV6ONLY = 11

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes)
_REQ = struct.Struct("=BBBBI48s")
# inet_diag_msg up to the inode: family, state, timer, retrans, sockid (sport, dport
# big-endian, src, dst 16 bytes each, interface, cookie[2]), expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
_RTA = struct.Struct("=HH")

# (protocol, IPPROTO, state bit) for each dump
_QUERIES = (
    (Protocol.TCP, socket.IPPROTO_TCP, 1 << TCP_LISTEN),
    (Protocol.UDP, socket.IPPROTO_UDP, 1 << TCP_CLOSE),
)


class NetlinkUnavailable(OSError):
    """The kernel offers no sock_diag here (not Linux, or a sandbox that forbids it)."""


def open_socket() -> socket.socket:
    try:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except (OSError, AttributeError) as e:
        raise NetlinkUnavailable(f"netlink sock_diag unavailable: {e}") from e


def list_sockets(sock: socket.socket | None = None, netns: str = HOST_NETNS) -> list[Socket]:
    """Every TCP listener and bound UDP socket, IPv4 and IPv6, in the socket's namespace.

    Pass a netlink socket opened inside another network namespace to list that one.
    """
    own = sock is None
    nl = open_socket() if sock is None else sock
    try:
        found: list[Socket] = []
        seq = 0
        for protocol, ipproto, states in _QUERIES:
            for family in (socket.AF_INET, socket.AF_INET6):
                seq += 1
                found.extend(_dump(nl, seq, protocol, ipproto, family, states, netns))
        return found
    finally:
        if own:
            nl.close()


def _dump(
    nl: socket.socket,
    seq: int,
    protocol: Protocol,
    ipproto: int,
    family: int,
    states: int,
    netns: str,
) -> Iterator[Socket]:
    req = _REQ.pack(family, ipproto, 0, 0, states, b"\0" * 48)
    hdr = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    try:
        nl.sendto(hdr + req, (0, 0))
    except OSError as e:
        raise NetlinkUnavailable(f"netlink sock_diag request failed: {e}") from e
    while True:
        data = nl.recv(1 << 16)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                return
            if mseq == seq:
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    if errno:
                        raise NetlinkUnavailable(f"netlink sock_diag error: {os.strerror(-errno)}")
                    return
                if mtype == SOCK_DIAG_BY_FAMILY:
                    parsed = _parse(data, offset + _NLMSGHDR.size, offset + length, protocol, netns)
                    if parsed is not None:
                        yield parsed
            offset += (length + 3) & ~3


def _parse(data: bytes, start: int, end: int, protocol: Protocol, netns: str) -> Socket | None:
    (
        family,
        _state,
        _timer,
        _retrans,
        sport,
        _dport,
        src,
        _dst,
        _ifindex,
        _cookie,
        _expires,
        _rq,
        _wq,
        uid,
        inode,
    ) = _MSG.unpack_from(data, start)
    port = int.from_bytes(sport, "big")
    if port == 0:  # an unbound UDP socket
        return None
    v6only: bool | None = None
    if family == socket.AF_INET:
        address = str(ipaddress.IPv4Address(src[:4]))
        fam = 4
    else:
        address = str(ipaddress.IPv6Address(src))
        fam = 6
        offset = start + _MSG.size
        while offset + _RTA.size <= end:
            rta_len, rta_type = _RTA.unpack_from(data, offset)
            if rta_len < _RTA.size:
                break
            if rta_type == INET_DIAG_SKV6ONLY:
                v6only = bool(data[offset + _RTA.size])
            offset += (rta_len + 3) & ~3
    return Socket(
        protocol=protocol,
        address=address,
        port=port,
        family=fam,
        v6only=v6only,
        inode=inode,
        uid=uid,
        netns=netns,
    )
