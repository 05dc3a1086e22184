"""Listening sockets from the kernel through netlink sock_diag (linux/inet_diag.h).

The request asks for the LISTEN state bit alone (TCP) and the CLOSE bit alone (UDP, bound
and unconnected): any other bit makes the kernel walk every connection on the host, so
the cost of a dump grows with listeners, not with established connections.

Parsing a record costs more than the kernel takes to send it, so each namespace's
sockets are remembered by their raw record and a record seen at the last dump is not
parsed again: a steady dump costs little more than the kernel's own work.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Collection

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
_SPORT = 4  # offset of the source port in inet_diag_msg

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


# netns label -> {record key: Socket} of its last dump; at most MEMO_NAMESPACES of them
MEMO_NAMESPACES = 256
_memo: OrderedDict[str, dict[tuple, Socket]] = OrderedDict()
_memo_lock = threading.Lock()


def forget(keep: Collection[str]) -> None:
    """Drop the memo of every namespace but these (the ones the last scan saw)."""
    with _memo_lock:
        for netns in [n for n in _memo if n not in keep]:
            del _memo[netns]


def list_sockets(sock: socket.socket | None = None, netns: str = HOST_NETNS) -> list[Socket]:
    """Every TCP listener and bound UDP socket, IPv4 and IPv6, in the socket's namespace.

    Pass a netlink socket opened inside another network namespace to list that one.
    """
    own = sock is None
    nl = open_socket() if sock is None else sock
    with _memo_lock:
        previous = _memo.get(netns, {})
    seen: dict[tuple, Socket] = {}
    try:
        seq = 0
        for protocol, ipproto, states in _QUERIES:
            for family in (socket.AF_INET, socket.AF_INET6):
                seq += 1
                _dump(nl, seq, protocol, ipproto, family, states, netns, previous, seen)
    finally:
        if own:
            nl.close()
    with _memo_lock:
        # only what listens now: memory follows the listeners, not their history
        _memo[netns] = seen
        _memo.move_to_end(netns)
        while len(_memo) > MEMO_NAMESPACES:
            _memo.popitem(last=False)
    return list(seen.values())


def _dump(
    nl: socket.socket,
    seq: int,
    protocol: Protocol,
    ipproto: int,
    family: int,
    states: int,
    netns: str,
    previous: dict[tuple, Socket],
    seen: dict[tuple, Socket],
) -> None:
    req = _REQ.pack(family, ipproto, 0, 0, states, b"\0" * 48)
    hdr = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    try:
        nl.sendto(hdr + req, (0, 0))
    except OSError as e:
        raise NetlinkUnavailable(f"netlink sock_diag request failed: {e}") from e
    unpack_header = _NLMSGHDR.unpack_from
    while True:
        data = nl.recv(1 << 16)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, mtype, _flags, mseq, _pid = unpack_header(data, offset)
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
                start = offset + _NLMSGHDR.size
                # a UDP socket with port 0 is not bound: nothing listens
                if mtype == SOCK_DIAG_BY_FAMILY and (
                    data[start + _SPORT] or data[start + _SPORT + 1]
                ):
                    # the record as the kernel wrote it: a listener's is the same from
                    # dump to dump (a busy UDP socket's queue moves: it is parsed again)
                    key = (ipproto, data[start : offset + length])
                    parsed = previous.get(key)
                    if parsed is None:
                        parsed = _parse(data, start, offset + length, protocol, netns)
                    if parsed is not None:
                        seen[key] = parsed
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
        ifindex,
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
        ifindex=ifindex,
    )
