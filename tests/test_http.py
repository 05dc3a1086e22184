"""The HTTP layer under abuse: smuggling shapes, slow and idle clients by the thousand,
password guessing, hostile web config and main config files, signals at start-up.

Every client runs in a process of its own; the tests assert bounds and answers, never
timings. Every loop is bounded in count and time, and every process is reaped.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import test_webconfig
from support import EXPORTER, Exporter, Metrics, free_port, wait_for
from test_reliability import FAST, raw_exchange, reply_code, scrape_raw

pki = test_webconfig.pki  # the fixture: a CA with server and client certificates
HEADERS = "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"


def _basic(user: str, password: bytes) -> str:
    return "Basic " + base64.b64encode(user.encode() + b":" + password).decode()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Exporter, Path]]:
    """An exporter with basic auth (cost 10) and a security header, lifecycle on."""
    tmp = tmp_path_factory.mktemp("guarded")
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=10)).decode()
    web = tmp / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n{HEADERS}")
    exp = Exporter(tmp, FAST, [f"--web.config.file={web}", "--web.enable-lifecycle"])
    try:
        wait_for(lambda: _get(exp.port, "/-/ready", AUTH)[0] == 200, 20, what="ready")
        yield exp, web
    finally:
        exp.stop()


AUTH = _basic("prometheus", b"s3cret")


def _get(
    port: int, path: str, auth: str | None = None, method: str = "GET", host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers={"Authorization": auth} if auth else {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except OSError:
        return 0, {}, b""
    finally:
        conn.close()


def _answers(reply: bytes) -> list[int]:
    return [int(line.split()[1]) for line in reply.split(b"\r\n") if line.startswith(b"HTTP/1.")]


SMUGGLING = [
    (
        b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "duplicate content-length",
    ),
    (b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\nab", "length list"),
    (
        b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "transfer-encoding with content-length",
    ),
    (b"GET /metrics HTTP/1.1\nHost: x\n\n", "bare LF"),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", "obs-fold"),
    (b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n", "space before colon"),
]


@pytest.mark.parametrize("payload", [s[0] for s in SMUGGLING], ids=[s[1] for s in SMUGGLING])
def test_smuggling_shapes_get_400_with_the_configured_headers(guarded, payload):
    exp, _ = guarded
    reply = raw_exchange(exp.port, payload)
    assert _answers(reply) == [400]
    assert b"X-Content-Type-Options: nosniff" in reply
    assert _get(exp.port, "/metrics", AUTH)[0] == 200


def test_a_get_body_is_read_never_parsed_as_a_request(guarded):
    exp, _ = guarded
    inner = f"POST /-/reload HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n\r\n".encode()
    outer = (
        f"GET /-/healthy HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
        f"Content-Length: {len(inner)}\r\nConnection: close\r\n\r\n"
    ).encode()
    before = exp.log().count("config reloaded")
    assert _answers(raw_exchange(exp.port, outer + inner)) == [200]
    assert exp.log().count("config reloaded") == before


def test_raw_non_ascii_authorization_gets_401(guarded):
    exp, _ = guarded
    reply = raw_exchange(
        exp.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xff\xfe\x80\r\n\r\n"
    )
    assert reply_code(reply) == 401
    assert b"X-Content-Type-Options: nosniff" in reply


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("POST", "/metrics", "GET, HEAD"), ("GET", "/-/reload", "POST"), ("PUT", "/", "GET, HEAD")],
    ids=["post metrics", "get reload", "put landing"],
)
def test_405_names_the_allowed_methods(guarded, method, path, allow):
    exp, _ = guarded
    status, headers, _ = _get(exp.port, path, AUTH, method)
    assert (status, headers.get("allow"), headers.get("x-content-type-options")) == (
        405,
        allow,
        "nosniff",
    )


def test_openmetrics_when_asked_and_name_filter(guarded):
    exp, _ = guarded
    conn = http.client.HTTPConnection("127.0.0.1", exp.port, timeout=10)
    try:
        accept = "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5"
        conn.request("GET", "/metrics", headers={"Authorization": AUTH, "Accept": accept})
        r = conn.getresponse()
        body = r.read().decode()
        assert r.getheader("Content-Type").startswith("application/openmetrics-text")
        assert body.endswith("# EOF\n") and body.count("# EOF") == 1
        assert "bindscope_service_status" in body and "process_cpu_seconds_total" in body
        conn.request(
            "GET",
            "/metrics?name[]=bindscope_scan_success&name[]=process_cpu_seconds_total",
            headers={"Authorization": AUTH, "Accept-Encoding": "identity"},
        )
        r = conn.getresponse()
        names = {s.name for s in Metrics(r.read().decode()).samples}
        assert names == {"bindscope_scan_success", "process_cpu_seconds_total"}
    finally:
        conn.close()


# Attackers, each on its own connection, guessing passwords as fast as the server answers:
# bounded in count and time. Prints the statuses they got.
GUESSERS = r"""
import base64, http.client, json, sys, threading, time
port, source, threads, tries = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
end = time.monotonic() + 60
seen, lock = {}, threading.Lock()
def guess(n):
    for i in range(tries):
        if time.monotonic() > end:
            return
        conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30,
                                          source_address=(source, 0))
        auth = "Basic " + base64.b64encode(f"prometheus:wrong{n}-{i}".encode()).decode()
        try:
            conn.request("GET", "/metrics", headers={"Authorization": auth})
            status = conn.getresponse().status
        except OSError as e:
            status = type(e).__name__
        finally:
            conn.close()
        with lock:
            seen[status] = seen.get(status, 0) + 1
