"""Issue 11 end to end: a port dropped by the server namespace's firewall (nft, iptables,
ufw, a private firewalld), as the client namespace, the exporter and `bindscope diagnose`
each see it, and firewalld's fixes applied as printed.

Every rule is written inside the test's server namespace only; the namespaces go away
with the `two_hosts` fixture, and the rules with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import (
    TOOL,
    Firewalld,
    Metrics,
    TwoHosts,
    private_firewalld,
    require_binary,
    ufw_script,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

SCAN_INTERVAL = 0.5
EXPORTER_PORT = 9917
APP_PORT = 7000
DB_PORT = 5432
S4, S6 = TwoHosts.SERVER4, TwoHosts.SERVER6
TIMED_OUT = "TimeoutError: timed out"
CONFIG = """\
scan_interval: 500ms
probe:
  timeout: 500ms
services:
  - {name: app, port: 7000, expose: private}
  - {name: db, port: 5432, expose: loopback}
"""

# Accepts and closes, so neither the probes nor the client fill its backlog; bounded in
# time, and killed by the fixture long before.
LISTENER = """
import socket, sys, time
address = sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"
s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if ":" in address:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
s.bind((address, int(sys.argv[1])))
s.listen(64)
s.settimeout(0.5)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        s.accept()[0].close()
    except TimeoutError:
        pass
