"""Reachability probes: a TCP connect to each service port on each host address, as telnet did.

All connects run at once from one thread with non-blocking sockets and a selector, so a
scan's probing takes at most `timeout` however many addresses there are; at most
MAX_IN_FLIGHT sockets are open at a time. A probe sends no payload and closes at once.

Know the limit: a connect to the host's own address enters through `lo`, which
firewalls accept, so success proves the socket accepts on that address, not that a
firewall lets other hosts in.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bindscope.model import ProbeResult

MAX_IN_FLIGHT = 256


@dataclass(frozen=True)
class Target:
    address: str  # may carry a %zone for link-local IPv6
    port: int


def _sockaddr(target: Target) -> tuple[int, tuple]:
    info = socket.getaddrinfo(
        target.address, target.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )
    family, _type, _proto, _name, sockaddr = info[0]
    return family, sockaddr


def probe_all(
    targets: Sequence[Target], timeout: float, max_in_flight: int = MAX_IN_FLIGHT
) -> dict[Target, ProbeResult]:
    """Connect to every target; the whole call returns within about `timeout` seconds."""
    results: dict[Target, ProbeResult] = {}
    pending = list(dict.fromkeys(targets))
    pending.reverse()
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    started: dict[int, tuple[Target, socket.socket, float]] = {}

    def finish(fd: int, ok: bool, err: str) -> None:
        target, s, t0 = started.pop(fd)
        sel.unregister(s)
        s.close()
        results[target] = ProbeResult(target.address, ok, time.monotonic() - t0, err)

    try:
        while pending or started:
            while pending and len(started) < max_in_flight:
                target = pending.pop()
                t0 = time.monotonic()
                try:
                    family, sockaddr = _sockaddr(target)
                    s = socket.socket(family, socket.SOCK_STREAM)
                except socket.gaierror:
                    # not numeric, or an unknown %zone: its errno (EAI_*) names no errno
                    results[target] = ProbeResult(target.address, False, 0.0, "bad_address")
                    continue
                except OSError as e:
                    results[target] = ProbeResult(target.address, False, 0.0, _err_name(e.errno))
                    continue
                s.setblocking(False)
                rc = s.connect_ex(sockaddr)
                started[s.fileno()] = (target, s, t0)
                sel.register(s, selectors.EVENT_WRITE)
                if rc not in (0, errno.EINPROGRESS):
                    finish(s.fileno(), False, _err_name(rc))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ev in sel.select(remaining):
                rc = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                finish(key.fd, rc == 0, _err_name(rc) if rc else "")
        for fd in list(started):
            finish(fd, False, "timeout")
        for target in pending:  # never started: the deadline came first
            results[target] = ProbeResult(target.address, False, 0.0, "timeout")
    finally:
        for _target, s, _t0 in started.values():
            s.close()
        sel.close()
    return results


def _err_name(code: int | None) -> str:
    if not code:
        return "error"
    return errno.errorcode.get(code, str(code))
