"""`bindscope` subcommands run as the operator runs them, on real sockets and a real Flask app.

Probes are pinned to loopback by the configs below (probe.addresses), so no test connects
to the machine's other addresses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from support import TOOL, free_port, wait_for

from bindscope.cli.output import Paint

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = FIXTURES / "configs"
SCAN_SCHEMA = json.loads((FIXTURES / "tool" / "scan.schema.json").read_text())
LOOPBACK_PROBES = 'probe:\n  timeout: 1s\n  addresses: [127.0.0.1, "::1"]\n'


def bindscope(
    *args: str, cwd: Path | None = None, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TOOL, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def write_config(tmp_path: Path, services: str = "", name: str = "bindscope.yml") -> Path:
    path = tmp_path / name
    path.write_text(
        LOOPBACK_PROBES + (f"services:\n{textwrap.indent(services, '  ')}" if services else "")
    )
    return path


def port_outside_ephemeral() -> int:
    """A free port below Linux's ephemeral range, which `init` skips."""
    for port in range(20000 + os.getpid() % 5000, 32000, 97):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port between 20000 and 32000")


# --- scan ---


def test_scan_all_ok_exits_0_and_lists_services(tmp_path: Path, listen):
    sock = listen("127.0.0.1")
    port = sock.getsockname()[1]
    cfg = write_config(tmp_path, f"- name: local\n  port: {port}\n  expose: loopback\n")
    r = bindscope("scan", f"--config.file={cfg}")
    assert r.returncode == 0, r.stdout + r.stderr
    header, row = r.stdout.splitlines()[:2]
    assert header.split() == [
        "SERVICE",
        "PORT",
        "EXPECTED",
        "EXPOSURE",
        "STATUS",
        "ADDRESS",
        "PROCESS",
        "PROBES",
    ]
    assert row.split()[:6] == ["local", f"{port}/tcp", "loopback", "loopback", "ok", "127.0.0.1"]
    assert row.endswith("127.0.0.1 ok, ::1 refused")
    assert "\x1b[" not in r.stdout  # not a terminal: no colour


def test_scan_with_a_failing_service_exits_1(tmp_path: Path, listen):
    sock = listen("127.0.0.1")
    port = sock.getsockname()[1]
    missing = free_port()
    cfg = write_config(
        tmp_path,
        f"- name: web\n  port: {port}\n  expose: private\n"
        f"- name: gone\n  port: {missing}\n  expose: private\n",
    )
    r = bindscope("scan", f"--config.file={cfg}")
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:3]}
    assert rows["web"][4] == "loopback_only"
    assert rows["gone"][4] == "not_listening"
    assert "2 services (1 loopback_only, 1 not_listening)" in r.stdout


def test_scan_json_shape(tmp_path: Path, listen):
    sock = listen("127.0.0.1")
    port = sock.getsockname()[1]
    stray = listen("::1", udp=True).getsockname()[1]
    cfg = write_config(tmp_path, f"- name: web\n  port: {port}\n  expose: private\n")
    r = bindscope("scan", "--json", f"--config.file={cfg}")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, SCAN_SCHEMA)
    assert (doc["version"], doc["ok"], doc["config"]) == (1, False, str(cfg))
    (web,) = doc["services"]
    assert (web["name"], web["status"], web["exposure"], web["listening"]) == (
        "web",
        "loopback_only",
        "loopback",
        True,
    )
    assert [(p["address"], p["success"]) for p in web["probes"]] == [
        ("127.0.0.1", True),
        ("::1", False),
    ]
    assert web["probes"][1]["error"] == "ECONNREFUSED"
    assert web["listeners"][0]["process"]["pid"] == os.getpid()
    assert web["listeners"][0]["service"] == "web"
    assert [lst["service"] for lst in doc["listeners"] if lst["port"] == port] == ["web"]
    mine = [lst for lst in doc["listeners"] if lst["port"] == stray and lst["protocol"] == "udp"]
    assert [(m["address"], m["scope"], m["service"], m["unexpected"]) for m in mine] == [
        ("::1", "loopback", "", False)
    ]


