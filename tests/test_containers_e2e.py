"""End to end with real podman containers and an `ip netns` namespace: the exporter on the
host follows published ports into containers (issue 10, cases 1-6), and `bindscope
diagnose PORT` names the container and the fix inside it.

Traffic stays on loopback, the containers' 203.0.113.0/24 and 198.51.100.0/24.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import (
    EXPORTER,
    TOOL,
    Metrics,
    free_port,
    require_binary,
    require_root,
    run,
    wait_for,
)

from bindscope.diagnose.programs import recognize
from bindscope.diagnose.steps import Case, step_published
from bindscope.discover.namespaces import read_proc_net
from bindscope.model import (
    Exposure,
    Listener,
    ProbeResult,
    ProcessInfo,
    Protocol,
    Published,
    PublishedStatus,
    Scope,
    Socket,
)

SCAN = "scan_interval: 1s\nprobe: {addresses: [127.0.0.1, '::1'], timeout: 1s}\n"


def scan_config(apps) -> str:
    """SCAN, with the test containers' addresses: the only published targets to probe."""
    ips = ", ".join(a.ctr.ip for a in (apps.loop, apps.wide, apps.empty))
    return f"scan_interval: 1s\nprobe: {{addresses: [127.0.0.1, '::1', {ips}], timeout: 1s}}\n"


NETNS_ADDRESS = "198.51.100.77"


# ---- the step on its own: the fix inside the container, per recognised program ----


def _inside(address: str, cmdline: tuple[str, ...]) -> Listener:
    sock = Socket(Protocol.TCP, address, 5000, 4, None, 1, netns="netns-c1", container="shop")
    loopback = address.startswith("127.")
    return Listener(
        sock,
        ProcessInfo(4242, cmdline[0].rsplit("/", 1)[-1], cmdline),
        Scope.LOOPBACK if loopback else Scope.WILDCARD,
        Exposure.LOOPBACK if loopback else Exposure.PRIVATE,
    )


def _case(status: PublishedStatus, listeners: tuple[Listener, ...], probe: bool) -> Case:
    published = Published(
        Protocol.TCP,
        "0.0.0.0",
        8080,
        "203.0.113.5",
        5000,
        status,
        netns="netns-c1",
        container="shop",
        listeners=listeners,
        probe=ProbeResult("203.0.113.5", probe, 0.001, "" if probe else "ECONNREFUSED"),
    )
    culprits = {lst.process.pid: recognize(lst.process, None, 5000) for lst in listeners}
    return Case(
        port=8080,
        verdicts=(),
        declared=False,
        listeners=(),
        addresses=(),
        culprits={pid: c for pid, c in culprits.items() if c is not None},
        published=(published,),
    )


@pytest.mark.parametrize(
    ("status", "address", "cmdline", "probe", "fix"),
    [
        (
            PublishedStatus.LOOPBACK_ONLY,
            "127.0.0.1",
            ("/usr/local/bin/python3", "-m", "flask", "run"),
            False,
            "inside container shop: `flask run --host=0.0.0.0 --port=5000`",
        ),
        (
            PublishedStatus.LOOPBACK_ONLY,
            "127.0.0.1",
            ("/usr/local/bin/gunicorn", "-b", "127.0.0.1:5000", "shop:app"),
            False,
            "inside container shop: `gunicorn -b 0.0.0.0:5000 shop:app`",
        ),
        (
            PublishedStatus.LOOPBACK_ONLY,
            "127.0.0.1",
            ("python3", "-m", "uvicorn", "main:app", "--port", "5000"),
            False,
            "inside container shop: `uvicorn main:app --host 0.0.0.0 --port 5000`",
        ),
        (
            PublishedStatus.NOT_LISTENING,
            None,
            (),
            False,
            "inside container shop: start the app and make it listen on 0.0.0.0 port 5000 (tcp)",
        ),
        (PublishedStatus.OK, "0.0.0.0", ("python3", "-m", "flask", "run"), True, None),
    ],
    ids=["flask run", "gunicorn", "uvicorn", "nothing inside", "ok"],
)
def test_published_step_names_the_fix_inside_the_container(status, address, cmdline, probe, fix):
    listeners = (_inside(address, cmdline),) if address else ()
    finding = step_published(_case(status, listeners, probe))
    assert finding is not None
    assert (
        finding.lines[0]
        == "tcp 0.0.0.0:8080 is forwarded (NAT) to 203.0.113.5:5000 in container shop"
    )
    assert finding.problem is (fix is not None)
    if fix is None:
        assert finding.fixes == ()
    else:
        assert finding.fixes[0].summary.startswith(fix), finding.fixes
    if address:
        assert f"  inside: {address}:5000" in "\n".join(finding.lines)
        assert f"    pid 4242 {listeners[0].process.name}: {' '.join(cmdline)}" in finding.lines


