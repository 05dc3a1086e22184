"""Resources bench: memory over 10,000 scans, and CPU per hour at a 15 s interval.

    .venv/bin/python bench/resources.py

In process, on the L=1000/E=20000 host with ~2000 processes, probes off: CPU per
Daemon.scan_once() (the exporter's scan thread: scan, render, gzip) extrapolated to an
hour of 15 s scans; RSS after a warm-up and after 10,000 Scanner.scan() (what keeps state
between scans); growth of the traced Python heap. Compared with psutil's peak.
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
import time
import tracemalloc

import common

SCANS, WARMUP, CPU_SCANS, TRACED, INTERVAL = 10_000, 50, 200, 200, 15.0
SERVICES, LISTENERS, CONNECTIONS, PROCESSES = 500, 1000, 20000, 2000

# in a fresh interpreter: how much psutil.net_connections() alone makes a process grow
_PSUTIL_PEAK = r"""
import resource, psutil
psutil.net_connections(kind="inet")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def scan_loop(scans: int) -> dict[str, float]:
    from bindscope.config.load import parse_config
    from bindscope.daemon import Daemon
    from bindscope.scan import Scanner

    config = parse_config(common.services_config(SERVICES), "bench.yml")
    scanner = Scanner()
    # the scan thread's work: scan, render the exposition, gzip it
    daemon = Daemon(config, None, scanner)
    for _ in range(WARMUP):
        daemon.scan_once()
    gc.collect()
    rss0, _ = common.rss_kb()
    cpu0, t0 = _cpu(), time.monotonic()
    for _ in range(CPU_SCANS):
        daemon.scan_once()
    cpu, wall = _cpu() - cpu0, time.monotonic() - t0
    # growth: the scans themselves, 10,000 times (what holds state between scans)
    for _ in range(scans):
        scanner.scan(config)
    gc.collect()
    rss1, peak = common.rss_kb()
    # tracing slows a scan ~3x, so the Python heap is traced over a shorter window
    tracemalloc.start()
    for _ in range(TRACED // 10):
        daemon.scan_once()
    gc.collect()
    traced0, _ = tracemalloc.get_traced_memory()
    for _ in range(TRACED):
        daemon.scan_once()
    gc.collect()
    traced1, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "rss0": rss0 / 1024,
        "rss1": rss1 / 1024,
        "peak": peak / 1024,
        "traced_delta_kib": (traced1 - traced0) / 1024,
        "cpu_ms_per_scan": cpu / CPU_SCANS * 1000,
        "wall_ms_per_scan": wall / CPU_SCANS * 1000,
        "cpu_s_per_hour": cpu / CPU_SCANS * (3600 / INTERVAL),
    }


def psutil_peak_mib() -> float:
    out = subprocess.run(
        [sys.executable, "-c", _PSUTIL_PEAK], capture_output=True, text=True, check=True
    )
    return int(out.stdout) / 1024


def run(h: common.Host, scans: int = SCANS) -> tuple[list[tuple[str, ...]], list[str]]:
    h.set_processes(PROCESSES)
    h.set_listeners(LISTENERS)
    h.set_connections(CONNECTIONS)
    # in a fresh interpreter, so that its RSS and peak are the scan loop's alone
    out = subprocess.run(
        [sys.executable, __file__, "--loop", str(scans)],
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    r = json.loads(out.stdout)
    rows = [
        ("RSS after warm-up (MiB)", f"{r['rss0']:.1f}", "< 30"),
        (f"RSS after {scans} scans (MiB)", f"{r['rss1']:.1f}", "no growth"),
        ("peak RSS of the scan loop (MiB)", f"{r['peak']:.1f}", "< 40"),
        (
            f"Python heap growth over {TRACED} traced scans (KiB)",
            f"{r['traced_delta_kib']:.0f}",
            "~0",
        ),
        ("psutil.net_connections() alone, peak RSS (MiB)", f"{psutil_peak_mib():.1f}", ""),
        ("CPU per scan+render+gzip (ms)", f"{r['cpu_ms_per_scan']:.1f}", ""),
        ("CPU per hour at 15 s (s)", f"{r['cpu_s_per_hour']:.1f}", "< 30"),
    ]
    notes = [f"wall time per scan+render+gzip: {r['wall_ms_per_scan']:.1f} ms"]
    return rows, notes


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--loop":
        json.dump(scan_loop(int(sys.argv[2])), sys.stdout)
        return 0
    print(f"machine: {common.machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    scans = int(sys.argv[1]) if len(sys.argv) > 1 else SCANS
    with common.host() as h:
        rows, notes = run(h, scans)
    common.report(rows, ("measure", "value", "target"), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