"""


class Server:
    """The server namespace: the exporter and the listeners, scraped from the client."""

    def __init__(self, hosts: TwoHosts, start_exporter: Callable, tmp: Path) -> None:
        self.hosts = hosts
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.firewalld: Firewalld | None = None  # started by firewalld_drop, closed here
        self.exporter = start_exporter(
            CONFIG,
            ready=False,
            prefix=hosts.prefix(hosts.server),
            listen=f"0.0.0.0:{EXPORTER_PORT}",
            port=EXPORTER_PORT,
        )

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.hosts.exec(self.hosts.server, *args, check=check)

    def listen(self, port: int, address: str = "0.0.0.0") -> None:
        script = self.tmp / "listener.py"  # a file, so diagnose shows a one-line command
        script.write_text(LISTENER)
        argv = [sys.executable, str(script), str(port), address]
        self.procs.append(
            subprocess.Popen([*self.hosts.prefix(self.hosts.server), *argv], start_new_session=True)
        )

    def scrape(self) -> Metrics | None:
        if self.exporter.proc.poll() is not None:
            raise AssertionError(f"exporter exited: {self.exporter.log()}")
        try:
            text = self.hosts.fetch(f"http://{S4}:{EXPORTER_PORT}/metrics", timeout=2)
        except subprocess.CalledProcessError:
            return None
        return Metrics(text)

    def wait(self, predicate: Callable[[Metrics], bool], what: str, timeout: float = 15.0):
        def attempt() -> Metrics | None:
            m = self.scrape()
            return m if m is not None and predicate(m) else None

        return wait_for(attempt, timeout, interval=0.1, what=what)

    def wait_scan_after(self, t: float, what: str) -> Metrics:
        """The first scan begun after t: at most one interval, the scan and a scrape away."""

        def begun_after(m: Metrics) -> bool:
            end = m.get("bindscope_last_scan_timestamp_seconds") or 0.0
            return end - (m.get("bindscope_scan_duration_seconds") or 0.0) > t

        return self.wait(begun_after, what, SCAN_INTERVAL + 3.0)

    def diagnose(self, port: int, *args: str) -> tuple[int, str]:
        r = subprocess.run(
            [
                *self.hosts.prefix(self.hosts.server),
                *TOOL,
                "diagnose",
                str(port),
                f"--config.file={self.exporter.config_path}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "NO_COLOR": "1"},
        )
        return r.returncode, r.stdout + r.stderr

    def close(self) -> None:
        if self.firewalld is not None:
            self.firewalld.close()
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
def server(two_hosts: TwoHosts, exporter, tmp_path: Path) -> Iterator[Server]:
    """Torn down before `exporter` and `two_hosts`: listeners, exporter, namespaces."""
    srv = Server(two_hosts, exporter, tmp_path)
    try:
        srv.wait(lambda m: m.get("bindscope_scan_success") == 1, "a first scan")
        yield srv
    finally:
        srv.close()


# --- the ways to drop a port for other hosts, each with how to undo it ---


@dataclass
class Drop:
    """Drops `port` for other hosts in the server namespace; `undo` lets them in again."""

    rule: str  # the deciding rule's text, as diagnose shows it
    opening: tuple[str, ...]  # the command diagnose names to open the port: one of these
    undo: Callable[[], object]
    client: str = TIMED_OUT  # what the client's connect gets while dropped


def nft_drop(srv: Server, port: int) -> Drop:
    require_binary("nft")
    srv.exec("nft", "add", "table", "inet", "e2e")
    base = "{ type filter hook input priority 0; policy accept; }"
    srv.exec("nft", "add", "chain", "inet", "e2e", "input", base)
    rule = ("tcp", "dport", str(port), "iifname", "!=", '"lo"', "drop")
    echo = srv.exec("nft", "-e", "-a", "add", "rule", "inet", "e2e", "input", *rule).stdout
    handle = re.search(r"# handle (\d+)", echo).group(1)
    text = f'tcp dport {port} iifname != "lo" drop'
    return Drop(
        rule=f"table inet e2e, chain input, handle {handle}: `{text}`",
        opening=(f"nft insert rule inet e2e input tcp dport {port} accept",),
        undo=lambda: srv.exec("nft", "delete", "rule", "inet", "e2e", "input", "handle", handle),
    )


def iptables_drop(srv: Server, port: int) -> Drop:
    require_binary("iptables")
    rule = ("INPUT", "-p", "tcp", "--dport", str(port), "!", "-i", "lo", "-j", "DROP")
    srv.exec("iptables", "-A", *rule)
    # iptables-nft writes this rule in nft's native terms (no xt match), so nft's JSON
    # carries it, with the handle `nft -a list ruleset` shows
    listed = json.loads(srv.exec("nft", "-j", "list", "chain", "ip", "filter", "INPUT").stdout)
    handle = [i["rule"]["handle"] for i in listed["nftables"] if "rule" in i][-1]
    return Drop(
        rule=f'table ip filter, chain INPUT, handle {handle}: `iifname != "lo" tcp dport {port}',
        opening=(
            f"iptables -I INPUT -p tcp --dport {port} -j ACCEPT",
            f"nft insert rule ip filter INPUT tcp dport {port} accept",
        ),
        undo=lambda: srv.exec("iptables", "-D", *rule),
    )


def ufw(srv: Server, *args: str) -> str:
    """ufw in the server namespace, its state in a private copy (support.ufw_script)."""
    return srv.exec(*ufw_script(srv.tmp / "ufw", list(args))).stdout


def ufw_drop(srv: Server, port: int) -> Drop:
    require_binary("ufw", "unshare")
    ufw(srv, "allow", f"{EXPORTER_PORT}/tcp")  # Prometheus, on the client, still scrapes
    ufw(srv, "--force", "enable")  # default: deny incoming
    return Drop(
        rule="table ip filter, chain INPUT: policy drop (written by ufw)",
        opening=(f"ufw allow {port}/tcp",),
        undo=lambda: ufw(srv, "allow", f"{port}/tcp"),
    )


def firewalld_drop(srv: Server, port: int) -> Drop:
    """A private firewalld from its defaults: zone public rejects the port. Undone by
    running the opening command diagnose prints, as printed."""
    require_binary("firewalld", "firewall-cmd", "dbus-daemon", "unshare")
    fw = srv.firewalld = Firewalld(srv.hosts.server)
    fw.start()
    fw.cmd(f"--add-port={EXPORTER_PORT}/tcp")  # Prometheus, on the client, still scrapes
    listed = srv.exec("nft", "-a", "list", "chain", "inet", "firewalld", "filter_IN_public")
    handle = re.search(r"reject with icmpx admin-prohibited # handle (\d+)", listed.stdout)
    assert handle, listed.stdout
    opening = (
        f"firewall-cmd --zone=public --add-port={port}/tcp && "
        f"firewall-cmd --permanent --zone=public --add-port={port}/tcp"
    )
    return Drop(
        rule=f"table inet firewalld, chain filter_IN_public, handle {handle.group(1)}: "
        "`reject with icmpx admin-prohibited` (written by firewalld)",
        opening=(opening,),
        undo=lambda: fw.shell(opening),
        client="OSError: [Errno 113] No route to host",  # its reject: admin-prohibited
    )


WRITERS = [nft_drop, iptables_drop, ufw_drop, firewalld_drop]
WRITER_IDS = ["nft-rule", "iptables-command", "ufw", "firewalld"]


def shown(m: Metrics, service: str, port: int) -> list[str]:
    """The metric lines a person compares with the client's connect."""
    keep = []
    for line in m.text.splitlines():
        ours = f'service="{service}"' in line or f'port="{port}"' in line
        if (
            ours
            and line.startswith(
                (
                    "bindscope_service_status",
                    "bindscope_service_exposure",
                    "bindscope_service_effective_exposure",
                    "bindscope_listener_firewall_info",
                )
            )
            and line.endswith(" 1.0")
        ):
            keep.append(line)
    return keep