def test_scan_no_probe(tmp_path: Path, listen):
    port = listen("127.0.0.1").getsockname()[1]
    cfg = write_config(tmp_path, f"- name: web\n  port: {port}\n  expose: loopback\n")
    r = bindscope("scan", "--json", "--no-probe", f"--config.file={cfg}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["services"][0]["probes"] == []


def test_scan_without_config_inventories_listeners():
    # the embedded default probes every address of the host: tests stay on loopback
    r = bindscope("scan", "--no-probe")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("No services declared")
    assert "Other listeners (" in r.stdout


@pytest.mark.parametrize(
    ("args", "stderr"),
    [
        (
            ["scan", f"--config.file={CONFIGS / 'invalid' / 'port_out_of_range.yml'}"],
            "port_out_of_range.yml:12:11: services[2].port: 70000 is not a port (1-65535)",
        ),
        (
            ["scan", "--config.file=/nonexistent/bindscope.yml"],
            "/nonexistent/bindscope.yml:0:0: cannot read: No such file or directory",
        ),
        (["scan", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: command"),
        (["diagnose", "not-a-service"], "'not-a-service' is neither a port nor a service"),
        (["diagnose", "70000"], "70000 is not a port (1-65535)"),
    ],
    ids=[
        "bad config",
        "missing config",
        "unknown flag",
        "no subcommand",
        "unknown service",
        "port out of range",
    ],
)
def test_usage_and_config_errors_exit_2(args: list[str], stderr: str):
    r = bindscope(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert stderr in r.stderr
    assert "Traceback" not in r.stderr


def test_paint_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert Paint.for_stream(Tty())("ok", "green") == "\x1b[32mok\x1b[0m"
    assert Paint.for_stream(io.StringIO())("ok", "green") == "ok"
    monkeypatch.setenv("NO_COLOR", "1")
    assert Paint.for_stream(Tty())("ok", "green") == "ok"


# --- check-config ---


def test_check_config_valid_files():
    files = sorted((CONFIGS / "valid").glob("*.yml"))
    r = bindscope("check-config", *map(str, files))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{f}: ok" for f in files]


@pytest.mark.parametrize("name", ["many_issues", "syntax_error", "missing_required"])
def test_check_config_prints_every_issue(name: str):
    # run from the fixture folder so the file names match the .err files
    r = bindscope("check-config", f"{name}.yml", cwd=CONFIGS / "invalid")
    assert r.returncode == 2
    assert r.stderr == (CONFIGS / "invalid" / f"{name}.err").read_text()


def test_check_config_mixed_files_exit_2_and_report_each():
    good, bad = CONFIGS / "valid" / "minimal.yml", CONFIGS / "invalid" / "bad_enum.yml"
    r = bindscope("check-config", str(good), str(bad))
    assert r.returncode == 2
    assert r.stdout == f"{good}: ok\n"
    assert r.stderr.startswith(f"{bad}:")


# --- init ---


def test_init_writes_a_config_that_passes_check_config(tmp_path: Path, listen):
    port = port_outside_ephemeral()
    listen("127.0.0.1", port)
    out = tmp_path / "init.yml"
    r = bindscope("init", "--output", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.startswith("# bindscope config, written by `bindscope init`")
    check = bindscope("check-config", str(out))
    assert (check.returncode, check.stdout) == (0, f"{out}: ok\n"), check.stderr
    entry = text[text.index(f"    port: {port}\n") - 40 :]
    assert "expose: loopback  # now: loopback on 127.0.0.1" in entry
    # the file it wrote judges this host as it is: the socket above is ok
    scan = bindscope("scan", "--json", "--no-probe", f"--config.file={out}")
    mine = [s for s in json.loads(scan.stdout)["services"] if s["port"] == port]
    assert [s["status"] for s in mine] == ["ok"]


def test_init_stdout_and_expose_from_current(listen):
    port = port_outside_ephemeral()
    listen("127.0.0.1", port)
    r = bindscope("init", "--expose-from-current")
    assert r.returncode == 0, r.stderr
    assert "Each expose is the current exposure (--expose-from-current)." in r.stdout
    assert f"    port: {port}\n" in r.stdout


def test_init_keeps_an_existing_file(tmp_path: Path):
    out = tmp_path / "bindscope.yml"
    out.write_text("services: []\n")
    r = bindscope("init", "-o", str(out))
    assert r.returncode == 2
    assert "exists (--force overwrites it)" in r.stderr
    assert out.read_text() == "services: []\n"
    assert bindscope("init", "-o", str(out), "--force").returncode == 0
    assert out.read_text() != "services: []\n"


# --- diagnose ---


@pytest.fixture
def flask_app(tmp_path: Path) -> Iterator[int]:
    """A real Flask development server started by `app.run(port=PORT)`: 127.0.0.1 only."""
    port = free_port()
    (tmp_path / "app.py").write_text(
        textwrap.dedent(f"""\
        from flask import Flask

        app = Flask(__name__)


        @app.route("/")
        def index():
            return "hello"


        if __name__ == "__main__":
            app.run(port={port})
        """)
    )
    log = open(tmp_path / "app.log", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [sys.executable, "app.py"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "app.log").read_text())
            with socket.socket() as s:
                s.settimeout(0.5)
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, 15, what="flask app listening")
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()


def test_diagnose_flask_app_run_names_the_fix(tmp_path: Path, flask_app: int):
    port = flask_app
    cfg = write_config(tmp_path)
    t0 = time.monotonic()
    r = bindscope("diagnose", str(port), f"--config.file={cfg}")
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert f"port {port} (undeclared: expected private, the default)" in out
    assert f"tcp 127.0.0.1:{port}: loopback: only this host can connect" in out
    assert f"{sys.executable} app.py" in out
    assert "recognised: Flask development server" in out
    assert "127.0.0.1  ok (" in out
    assert "::1        refused (nothing is bound to this address)" in out
    assert "It listens on loopback only (127.0.0.1)" in out
    assert (
        f"in {tmp_path / 'app.py'} line 12: change `app.run(port={port})` to "
        f'`app.run(host="0.0.0.0", port={port})`'
    ) in out
    assert f"`gunicorn -b 0.0.0.0:{port} app:app`" in out
    assert out.rstrip().endswith("Result: PROBLEM (loopback_only)")
    # one scan and one round of probes, not one per address in turn: bounded, with room
    # for a busy host
    assert elapsed < 30, elapsed


def test_diagnose_by_service_name(tmp_path: Path, flask_app: int):
    cfg = write_config(tmp_path, f"- name: shop\n  port: {flask_app}\n  expose: private\n")
    r = bindscope("diagnose", "shop", f"--config.file={cfg}")
    assert r.returncode == 1
    assert f"service shop ({flask_app}/tcp, expose private)" in r.stdout
    assert "shop: loopback_only" in r.stdout


def test_diagnose_reachable_as_declared_exits_0(tmp_path: Path, listen):
    port = listen("127.0.0.1").getsockname()[1]
    cfg = write_config(tmp_path, f"- name: cache\n  port: {port}\n  expose: loopback\n")
    r = bindscope("diagnose", str(port), f"--config.file={cfg}")
    assert r.returncode == 0, r.stdout
    assert "nothing: it is reachable as expected" in r.stdout
    assert r.stdout.rstrip().endswith("Result: ok (ok)")


def test_diagnose_udp_and_nothing_listening(tmp_path: Path, listen):
    cfg = write_config(tmp_path)
    udp = listen("127.0.0.1", udp=True).getsockname()[1]
    r = bindscope("diagnose", str(udp), f"--config.file={cfg}")
    assert "tcp: nothing\n   udp: yes, 1 socket" in r.stdout
    assert "not probed: only TCP services" in r.stdout
    assert r.returncode == 1  # expected private, bound to loopback
    idle = free_port()
    r = bindscope("diagnose", str(idle), f"--config.file={cfg}")
    assert r.returncode == 1
    assert "tcp: nothing\n   udp: nothing" in r.stdout
    assert "start the service" in r.stdout


@pytest.mark.root
def test_diagnose_in_a_namespace_matches_what_another_host_sees(two_hosts, tmp_path: Path):
    """The Flask case, whole: app.run() on the server; the client's connect fails as diagnosed."""
    port = 5000
    (tmp_path / "app.py").write_text(
        f"from flask import Flask\napp = Flask(__name__)\napp.run(port={port})\n"
    )
    app = subprocess.Popen(
        [*two_hosts.prefix(two_hosts.server), sys.executable, "app.py"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def up() -> bool:
            r = two_hosts.exec(two_hosts.server, "ss", "-Hltn", f"sport = :{port}", check=False)
            return bool(r.stdout.strip())

        wait_for(up, 15, what="flask app in the server namespace")
        # the namespace's own addresses only: its link-local one is left out
        cfg = tmp_path / "bindscope.yml"
        cfg.write_text(
            f"probe:\n  addresses: [127.0.0.1, '::1', {two_hosts.SERVER4}, '{two_hosts.SERVER6}']\n"
        )
        r = subprocess.run(
            [
                *two_hosts.prefix(two_hosts.server),
                *TOOL,
                "diagnose",
                str(port),
                f"--config.file={cfg}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"{two_hosts.SERVER4}  refused (nothing is bound to this address)" in r.stdout
        assert f'app.run(host="0.0.0.0", port={port})' in r.stdout
        assert "refused" in two_hosts.connect(two_hosts.SERVER4, port).lower()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(app.pid, signal.SIGKILL)
        app.wait(10)
