"""Portable fallback listing through psutil, for hosts where netlink sock_diag is missing.

psutil reads every connection of the host (cost grows with established connections) and
cannot tell v6only; it is used only when netlink is unavailable.
"""

from __future__ import annotations

import socket

import psutil

from bindscope.model import HOST_NETNS, Protocol, Socket


def list_sockets() -> tuple[list[Socket], dict[tuple[str, str, int], int]]:
    """Listening sockets, and the owning pid psutil reported for each (protocol,
    address, port); psutil gives no inode, so the sockets carry inode 0."""
    found: list[Socket] = []
    pids: dict[tuple[str, str, int], int] = {}
    for c in psutil.net_connections(kind="inet"):
        if c.type == socket.SOCK_STREAM:
            if c.status != psutil.CONN_LISTEN:
                continue
            protocol = Protocol.TCP
        elif c.type == socket.SOCK_DGRAM:
            if c.raddr or not c.laddr or c.laddr.port == 0:
                continue
            protocol = Protocol.UDP
        else:
            continue
        address = c.laddr.ip.split("%", 1)[0]
        family = 6 if c.family == socket.AF_INET6 else 4
        key = (protocol.value, address, c.laddr.port)
        found.append(
            Socket(
                protocol=protocol,
                address=address,
                port=c.laddr.port,
                family=family,
                v6only=None,
                inode=0,
                netns=HOST_NETNS,
            )
        )
        if c.pid:
            pids[key] = c.pid
    return found, pids