ts = [threading.Thread(target=guess, args=(n,)) for n in range(threads)]
for t in ts: t.start()
print("started", flush=True)
for t in ts: t.join()
print(json.dumps(seen))
"""


def test_guessing_passwords_does_not_keep_a_valid_first_login_out(tmp_path: Path):
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=10)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    exp = Exporter(tmp_path, FAST, [f"--web.config.file={web}"])
    attack = None
    try:
        wait_for(lambda: _get(exp.port, "/-/healthy")[0] == 401, 20, what="serving")
        attack = subprocess.Popen(
            [sys.executable, "-c", GUESSERS, str(exp.port), "127.0.0.2", "150", "5"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert attack.stdout is not None and attack.stdout.readline().strip() == "started"
        # the first valid login while 150 connections guess from another address
        status, _, body = _get(exp.port, "/metrics", AUTH)
        assert status == 200 and b"bindscope_scan_success 1.0" in body
        out, _ = attack.communicate(timeout=90)
        seen = json.loads(out.splitlines()[-1])
        # guessers get refused or told to slow down, and nothing else
        assert set(seen) <= {"401", "429"} and seen.get("429", 0) > 0, seen
        assert sum(seen.values()) == 750
    finally:
        if attack is not None and attack.poll() is None:
            attack.kill()
            attack.wait()
        exp.stop()


# Holds connections open: "idle" ones never send a byte, "trickle" ones send a request one
# byte every 0.5 s. Prints "held N" once all are open, then waits for stdin to close.
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
print(f"held {len(held)}", flush=True)
request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 200 + b"\r\n\r\n"
end = time.monotonic() + 120
i = 0
while time.monotonic() < end and not select.select([sys.stdin], [], [], 0.5)[0]:
    if kind == "trickle" and i < len(request):
        for s in held:
            try:
                s.send(request[i:i + 1])
            except OSError:
                pass
        i += 1
closed = 0
for s in held:
    try:
        s.recv(65536)  # an answer (408) or the end: the server let go of it
        closed += 1
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
print(f"closed {closed}", flush=True)
"""


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


@pytest.mark.slow
def test_a_thousand_slow_and_idle_clients_neither_block_a_scrape_nor_add_threads(exporter):
    exp = exporter(FAST)
    idle_threads = _threads(exp.proc.pid)
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(exp.port), "500", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for kind in ("idle", "trickle")
    ]
    try:
        for h in holders:
            assert h.stdout is not None and h.stdout.readline().startswith("held 500")
        wait_for(lambda: _connections(exp.proc.pid) >= 1000, 10, what="1000 connections")
        for accept_gzip in (False, True):
            assert scrape_raw(exp.port, accept_gzip).get("bindscope_scan_success") == 1.0
        # one event loop: no thread per connection
        assert _threads(exp.proc.pid) <= idle_threads + 2
    finally:
        for h in holders:
            with contextlib.suppress(OSError):
                h.communicate("", timeout=30)
            if h.poll() is None:
                h.kill()
                h.wait()
    assert exp.proc.poll() is None
    scrape_raw(exp.port)


def _connections(pid: int) -> int:
    return sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if _is_socket(pid, fd))


def _is_socket(pid: int, fd: str) -> bool:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return False


def test_beyond_max_connections_the_longest_idle_is_closed(exporter):
    exp = exporter(FAST, ["--web.max-connections=20"])
    own = _connections(exp.proc.pid)  # listening, netlink, the loop's wake-up pair
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(exp.port), "100", "idle"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("held 100")
        # the exporter never holds more than the limit, and a scrape still gets in
        assert _connections(exp.proc.pid) <= own + 20 + 2  # a probe or two
        assert scrape_raw(exp.port).get("bindscope_scan_success") == 1.0
        out, _ = holder.communicate("", timeout=30)
        assert int(out.split()[-1]) >= 80  # closed by the exporter to make room
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_trickled_request_is_cut_at_its_deadline(shared_exporter_port):
    # a header byte every 0.5 s keeps no connection: the whole request has 10 s
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(shared_exporter_port), "3", "trickle"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("held 3")
        # the request (about 240 bytes) would take two minutes at this pace
        time.sleep(12)
        out, _ = holder.communicate("", timeout=30)
        assert out.split()[-1] == "3"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@pytest.fixture(scope="module")
