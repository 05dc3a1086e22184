"""Abuse cases against the real exporter, each with the figure it gives.

    .venv/bin/python bench/abuse.py

Each case starts its own exporter on 127.0.0.1 (probing and the extra collectors off),
attacks it from other processes, prints one line, and stops everything it started.
Nothing connects anywhere but 127.0.0.1 and 127.0.0.2; every loop is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt

EXPORTER = [
    sys.executable,
    "-c",
    "import sys; from bindscope.cli.exporter import main; sys.exit(main())",
]
CONFIG = (
    "scan_interval: 1s\nprobe: {enabled: false}\n"
    "services:\n  - {name: web, port: 1, expose: loopback}\n"
)
LOOP = "127.0.0.1"
FLAGS = ["--no-collector.namespaces", "--no-collector.firewall", "--no-collector.published-ports"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def exporter(tmp: Path, *flags: str, prefix: tuple[str, ...] = ()) -> Iterator[tuple]:
    port = free_port()
    config = tmp / "bindscope.yml"
    if not config.exists():
        config.write_text(CONFIG)
    log = open(tmp / f"log-{port}", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [
            *prefix,
            *EXPORTER,
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            *FLAGS,
            *flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(200):
            if get(port, "/-/healthy")[0]:
                break
            time.sleep(0.05)
        yield proc, port, config
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def get(
    port: int,
    path: str = "/metrics",
    auth: str | None = None,
    context: ssl.SSLContext | None = None,
    source: str = "127.0.0.1",
    timeout: float = 15,
) -> tuple[int, bytes]:
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=timeout, source_address=(source, 0)
        )
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    try:
        conn.request("GET", path, headers={"Authorization": auth} if auth else {})
        r = conn.getresponse()
        return r.status, r.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                got += chunk
        return got


def status_of(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def pki(tmp: Path) -> tuple[Path, Path, ssl.SSLContext]:
    key, cert = tmp / "server.key", tmp / "server.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key, ssl.create_default_context(cafile=str(cert))


HOLD = r"""
import socket, sys, time, select
port, count, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
held = []
for _ in range(count):
    s = socket.socket(); s.setblocking(False); s.connect_ex(("127.0.0.1", port)); held.append(s)
time.sleep(0.5)
print("held", flush=True)
i, end = 0, time.monotonic() + 120
while time.monotonic() < end and not select.select([sys.stdin], [], [], 2.0)[0]:
    if kind == "trickle":
        for s in held:
            try: s.send(b"GET / HTTP/1.1\r\nX: "[i % 20:i % 20 + 1] if i < 20 else b"a")
            except OSError: pass
        i += 1
