"""Shared bench fixtures: a host with L listeners, E established connections, N processes.

Everything is on loopback and owned by child processes that are killed on exit, even
when the bench fails half-way. Timings are medians of repeated runs, so that the noise
of a shared 2-core machine shows less.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the first error of each source is logged as a warning: noise in a bench table
logging.getLogger("bindscope").setLevel(logging.ERROR)
PER_WORKER = 4000  # connections per worker: 8000 fds, well under the 20000 fd limit

# A worker holds sockets until its stdin closes. "listen N": N TCP listeners on 127.0.0.1;
# "connect N": N established loopback connections (both ends, 2 fds each).
_WORKER = r"""
import socket, sys
kind, n = sys.argv[1], int(sys.argv[2])
held = []
if kind == "listen":
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        held.append(s)
else:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    addr = srv.getsockname()
    for i in range(n):
        c = socket.create_connection(addr)
        a, _ = srv.accept()
        held += (c, a)
    srv.close()  # only established connections stay
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
"""


class Host:
    """Child processes holding the sockets and the sleeping processes of a bench host."""

    def __init__(self) -> None:
        self._listeners: list[subprocess.Popen] = []
        self._connections: list[subprocess.Popen] = []
        self._sleepers: list[subprocess.Popen] = []

    def _worker(self, kind: str, n: int) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-c", _WORKER, kind, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = p.stdout.readline() if p.stdout else ""
        if line.strip() != "ready":
            p.kill()
            p.wait()
            raise RuntimeError(f"bench worker {kind} {n} failed to start")
        return p

    def set_listeners(self, n: int) -> None:
        self._stop(self._listeners)
        if n:
            self._listeners.append(self._worker("listen", n))

    def set_connections(self, n: int) -> None:
        self._stop(self._connections)
        while n > 0:
            self._connections.append(self._worker("connect", min(n, PER_WORKER)))
            n -= PER_WORKER

    def set_processes(self, n: int) -> None:
        """Sleeping processes (3 fds each); their sleep bounds their life if we are killed."""
        self._stop(self._sleepers)
        for _ in range(n):
            self._sleepers.append(
                subprocess.Popen(
                    ["sleep", "1800"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    @staticmethod
    def _stop(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in procs:
            p.wait()
        procs.clear()

    def close(self) -> None:
        for procs in (self._listeners, self._connections, self._sleepers):
            self._stop(procs)


@contextlib.contextmanager
def host() -> Iterator[Host]:
    h = Host()
    # SIGTERM must unwind through the finally below, not leave children behind
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        yield h
    finally:
        h.close()
        signal.signal(signal.SIGTERM, previous)


def processes_on_host() -> int:
    return sum(1 for p in os.listdir("/proc") if p.isdigit())


def median_ms(fn: Callable[[], object], repeat: int, budget: float = 20.0) -> float:
    """Median wall time of fn in ms over `repeat` runs (fewer if `budget` seconds run out)."""
    times = []
    deadline = time.monotonic() + budget
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.monotonic() > deadline:
            break
    return statistics.median(times) * 1000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the reference methods, each listing the host's listening sockets --------------------

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI48s")


# (IPPROTO, state bit): TCP LISTEN alone, and bound unconnected UDP (CLOSE)
TCP_LISTEN = ((socket.IPPROTO_TCP, 1 << 10),)
LISTEN_AND_UDP = (*TCP_LISTEN, (socket.IPPROTO_UDP, 1 << 7))


def raw_listen_dump(
    nl: socket.socket | None = None, requests: tuple[tuple[int, int], ...] = TCP_LISTEN
) -> int:
    """The floor: sock_diag dumps (IPv4 and IPv6; TCP LISTEN unless told), messages
    counted, not parsed; in the namespace of nl (a fresh socket in ours by default)."""
    if nl is None:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as own:
            return raw_listen_dump(own, requests)
    count = 0
    seq = 0
    for ipproto, states in requests:
        for family in (socket.AF_INET, socket.AF_INET6):
            seq += 1
            req = _REQ.pack(family, ipproto, 0, 0, states, b"\0" * 48)
            nl.sendto(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), 20, 0x301, seq, 0) + req, (0, 0))
            done = False
            while not done:
                data = nl.recv(1 << 16)
                offset = 0
                while offset < len(data):
                    length, mtype = _NLMSGHDR.unpack_from(data, offset)[:2]
                    if mtype in (2, 3):  # NLMSG_ERROR, NLMSG_DONE
                        done = True
                        break
                    count += 1
                    offset += (length + 3) & ~3
    return count


def proc_net_listeners() -> int:
    """Parse /proc/net/{tcp,tcp6,udp,udp6}; keep TCP LISTEN (0A) and UDP CLOSE (07) lines."""
    count = 0
    for name, state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        with open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == state:
                    _addr, port = fields[1].rsplit(":", 1)
                    count += int(port, 16) != 0
    return count


def ss_listen() -> int:
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=True).stdout
    return out.count("\n") - 1


def psutil_connections() -> int:
    import psutil

    return sum(1 for c in psutil.net_connections(kind="inet") if c.status in ("LISTEN", "NONE"))


def rss_kb(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident memory now, and its peak."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def rss_anon_kb(pid: int | str = "self") -> int:
    """RssAnon: resident memory of the process's own, not shared library pages."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def services_config(n: int) -> str:
    """n declared TCP services, on the ports that listen now first (so judging has work to
    do), then on ports that do not; probing off."""
    from bindscope.discover import netlink

    listening = sorted({s.port for s in netlink.list_sockets() if s.protocol.value == "tcp"})
    idle = (p for p in range(1, 65536) if p not in set(listening))
    ports = (listening + [next(idle) for _ in range(max(0, n - len(listening)))])[:n]
    lines = ["scan_interval: 15s", "probe: {enabled: false}", "services:"]
    lines += [f"  - {{name: svc{i}, port: {p}, expose: loopback}}" for i, p in enumerate(ports)]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({cpu}), {os.uname().sysname} {os.uname().release}, "
        f"Python {sys.version.split()[0]}"
    )


def report(rows: list[tuple[str, ...]], header: tuple[str, ...], notes: list[str]) -> None:
    """Print a result table and the notes under it, as every bench does."""
    print(table(rows, header))
    for note in notes:
        print(f"- {note}")
    sys.stdout.flush()


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        out.append(
            "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        )
    return "\n".join(out)