def shared_exporter_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    exp = Exporter(tmp_path_factory.mktemp("http"), FAST)
    try:
        exp.wait_ready()
        yield exp.port
    finally:
        exp.stop()


# A server whose landing page waits until a file appears: a request held in flight for as
# long as the test wants, without timing. Prints its port.
HELD_SERVER = r"""
import os, sys, time
from bindscope.web.server import Endpoints, HTTPServer, Limits, bind, endpoint
flag = sys.argv[1]
def landing():
    for _ in range(600):
        if os.path.exists(flag):
            break
        time.sleep(0.05)
    return "page"
sock = bind("127.0.0.1", 0)
ep = Endpoints(lambda f, z, n: (b"m 1\n",), landing, lambda: True, lambda: (True, ""))
server = HTTPServer([sock], ep, None, Limits(max_requests=1))
server.start()
print(endpoint(sock)[1], flush=True)
sys.stdin.read()
server.stop()
"""


def test_beyond_max_requests_the_answer_is_503(tmp_path: Path):
    flag = tmp_path / "go"
    server = subprocess.Popen(
        [sys.executable, "-c", HELD_SERVER, str(flag)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    held = None
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        url = f"http://127.0.0.1:{port}/"
        held = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import urllib.request as u; print(u.urlopen('{url}', timeout=60).status)",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: _get(port, "/-/healthy")[0] == 503, 20, what="503 while one is held")
        status, headers, _ = _get(port, "/metrics")
        assert (status, headers.get("retry-after")) == (503, "1")
        flag.touch()
        assert held.communicate(timeout=30)[0].strip() == "200"
        assert _get(port, "/metrics")[0] == 200
    finally:
        for p in (held, server):
            if p is not None and p.poll() is None:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    p.communicate("" if p is server else None, timeout=10)
                if p.poll() is None:
                    p.kill()
                    p.wait()


# --- web config files


def _tls_auth(tmp: Path, pki) -> str:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    return (
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        f"basic_auth_users:\n  prometheus: {hashed}\n"
    )


@pytest.mark.parametrize(
    "text",
    ["", "# only a comment\n", "tls_server_config:\n", "basic_auth_users:\n", "{tls_server"],
    ids=["empty", "comments only", "tls without value", "auth without value", "cut short"],
)
def test_an_emptied_or_partial_web_config_keeps_tls_and_auth(tmp_path: Path, pki, text):
    from bindscope.web.webconfig import WebConfigWatcher

    path = tmp_path / "web.yml"
    full = _tls_auth(tmp_path, pki)
    path.write_text(full)
    watcher = WebConfigWatcher(str(path))
    path.write_text(text)
    watcher.refresh()
    current = watcher.current()
    assert current is not None and current.tls is not None and current.users
    assert watcher.errors == 1
    # every prefix of the full file, as a rewrite in place leaves it, is refused as well
    for cut in range(0, len(full), 7):
        path.write_text(full[:cut])
        watcher.refresh()
        current = watcher.current()
        assert current is not None and current.tls is not None and current.users, cut


def test_turning_tls_and_auth_off_takes_a_file_that_says_so(tmp_path: Path, pki):
    from bindscope.web.webconfig import WebConfigWatcher

    path = tmp_path / "web.yml"
    path.write_text(_tls_auth(tmp_path, pki))
    watcher = WebConfigWatcher(str(path))
    path.write_text("tls_server_config: {}\nbasic_auth_users: {}\n")
    watcher.refresh()
    current = watcher.current()
    assert current is not None and current.tls is None and not current.users
    assert watcher.errors == 0


@pytest.mark.parametrize(
    "make",
    ["deep", "huge", "fifo"],
    ids=["nested 5000 deep", "5 MB", "a FIFO"],
)
def test_a_hostile_web_config_is_refused_and_serving_goes_on(tmp_path: Path, make: str):
    web = tmp_path / "web.yml"
    web.write_text(HEADERS)
    exp = Exporter(tmp_path, FAST, [f"--web.config.file={web}"])
    try:
        exp.wait_ready()
        web.unlink()
        if make == "deep":
            web.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
        elif make == "huge":
            web.write_text("# " + "x" * (5 << 20) + "\n")
        else:
            os.mkfifo(web)
        wait_for(lambda: "web config not reloaded" in exp.log(), 30, what="the reload refused")
        status, headers, _ = _get(exp.port, "/metrics")
        assert (status, headers.get("x-content-type-options")) == (200, "nosniff")
        assert (
            Metrics(_get(exp.port, "/metrics")[2].decode()).get(
                "bindscope_web_config_reload_errors_total"
            )
            >= 1
        )
        assert exp.stop() == 0  # SIGTERM still stops it
    finally:
        exp.stop()


# --- main config and signals


def test_an_emptied_main_config_keeps_its_services_until_it_says_none(exporter):
    exp = exporter(FAST)
    for text in ("", "# nothing\n", "scan_interval: 200ms\n"):
        exp.config_path.write_text(text)
        exp.proc.send_signal(signal.SIGHUP)
        exp.wait_metrics(
            lambda m: (
                m.get("bindscope_config_last_reload_successful") == 0.0
                and m.all("bindscope_service_info", service="web")
            ),
            10,
            what=f"{text!r} refused",
        )
        exp.config_path.write_text(FAST)
        exp.proc.send_signal(signal.SIGHUP)
        exp.wait_metrics(
            lambda m: m.get("bindscope_config_last_reload_successful") == 1.0, 10, what="good"
        )
    exp.config_path.write_text("services: []\n")
    exp.proc.send_signal(signal.SIGHUP)
    exp.wait_metrics(
        lambda m: (
            m.get("bindscope_config_last_reload_successful") == 1.0
            and not m.all("bindscope_service_info")
        ),
        10,
        what="services: [] in force",
    )


def test_a_fifo_as_main_config_is_refused_and_later_reloads_work(exporter):
    exp = exporter(FAST)
    exp.config_path.unlink()
    os.mkfifo(exp.config_path)
    exp.proc.send_signal(signal.SIGHUP)
    exp.wait_metrics(
        lambda m: m.get("bindscope_config_last_reload_successful") == 0.0, 10, what="refused"
    )
    assert "not a regular file" in exp.log()
    exp.config_path.unlink()
    exp.config_path.write_text(FAST.replace("name: web", "name: back"))
    exp.proc.send_signal(signal.SIGHUP)
    exp.wait_metrics(
        lambda m: m.all("bindscope_service_info", service="back"), 10, what="reload after"
    )


def _catches(pid: int, signum: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigCgt:", "SigIgn:")) and int(line.split()[1], 16) >> (signum - 1) & 1:
            return True
    return False


def test_sighup_during_start_up_never_kills(tmp_path: Path):
    # a large config makes start-up long; SIGHUPs land all through it
    services = "".join(
        f"  - {{name: s{i}, port: {1000 + i}, expose: loopback}}\n" for i in range(3000)
    )
    config = tmp_path / "big.yml"
    config.write_text("probe: {enabled: false}\nservices:\n" + services)
    port = free_port()
    proc = subprocess.Popen(
        [*EXPORTER, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _catches(proc.pid, signal.SIGHUP), 10, interval=0.001, what="handler")
        sent = 0
        for _ in range(400):
            if _get(port, "/-/ready")[0] == 200:
                break
            proc.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.02)
        assert proc.poll() is None
        wait_for(lambda: _get(port, "/-/ready")[0] == 200, 30, what="ready")
        assert sent > 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


# --- conventions


def test_version_names_python_and_platform():
    out = subprocess.run([*EXPORTER, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "python 3." in out.stdout and "linux/" in out.stdout


def test_log_lines_carry_caller_and_exporter_metrics_can_be_left_out(exporter):
    exp = exporter(FAST, ["--web.disable-exporter-metrics"])
    m = scrape_raw(exp.port)
    assert not m.all("process_cpu_seconds_total") and not m.all("python_gc_objects_collected_total")
    first = exp.log().splitlines()[0]
    assert " caller=" in first and first.index("caller=") < first.index("msg=")


def test_systemd_socket_is_served(tmp_path: Path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    config = tmp_path / "c.yml"
    config.write_text(FAST)
    # the socket is fd 3 in the exporter, and LISTEN_PID its own pid, as systemd sets them
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = "
        "str(os.getpid()); os.environ['LISTEN_FDS'] = '1'; os.execv(sys.argv[2], sys.argv[2:])"
    )
    flags = [f"--config.file={config}", "--web.systemd-socket"]
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, str(listener.fileno()), *EXPORTER, *flags],
        pass_fds=(listener.fileno(),),
        stderr=subprocess.PIPE,
        text=True,
    )
    listener.close()
    try:
        wait_for(lambda: _get(port, "/-/ready")[0] == 200, 20, what="ready on the passed socket")
        assert b"bindscope_scan_success" in _get(port, "/metrics")[2]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