@pytest.mark.parametrize("write", WRITERS, ids=WRITER_IDS)
def test_dropped_for_other_hosts_is_blocked_until_the_rule_goes(server, write):
    hosts = server.hosts
    server.listen(APP_PORT)
    server.wait(lambda m: m.status("app") == "ok", "app ok before any rule")
    assert hosts.connect(S4, APP_PORT, timeout=1.0) == "ok"

    drop = write(server, APP_PORT)
    m = server.wait(lambda m: m.status("app") == "blocked", "app blocked")
    client = hosts.connect(S4, APP_PORT, timeout=1.0)
    assert client == drop.client
    assert m.exposure("app") == "private"
    assert m.get("bindscope_service_effective_exposure", service="app", exposure="loopback") == 1
    fw = {"protocol": "tcp", "address": "0.0.0.0", "port": str(APP_PORT), "netns": "host"}
    assert m.get("bindscope_listener_firewall_info", verdict="drop", **fw) == 1

    code, out = server.diagnose(APP_PORT)
    assert code == 1, out
    assert f"tcp {S4}: the firewall drops other hosts: {drop.rule}" in out
    assert f"let other hosts in on {APP_PORT}/tcp" in out, out
    assert any(f"$ {c}" in out for c in drop.opening), out
    assert "Result: PROBLEM (blocked)" in out
    print(f"client$ connect {S4}:{APP_PORT} -> {client}", *shown(m, "app", APP_PORT), sep="\n")
    print(f"server$ bindscope diagnose {APP_PORT}\n{out}")

    drop.undo()
    undone = time.time()
    m = server.wait_scan_after(undone, "a scan begun after the rule went")
    assert m.status("app") == "ok"
    assert m.get("bindscope_service_effective_exposure", service="app", exposure="private") == 1
    assert m.get("bindscope_listener_firewall_info", verdict="accept", **fw) == 1
    assert hosts.connect(S4, APP_PORT, timeout=1.0) == "ok"


def test_database_protected_by_the_firewall_alone_is_ok_and_overexposed_without_it(server):
    server.listen(DB_PORT)
    drop = nft_drop(server, DB_PORT)
    m = server.wait(
        lambda m: (
            m.get("bindscope_service_effective_exposure", service="db", exposure="loopback") == 1
        ),
        "db narrowed to loopback by the firewall",
    )
    client = server.hosts.connect(S4, DB_PORT, timeout=1.0)
    assert client == TIMED_OUT
    # bound wide, reachable by nobody else: no alert, the dashboard's "firewall alone"
    assert (m.status("db"), m.exposure("db")) == ("ok", "private")
    print(f"client$ connect {S4}:{DB_PORT} -> {client}", *shown(m, "db", DB_PORT), sep="\n")
    code, out = server.diagnose(DB_PORT)
    assert code == 0, out
    assert f"tcp {S4}: the firewall drops other hosts: {drop.rule}" in out
    assert "protected by the firewall alone" in out
    print(f"server$ bindscope diagnose {DB_PORT}\n{out}")

    drop.undo()
    m = server.wait_scan_after(time.time(), "a scan begun after the rule went")
    assert m.status("db") == "overexposed"
    assert server.hosts.connect(S4, DB_PORT, timeout=1.0) == "ok"
    code, out = server.diagnose(DB_PORT)
    assert code == 1, out
    assert (
        f"tcp {S4}: the firewall accepts new connections from other hosts on {S4}: "
        "nothing but the bind keeps them out (table inet e2e, chain input: policy accept)"
    ) in out
    assert f"$ nft insert rule inet e2e input iifname != lo tcp dport {DB_PORT} drop" in out
    print(f"server$ bindscope diagnose {DB_PORT}\n{out}")