"""


@contextlib.contextmanager
def holding(port: int, count: int, kind: str) -> Iterator[None]:
    procs = []
    for _ in range(0, count, 500):
        p = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(port), str(min(500, count)), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        count -= 500
    try:
        for p in procs:
            assert p.stdout is not None
            p.stdout.readline()
        yield
    finally:
        for p in procs:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                p.communicate("", timeout=10)
            if p.poll() is None:
                p.kill()
                p.wait()


def case_rewrite_in_place(tmp: Path) -> str:
    cert, key, ctx = pki(tmp)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    full = (
        f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        f"basic_auth_users:\n  prometheus: {hashed}\n"
    )
    web = tmp / "web.yml"
    web.write_text(full)
    leaked = plain = tls = 0
    with exporter(tmp, f"--web.config.file={web}") as (_proc, port, _):
        for i in range(657):
            with open(web, "w") as f:  # in place, as an editor without rename writes
                cut = random.randrange(len(full))
                f.write(full[:cut])
                f.flush()
                for _ in range(2):
                    plain += 1
                    leaked += get(port, timeout=2)[0] == 200
                    tls += 1
                    leaked += get(port, context=ctx, timeout=2)[0] == 200
                f.write(full[cut:])
            if i % 50 == 0:
                time.sleep(1.1)  # let the watcher see the half-written file too
        errors = get(port, auth=_basic("s3cret"), context=ctx)[1].count(b"reload_errors")
    return (
        f"web config rewritten in place 657 times: {leaked} unauthenticated 200s in "
        f"{plain} plain and {tls} TLS requests (reload errors family present: {errors > 0})"
    )


def _basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode()


def case_hostile_web_config(tmp: Path) -> str:
    web = tmp / "web.yml"
    web.write_text("http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
    out = []
    with exporter(tmp, f"--web.config.file={web}") as (proc, port, _):
        for name, make in (
            ("5000 deep", lambda: web.write_text("a: " + "[" * 5000 + "]" * 5000)),
            ("5 MB", lambda: web.write_text("#" * (5 << 20))),
            ("FIFO", lambda: (web.unlink(), os.mkfifo(web))),
        ):
            make()
            worst = max(timed(lambda: get(port))[0] for _ in range(15) if time.sleep(0.1) or 1)
            ok = get(port)[0] == 200
            out.append(
                f"{name}: scrapes {'served' if ok else 'FAILED'}, worst {worst * 1000:.0f} ms"
            )
            web.unlink()
            web.write_text("{}\n")
        os.unlink(web)
        os.mkfifo(web)
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        stop, _ = timed(lambda: proc.wait(10))
        out.append(f"SIGTERM with a FIFO as web config: exit {proc.returncode} in {stop:.2f} s")
    return "; ".join(out)


def case_bcrypt_cost_16_reload(tmp: Path) -> str:
    web = tmp / "web.yml"
    web.write_text("{}\n")
    with exporter(tmp, f"--web.config.file={web}") as (_proc, port, _):
        hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode().replace("$04$", "$16$", 1)
        web.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
        worst = max(timed(lambda: get(port, "/-/healthy"))[0] for _ in range(30))
    return f"reload of a cost-16 bcrypt config: worst new-connection request {worst * 1000:.0f} ms"


def case_slow_connections_fd_limit(tmp: Path) -> str:
    with exporter(tmp, prefix=("prlimit", "--nofile=1024:1024")) as (proc, port, _):
        cpu0 = _cpu(proc.pid)
        with holding(port, 1100, "trickle"):
            time.sleep(3)
            worst = max(timed(lambda: get(port))[0] for _ in range(5))
            body = get(port)[1]
            cpu = (_cpu(proc.pid) - cpu0) / (3 + worst * 5)
        emfile = (tmp / f"log-{port}").read_text().count("Too many open files")
    ok = b"bindscope_scan_success 1.0" in body
    return (
        f"1100 trickling connections, fd limit 1024: scrape {'ok' if ok else 'FAILED'}, worst "
        f"{worst * 1000:.0f} ms, exporter CPU {cpu:.0%} of a core, 'Too many open files' "
        f"{emfile} times"
    )


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def case_4000_connections(tmp: Path) -> str:
    with exporter(tmp, "--web.max-connections=5000") as (proc, port, _):
        before = status_of(proc.pid)
        with holding(port, 4000, "idle"):
            held = status_of(proc.pid)
            worst = max(timed(lambda: get(port))[0] for _ in range(5))
        time.sleep(1)
        after = status_of(proc.pid)
    return (
        f"4000 idle connections: {held['Threads']} threads (idle {before['Threads']}), RSS "
        f"{held['VmRSS'] // 1024} MB (idle {before['VmRSS'] // 1024}, after "
        f"{after['VmRSS'] // 1024}), worst scrape {worst * 1000:.0f} ms"
    )


GUESS = r"""
import base64, http.client, sys, threading
port = int(sys.argv[1])
def guess(n):
    for i in range(20):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                       source_address=("127.0.0.2", 0))
        a = "Basic " + base64.b64encode(f"prometheus:w{n}-{i}".encode()).decode()
        try:
            c.request("GET", "/metrics", headers={"Authorization": a}); c.getresponse().read()
        except OSError:
            pass
        c.close()
