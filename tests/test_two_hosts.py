"""The Flask app.run() failure reproduced from a second host, with two network namespaces.

The exporter runs in namespace "server". Namespace "client" plays another host:
it scrapes the exporter and connects to the services itself, so each case compares what
the exporter claims with what another host really gets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import Metrics, TwoHosts, require_binary, wait_for

SCAN_INTERVAL = 0.5
PROBE_TIMEOUT = 0.5
EXPORTER_PORT = 9917
FLASK_APP = Path(__file__).parent / "fixtures" / "flask_app.py"
FLASK_PORT = 5000  # Flask's default: app.run() with no arguments
S4, S6 = TwoHosts.SERVER4, TwoHosts.SERVER6
REFUSED = "ConnectionRefusedError: [Errno 111] Connection refused"
TIMED_OUT = "TimeoutError: timed out"

# A plain TCP service: accepts and closes, so the probes of every scan never fill its
# backlog; or a hung one that never accepts. Bounded in time: the fixture kills it first.
LISTENER = """
import socket, sys, time
address, port, v6only, accepting = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if v6only != "default":
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only == "on"))
s.bind((address, port))
s.listen(64 if accepting == "yes" else 0)
s.settimeout(0.5)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    if accepting != "yes":  # a hung service: its accept queue fills and SYNs are dropped
        time.sleep(0.5)
        continue
    try:
        conn, _ = s.accept()
    except TimeoutError:
        continue
    conn.close()
"""


def config(*services: tuple[str, int, str]) -> str:
    """The exporter's config: fast scans, short probes, the (name, port, expose) given."""
    lines = [f"  - {{name: {n}, port: {p}, expose: {e}}}" for n, p, e in services]
    body = "\n".join(lines) if lines else "  []"
    return f"scan_interval: 500ms\nprobe:\n  timeout: 500ms\nservices:\n{body}\n"


def probes(m: Metrics, service: str) -> dict[str, float]:
    return {s.labels["address"]: s.value for s in m.all("bindscope_probe_success", service=service)}


class Server:
    """The server namespace: the exporter and the services run in it; all killed at the end."""

    def __init__(self, hosts: TwoHosts, start_exporter: Callable, tmp: Path) -> None:
        self.hosts = hosts
        self._start_exporter = start_exporter
        self._tmp = tmp
        self._procs: list[tuple[subprocess.Popen, Path]] = []
        self.exporter = None

    def start_exporter(self, config_text: str) -> Metrics:
        self.exporter = self._start_exporter(
            config_text,
            ready=False,
            prefix=self.hosts.prefix(self.hosts.server),
            listen=f"0.0.0.0:{EXPORTER_PORT}",
            port=EXPORTER_PORT,
        )
        return self.wait(lambda m: m.get("bindscope_scan_success") == 1, "a first scan")

    def scrape(self) -> Metrics | None:
        """Scrape from the client, as Prometheus on another host would; None if refused."""
        if self.exporter.proc.poll() is not None:
            raise AssertionError(f"exporter exited: {self.exporter.log()}")
        for proc, log in self._procs:
            if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                raise AssertionError(f"{proc.args} exited: {log.read_text(errors='replace')}")
        try:
            text = self.hosts.fetch(f"http://{S4}:{EXPORTER_PORT}/metrics", timeout=2)
        except subprocess.CalledProcessError:
            return None
        return Metrics(text)

    def wait(self, predicate: Callable[[Metrics], bool], what: str, timeout: float = 10.0):
        def attempt() -> Metrics | None:
            m = self.scrape()
            return m if m is not None and predicate(m) else None

        return wait_for(attempt, timeout, interval=0.1, what=what)

    def spawn(self, *args: str) -> subprocess.Popen:
        log = self._tmp / f"server-proc-{len(self._procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*self.hosts.prefix(self.hosts.server), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append((proc, log))
        return proc

    def flask(self, all_interfaces: bool = False) -> subprocess.Popen:
        args = ["--all-interfaces"] if all_interfaces else []
        return self.spawn(sys.executable, str(FLASK_APP), *args)

    def listener(
        self, address: str, port: int, v6only: bool | None = None, accepting: bool = True
    ) -> subprocess.Popen:
        mode = "default" if v6only is None else ("on" if v6only else "off")
        yes = "yes" if accepting else "no"
        return self.spawn(sys.executable, "-c", LISTENER, address, str(port), mode, yes)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)

    def close(self) -> None:
        for proc, _log in self._procs:
            self.kill(proc)


@pytest.fixture
def server(two_hosts: TwoHosts, exporter, tmp_path: Path) -> Iterator[Server]:
    """Torn down before `exporter` and `two_hosts`: services, then exporter, then namespaces."""
    srv = Server(two_hosts, exporter, tmp_path)
    try:
        yield srv
    finally:
        srv.close()


def test_flask_app_run_default_is_loopback_only(server):
    server.start_exporter(config(("web", FLASK_PORT, "private")))
    server.flask()
    m = server.wait(
        lambda m: m.status("web") == "loopback_only" and probes(m, "web").get(S4) == 0,
        "web loopback_only, with its probes",
    )
    client = server.hosts.connect(S4, FLASK_PORT)
    assert client == REFUSED
    assert m.exposure("web") == "loopback"
    assert probes(m, "web") == {"127.0.0.1": 1, "::1": 0, S4: 0, S6: 0}
    # the closing note shows this side by side: what a second host gets, what we export
    shown = [
        line
        for line in m.text.splitlines()
        if 'service="web"' in line
        and line.startswith(("bindscope_service_status", "bindscope_probe_success"))
        and (line.endswith(" 1.0") or "probe" in line)
    ]
    print(f"client$ connect {S4}:{FLASK_PORT} -> {client}", *shown, sep="\n")


