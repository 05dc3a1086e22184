"""Namespace bench: what each extra network namespace adds to a scan.

    sudo .venv/bin/python bench/namespaces.py

Creates 50 `ip netns` namespaces (lo up, one process living in each, one TCP listener
each on 0.0.0.0:8080), then times a steady-state Scanner.scan() with namespace scanning
on and off (probes and firewall off), before and after; all are removed at the end,
even when the bench fails half-way. Needs root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import common

from bindscope.config.load import parse_config
from bindscope.scan import Scanner

NAMESPACES = 50
REPEAT = 30
CONFIG = parse_config("scan_interval: 15s\nprobe: {enabled: false}\n", "bench.yml")

# Holds one listener in each namespace named on its command line, until stdin closes:
# a thread-less process may enter a namespace with setns() and come back.
_WORKER = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
home = os.open("/proc/self/ns/net", os.O_RDONLY)
held = []
for name in sys.argv[1:]:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), f"setns {name}")
    os.close(fd)
    held.append(socket.create_server(("0.0.0.0", 8080)))
    libc.setns(home, 0x40000000)
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _remove_leftovers() -> None:
    """Namespaces a killed earlier run of this bench left (its pid is in the name)."""
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else ():
        parts = name.split("-")
        if parts[0] == "bsb" and len(parts) == 3 and not Path(f"/proc/{parts[1]}").exists():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@contextlib.contextmanager
def namespaces(n: int) -> Iterator[list[str]]:
    names = [f"bsb-{os.getpid()}-{i}" for i in range(n)]
    made: list[str] = []
    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
            _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
            # a member process, as a container has; its sleep bounds its life if we die
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", name, "sleep", "900"], stdin=subprocess.DEVNULL
                )
            )
        worker = subprocess.Popen(
            [sys.executable, "-c", _WORKER, *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(worker)
        if worker.stdout is None or worker.stdout.readline().strip() != "ready":
            raise RuntimeError("the listener worker failed")
        yield names
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in procs:
            p.wait()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        signal.signal(signal.SIGTERM, previous)


def measure() -> dict[str, float]:
    """Steady-state scan (ms) with namespaces off and on, and how many were scanned."""
    out: dict[str, float] = {}
    for label, on in (("off", False), ("on", True)):
        scanner = Scanner(namespaces=on, firewall=False)
        snap = scanner.scan(CONFIG)  # the first scan opens a netlink socket in each
        out[label] = common.median_ms(lambda s=scanner: s.scan(CONFIG), REPEAT)
        if on:
            errors = scanner.scan(CONFIG).errors
            if errors:
                print(f"  scan errors with namespaces on: {errors}", file=sys.stderr)
            out["extra"] = sum(snap.namespaces.values()) - 1
            out["listeners"] = len(snap.listeners)
            cold = Scanner(namespaces=True, firewall=False)
            t0 = time.perf_counter()
            cold.scan(CONFIG)
            out["cold"] = (time.perf_counter() - t0) * 1000
    return out


def run() -> tuple[list[tuple[str, ...]], list[str]]:
    _remove_leftovers()
    before = measure()
    with namespaces(NAMESPACES):
        after = measure()
    rows = []
    for label, m in (("before", before), (f"+{NAMESPACES} ip netns", after)):
        rows.append(
            (
                label,
                str(int(m["extra"])),
                str(int(m["listeners"])),
                f"{m['off']:.1f}",
                f"{m['on']:.1f}",
                f"{m['cold']:.1f}",
                f"{m['on'] - m['off']:.1f}",
            )
        )
    added = after["extra"] - before["extra"]
    slope = ((after["on"] - after["off"]) - (before["on"] - before["off"])) / added
    notes = [
        f"per extra namespace (steady, from the {int(added)} added): {slope:.2f} ms "
        "(target: about 1 ms plus attribution)",
        f"processes on the host during the run: {common.processes_on_host()}",
    ]
    return rows, notes


HEADER = (
    "host",
    "other netns",
    "listeners",
    "scan, netns off (ms)",
    "scan, netns on (ms)",
    "cold scan, on (ms)",
    "cost of netns (ms)",
)


def main() -> int:
    if os.geteuid() != 0:
        print("bench/namespaces.py needs root (ip netns add, setns)", file=sys.stderr)
        return 2
    print(f"machine: {common.machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    rows, notes = run()
    common.report(rows, HEADER, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
