"""Scrape bench: latency under 50 concurrent scrapers, and the exporter's RSS and CPU.

    .venv/bin/python bench/scrape.py

Runs the real exporter (probing off, 500 declared services, 1000 listeners, 20000
established connections on the host) and scrapes it from 50 keep-alive clients spread
over 5 processes for 30 s, asking for gzip as Prometheus does.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

SCRAPERS, CLIENT_PROCESSES, DURATION = 50, 5, 30.0
# (label, gzip, seconds between one scraper's scrapes (0: closed loop), duration)
LOADS = (
    ("50 closed-loop, gzip", True, 0.0, DURATION),
    ("50 x 10/s (500/s), gzip", True, 0.1, DURATION),
    ("50 closed-loop, plain", False, 0.0, DURATION / 3),
)
SERVICES, LISTENERS, CONNECTIONS, PROCESSES = 500, 1000, 20000, 2000


def _client(port: int, threads: int, duration: float, gzip: bool, every: float) -> None:
    """One client process: `threads` scrapers, each in a closed loop (every=0) or one
    scrape every `every` seconds; prints the latencies as JSON."""
    latencies: list[float] = []
    failures = [0]
    deadline = time.monotonic() + duration
    headers = {"Accept-Encoding": "gzip"} if gzip else {}

    def scraper() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        tick = time.monotonic()
        while time.monotonic() < deadline:
            if every:
                tick += every
                time.sleep(max(0.0, tick - time.monotonic()))
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/metrics", headers=headers)
                r = conn.getresponse()
                body = r.read()
                if r.status != 200 or not body:
                    failures[0] += 1
                    continue
            except (OSError, http.client.HTTPException):
                failures[0] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            latencies.append(time.perf_counter() - t0)
        conn.close()

    workers = [threading.Thread(target=scraper) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(duration + 20)
    json.dump({"latencies": latencies, "failures": failures[0]}, sys.stdout)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_load(port: int, pid: int, duration: float, gzip: bool, every: float) -> dict[str, float]:
    per = SCRAPERS // CLIENT_PROCESSES
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                str(port),
                str(per),
                str(duration),
                str(gzip),
                str(every),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(CLIENT_PROCESSES)
    ]
    cpu0 = _cpu_seconds(pid)
    latencies: list[float] = []
    failures = 0
    try:
        for c in clients:
            out, _ = c.communicate(timeout=duration + 60)
            got = json.loads(out)
            latencies += got["latencies"]
            failures += got["failures"]
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
    cpu = _cpu_seconds(pid) - cpu0
    return {
        "scrapes": len(latencies),
        "failures": failures,
        "rate": len(latencies) / duration,
        "p50": common.percentile(latencies, 0.50) * 1000,
        "p99": common.percentile(latencies, 0.99) * 1000,
        "server_cpu_ms_per_scrape": cpu / max(1, len(latencies)) * 1000,
    }


@contextlib.contextmanager
def exporter(config: str, extra: list[str] | None = None):
    """The exporter as a subprocess on a loopback port: (port, pid); stopped at the end."""
    with tempfile.TemporaryDirectory(prefix="bs-bench-") as tmp:
        path = Path(tmp) / "bindscope.yml"
        path.write_text(config)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from bindscope.cli.exporter import main; sys.exit(main())",
                f"--config.file={path}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
                *(extra or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/-/ready")
                    if conn.getresponse().status == 200:
                        break
                if proc.poll() is not None:
                    raise RuntimeError(f"exporter exited {proc.returncode}")
                time.sleep(0.1)
            else:
                raise RuntimeError("exporter not ready in 60 s")
            yield port, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def body_size(port: int, gzip: bool) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"} if gzip else {})
    return len(conn.getresponse().read())


def run(h: common.Host) -> tuple[list[tuple[str, ...]], list[str]]:
    h.set_processes(PROCESSES)
    h.set_listeners(LISTENERS)
    h.set_connections(CONNECTIONS)
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    with exporter(common.services_config(SERVICES)) as (port, pid):
        time.sleep(1)
        idle_rss, _ = common.rss_kb(pid)
        sizes = (
            f"{body_size(port, False) // 1024} KiB plain, {body_size(port, True) // 1024} KiB gzip"
        )
        for label, gzip, every, duration in LOADS:
            r = scrape_load(port, pid, duration, gzip, every)
            rows.append(
                (
                    f"scrape {label}",
                    f"{r['p50']:.2f}",
                    f"{r['p99']:.2f}",
                    f"{r['rate']:.0f}/s",
                    f"{r['server_cpu_ms_per_scrape']:.2f}",
                    str(r["failures"]),
                )
            )
        rss, peak = common.rss_kb(pid)
        anon = common.rss_anon_kb(pid)
    notes.append(f"exposition: {sizes}")
    notes.append(
        f"exporter RSS: idle {idle_rss / 1024:.1f} MiB, after the scrape load "
        f"{rss / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB (targets: steady < 30, peak < 40); "
        f"of which anonymous (not shared libraries) {anon / 1024:.1f} MiB"
    )
    return rows, notes


HEADER = ("load", "p50 ms", "p99 ms", "scrapes", "server CPU ms/scrape", "failed")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        _client(
            int(sys.argv[2]),
            int(sys.argv[3]),
            float(sys.argv[4]),
            sys.argv[5] == "True",
            float(sys.argv[6]),
        )
        return 0
    print(f"machine: {common.machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(
        f"{SCRAPERS} concurrent keep-alive scrapers ({CLIENT_PROCESSES} processes), closed "
        f"loop; {SERVICES} services, {LISTENERS} listeners, {CONNECTIONS} connections"
    )
    with common.host() as h:
        rows, notes = run(h)
    common.report(rows, HEADER, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