ts = [threading.Thread(target=guess, args=(n,)) for n in range(150)]
[t.start() for t in ts]; print("go", flush=True); [t.join() for t in ts]
"""


def case_guessing(tmp: Path) -> str:
    web = tmp / "web.yml"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(10)).decode()
    web.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    with exporter(tmp, f"--web.config.file={web}") as (_proc, port, _):
        attack = subprocess.Popen(
            [sys.executable, "-c", GUESS, str(port)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert attack.stdout is not None
            attack.stdout.readline()
            time.sleep(1)
            took, (code, _) = timed(lambda: get(port, auth=_basic("s3cret")))  # type: ignore[misc]
        finally:
            attack.kill()
            attack.wait()
    return f"150 connections guessing passwords: first valid login {code} in {took * 1000:.0f} ms"


def case_smuggling(tmp: Path) -> str:
    out = []
    with exporter(tmp, "--web.enable-lifecycle") as (_proc, port, _):
        inner = b"POST /-/reload HTTP/1.1\r\nHost: x\r\n\r\n"
        reply = raw(
            port,
            b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(inner)
            + inner,
        )
        reloads = (tmp / f"log-{port}").read_text().count("config reloaded")
        out.append(
            f"GET carrying POST /-/reload: {reply.count(b'HTTP/1.1 ')} answer, {reloads} reloads"
        )
        for name, payload in (
            (
                "duplicate Content-Length",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            ),
            (
                "TE with CL",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
            (
                "non-ASCII Authorization",
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: \xff\xfe\r\n\r\n",
            ),
        ):
            out.append(f"{name}: {raw(port, payload).split(b' ', 2)[1].decode() or 'closed'}")
    return "; ".join(out)


def case_cap(tmp: Path) -> str:
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import resource, socket, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))\n"
            "held = []\n"
            "for _ in range(19900):\n"
            "    s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(1); held.append(s)\n"
            "print('ok', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        worker.stdout.readline()
        with exporter(tmp) as (_proc, port, _):
            for _ in range(300):  # the first scan of 19,900 listeners takes a while
                body = get(port)[1]
                if b"bindscope_listener_info_dropped" in body:
                    break
                time.sleep(0.5)
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            worker.communicate("", timeout=10)
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    text = body.decode()
    counts = {
        f: sum(1 for line in text.splitlines() if line.startswith(f + "{"))
        for f in (
            "bindscope_listener_info",
            "bindscope_unexpected_listener_info",
            "bindscope_listener_firewall_info",
        )
    }
    dropped = {
        line.split()[0]: line.split()[1]
        for line in text.splitlines()
        if line.split(" ")[0].endswith("_dropped")
    }
    return (
        f"19,900 listeners, default cap: series {counts}, dropped {dropped}, body {len(body)} bytes"
    )


def _catches_hup(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGHUP - 1) & 1)
    return False


def case_sighup_at_start(tmp: Path) -> str:
    small = tmp / "bindscope.yml"
    small.write_text(CONFIG)
    deaths, windows = 0, []
    for i in range(40):
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*EXPORTER, f"--config.file={small}", f"--web.listen-address={LOOP}:{port}", *FLAGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if i % 2:  # odd runs: how long the process is unprotected
            while not _catches_hup(proc.pid) and time.perf_counter() - t0 < 10:
                time.sleep(0.0005)
            windows.append(time.perf_counter() - t0)
        else:  # even runs: a SIGHUP 50 to 550 ms after the start
            time.sleep(0.05 + i * 0.0125)
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            deaths += proc.poll() is not None
        proc.terminate()
        proc.wait(10)
    big = tmp / "big.yml"
    big.write_text(
        "probe: {enabled: false}\nservices:\n"
        + "".join(
            f"  - {{name: s{i}, port: {1 + i % 60000}, expose: loopback}}\n" for i in range(20000)
        )
    )
    port = free_port()
    proc = subprocess.Popen(
        [*EXPORTER, f"--config.file={big}", f"--web.listen-address=127.0.0.1:{port}", *FLAGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not _catches_hup(proc.pid):
        time.sleep(0.0005)
    for _ in range(100):  # through the 5 s of start-up the large config takes
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.05)
    big_alive = proc.poll() is None
    proc.terminate()
    proc.wait(10)
    windows.sort()
    return (
        f"SIGHUP 50-550 ms after start: {deaths} of 20 killed; handler in place "
        f"{windows[len(windows) // 2] * 1000:.0f} ms after exec (median, worst "
        f"{windows[-1] * 1000:.0f} ms); 20,000-service config, 100 SIGHUPs from then on over "
        f"5 s: {'alive' if big_alive else 'KILLED'}"
    )


def case_main_config(tmp: Path) -> str:
    with exporter(tmp) as (proc, port, config):
        config.write_text("")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        body = get(port)[1]
        empty = (b"bindscope_config_last_reload_successful 0.0" in body, b'service="web"' in body)
        config.unlink()
        os.mkfifo(config)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        config.unlink()
        config.write_text(CONFIG.replace("web", "back"))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        after = b'service="back"' in get(port)[1]
    return (
        f"emptied main config: reload refused {empty[0]}, services kept {empty[1]}; "
        f"FIFO main config refused, next reload applied {after}"
    )


CASES = [
    case_rewrite_in_place,
    case_hostile_web_config,
    case_bcrypt_cost_16_reload,
    case_slow_connections_fd_limit,
    case_4000_connections,
    case_guessing,
    case_smuggling,
    case_cap,
    case_sighup_at_start,
    case_main_config,
]


def main() -> int:
    only = sys.argv[1:]
    for case in CASES:
        if only and case.__name__.removeprefix("case_") not in only:
            continue
        with tempfile.TemporaryDirectory(prefix="bindscope-abuse-") as tmp:
            print(f"- {case(Path(tmp))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