def test_published_step_says_nothing_about_an_unpublished_port():
    case = Case(port=8080, verdicts=(), declared=False, listeners=(), addresses=())
    assert step_published(case) is None


# ---- real containers ----


def _listening(pid: int, address: str, port: int) -> bool:
    return any(r[0] == "tcp" and r[2:4] == (address, port) for r in read_proc_net(pid))


@pytest.fixture(scope="module")
def apps(podman) -> SimpleNamespace:
    """Three containers publishing their port INSIDE on the host's loopback: the app on
    127.0.0.1 (the app.run() bug), the app on 0.0.0.0, and nothing listening."""
    inside = free_port()  # free on the host too: case 4 listens there with the same number
    server = ["python3", "-m", "http.server", "--bind"]
    made = {}
    for tag, command in (
        ("loop", [*server, "127.0.0.1", str(inside)]),
        ("wide", [*server, "0.0.0.0", str(inside)]),
        ("empty", ["sleep", "600"]),
    ):
        port = free_port()
        ctr = podman.run(tag, command, publish=(f"127.0.0.1:{port}:{inside}",))
        made[tag] = SimpleNamespace(ctr=ctr, name=ctr.name, port=port)
    for tag, address in (("loop", "127.0.0.1"), ("wide", "0.0.0.0")):
        pid = made[tag].ctr.pid
        wait_for(lambda p=pid, a=address: _listening(p, a, inside), 20, 0.1, f"{tag} app")
    return SimpleNamespace(inside=inside, prefix=podman.prefix, **made)


