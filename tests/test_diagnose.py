"""diagnose.py: culprit recognition, fixes and findings, on hand-built scans (pure)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from bindscope.classify import accepts_on, host_address, scope_of
from bindscope.cli.init import default_expose, plan, render
from bindscope.config.load import Config
from bindscope.diagnose.case import diagnosis_of
from bindscope.diagnose.document import to_document
from bindscope.diagnose.fixes import advice, bind_change, widen_host
from bindscope.diagnose.programs import Culprit, Source, python_entry, read_source, recognize
from bindscope.diagnose.steps import FIREWALL_CHECK, Case, Finding, diagnose
from bindscope.judge import status_of
from bindscope.model import (
    Exposure,
    HostAddress,
    Listener,
    ProbeResult,
    ProcessInfo,
    Protocol,
    ServiceSpec,
    Snapshot,
    Socket,
    Verdict,
)

FLASK_APP = (
    'from flask import Flask\napp = Flask(__name__)\n\nif __name__ == "__main__":\n'
    "    app.run(port=5000)\n"
)
HOSTS = (
    host_address("lo", "127.0.0.1", 4),
    host_address("lo", "::1", 6),
    host_address("eth0", "198.51.100.1", 4),
    host_address("eth0", "2001:db8::1", 6),
)


def proc(*cmdline: str, name: str = "", pid: int = 100) -> ProcessInfo:
    return ProcessInfo(pid=pid, name=name or os.path.basename(cmdline[0])[:15], cmdline=cmdline)


PY = "/srv/venv/bin/python3"


@pytest.mark.parametrize(
    ("process", "source", "port", "kind"),
    [
        (proc(PY, "app.py"), Source("/srv/app.py", FLASK_APP), 5000, "flask"),
        (proc(PY, "-u", "/srv/app.py"), Source("/srv/app.py", FLASK_APP), 8080, "flask"),
        (proc(PY, "/srv/venv/bin/flask", "run", name="flask"), None, 5000, "flask-cli"),
        (proc(PY, "-m", "flask", "--app", "hello", "run"), None, 5000, "flask-cli"),
        (proc(PY, "-m", "flask", "routes"), None, 6000, None),
        (proc(PY, "manage.py", "runserver"), None, 8000, "django"),
        (
            proc(
                PY,
                "/v/bin/gunicorn",
                "-b",
                "127.0.0.1:8000",
                "shop.wsgi:application",
                name="gunicorn",
            ),
            None,
            8000,
            "gunicorn",
        ),
        (proc("gunicorn: master [app:app]", name="gunicorn"), None, 8000, "gunicorn"),
        (proc(PY, "-m", "uvicorn", "main:app", "--port", "8000"), None, 8000, "uvicorn"),
        (proc(PY, "/v/bin/jupyter-lab", name="jupyter-lab"), None, 8888, "jupyter"),
        (proc(PY, "-m", "http.server", "--bind", "127.0.0.1", "8080"), None, 8080, "http.server"),
        (
            proc(PY, "serve.py"),
            Source("/srv/serve.py", "import uvicorn\nuvicorn.run(app)\n"),
            8000,
            "uvicorn",
        ),
        (proc(PY, "tool.py"), Source("/srv/tool.py", "print('hi')\n"), 5000, "flask"),
        (proc(PY, "tool.py"), Source("/srv/tool.py", "print('hi')\n"), 8888, "jupyter"),
        (proc(PY, "tool.py"), Source("/srv/tool.py", "print('hi')\n"), 7000, None),
        (proc("node", "server.js"), None, 3000, "node"),
        (proc("node", "/app/node_modules/.bin/next", "start"), None, 3000, "next"),
        (proc("node", "/app/node_modules/vite/bin/vite.js"), None, 5173, "vite"),
        (proc("/usr/bin/redis-server 0.0.0.0:6379", name="redis-server"), None, 6379, "redis"),
        (proc("/usr/sbin/mariadbd", name="mariadbd"), None, 3306, "mysql"),
        (proc("/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/pg"), None, 5432, "postgres"),
        (proc("memcached", "-p", "11211"), None, 11211, "memcached"),
        (proc("/usr/bin/mongod", "--config", "/etc/mongod.conf"), None, 27017, "mongod"),
        (
            proc(
                "/usr/bin/java", "-Xms1g", "org.elasticsearch.bootstrap.Elasticsearch", name="java"
            ),
            None,
            9200,
            "elasticsearch",
        ),
        (proc("/usr/sbin/sshd", "-D"), None, 22, "sshd"),
    ],
    ids=[
        "flask app.run() script",
        "flask script with python options",
        "flask run console script",
        "python -m flask run",
        "flask without run is not a server",
        "django runserver",
        "gunicorn with a bind",
        "gunicorn proctitle",
        "uvicorn module",
        "jupyter lab",
        "http.server",
        "uvicorn.run() in a script",
        "python on 5000 guesses flask",
        "python on 8888 guesses jupyter",
        "python elsewhere is unknown",
        "node",
        "next",
        "vite",
        "redis",
        "mariadb",
        "postgres",
        "memcached",
        "mongod",
        "elasticsearch",
        "sshd",
    ],
)
def test_recognize(process: ProcessInfo, source: Source | None, port: int, kind: str | None):
    culprit = recognize(process, source, port)
    assert (culprit.kind if culprit else None) == kind


def test_flask_culprit_points_at_the_run_call():
    c = recognize(proc(PY, "app.py"), Source("/srv/app.py", FLASK_APP), 5000)
    assert (c.script, c.line, c.call, c.var) == ("/srv/app.py", 5, "app.run(port=5000)", "app")


def test_gunicorn_app_argument_is_not_the_bind_address():
    c = recognize(
        proc(
            PY, "/v/bin/gunicorn", "-b", "127.0.0.1:8000", "shop.wsgi:application", name="gunicorn"
        )
    )
    assert c.app == "shop.wsgi:application"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((PY, "app.py", "--x"), ("script", "app.py", ("--x",))),
        ((PY, "-X", "dev", "-m", "flask", "run"), ("module", "flask", ("run",))),
        ((PY, "-mhttp.server", "80"), ("module", "http.server", ("80",))),
        ((PY, "-c", "print(1)"), ("code", "print(1)", ())),
        ((PY,), None),
    ],
    ids=["script", "option with a value, then -m", "-m glued", "-c", "bare interpreter"],
)
def test_python_entry(argv, expected):
    assert python_entry(argv) == expected


@pytest.mark.parametrize(
    ("culprit", "host", "wanted"),
    [
        (
            Culprit("flask", "", script="/srv/app.py", line=5, call="app.run(port=5000)"),
            "0.0.0.0",
            ['`app.run(host="0.0.0.0", port=5000)`', "`gunicorn -b 0.0.0.0:5000 app:app`"],
        ),
        (Culprit("flask-cli", ""), "0.0.0.0", ["`flask run --host=0.0.0.0 --port=5000`"]),
        (Culprit("django", ""), "0.0.0.0", ["runserver 0.0.0.0:5000", "ALLOWED_HOSTS"]),
        (Culprit("gunicorn", "", app="m:app"), "0.0.0.0", ["`gunicorn -b 0.0.0.0:5000 m:app`"]),
        (Culprit("uvicorn", "", app="m:app"), "0.0.0.0", ["--host 0.0.0.0 --port 5000"]),
        (Culprit("jupyter", ""), "0.0.0.0", ["--ip=0.0.0.0"]),
        (Culprit("node", ""), "0.0.0.0", ['server.listen(5000, "0.0.0.0")']),
        (Culprit("redis", ""), "127.0.0.1", ["`bind 127.0.0.1 -::1` in redis.conf"]),
        (Culprit("mysql", ""), "127.0.0.1", ["`bind-address = 127.0.0.1`"]),
        (Culprit("postgres", ""), "127.0.0.1", ["`listen_addresses = '127.0.0.1,::1'`"]),
        (Culprit("memcached", ""), "127.0.0.1", ["`-l 127.0.0.1,::1`"]),
        (Culprit("mongod", ""), "127.0.0.1", ["`net.bindIp: 127.0.0.1`"]),
        (Culprit("elasticsearch", ""), "127.0.0.1", ["`network.host: 127.0.0.1`"]),
        (None, "0.0.0.0", ["listen on 0.0.0.0"]),
    ],
    ids=[
        "flask app.run",
        "flask run",
        "django",
        "gunicorn",
        "uvicorn",
        "jupyter",
        "node",
        "redis",
        "mysql",
        "postgres",
        "memcached",
        "mongod",
        "elasticsearch",
        "unknown",
    ],
)
def test_bind_change(culprit: Culprit | None, host: str, wanted: list[str]):
    text = "\n".join(f.summary for f in bind_change(culprit, 5000, host))
    for w in wanted:
        assert w in text


def listener(
    address: str,
    port: int = 5000,
    pid: int | None = 100,
    v6only: bool | None = None,
    protocol: Protocol = Protocol.TCP,
    hosts: tuple[HostAddress, ...] = HOSTS,
    cmdline: tuple[str, ...] = (PY, "app.py"),
) -> Listener:
    from bindscope.classify import exposure_of

    sock = Socket(
        protocol=protocol,
        address=address,
        port=port,
        family=6 if ":" in address else 4,
        v6only=v6only,
        inode=1,
    )
    process = (
        ProcessInfo(pid=pid, name="python3", cmdline=cmdline)
        if pid
        else ProcessInfo(None, "unknown")
    )
    return Listener(
        socket=sock, process=process, scope=scope_of(address), exposure=exposure_of(sock, hosts)
    )


def case(
    listeners: list[Listener],
    probes: dict[str, str],
    expose: Exposure = Exposure.PRIVATE,
    culprits: dict[int, Culprit] | None = None,
    declared: bool = False,
) -> Case:
    """probes: address -> "ok" or an errno name / "timeout"."""
    spec = ServiceSpec(name="web" if declared else "5000/tcp", port=5000, expose=expose)
    status, exposure = status_of(spec, listeners)
    results = tuple(
        ProbeResult(a, r == "ok", 0.001, "" if r == "ok" else r) for a, r in probes.items()
    )
    verdict = Verdict(
        service=spec, status=status, exposure=exposure, listeners=tuple(listeners), probes=results
    )
    return Case(
        port=5000,
        verdicts=(verdict,),
        declared=declared,
        listeners=tuple(listeners),
        addresses=HOSTS,
        culprits=culprits or {},
    )


FLASK = Culprit(
    "flask", "Flask development server", script="/srv/app.py", line=5, call="app.run(port=5000)"
)
REFUSED = "ECONNREFUSED"


def test_loopback_flask_says_loopback_only_and_names_the_fix():
    d = diagnose(
        case(
            [listener("127.0.0.1")],
            {"127.0.0.1": "ok", "198.51.100.1": REFUSED},
            culprits={100: FLASK},
        )
    )
    assert d.problem
    assert [f.title for f in d.findings] == [
        "Is anything listening on port 5000?",
        "On which addresses?",
        "Which process, with which command line?",
        "Can it be reached on each of the host's addresses? (a TCP connect, as telnet does)",
        "What does that mean for a client on another host?",
        "What to change",
    ]
    text = "\n".join(line for f in d.findings for line in f.lines)
    assert "loopback only (127.0.0.1)" in text
    assert "198.51.100.1  refused (nothing is bound to this address)" in text
    assert "recognised: Flask development server" in text
    assert d.fixes[0].summary == (
        'in /srv/app.py line 5: change `app.run(port=5000)` to `app.run(host="0.0.0.0", port=5000)`'
    )
    assert (d.fixes[0].kind, d.fixes[0].file, d.fixes[0].line) == ("code", "/srv/app.py", 5)
    assert not any(FIREWALL_CHECK in f.summary for f in d.fixes)


def test_wide_listener_with_a_failing_host_probe_points_at_the_firewall():
    d = diagnose(case([listener("0.0.0.0")], {"127.0.0.1": "ok", "198.51.100.1": "timeout"}))
    assert d.problem
    assert [f.summary for f in d.fixes] == [
        f"it listens on 198.51.100.1 but connecting there fails: {FIREWALL_CHECK}"
    ]
    assert "198.51.100.1  timeout although a socket is bound to it" in d.findings[3].lines


def test_reachable_as_declared_is_no_problem():
    d = diagnose(case([listener("0.0.0.0")], {"127.0.0.1": "ok", "198.51.100.1": "ok"}))
    assert not d.problem
    assert d.fixes == ()
    assert d.findings[-1].lines == ("nothing: it is reachable as expected",)


def test_overexposed_database_names_its_bind_setting():
    redis = Culprit("redis", "Redis")
    public = (*HOSTS, host_address("eth1", "8.8.8.8", 4))
    lst = listener("0.0.0.0", hosts=public)
    d = diagnose(case([lst], {}, expose=Exposure.LOOPBACK, culprits={100: redis}, declared=True))
    assert d.problem
    assert "overexposed" in d.findings[4].lines[0]
    assert any("`bind 127.0.0.1 -::1` in redis.conf" in f.summary for f in d.fixes)


def test_nothing_listening():
    d = diagnose(case([], {"127.0.0.1": REFUSED}))
    assert d.problem
    assert d.findings[0] == Finding(
        "Is anything listening on port 5000?",
        ("tcp: nothing", "udp: nothing"),
        problem=True,
        step="listening",
    )
    assert "start the service" in d.fixes[0].summary


def test_v6only_and_owner_unknown_are_said():
    d = diagnose(case([listener("::", v6only=False, pid=None)], {}))
    assert d.findings[1].lines == (
        "tcp [::]:5000: wildcard, v6only off: every IPv6 and IPv4 address (exposure private)",
    )
    assert "owner unknown" in d.findings[2].lines[0]


def test_an_extra_step_is_one_more_finding():
    def containers(c: Case) -> Finding:
        return Finding("Is it a published port?", ("no",), (advice("a fix from the step"),), True)

    from bindscope.diagnose.steps import STEPS

    d = diagnose(case([listener("0.0.0.0")], {}), steps=(*STEPS, containers))
    assert d.findings[-2].title == "Is it a published port?"
    assert d.fixes == (advice("a fix from the step"),)


@pytest.mark.parametrize(
    ("address", "v6only", "target", "expected"),
    [
        ("0.0.0.0", None, "198.51.100.1", True),
        ("0.0.0.0", None, "2001:db8::1", False),
        ("::", False, "198.51.100.1", True),
        ("::", True, "198.51.100.1", False),
        ("127.0.0.1", None, "198.51.100.1", False),
        ("::ffff:127.0.0.1", None, "127.0.0.1", True),
        ("fe80::1", None, "fe80::1%eth0", True),
    ],
    ids=[
        "v4 wildcard takes v4",
        "v4 wildcard not v6",
        "dual-stack wildcard takes v4",
        "v6only wildcard not v4",
        "loopback bind not the host address",
        "v4-mapped loopback",
        "zone ignored",
    ],
)
def test_accepts_on(address: str, v6only: bool | None, target: str, expected: bool):
    assert accepts_on(listener(address, v6only=v6only).socket, target) is expected


@pytest.mark.parametrize(
    ("expose", "extra", "host"),
    [
        (Exposure.PRIVATE, (), "0.0.0.0"),
        (Exposure.PRIVATE, (host_address("eth1", "8.8.8.8", 4),), "198.51.100.1"),
        (Exposure.PUBLIC, (host_address("eth1", "8.8.8.8", 4),), "0.0.0.0"),
    ],
    ids=[
        "private-only host: all addresses",
        "private on a public host: the private address",
        "public: all addresses",
    ],
)
def test_widen_host(expose: Exposure, extra: tuple[HostAddress, ...], host: str):
    assert widen_host(expose, (*HOSTS, *extra)) == host


def test_read_source_resolves_the_script_against_the_process_cwd(tmp_path: Path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "app.py").write_text(FLASK_APP)
    (tmp_path / "proc" / "42").mkdir(parents=True)
    os.symlink(tmp_path / "srv", tmp_path / "proc" / "42" / "cwd")
    os.symlink("/", tmp_path / "proc" / "42" / "root")  # a process on the host
    got = read_source(proc(PY, "app.py", pid=42), proc=str(tmp_path / "proc"))
    assert got == Source(str(tmp_path / "srv" / "app.py"), FLASK_APP)
    assert read_source(proc(PY, "missing.py", pid=42), proc=str(tmp_path / "proc")) is None
    assert read_source(proc("/usr/sbin/sshd", pid=42), proc=str(tmp_path / "proc")) is None


def test_read_source_reads_a_container_script_through_the_process_root(tmp_path: Path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "app").mkdir(parents=True)
    (rootfs / "app" / "main.py").write_text(FLASK_APP)
    (tmp_path / "proc" / "7").mkdir(parents=True)
    os.symlink(rootfs, tmp_path / "proc" / "7" / "root")
    got = read_source(proc(PY, "/app/main.py", pid=7), proc=str(tmp_path / "proc"))
    assert got == Source("/app/main.py", FLASK_APP)  # the path as the container sees it


# --- init's plan, pure ---


@pytest.mark.parametrize(
    ("now", "culprit", "expected"),
    [
        (Exposure.LOOPBACK, None, Exposure.LOOPBACK),
        (Exposure.PUBLIC, None, Exposure.PRIVATE),
        (Exposure.PRIVATE, Culprit("redis", "Redis"), Exposure.LOOPBACK),
    ],
    ids=["loopback stays loopback", "wide becomes private", "a database becomes loopback"],
)
def test_default_expose(now: Exposure, culprit: Culprit | None, expected: Exposure):
    assert default_expose(now, culprit) is expected


def test_plan_names_skips_and_exposes():
    listeners = [
        listener("127.0.0.1", port=5000),
        listener("::1", port=5000),
        listener("0.0.0.0", port=6379, pid=7, cmdline=("redis-server",)),
        listener("0.0.0.0", port=8000, pid=8, cmdline=("redis-server",)),
        listener("0.0.0.0", port=9917, pid=9, cmdline=("bindscope-exporter",)),
        listener("127.0.0.1", port=40000, pid=10),
        listener("0.0.0.0", port=53, pid=None, protocol=Protocol.UDP),
    ]
    culprits = {
        100: FLASK,
        7: Culprit("redis", "Redis"),
        8: Culprit("redis", "Redis"),
        9: Culprit("bindscope", "bindscope-exporter"),
    }
    entries, skipped = plan(
        listeners, culprits, expose_from_current=False, ephemeral=(32768, 60999)
    )
    got = [(e.name, e.port, e.protocol.value, e.expose.value, e.now.value) for e in entries]
    assert got == [
        ("port-53", 53, "udp", "private", "private"),
        ("flask", 5000, "tcp", "loopback", "loopback"),
        ("redis-6379", 6379, "tcp", "loopback", "private"),
        ("redis-8000", 8000, "tcp", "loopback", "private"),
    ]
    assert entries[1].addresses == ("127.0.0.1", "::1")
    assert [s.split(":")[0] for s in skipped] == ["tcp 9917 (python3)", "tcp 40000 (python3)"]
    current, _ = plan(listeners, culprits, expose_from_current=True, ephemeral=(32768, 60999))
    assert [e.expose.value for e in current] == ["private", "loopback", "private", "private"]


def test_render_is_valid_config_with_the_current_exposure_in_comments():
    from bindscope.config.load import parse_config

    listeners = [listener("127.0.0.1", port=5000, cmdline=(PY, "it's\x1b[31m.py"))]
    entries, skipped = plan(listeners, {100: FLASK}, expose_from_current=False)
    text = render(entries, skipped, expose_from_current=False, host="h1", when="now")
    config = parse_config(text, "init.yml")
    (spec,) = config.services
    assert (spec.name, spec.port, spec.expose) == ("flask", 5000, Exposure.LOOPBACK)
    assert spec.process.pattern == "^python3$"
    assert re.search(r"expose: loopback {2}# now: loopback on 127.0.0.1; Flask", text)
    assert "\x1b" not in text


def test_the_document_names_each_step_and_the_result():
    d = diagnose(case([listener("127.0.0.1")], {"127.0.0.1": "ok", "198.51.100.1": REFUSED}))
    doc = to_document(d, "5000")
    assert (doc["version"], doc["target"], doc["result"]) == (1, "5000", "problem")
    steps = [f["step"] for f in doc["findings"]]
    assert steps[:4] == ["listening", "addresses", "processes", "probes"]
    assert steps[-1] == "fixes"
    assert doc["fixes"] and all(f["summary"] for f in doc["fixes"])


def test_diagnosis_of_a_snapshot_judges_an_undeclared_port():
    lst = listener("127.0.0.1")
    snap = Snapshot(
        timestamp=0.0,
        duration=0.0,
        success=True,
        verdicts=(),
        listeners=(lst,),
        unexpected=(),
        host_addresses=HOSTS,
    )
    d = diagnosis_of("5000", snap, Config(), probed=False)
    assert d.problem
    assert "loopback" in " ".join(line for f in d.findings for line in f.lines)


def test_the_flask_fix_points_at_the_call_in_the_code_not_in_a_docstring():
    fixture = Path(__file__).parent / "fixtures" / "flask_app.py"
    text = fixture.read_text()
    culprit = recognize(
        ProcessInfo(pid=7, name="python3", cmdline=("python3", str(fixture))),
        Source(str(fixture), text),
        5000,
    )
    assert culprit is not None and culprit.kind == "flask"
    # the docstring's `app.run()` (line 1) and the host='0.0.0.0' branch are not it
    assert text.splitlines()[culprit.line - 1].strip() == "app.run()"