def test_the_firewalld_fix_applied_as_printed_closes_that_port_only(server):
    """firewalld's runtime configuration as admins change it (no --permanent): the server's
    interface moved to zone internal, ports opened there. The closing fix diagnose prints
    is run literally against that firewalld; then only the declared-loopback port is
    closed to other hosts, on both families, and loopback still gets in."""
    hosts = server.hosts
    server.listen(DB_PORT, "::")  # dual stack: the fix must cover both families
    server.listen(APP_PORT, "::")
    with private_firewalld(hosts.server) as fw:
        fw.cmd("--zone=internal", f"--change-interface={hosts.server_device}")
        for port in (EXPORTER_PORT, APP_PORT, DB_PORT):  # Prometheus, the app, the database
            fw.cmd("--zone=internal", f"--add-port={port}/tcp")
        db = {"protocol": "tcp", "address": "::", "port": str(DB_PORT), "netns": "host"}
        m = server.wait(
            lambda m: (
                m.get("bindscope_listener_firewall_info", verdict="accept", **db) == 1
                and m.status("db") == "overexposed"
            ),
            "db open to other hosts through firewalld",
        )
        assert {a: hosts.connect(a, DB_PORT, timeout=1.0) for a in (S4, S6)} == {
            S4: "ok",
            S6: "ok",
        }
        code, out = server.diagnose(DB_PORT, "--json")
        assert code == 1, out
        doc = json.loads(out)
        fixes = [f for f in doc["fixes"] if f["kind"] == "firewall"]
        assert len(fixes) == 1, doc["fixes"]
        print(f"server$ bindscope diagnose {DB_PORT} --json  # firewall fix\n", fixes)
        for command in fixes[0]["commands"]:
            assert "--zone=internal" in command, command  # the interface's zone, not a guess
            fw.shell(command)  # as printed, with the private bus in the environment

        timed_out = {S4: TIMED_OUT, S6: TIMED_OUT}
        assert {a: hosts.connect(a, DB_PORT, timeout=1.0) for a in (S4, S6)} == timed_out
        assert {a: hosts.connect(a, APP_PORT, timeout=1.0) for a in (S4, S6)} == {
            S4: "ok",
            S6: "ok",
        }
        here = {a: hosts.connect(a, DB_PORT, ns=hosts.server) for a in ("127.0.0.1", "::1")}
        assert here == {"127.0.0.1": "ok", "::1": "ok"}
        m = server.wait_scan_after(time.time(), "a scan begun after the fix")
        assert m.get("bindscope_listener_firewall_info", verdict="drop", **db) == 1
        assert (m.status("db"), m.status("app")) == ("ok", "ok")
        assert m.get("bindscope_service_effective_exposure", service="db", exposure="loopback")
        # and it lasts: the permanent configuration has the rule too
        kept = fw.cmd("--permanent", "--zone=internal", "--list-rich-rules").stdout
        assert f'rule port port="{DB_PORT}" protocol="tcp" drop' in kept
        code, out = server.diagnose(DB_PORT, "--json")
        after = json.loads(out)
        assert (code, after["result"]) == (0, "ok"), out
        assert not [f for f in after["fixes"] if f["kind"] == "firewall"]
