"""Steady-state bench: a scan that finds what the last one found, against its floor.

    .venv/bin/python bench/steady.py

On a host with 1000 TCP listeners on 127.0.0.1, 8000 established loopback connections
and ~2000 processes, with 500 declared services and probes off, in one fresh
interpreter (so that its RSS is the exporter's scan loop alone): the steady
Scanner.scan() with every collector (the exporter's default) against the floor, raw
sock_diag dumps of the same requests (TCP LISTEN, UDP CLOSE; IPv4 and IPv6) in the same
network namespaces, messages counted and not parsed; psutil.net_connections() on the
host; CPU of the scan thread's work (Daemon.scan_once(): scan, render, gzip) extrapolated
to an hour of 15 s scans; RSS after it all.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import socket
import statistics
import subprocess
import sys
import time

import common

SERVICES, LISTENERS, CONNECTIONS, PROCESSES = 500, 1000, 8000, 2000
WARMUP, CPU_SCANS, STEADY, PSUTIL, INTERVAL = 20, 300, 200, 5, 15.0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _floor_sockets() -> list[socket.socket]:
    """A netlink socket in each namespace a scan sees (the host's opened per dump, as
    bindscope does; the others kept open, as bindscope keeps them)."""
    from bindscope.discover.namespaces import enumerate_namespaces, in_namespace

    found, _ = enumerate_namespaces()
    kept = []
    for ns in found[1:]:
        with contextlib.suppress(OSError):
            kept.append(
                in_namespace(ns.path, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4))
            )
    return kept


def loop() -> dict[str, float]:
    from bindscope.config.load import parse_config
    from bindscope.daemon import Daemon
    from bindscope.scan import Scanner

    config = parse_config(common.services_config(SERVICES), "bench.yml")
    scanner = Scanner()
    daemon = Daemon(config, None, scanner)
    for _ in range(WARMUP):
        daemon.scan_once()
    gc.collect()
    cpu0, t0 = _cpu(), time.monotonic()
    for _ in range(CPU_SCANS):
        daemon.scan_once()
    cpu, wall = _cpu() - cpu0, time.monotonic() - t0
    gc.collect()
    rss, peak = common.rss_kb()
    others = _floor_sockets()

    def floor() -> None:
        common.raw_listen_dump(requests=common.LISTEN_AND_UDP)
        for nl in others:
            common.raw_listen_dump(nl, common.LISTEN_AND_UDP)

    # in turns, so that the load of the shared machine weighs on both alike
    floors, scans = [], []
    for _ in range(STEADY):
        floors.append(common.median_ms(floor, 1))
        scans.append(common.median_ms(lambda: scanner.scan(config), 1))
    floor_ms, steady = statistics.median(floors), statistics.median(scans)
    namespaces = 1 + len(others)
    for nl in others:
        nl.close()
    # last: psutil's own memory must not count in the exporter's RSS above
    ps = common.median_ms(common.psutil_connections, PSUTIL, budget=60)
    return {
        "floor_ms": floor_ms,
        "namespaces": namespaces,
        "steady_ms": steady,
        "psutil_ms": ps,
        "cpu_ms_per_scan": cpu / CPU_SCANS * 1000,
        "wall_ms_per_scan": wall / CPU_SCANS * 1000,
        "cpu_s_per_hour": cpu / CPU_SCANS * (3600 / INTERVAL),
        "rss_mib": rss / 1024,
        "peak_mib": peak / 1024,
        "exposition_kib": len(daemon.metrics()[0]) / 1024,
    }


def run(h: common.Host) -> tuple[list[tuple[str, ...]], list[str]]:
    h.set_processes(PROCESSES)
    h.set_listeners(LISTENERS)
    h.set_connections(CONNECTIONS)
    out = subprocess.run(
        [sys.executable, __file__, "--loop"],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    r = json.loads(out.stdout)
    rows = [
        (f"raw dumps, same {r['namespaces']} namespaces (floor, ms)", f"{r['floor_ms']:.2f}", ""),
        ("steady Scanner.scan(), all collectors (ms)", f"{r['steady_ms']:.2f}", ""),
        ("steady scan / floor", f"{r['steady_ms'] / r['floor_ms']:.1f}x", "<= 3x"),
        ("psutil.net_connections() (ms)", f"{r['psutil_ms']:.1f}", ""),
        ("psutil / steady scan", f"{r['psutil_ms'] / r['steady_ms']:.0f}x", ">= 50x"),
        ("CPU per scan+render+gzip (ms)", f"{r['cpu_ms_per_scan']:.2f}", ""),
        ("CPU per hour at 15 s (s)", f"{r['cpu_s_per_hour']:.2f}", "< 3"),
        ("RSS after the scans (MiB)", f"{r['rss_mib']:.1f}", "not above before"),
        ("peak RSS (MiB)", f"{r['peak_mib']:.1f}", ""),
    ]
    notes = [
        f"processes on the host: {common.processes_on_host()}",
        f"wall time per scan+render+gzip: {r['wall_ms_per_scan']:.2f} ms",
        f"exposition: {r['exposition_kib']:.0f} KiB",
    ]
    return rows, notes


def main() -> int:
    if sys.argv[1:] == ["--loop"]:
        json.dump(loop(), sys.stdout)
        return 0
    print(f"machine: {common.machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    with common.host() as h:
        rows, notes = run(h)
    common.report(rows, ("measure", "value", "target"), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
