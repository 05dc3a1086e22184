"""Faults and load: malformed HTTP, half-open and concurrent clients, churn, reload storms,
and the listener cardinality cap. Every loop is bounded; the file runs in about a minute.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Exporter, Metrics, wait_for

from bindscope.config.load import parse_config
from bindscope.discover.processes import InodeResolver
from bindscope.model import ErrorSource
from bindscope.scan import Scanner

# probing stays on loopback: these tests never connect to the host's other addresses
FAST = """
scan_interval: 200ms
probe: {enabled: true, timeout: 200ms, addresses: [127.0.0.1]}
services:
  - {name: web, port: 1, expose: loopback}
"""


@pytest.fixture(scope="module")
def shared_exporter(tmp_path_factory: pytest.TempPathFactory):
    """One exporter for the HTTP tests, which must leave it serving."""
    # a hundred scrapers at once is more than the default --web.max-requests (40) admits
    exp = Exporter(tmp_path_factory.mktemp("reliability"), FAST, ["--web.max-requests=100"])
    try:
        exp.wait_ready()
        yield exp
    finally:
        exp.stop()


def complete(body: bytes, encoding: str | None) -> Metrics:
    """Parse an exposition; it must be whole: the scan's part and the runtime part."""
    text = (gzip.decompress(body) if encoding == "gzip" else body).decode()
    m = Metrics(text)
    names = {s.name for s in m.samples}
    assert {"bindscope_service_info", "bindscope_scan_success", "bindscope_build_info"} <= names
    return m


def scrape_raw(port: int, accept_gzip: bool = False, timeout: float = 5.0) -> Metrics:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"} if accept_gzip else {})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200
        assert int(r.getheader("Content-Length")) == len(body)
        return complete(body, r.getheader("Content-Encoding"))
    finally:
        conn.close()


def raw_exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes, half-close, and read what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server may close before all is sent
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
        return got


def reply_code(reply: bytes) -> int | None:
    """The status of a reply; HTTP/0.9-style error pages carry it in the body only."""
    if reply.startswith(b"HTTP/"):
        return int(reply.split(b"\r\n", 1)[0].split()[1])
    if b"Error code: " in reply:
        return int(reply.split(b"Error code: ", 1)[1][:3])
    assert reply == b"", reply[:200]
    return None  # closed without a word


