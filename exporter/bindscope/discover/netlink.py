"""Listening sockets from the kernel through netlink sock_diag (linux/inet_diag.h).

The request asks for the LISTEN state bit alone (TCP) and the CLOSE bit alone (UDP, bound
and unconnected): any other bit makes the kernel walk every connection on the host, so
the cost of a dump grows with listeners, not with established connections.

Parsing a record costs more than the kernel takes to send it, so a caller's Memo keeps
what each namespace's last dump received: bytes equal to last time are not parsed again,
and a steady dump costs little more than the kernel's own work.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
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


# what one chunk (one recv) of a dump held: its bytes, whether it ended the dump, and
# its records as (key, Socket)
_Chunk = tuple[bytes, bool, tuple[tuple[tuple, Socket], ...]]


class Memo:
    """What the last dump of each namespace received, kept by its caller between scans.

    The kernel sends a listener's record the same from dump to dump, so a chunk equal
    to the one received at the same place last time needs no parsing, and a dump whose
    every chunk is equal returns the very tuple it returned then: a caller can tell
    "nothing changed" by identity. A chunk that differs is parsed, reusing each record
    seen before (a busy UDP socket's queue moves; its record is parsed again).
    """

    def __init__(self) -> None:
        # netns label -> ({(seq, chunk index): chunk}, the sockets they made)
        self._last: dict[str, tuple[dict[tuple[int, int], _Chunk], tuple[Socket, ...]]] = {}
        self._lock = threading.Lock()

    def get(self, netns: str) -> tuple[dict[tuple[int, int], _Chunk], tuple[Socket, ...]]:
        with self._lock:
            return self._last.get(netns, ({}, ()))

    def put(
        self, netns: str, chunks: dict[tuple[int, int], _Chunk], sockets: tuple[Socket, ...]
    ) -> None:
        with self._lock:
            self._last[netns] = (chunks, sockets)

    def forget(self, keep: Collection[str]) -> None:
        """Drop every namespace but these (the ones the last scan saw)."""
        with self._lock:
            for netns in [n for n in self._last if n not in keep]:
                del self._last[netns]

    def __contains__(self, netns: str) -> bool:
        return netns in self._last


def list_sockets(
    sock: socket.socket | None = None, netns: str = HOST_NETNS, memo: Memo | None = None
) -> tuple[Socket, ...]:
    """Every TCP listener and bound UDP socket, IPv4 and IPv6, in the socket's namespace.

    Pass a netlink socket opened inside another network namespace to list that one, and
    a Memo kept between calls to skip parsing what the last call already parsed.
    """
    own = sock is None
    nl = open_socket() if sock is None else sock
    last_chunks, last_sockets = memo.get(netns) if memo is not None else ({}, ())
    known: dict[tuple, Socket] | None = None  # records of the last dump, built when needed
    chunks: dict[tuple[int, int], _Chunk] = {}
    unchanged = bool(last_chunks)
    try:
        seq = 0
        for protocol, ipproto, states in _QUERIES:
            for family in (socket.AF_INET, socket.AF_INET6):
                seq += 1
                _request(nl, seq, ipproto, family, states)
                final = False
                while not final:
                    data = nl.recv(1 << 16)
                    where = (seq, len(chunks))
                    chunk = last_chunks.get(where)
                    if chunk is None or chunk[0] != data:
                        unchanged = False
                        if known is None:
                            known = {k: s for c in last_chunks.values() for k, s in c[2]}
                        chunk = _parse_chunk(data, seq, protocol, ipproto, netns, known)
                    chunks[where] = chunk
                    final = chunk[1]
    finally:
        if own:
            nl.close()
    if unchanged and len(chunks) == len(last_chunks):
        return last_sockets
    # one socket per record: the same record twice in a dump is one socket
    sockets = tuple({k: s for c in chunks.values() for k, s in c[2]}.values())
    if memo is not None:
        # only what listens now: memory follows the listeners, not their history
        memo.put(netns, chunks, sockets)
    return sockets


def _request(nl: socket.socket, seq: int, ipproto: int, family: int, states: int) -> None:
    req = _REQ.pack(family, ipproto, 0, 0, states, b"\0" * 48)
    hdr = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    try:
        nl.sendto(hdr + req, (0, 0))
    except OSError as e:
        raise NetlinkUnavailable(f"netlink sock_diag request failed: {e}") from e


def _parse_chunk(
    data: bytes,
    seq: int,
    protocol: Protocol,
    ipproto: int,
    netns: str,
    known: dict[tuple, Socket],
) -> _Chunk:
    """One recv of a dump: whether it ended the dump, and its records."""
    found: list[tuple[tuple, Socket]] = []
    unpack_header = _NLMSGHDR.unpack_from
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, mseq, _pid = unpack_header(data, offset)
        if length < _NLMSGHDR.size:
            return data, True, tuple(found)
        if mseq == seq:
            if mtype == NLMSG_DONE:
                return data, True, tuple(found)
            if mtype == NLMSG_ERROR:
                (errno,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                if errno:
                    raise NetlinkUnavailable(f"netlink sock_diag error: {os.strerror(-errno)}")
                return data, True, tuple(found)
            start = offset + _NLMSGHDR.size
            # a UDP socket with port 0 is not bound: nothing listens
            if mtype == SOCK_DIAG_BY_FAMILY and (data[start + _SPORT] or data[start + _SPORT + 1]):
                key = (ipproto, data[start : offset + length])
                parsed = known.get(key)
                if parsed is None:
                    parsed = _parse(data, start, offset + length, protocol, netns)
                if parsed is not None:
                    found.append((key, parsed))
        offset += (length + 3) & ~3
    return data, False, tuple(found)


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
        address = socket.inet_ntop(socket.AF_INET, src[:4])
        fam = 4
    else:
        # inet_ntop, as psutil and /proc's reader name them: `::ffff:198.51.100.1`, where
        # ipaddress writes an IPv4-mapped address as `::ffff:c633:6401`
        address = socket.inet_ntop(socket.AF_INET6, src)
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