def test_flask_restarted_on_all_interfaces_is_ok_within_a_scan(server):
    server.start_exporter(config(("web", FLASK_PORT, "private")))
    app = server.flask()
    server.wait(lambda m: m.status("web") == "loopback_only", "web loopback_only")
    server.kill(app)
    server.flask(all_interfaces=True)
    wait_for(lambda: server.hosts.connect(S4, FLASK_PORT) == "ok", 10, what="client connects")
    listening_since = time.time()

    def scanned_after(m: Metrics) -> bool:
        started = m.get("bindscope_last_scan_timestamp_seconds") - m.get(
            "bindscope_scan_duration_seconds"
        )
        return started > listening_since

    # the first scan that starts after the app listens must say ok: at most one interval
    # to wait, plus the scan itself (probes bounded by their timeout) and the scrape
    m = server.wait(scanned_after, "a scan begun after the restart", SCAN_INTERVAL + 3.0)
    assert m.status("web") == "ok"
    assert m.exposure("web") == "private"
    # 0.0.0.0 is IPv4 only: the IPv6 addresses refuse, and the client would see the same
    assert probes(m, "web") == {"127.0.0.1": 1, "::1": 0, S4: 1, S6: 0}
    assert server.hosts.connect(S6, FLASK_PORT) == REFUSED


@pytest.mark.parametrize(
    ("v6only", "reachable"),
    [(False, {S4, S6}), (True, {S6})],
    ids=["v6only-off-takes-ipv4-and-ipv6", "v6only-on-takes-ipv6-only"],
)
def test_ipv6_wildcard_reaches_what_v6only_allows(server, v6only, reachable):
    server.start_exporter(config(("app", 7000, "private")))
    server.listener("::", 7000, v6only=v6only)
    expected = {"127.0.0.1": int(not v6only), "::1": 1, S4: int(not v6only), S6: 1}
    # discovery comes before the probes in a scan: a socket opened in between is probed
    # but not yet seen, so wait for a scan that saw it too
    m = server.wait(
        lambda m: (
            m.get("bindscope_service_listening", service="app") == 1
            and probes(m, "app") == expected
        ),
        f"app listening, probes {expected}",
    )
    for address in (S4, S6):
        assert server.hosts.connect(address, 7000) == ("ok" if address in reachable else REFUSED)
    assert (m.status("app"), m.exposure("app")) == ("ok", "private")
    assert m.get("bindscope_listener_info", address="::", port="7000", exposure="private") == 1


def test_database_expected_loopback_on_all_interfaces_is_overexposed(server):
    server.start_exporter(config(("db", 5432, "loopback")))
    server.listener("0.0.0.0", 5432)
    m = server.wait(lambda m: m.status("db") == "overexposed", "db overexposed")
    assert m.exposure("db") == "private"
    assert server.hosts.connect(S4, 5432) == "ok"


def test_undeclared_listener_on_all_interfaces_is_unexpected(server):
    server.start_exporter(config())
    server.listener("0.0.0.0", 8081)
    stray = {"protocol": "tcp", "address": "0.0.0.0", "port": "8081", "netns": "host"}
    m = server.wait(
        lambda m: m.get("bindscope_unexpected_listener_info", **stray) == 1, "8081 unexpected"
    )
    assert m.all("bindscope_unexpected_listener_info", **stray)[0].labels["exposure"] == "private"
    assert server.hosts.connect(S4, 8081) == "ok"
    # the exporter's own 0.0.0.0:9917 is known to it, never unexpected
    own = {"address": "0.0.0.0", "port": str(EXPORTER_PORT), "netns": "host"}
    assert m.get("bindscope_listener_info", service="bindscope", **own) == 1
    assert m.get("bindscope_unexpected_listener_info", **own) is None


@pytest.mark.parametrize(
    ("drop", "accepting", "status", "probed"),
    [
        (None, False, "ok", 0),
        ("", True, "blocked", 0),
        ('iifname != "lo"', True, "blocked", 1),
    ],
    ids=[
        "service-stops-accepting-keeps-ok-probes-fail",
        "firewall-drops-everywhere-blocked-probes-fail",
        "firewall-drops-other-hosts-blocked-probes-pass-via-lo",
    ],
)
def test_probes_are_a_signal_apart_from_the_status(
    server, tmp_path, drop, accepting, status, probed
):
    if drop is not None:
        require_binary("nft")
        rules = tmp_path / "drop.nft"
        rules.write_text(
            "table inet bindscope_test {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            f"    {drop} tcp dport 7000 drop\n"
            "  }\n"
            "}\n"
        )
        server.hosts.exec(server.hosts.server, "nft", "-f", str(rules))
    server.start_exporter(config(("app", 7000, "private")))
    server.listener("0.0.0.0", 7000, accepting=accepting)
    # a service that stops accepting lets the first probe fill its queue: from then on
    # every SYN is dropped, so wait for a scan where all of them failed
    m = server.wait(
        lambda m: (
            m.get("bindscope_service_listening", service="app") == 1
            and probes(m, "app")[S4] == probed
            and (accepting or not any(probes(m, "app").values()))
        ),
        f"app listening, probe of {S4} {probed}",
    )
    # the status comes from the evidence (the bind, the ruleset), never from a probe
    assert m.status("app") == status
    # only the client sees the drop: a probe of the host's own address enters through lo
    assert server.hosts.connect(S4, 7000, timeout=1.0) == TIMED_OUT
    if not probed:
        duration = m.get("bindscope_probe_duration_seconds", service="app", address=S4)
        # it waited the whole timeout, and then gave up (the bound is loose: a busy host)
        assert PROBE_TIMEOUT <= duration < PROBE_TIMEOUT + 5