# (payload, the answer it gets: a status, or None for a close)
MALFORMED = [
    (b"\x00\xff\x16\x03\x01garbage\r\n\r\n", 400, "binary garbage"),
    (b"GET\r\n\r\n", 400, "request line without path"),
    (b"GET /metrics HTTP/9.9\r\n\r\n", 505, "unknown HTTP version"),
    (b"GET /metrics HTTP/1.1\r\nHost\r\n\r\n", 400, "header without colon"),
    (b"BREW /metrics HTTP/1.1\r\n\r\n", 501, "unknown method"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "request line over 64 KiB"),
    (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431, "header over 64 KiB"),
    (
        b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
        431,
        "200 headers",
    ),
    (b"POST /-/reload HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, "content-length not a number"),
    (b"POST /-/reload HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "negative content-length"),
    (b"POST /-/reload HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413, "huge content-length"),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", 400, "cut before the blank line, then EOF"),
    (b"", None, "connect and close"),
]


@pytest.mark.parametrize(
    ("payload", "expected"), [m[:2] for m in MALFORMED], ids=[m[2] for m in MALFORMED]
)
def test_malformed_request_gets_its_answer_and_serving_goes_on(shared_exporter, payload, expected):
    assert reply_code(raw_exchange(shared_exporter.port, payload)) == expected
    scrape_raw(shared_exporter.port)


def test_half_open_connections_neither_block_scrapes_nor_stay_forever(shared_exporter):
    held = []
    try:
        for i in range(50):
            s = socket.create_connection(("127.0.0.1", shared_exporter.port), timeout=20)
            held.append(s)
            # half of them stall mid-request, half never send a byte
            if i % 2:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        for accept_gzip in (False, True):
            t0 = time.monotonic()
            scrape_raw(shared_exporter.port, accept_gzip)
            assert time.monotonic() - t0 < 2.0
        # the server's per-connection timeout (10 s) drops every one of them; reading
        # to the end times out (and fails the test) if one stays open
        deadline = time.monotonic() + 15
        for s in held:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            while s.recv(1024):
                pass
    finally:
        for s in held:
            s.close()
    scrape_raw(shared_exporter.port)


# One load process: THREADS scrapers, each on its own keep-alive connection, scraping
# for `seconds` (and, if it has had no answer yet, until a hard cap, so a late starter
# shows as a failure rather than as silence). Bounded in count and time; prints JSON.
SCRAPERS = r"""
import gzip, http.client, json, sys, threading, time
port, first, threads, seconds = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                 float(sys.argv[4]))
deadline = time.monotonic() + seconds
hard = deadline + 20
done, failures, lock = {}, [], threading.Lock()

def scraper(n):
    gz = n % 2 == 1
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    got = 0
    for _ in range(100_000):
        now = time.monotonic()
        if now >= hard or (now >= deadline and got):
            break
        try:
            conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"} if gz else {})
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"status {r.status}")
            if int(r.getheader("Content-Length")) != len(body):
                raise RuntimeError("Content-Length differs from the body")
            if r.getheader("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            for name in (b"bindscope_service_info", b"bindscope_scan_success",
                         b"bindscope_build_info"):
                if name not in body:
                    raise RuntimeError(f"{name.decode()} missing")
            if not body.endswith(b"\n"):
                raise RuntimeError("exposition cut short")
            got += 1
        except Exception as e:
            with lock:
                failures.append(f"scraper {n}: {type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.close()
    with lock:
        done[n] = got

ts = [threading.Thread(target=scraper, args=(first + i,)) for i in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(json.dumps({"done": done, "failures": failures}))
"""


def test_hundred_concurrent_scrapers_for_ten_seconds(shared_exporter):
    # the load runs in other processes: scrapers as threads of this one would compete for
    # this process's interpreter lock and starve each other, whatever the server does
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRAPERS, str(shared_exporter.port), str(p * 10), "10", "10"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in range(10)
    ]
    done: dict[int, int] = {}
    failures: list[str] = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)
            assert p.returncode == 0, out
            result = json.loads(out)
            done.update({int(k): v for k, v in result["done"].items()})
            failures += result["failures"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert failures == []
    assert sorted(done) == list(range(100))
    starved = [n for n in done if not done[n]]
    assert starved == [], f"scrapers that got no answer: {starved}"
    scrape_raw(shared_exporter.port)


# a process that forks `count` children (for at most `seconds`) that each open a few
# listeners on loopback and exit after a few ms, while it opens and closes listeners itself
CHURN = r"""
import os, random, socket, sys, time
end = time.monotonic() + float(sys.argv[1])
count = int(sys.argv[2])
spawned = 0
while time.monotonic() < end and spawned < count:
    pid = os.fork()
    if pid == 0:
        held = []
        for _ in range(random.randint(1, 4)):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            held.append(s)
        time.sleep(random.random() * 0.02)
        os._exit(0)
    spawned += 1
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    s.close()
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
print(spawned)
"""


def churn(count: int, seconds: float = 60.0) -> subprocess.Popen:
    """The churn runs until `count` processes were forked; `seconds` only caps it."""
    return subprocess.Popen(
        [sys.executable, "-c", CHURN, str(seconds), str(count)], stdout=subprocess.PIPE, text=True
    )


def test_churn_of_processes_and_listeners_while_the_exporter_scans(exporter):
    exp = exporter(FAST.replace("200ms", "100ms", 1))
    proc = churn(400)
    try:
        scrapes = 0
        # scrapes all through the churn, and at least ten of them however fast it ends
        deadline = time.monotonic() + 90
        while (proc.poll() is None or scrapes < 10) and time.monotonic() < deadline:
            m = scrape_raw(exp.port)
            assert m.get("bindscope_scan_success") == 1.0
            scrapes += 1
            time.sleep(0.05)
        spawned = int(proc.communicate(timeout=30)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert spawned == 400, f"only {spawned} processes forked within the cap: not a churn"
    assert scrapes >= 10
    # the scan thread is not stuck: scans keep completing after the churn
    first = scrape_raw(exp.port).get("bindscope_last_scan_timestamp_seconds")
    wait_for(
        lambda: scrape_raw(exp.port).get("bindscope_last_scan_timestamp_seconds") > first,
        5,
        what="a scan after the churn",
    )
    assert scrape_raw(exp.port).get("bindscope_scan_errors_total", source="scan") == 0
    # and it still stops on SIGTERM (stop() kills it after 5 s and would return -9)
    assert exp.stop() == 0


def test_churn_in_process_never_fails_a_scan():
    scanner = Scanner(namespaces=False, firewall=False, published=False)
    config = parse_config("probe: {enabled: false}\n", "churn.yml")
    proc = churn(300)
    snapshots = 0
    try:
        deadline = time.monotonic() + 20
        while (proc.poll() is None or snapshots < 3) and time.monotonic() < deadline:
            snap = scanner.scan(config)
            assert snap.success, snap.errors
            snapshots += 1
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert snapshots >= 3
    assert "scan" not in scanner.scan(config).errors


def test_a_process_vanishing_between_fd_walk_and_read_is_counted(tmp_path: Path):
    # /proc/42 holds the socket but its comm and cmdline are gone: it exited mid-scan
    fd_dir = tmp_path / "42" / "fd"
    fd_dir.mkdir(parents=True)
    os.symlink("socket:[777]", fd_dir / "3")
    result = InodeResolver(proc=str(tmp_path)).resolve([777])
    assert result.owners == {}
    assert result.errors[ErrorSource.PROC_VANISHED] == 1


def _write(path: Path, text: str) -> None:
    """Replace the file in one step: a reload never reads half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_reload_storm_every_scrape_succeeds_and_the_last_valid_file_wins(exporter):
    exp = exporter(FAST)
    broken = "services:\n  - {name: web, port: 70000}\n"
    last = None
    for i in range(100):
        if i % 2:
            last = f"svc{i}"
            _write(exp.config_path, FAST.replace("name: web", f"name: {last}"))
        else:
            _write(exp.config_path, broken)
        exp.proc.send_signal(signal.SIGHUP)
        m = scrape_raw(exp.port, accept_gzip=bool(i % 3))
        assert m.get("bindscope_scan_success") == 1.0
    final = exp.wait_metrics(
        lambda m: (
            m.get("bindscope_config_last_reload_successful") == 1.0
            and m.all("bindscope_service_info", service=last)
        ),
        10,
        what=f"config with {last} in force",
    )
    assert {s.labels["service"] for s in final.all("bindscope_service_info")} == {last}
    assert exp.proc.poll() is None
    _write(exp.config_path, broken)
    exp.proc.send_signal(signal.SIGHUP)
    exp.wait_metrics(
        lambda m: (
            m.get("bindscope_config_last_reload_successful") == 0.0
            and m.all("bindscope_service_info", service=last)
        ),
        10,
        what="a broken file keeping the last good config",
    )


@pytest.mark.parametrize(
    ("cap", "opened"),
    [(5, 20), (1, 3)],
    ids=["cap 5 of 20+ listeners", "cap 1 of 3+ listeners"],
)
def test_listener_info_is_capped_and_the_rest_counted(exporter, listen, cap, opened):
    for _ in range(opened):
        listen("127.0.0.1")
    exp = exporter(FAST, [f"--collector.listeners.max={cap}"])
    m = scrape_raw(exp.port)
    assert len(m.all("bindscope_listener_info")) == cap
    total = sum(s.value for s in m.all("bindscope_listeners"))
    assert total >= opened
    # every socket here has its own label set: exactly the ones beyond the cap are left out
    distinct = {
        (x.labels["protocol"], x.labels["address"], x.labels["port"])
        for x in m.all("bindscope_listener_info")
    }
    assert len(distinct) == cap
    assert m.get("bindscope_listener_info_dropped") == total - cap


def test_no_cap_exports_every_listener(exporter, listen):
    for _ in range(10):
        listen("127.0.0.1")
    exp = exporter(FAST, ["--collector.listeners.max=0"])
    m = scrape_raw(exp.port)
    assert len(m.all("bindscope_listener_info")) >= 10
    assert m.get("bindscope_listener_info_dropped") == 0


def test_gzip_body_decodes_to_a_whole_exposition(shared_exporter):
    conn = http.client.HTTPConnection("127.0.0.1", shared_exporter.port, timeout=5)
    conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    r = conn.getresponse()
    text = gzip.decompress(r.read()).decode()
    conn.close()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"bindscope_service_status", "process_resident_memory_bytes"} <= families