@pytest.fixture(scope="module")
def named_netns() -> Iterator[SimpleNamespace]:
    """An `ip netns` namespace with 198.51.100.77 on a veth inside it and a listener there."""
    require_root()
    require_binary("ip")
    for line in run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0]
        owner = name.removeprefix("bsn-")
        if owner != name and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            run("ip", "netns", "del", name, check=False)  # a killed run's leftover
    name = f"bsn-{os.getpid()}"
    port = free_port()
    code = (
        "import socket,sys,time\n"
        f"s=socket.create_server(({NETNS_ADDRESS!r},{port}))\n"
        "print('ready',flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = None
    try:
        run("ip", "netns", "add", name)
        for cmd in (
            "ip link set lo up",
            "ip link add bsn0 type veth peer name bsn1",  # no dummy module on these kernels
            f"ip addr add {NETNS_ADDRESS}/24 dev bsn0",
            "ip link set bsn1 up",
            "ip link set bsn0 up",
        ):
            run("ip", "netns", "exec", name, *cmd.split())
        proc = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield SimpleNamespace(name=name, port=port)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        run("ip", "netns", "del", name, check=False)


def _start(exporter, config: str):
    """The exporter, ready after its first scan; a loaded 2-core CI machine may take long."""
    # unlimited listener series: another test's or bench's thousands must not push ours out
    exp = exporter(
        config, ["--collector.listeners.max=0", "--collector.published-ports"], ready=False
    )
    exp.wait_ready(timeout=60)
    return exp


def _wait(exp, predicate, what: str) -> Metrics:
    """wait_metrics, saying on a timeout what the exporter last exported and logged."""
    try:
        return exp.wait_metrics(predicate, timeout=30, what=what)
    except AssertionError as e:
        m = exp.scrape()
        seen = _lines(m, "bindscope_published_port_status") + "\n" + _lines(m, "errors_total")
        raise AssertionError(f"{e}\n{seen}\n{exp.log()[-3000:]}") from None


def _connect(port: int) -> str:
    """A client of the published port, as telnet does: 'ok' or the error."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def _published_status(m: Metrics, container: str, port: int) -> str | None:
    for s in m.all("bindscope_published_port_status", container=container, host_port=str(port)):
        if s.value == 1:
            return s.labels["status"]
    return None


def _lines(m: Metrics, *needles: str) -> str:
    return "\n".join(
        line for line in m.text.splitlines() if all(n in line for n in needles) and line[0] != "#"
    )


@pytest.mark.root
@pytest.mark.slow
def test_case1_app_on_loopback_inside_a_published_port(apps, exporter):
    app = apps.loop
    error = _connect(app.port)
    assert error.startswith(("ConnectionRefusedError", "ConnectionResetError")), error

    exp = _start(exporter, scan_config(apps))
    m = _wait(
        exp,
        lambda m: _published_status(m, app.name, app.port) == "loopback_only",
        f"{app.name} loopback_only",
    )
    inside = m.all("bindscope_listener_info", container=app.name, port=str(apps.inside))
    assert [(s.labels["address"], s.labels["scope"]) for s in inside] == [("127.0.0.1", "loopback")]
    assert inside[0].labels["netns"] not in ("", "host")
    assert inside[0].labels["process"] == "python3"
    assert (
        m.get(
            "bindscope_published_port_info",
            container=app.name,
            host_address="127.0.0.1",
            host_port=str(app.port),
            target_address=app.ctr.ip,
            target_port=str(apps.inside),
        )
        == 1
    )
    assert m.get("bindscope_published_port_probe_success", container=app.name) == 0
    assert m.get("bindscope_network_namespaces", kind="container") >= 3
    print(f"\n$ client connect to 127.0.0.1:{app.port}\n{error}\n")
    print(_lines(m, "bindscope_published_port_", app.name))
    print(_lines(m, "bindscope_listener_info", app.name))


@pytest.mark.root
@pytest.mark.slow
def test_case2_app_on_every_address_inside_is_ok(apps, exporter):
    app = apps.wide
    with urllib.request.urlopen(f"http://127.0.0.1:{app.port}/", timeout=5) as r:
        assert r.status == 200

    exp = _start(exporter, scan_config(apps))
    m = exp.scrape()  # ready means the first scan is done: ok within one scan
    assert _published_status(m, app.name, app.port) == "ok", _lines(m, app.name)
    assert m.get("bindscope_published_port_probe_success", container=app.name) == 1
    inside = m.all("bindscope_listener_info", container=app.name, port=str(apps.inside))
    assert [(s.labels["address"], s.labels["scope"]) for s in inside] == [("0.0.0.0", "wildcard")]


@pytest.mark.root
@pytest.mark.slow
def test_case3_nothing_inside_then_the_app_starts(apps, podman, exporter):
    app = apps.empty
    exp = _start(exporter, scan_config(apps))
    m = exp.scrape()
    assert _published_status(m, app.name, app.port) == "not_listening", _lines(m, app.name)
    assert m.all("bindscope_listener_info", container=app.name) == []

    podman.cmd(
        "exec", "-d", app.name, "python3", "-m", "http.server", "--bind", "0.0.0.0",
        str(apps.inside),
    )  # fmt: skip
    try:
        wait_for(lambda: _listening(app.ctr.pid, "0.0.0.0", apps.inside), 20, 0.1, "exec'd app")
        started = time.monotonic()
        m = _wait(exp, lambda m: _published_status(m, app.name, app.port) == "ok", "ok")
        took = time.monotonic() - started
        # within one scan: a 1 s interval, the scan under way and the next one, a scrape
        assert took < 1.5 + 2 * m.get("bindscope_scan_duration_seconds"), took
    finally:
        # back to nothing listening for the other tests: kill all but the container's init
        kill = "import os,signal; os.kill(-1, signal.SIGKILL)"
        podman.cmd("exec", app.name, "python3", "-c", kill, check=False)
        wait_for(lambda: not _listening(app.ctr.pid, "0.0.0.0", apps.inside), 10, 0.1, "kill")


@pytest.mark.root
@pytest.mark.slow
def test_case4_services_judged_each_in_its_own_namespace(apps, exporter, listen):
    listen("127.0.0.1", apps.inside)  # the same port number, on the host, loopback only
    exp = _start(
        exporter,
        scan_config(apps)
        + f"""services:
  - {{name: in-container, port: {apps.inside}, expose: private,
      container: '^{apps.wide.name}$'}}
  - {{name: on-host, port: {apps.inside}, expose: private}}
""",
    )
    m = exp.scrape()
    assert m.status("in-container") == "ok"
    assert m.status("on-host") == "loopback_only"
    claimed = {
        s.labels["service"]: (s.labels["netns"], s.labels["container"], s.labels["address"])
        for s in m.all("bindscope_listener_info", port=str(apps.inside))
        if s.labels["service"]
    }
    assert claimed["on-host"] == ("host", "", "127.0.0.1")
    assert claimed["in-container"][1:] == (apps.wide.name, "0.0.0.0")
    # the loopback container's listener on the same port is no service's
    loop = m.all("bindscope_listener_info", container=apps.loop.name, port=str(apps.inside))
    assert [s.labels["service"] for s in loop] == [""]


@pytest.mark.root
@pytest.mark.slow
def test_case5_named_namespace_is_inventoried_and_judged(named_netns, exporter):
    ns = named_netns
    exp = _start(
        exporter,
        SCAN
        + f"""services:
  - {{name: in-netns, port: {ns.port}, expose: private, netns: {ns.name}}}
  - {{name: host-twin, port: {ns.port}, expose: private}}
""",
    )
    m = exp.scrape()
    found = m.all("bindscope_listener_info", netns=ns.name, port=str(ns.port))
    assert [(s.labels["address"], s.labels["service"]) for s in found] == [
        (NETNS_ADDRESS, "in-netns")
    ]
    assert found[0].labels["container"] == ""
    assert m.status("in-netns") == "ok"
    assert m.status("host-twin") == "not_listening"  # the host has nothing on that port
    assert m.get("bindscope_network_namespaces", kind="named") >= 1


@pytest.mark.root
@pytest.mark.slow
def test_case6_unprivileged_sees_the_host_and_counts_the_netns_error(
    apps, named_netns, shared_dir, listen
):
    require_binary("setpriv")
    local = listen("127.0.0.1").getsockname()[1]
    port = free_port()
    config = shared_dir / "bindscope.yml"
    config.write_text(SCAN + f"services:\n  - {{name: local, port: {local}, expose: loopback}}\n")
    config.chmod(0o644)
    with open(shared_dir / "log", "wb") as log:
        proc = subprocess.Popen(
            [
                "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all",
                *EXPORTER, f"--web.listen-address=127.0.0.1:{port}", f"--config.file={config}",
                "--collector.listeners.max=0",
            ],
            stdout=log, stderr=subprocess.STDOUT, cwd=shared_dir, start_new_session=True,
        )  # fmt: skip
        try:

            def scrape() -> Metrics | None:
                assert proc.poll() is None, (shared_dir / "log").read_text()
                with contextlib.suppress(OSError):
                    url = f"http://127.0.0.1:{port}/metrics"
                    with urllib.request.urlopen(url, timeout=2) as r:
                        m = Metrics(r.read().decode())
                        return m if m.get("bindscope_scan_success") == 1 else None
                return None

            m = wait_for(scrape, 20, interval=0.2, what="the unprivileged exporter")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    assert m.status("local") == "ok"
    own = m.all("bindscope_listener_info", port=str(local))
    assert [(s.labels["netns"], s.labels["address"]) for s in own] == [("host", "127.0.0.1")]
    # each namespace it could not enter counts, in every scan: the 3 containers' and ours
    assert m.get("bindscope_scan_errors_total", source="netns") >= 4
    assert m.get("bindscope_network_namespaces", kind="host") == 1
    # the containers and the named namespace were out of its reach, never guessed at
    assert m.all("bindscope_listener_info", netns=named_netns.name) == []
    assert m.all("bindscope_listener_info", container=apps.loop.name) == []
    assert proc.returncode == 0


@pytest.mark.root
@pytest.mark.slow
def test_diagnose_follows_the_published_port_into_the_container(apps, tmp_path):
    app = apps.loop
    config = tmp_path / "diagnose.yml"
    config.write_text(scan_config(apps))
    done = subprocess.run(
        [*TOOL, "diagnose", str(app.port), f"--config.file={config}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )
    out = done.stdout
    print(f"\n$ bindscope diagnose {app.port}\n{out}")
    assert done.returncode == 1, done.stderr
    target = f"{app.ctr.ip}:{apps.inside}"
    assert f"tcp 127.0.0.1:{app.port} is forwarded (NAT) to {target} in container {app.name}" in out
    assert f"inside: 127.0.0.1:{apps.inside}: loopback: only processes in container" in out
    assert f"python3 -m http.server --bind 127.0.0.1 {apps.inside}" in out
    assert f"a connect from the host to {target}: refused" in out
    assert (
        f"- inside container {app.name}: `python3 -m http.server --bind 0.0.0.0 {apps.inside}`"
        in out
    )
    assert "firewall may drop it" not in out  # NAT, not a firewall, explains the refusal


@pytest.mark.root
@pytest.mark.slow
def test_scan_shows_containers_and_their_published_ports(apps, tmp_path):
    config = tmp_path / "scan.yml"
    config.write_text(scan_config(apps))
    done = subprocess.run(
        [*TOOL, "scan", f"--config.file={config}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )
    # no services declared, but a published port leads to an app on loopback
    assert done.returncode == 1, done.stderr
    others, published = done.stdout.split("\nPublished ports (")
    header = others.splitlines()[others.splitlines().index("") + 2]
    assert header.split()[-2:] == ["NETNS", "CONTAINER"]
    rows = {
        line.split()[-1]: line.split()
        for line in others.splitlines()
        if line.split() and line.split()[-1].startswith(apps.prefix)
    }
    assert rows[apps.loop.name][:4] == ["tcp", "127.0.0.1", str(apps.inside), "loopback"]
    assert rows[apps.wide.name][:4] == ["tcp", "0.0.0.0", str(apps.inside), "wildcard"]
    expected = {
        apps.loop.name: ["loopback_only", "127.0.0.1"],
        apps.wide.name: ["ok", "0.0.0.0"],
        apps.empty.name: ["not_listening", "-"],
    }
    for name, (status, inside) in expected.items():
        app = getattr(apps, name.rsplit("-", 1)[1])
        row = next(line.split() for line in published.splitlines() if f" {name} " in line)
        assert row[:3] == ["tcp", f"127.0.0.1:{app.port}", f"{app.ctr.ip}:{apps.inside}"]
        assert row[5:7] == [status, inside]


@pytest.mark.root
@pytest.mark.slow
def test_case7_each_container_of_a_shared_namespace_owns_its_sockets(apps, podman, exporter):
    """Two containers in one network namespace, as in a pod: each socket carries its
    owner's container, so a service matched by container name finds its own."""
    port = free_port()
    side = podman.run(
        "side",
        ["python3", "-m", "http.server", "--bind", "0.0.0.0", str(port)],
        network=f"container:{apps.wide.name}",
    )
    wait_for(lambda: _listening(side.pid, "0.0.0.0", port), 20, 0.1, "side app")
    exp = _start(
        exporter,
        scan_config(apps)
        + f"""services:
  - {{name: side, port: {port}, expose: private, container: '^{side.name}$'}}
  - {{name: wide, port: {apps.inside}, expose: private, container: '^{apps.wide.name}$'}}
""",
    )
    m = _wait(exp, lambda m: m.status("side") == "ok", "the side container's service ok")
    assert m.status("wide") == "ok"
    side_sockets = m.all("bindscope_listener_info", port=str(port))
    wide_sockets = m.all("bindscope_listener_info", port=str(apps.inside), service="wide")
    assert {s.labels["container"] for s in side_sockets} == {side.name}
    assert {s.labels["container"] for s in wide_sockets} == {apps.wide.name}
    # one namespace for both
    assert {s.labels["netns"] for s in side_sockets} == {s.labels["netns"] for s in wide_sockets}
