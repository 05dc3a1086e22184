"""HTTP bench: the exporter against nginx serving the same bytes, and 1000 slow clients.

    .venv/bin/python bench/web.py      # needs wrk and nginx (apt-get install wrk nginx-light)

In one run: wrk (2 threads, 50 connections, 10 s, --latency) against the exporter's
/metrics and against nginx serving a file holding the very exposition the exporter
served; then 500 idle and 500 trickling connections (a header byte every 0.5 s) held
against the exporter while a normal scrape is timed, with the exporter's threads and RSS
before, during and after. Everything on 127.0.0.1; every process is killed at the end.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

WRK = ("wrk", "-t2", "-c50", "-d10s", "--latency")
SLOW = 1000
SERVICES, LISTENERS = 50, 50
EXPORTER = [
    sys.executable,
    "-c",
    "import sys; from bindscope.cli.exporter import main; sys.exit(main())",
]
HOLDER = r"""
import socket, sys, time, select
port, count, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
held = []
for _ in range(count):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    held.append(s)
time.sleep(0.5)
print("held", flush=True)
request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"
i = 0
end = time.monotonic() + 120
while time.monotonic() < end and not select.select([sys.stdin], [], [], 0.5)[0]:
    if kind == "trickle" and i < len(request):
        for s in held:
            try:
                s.send(request[i:i + 1])
            except OSError:
                pass
        i += 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrk(url: str) -> dict[str, str]:
    out = subprocess.run([*WRK, url], capture_output=True, text=True, timeout=60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"\s50%\s+([\d.]+\w+)", out)
    p99 = re.search(r"\s99%\s+([\d.]+\w+)", out)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    if not (rps and p50 and p99):
        raise RuntimeError(f"wrk output not understood:\n{out}")
    return {"rps": rps.group(1), "p50": p50.group(1), "p99": p99.group(1), "errors": str(errors)}


def ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def status(pid: int) -> tuple[int, int]:
    """(threads, VmRSS KiB) of a process."""
    threads = rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return threads, rss


def scrape(port: int) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"scrape: {r.status}")
    finally:
        conn.close()
    return time.perf_counter() - t0, body


def main() -> int:
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench/web.py needs {tool}: apt-get install wrk nginx-light", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="bindscope-http-bench-"))
    tmp.chmod(0o755)  # nginx's workers run as www-data
    procs: list[subprocess.Popen] = []
    port, nginx_port = free_port(), free_port()
    try:
        # a body of the usual size (tens of KB), whatever else listens on this host
        (tmp / "bindscope.yml").write_text(common.services_config(SERVICES))
        exporter = subprocess.Popen(
            [
                *EXPORTER,
                f"--config.file={tmp / 'bindscope.yml'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--no-collector.namespaces",
                "--no-collector.firewall",
                "--no-collector.published-ports",
                f"--collector.listeners.max={LISTENERS}",
            ],
            stderr=subprocess.DEVNULL,
        )
        procs.append(exporter)
        for _ in range(200):
            with contextlib.suppress(OSError, RuntimeError):
                body = scrape(port)[1]
                if b"bindscope_scan_success 1.0" in body:
                    break
            time.sleep(0.05)
        (tmp / "www").mkdir()
        (tmp / "nginx.conf").write_text(
            f"""
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    types {{ }}
    default_type "text/plain; version=0.0.4; charset=utf-8";
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{nginx_port};
        root {tmp}/www;
    }}
}}
"""
        )
        nginx = subprocess.Popen(
            ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"]
        )
        procs.append(nginx)
        time.sleep(1)
        rows, notes = [], [f"{common.machine()}; plain bodies (wrk asks no gzip)"]
        for services in (SERVICES, 2):
            if services != SERVICES:  # a small body: the per-request cost dominates
                (tmp / "bindscope.yml").write_text(common.services_config(services))
                exporter.send_signal(signal.SIGHUP)
                time.sleep(2)
                body = scrape(port)[1]
            name = f"metrics-{services}"
            (tmp / "www" / name).write_bytes(body)
            ours = wrk(f"http://127.0.0.1:{port}/metrics")
            theirs = wrk(f"http://127.0.0.1:{nginx_port}/{name}")
            size = f"{len(body) // 1024} KiB"
            rows.append((f"bindscope-exporter, {size}", *ours.values()))
            rows.append((f"nginx, same {size}", *theirs.values()))
            ratio = float(ours["rps"]) / float(theirs["rps"])
            p99x = ms(ours["p99"]) / ms(theirs["p99"])
            notes.append(
                f"{size}: throughput {ratio:.0%} of nginx's (target >= 10%), p99 {p99x:.1f}x "
                f"nginx's (target <= 5x)"
            )
        common.report(rows, ("server", "requests/s", "p50", "p99", "errors"), notes)

        time.sleep(1)
        idle_threads, idle_rss = status(exporter.pid)
        idle_scrape = min(scrape(port)[0] for _ in range(5))
        holders = [
            subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(port), str(SLOW // 2), kind],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for kind in ("idle", "trickle")
        ]
        procs += holders
        for h in holders:
            assert h.stdout is not None
            h.stdout.readline()
        time.sleep(3)  # trickling for a while
        held_scrapes = [scrape(port)[0] for _ in range(5)]
        held_threads, held_rss = status(exporter.pid)
        for h in holders:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                h.communicate("", timeout=30)
        time.sleep(2)
        after_threads, after_rss = status(exporter.pid)
        common.report(
            [
                ("idle", "0", f"{idle_scrape * 1000:.1f}", str(idle_threads), str(idle_rss)),
                (
                    f"{SLOW} slow/idle held",
                    str(SLOW),
                    f"{max(held_scrapes) * 1000:.1f}",
                    str(held_threads),
                    str(held_rss),
                ),
                ("after", "0", "", str(after_threads), str(after_rss)),
            ],
            ("phase", "connections", "worst scrape ms", "threads", "RSS KiB"),
            [
                f"worst of 5 scrapes while {SLOW} connections are held: "
                f"{max(held_scrapes) * 1000:.1f} ms (target < 1000 ms)",
                f"threads {idle_threads} idle, {held_threads} held (target: bounded)",
                f"RSS {idle_rss} KiB idle, {held_rss} KiB held, {after_rss} KiB after",
            ],
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
