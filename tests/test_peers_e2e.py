"""Peers across three network namespaces: the path between hosts, seen from both ends.

"server" and "client" are joined by "router", which forwards between 198.51.100.0/25 and
198.51.100.128/25 (2001:db8::/64 and 2001:db8:1::/64). Each runs its own exporter; the
client's watches the server's as a peer, and a Prometheus in the client scrapes both with
the shipped rules. A drop rule in the router's forward chain for one port plays the
security group: the server's own firewall accepts, its exporter says ok, and only the
client's peer probe and a remote diagnose from the client can tell.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import bcrypt
import pytest
import yaml
from support import TOOL, Exporter, Metrics, require_binary, require_root, run, wait_for

from mixin.rules import RulesConfig, render

S4, S6 = "198.51.100.1", "2001:db8::1"
ROUTER_S4, ROUTER_S6 = "198.51.100.126", "2001:db8::fe"
C4, C6 = "198.51.100.129", "2001:db8:1::1"
ROUTER_C4, ROUTER_C6 = "198.51.100.254", "2001:db8:1::fe"
UNROUTED = "192.0.2.1"  # the server has it, the client has no route to it
EXPORTER_PORT = 9917
PEER = f"{S4}:{EXPORTER_PORT}"
FLASK_PORT, API_PORT, ADMIN_PORT, UNDECLARED_PORT = 5000, 8080, 8081, 8082
FLASK_APP = Path(__file__).parent / "fixtures" / "flask_app.py"
USER, PASSWORD = "prom", "peer-secret"
ALERT = "BindscopeServiceUnreachableFromPeers"
TIMEOUT = 60.0  # bounds every wait; the pipeline settles in seconds (for: 2s)
PREFIXES = ("bps-", "bpr-", "bpc-")

# Accepts and counts: the undeclared port must never see a connection from a peer.
COUNTING_LISTENER = """
import socket, sys, time
port, path = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((sys.argv[3], port))
s.listen(64)
s.settimeout(0.5)
n = 0
open(path, "w").write("0")
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        conn, peer = s.accept()
    except TimeoutError:
        continue
    conn.close()
    if not peer[0].startswith(("::1", "::ffff:127.")):
        n += 1
        open(path, "w").write(str(n))
"""

DROP_RULESET = f"""
table inet bindscope_test_path {{
    chain forward {{
        type filter hook forward priority 0; policy accept;
        tcp dport {API_PORT} drop
    }}
}}
"""


class ThreeHosts:
    """server <-> router <-> client; the pid in the names lets a later run clean up."""

    _made = 0

    def __init__(self) -> None:
        ThreeHosts._made += 1
        tag = f"{os.getpid()}-{ThreeHosts._made}"
        self.server, self.router, self.client = (p + tag for p in PREFIXES)
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def exec(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", ns, *args, check=check)

    def create(self) -> None:
        for ns in (self.server, self.router, self.client):
            run("ip", "netns", "add", ns)
            self.exec(ns, "ip", "link", "set", "lo", "up")
        # both ends are made inside their namespaces: nothing appears in the host's
        for left, lname, rname in ((self.server, "eth0", "eth-s"), (self.client, "eth0", "eth-c")):
            run("ip", "link", "add", lname, "netns", left, "type", "veth",
                "peer", "name", rname, "netns", self.router)  # fmt: skip
        for ns, dev, v4, v6 in (
            (self.server, "eth0", f"{S4}/25", f"{S6}/64"),
            (self.router, "eth-s", f"{ROUTER_S4}/25", f"{ROUTER_S6}/64"),
            (self.router, "eth-c", f"{ROUTER_C4}/25", f"{ROUTER_C6}/64"),
            (self.client, "eth0", f"{C4}/25", f"{C6}/64"),
        ):
            self.exec(ns, "ip", "link", "set", "dev", dev, "addrgenmode", "none")
            self.exec(ns, "ip", "addr", "add", v4, "dev", dev)
            self.exec(ns, "ip", "-6", "addr", "add", v6, "dev", dev, "nodad")
            self.exec(ns, "ip", "link", "set", dev, "up")
        # a router forwarding IPv6 solicits neighbours from its link-local address
        for dev in ("eth-s", "eth-c"):
            self.exec(self.router, "ip", "-6", "addr", "add", "fe80::fe/64", "dev", dev, "nodad")
        # no default routes: each side reaches the other's /25 and /64 only, via the router
        self.exec(self.server, "ip", "route", "add", "198.51.100.128/25", "via", ROUTER_S4)
        self.exec(self.server, "ip", "-6", "route", "add", "2001:db8:1::/64", "via", ROUTER_S6)
        self.exec(self.client, "ip", "route", "add", "198.51.100.0/25", "via", ROUTER_C4)
        self.exec(self.client, "ip", "-6", "route", "add", "2001:db8::/64", "via", ROUTER_C6)
        # a second address on the server's interface, in a range the client cannot route to
        self.exec(self.server, "ip", "addr", "add", f"{UNROUTED}/32", "dev", "eth0")
        self.exec(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.exec(self.router, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

    def spawn(self, ns: str, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append((proc, log))
        return proc

    def drop(self, on: bool) -> None:
        if on:
            subprocess.run(
                ["ip", "netns", "exec", self.router, "nft", "-f", "-"],
                input=DROP_RULESET, text=True, check=True, capture_output=True, timeout=30,
            )  # fmt: skip
        else:
            self.exec(self.router, "nft", "delete", "table", "inet", "bindscope_test_path")

    def get(self, ns: str, url: str, auth: bool = True, timeout: float = 3.0) -> tuple[int, str]:
        """GET from inside a namespace: (status, body); 0 when nothing answered."""
        code = textwrap.dedent(f"""
            import base64, json, sys, urllib.request, urllib.error
            req = urllib.request.Request({url!r})
            if {auth!r}:
                token = base64.b64encode({f"{USER}:{PASSWORD}".encode()!r}).decode()
                req.add_header("Authorization", "Basic " + token)
            try:
                with urllib.request.urlopen(req, timeout={timeout}) as r:
                    out = (r.status, r.read().decode())
            except urllib.error.HTTPError as e:
                out = (e.code, e.read().decode())
            except OSError as e:
                out = (0, str(e))
            sys.stdout.write(json.dumps(out))
        """)
        r = self.exec(ns, sys.executable, "-c", code, check=False)
        if r.returncode != 0:
            return 0, r.stderr
        status, body = json.loads(r.stdout)
        return status, body

    def delete(self) -> None:
        for proc, _log in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for ns in (self.server, self.router, self.client):
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)


def _remove_leftovers() -> None:
    """Namespaces of an earlier run that was killed before its finalizers ran."""
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if (
            name.startswith(PREFIXES)
            and len(parts) == 3
            and parts[1].isdigit()
            and not Path(f"/proc/{parts[1]}").exists()
        ):
            run("ip", "netns", "del", name, check=False)


@dataclass
class Lab:
    hosts: ThreeHosts
    tmp: Path
    server: Exporter
    client: Exporter
    password_file: Path
    accepted_file: Path

    def client_metrics(self) -> Metrics:
        status, body = self.hosts.get(self.hosts.client, f"http://{C4}:{EXPORTER_PORT}/metrics")
        assert status == 200, body
        return Metrics(body)

    def server_metrics(self) -> Metrics:
        status, body = self.hosts.get(self.hosts.client, f"http://{PEER}/metrics")
        assert status == 200, body
        return Metrics(body)

    def wait_client(self, predicate, what: str) -> Metrics:
        def attempt() -> Metrics | None:
            for exp in (self.server, self.client):
                if exp.proc.poll() is not None:
                    raise AssertionError(f"exporter exited: {exp.log()}")
            m = self.client_metrics()
            return m if predicate(m) else None

        return wait_for(attempt, TIMEOUT, 0.3, what)

    def prometheus(self, path: str) -> dict:
        status, body = self.hosts.get(self.hosts.client, f"http://127.0.0.1:9090{path}", auth=False)
        assert status == 200, body
        return json.loads(body)

    def alerts(self) -> list[dict]:
        return [
            a
            for a in self.prometheus("/api/v1/alerts")["data"]["alerts"]
            if a["labels"]["alertname"] == ALERT
        ]

    def diagnose(self, port: int, *extra: str) -> subprocess.CompletedProcess:
        return run(
            "ip", "netns", "exec", self.hosts.client, *TOOL, "diagnose", f"{S4}:{port}",
            "--timeout", "1", f"--exporter.username={USER}",
            f"--exporter.password-file={self.password_file}", *extra,
            check=False, timeout=60,
        )  # fmt: skip


def _short_rules() -> str:
    short = {f.name: "2s" for f in fields(RulesConfig) if f.name.endswith("_for")}
    return render(replace(RulesConfig(), **short))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    require_binary("ip", "nft", "prometheus", "sysctl")
    _remove_leftovers()
    tmp = tmp_path_factory.mktemp("peers")
    tmp.chmod(0o755)
    hosts = ThreeHosts()
    exporters: list[Exporter] = []
    try:
        hosts.create()
        password_file = tmp / "peer-password"
        password_file.write_text(PASSWORD + "\n")
        web = tmp / "web.yml"
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
        web.write_text(f"basic_auth_users:\n  {USER}: {hashed}\n")
        flags = [f"--web.config.file={web}", "--no-collector.namespaces"]
        server_config = yaml.safe_dump({
            "scan_interval": "500ms",
            "probe": {"timeout": "500ms"},
            "services": [
                {"name": "web", "port": FLASK_PORT, "expose": "private"},
                {"name": "api", "port": API_PORT, "expose": "private"},
                {"name": "admin", "port": ADMIN_PORT, "expose": "loopback"},
            ],
        })  # fmt: skip
        client_config = yaml.safe_dump({
            "scan_interval": "500ms",
            "probe": {"timeout": "500ms"},
            "unexpected": {"report": False},
            "peers": {
                "targets": [PEER],
                "interval": "1s",
                "timeout": "500ms",
                "basic_auth": {"username": USER, "password_file": str(password_file)},
            },
        })  # fmt: skip
        (tmp / "server").mkdir()
        (tmp / "client").mkdir()
        accepted = tmp / "undeclared-accepts"
        hosts.spawn(hosts.server, [sys.executable, str(FLASK_APP)], tmp / "flask.log")
        for port, address in ((API_PORT, "::"), (ADMIN_PORT, "::1"), (UNDECLARED_PORT, "::")):
            hosts.spawn(
                hosts.server,
                [sys.executable, "-c", COUNTING_LISTENER, str(port),
                 str(accepted if port == UNDECLARED_PORT else tmp / f"accepts-{port}"), address],
                tmp / f"listener-{port}.log",
            )  # fmt: skip
        for name, ns, config in (
            ("server", hosts.server, server_config),
            ("client", hosts.client, client_config),
        ):
            exp = Exporter(
                tmp / name,
                config,
                flags,
                prefix=["ip", "netns", "exec", ns],
                port=EXPORTER_PORT,
                listen=f":{EXPORTER_PORT}",
            )
            exporters.append(exp)
        server, client = exporters
        prom = tmp / "prometheus"
        prom.mkdir()
        (prom / "bindscope.rules.yml").write_text(_short_rules())
        (prom / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": ["bindscope.rules.yml"],
            "scrape_configs": [{
                "job_name": "bindscope",
                "basic_auth": {"username": USER, "password_file": str(password_file)},
                "static_configs": [{"targets": [PEER, f"{C4}:{EXPORTER_PORT}"]}],
            }],
        }))  # fmt: skip
        hosts.spawn(
            hosts.client,
            ["prometheus", f"--config.file={prom / 'prometheus.yml'}",
             f"--storage.tsdb.path={prom / 'data'}", "--web.listen-address=127.0.0.1:9090"],
            prom / "prometheus.log",
        )  # fmt: skip
        lab = Lab(hosts, tmp, server, client, password_file, accepted)
        for exp, base in ((server, f"http://{PEER}"), (client, f"http://{C4}:{EXPORTER_PORT}")):

            def ready(exp: Exporter = exp, base: str = base) -> bool:
                if exp.proc.poll() is not None:
                    raise AssertionError(f"exporter exited: {exp.log()}")
                return hosts.get(hosts.client, base + "/-/ready")[0] == 200

            wait_for(ready, TIMEOUT, 0.3, f"exporter at {base} ready")
        wait_for(
            lambda: lab.hosts.get(hosts.client, "http://127.0.0.1:9090/-/ready", False)[0] == 200,
            TIMEOUT,
            0.5,
            "prometheus ready",
        )
        yield lab
    finally:
        for exp in exporters:
            exp.stop()
        hosts.delete()
        shutil.rmtree(tmp, ignore_errors=True)


def _peer_probes(m: Metrics) -> dict[tuple[str, str], float]:
    return {
        (s.labels["service"], s.labels["address"]): s.value
        for s in m.all("bindscope_peer_probe_success", peer=PEER)
    }


def _excerpt(m: Metrics) -> str:
    keep = ("bindscope_peer_up", "bindscope_peer_probe_success", "bindscope_peer_probe_duration")
    return "\n".join(line for line in m.text.splitlines() if line.startswith(keep))


def test_the_path_drop_is_seen_by_the_peer_alerted_and_diagnosed(lab: Lab):
    open_path = lab.wait_client(
        lambda m: _peer_probes(m).get(("api", S4)) == 1 and _peer_probes(m).get(("api", S6)) == 1,
        "the peer reaches api over the router",
    )
    print(f"\npeer metrics on the client, path open:\n{_excerpt(open_path)}")
    # only declared private/public TCP services, only on addresses the client routes to
    assert set(_peer_probes(open_path)) == {("api", S4), ("api", S6), ("web", S4), ("web", S6)}
    assert _peer_probes(open_path)[("web", S4)] == 0  # app.run(): loopback only there
    assert open_path.get("bindscope_peer_up", peer=PEER) == 1

    lab.hosts.drop(True)
    try:
        dropped = lab.wait_client(
            lambda m: (
                _peer_probes(m).get(("api", S4)) == 0 and _peer_probes(m).get(("api", S6)) == 0
            ),
            "the peer's probes of api fail behind the drop",
        )
        print(f"\npeer metrics on the client, router drops tcp/{API_PORT}:\n{_excerpt(dropped)}")
        server = lab.server_metrics()
        assert server.status("api") == "ok"  # the server itself sees nothing wrong
        assert server.get("bindscope_probe_success", service="api", address=S4) == 1

        firing = wait_for(
            lambda: [a for a in lab.alerts() if a["state"] == "firing"],
            TIMEOUT,
            0.5,
            f"{ALERT} firing in Prometheus",
        )
        assert [(a["labels"]["instance"], a["labels"]["service"], a["labels"]["port"])
                for a in firing] == [(PEER, "api", str(API_PORT))]  # fmt: skip
        print(f"\nPrometheus alert: {json.dumps(firing[0]['labels'], sort_keys=True)}")

        dropped_diag = lab.diagnose(API_PORT)
        print(f"\n$ bindscope diagnose {S4}:{API_PORT}   (from the client)\n{dropped_diag.stdout}")
        assert dropped_diag.returncode == 1, dropped_diag.stderr
        assert "Something on the path between the hosts drops it" in dropped_diag.stdout
        assert "timed out" in dropped_diag.stdout
        doc = json.loads(lab.diagnose(API_PORT, "--json").stdout)
        assert doc["version"] == 1 and doc["result"] == "problem"
        assert [c["outcome"] for c in doc["connect"]] == ["timed_out"]
        assert doc["fixes"][0]["kind"] == "firewall"
        assert doc["host"]["services"][0]["firewall"] == "accept"
    finally:
        lab.hosts.drop(False)

    lab.wait_client(lambda m: _peer_probes(m).get(("api", S4)) == 1, "api reachable again")
    wait_for(lambda: not lab.alerts(), TIMEOUT, 0.5, f"{ALERT} resolved")
    # a peer is no port scanner: the undeclared port never saw a connection from outside
    assert lab.accepted_file.read_text() == "0"


def test_remote_diagnose_of_a_flask_app_run_port(lab: Lab):
    lab.wait_client(lambda m: _peer_probes(m).get(("web", S4)) == 0, "web probed")
    result = lab.diagnose(FLASK_PORT)
    print(f"\n$ bindscope diagnose {S4}:{FLASK_PORT}   (from the client)\n{result.stdout}")
    assert result.returncode == 1, result.stderr
    assert "loopback only" in result.stdout
    assert "app.run(host=" in result.stdout
    doc = json.loads(lab.diagnose(FLASK_PORT, "--json").stdout)
    assert [c["outcome"] for c in doc["connect"]] == ["refused"]
    assert doc["host"]["services"][0]["status"] == "loopback_only"


def test_remote_diagnose_without_an_exporter_tells_what_the_connect_does(lab: Lab):
    result = run(
        "ip", "netns", "exec", lab.hosts.client, *TOOL, "diagnose", f"{S4}:{UNDECLARED_PORT}",
        "--timeout", "1", "--exporter", f"http://{S4}:1", check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "What the connect alone tells" in result.stdout
    assert "no answer" in result.stdout


def test_peer_api_without_credentials_is_401(lab: Lab):
    for path in ("/api/v1/services", f"/api/v1/diagnose?target={API_PORT}"):
        status, _ = lab.hosts.get(lab.hosts.client, f"http://{PEER}{path}", auth=False)
        assert status == 401
    status, body = lab.hosts.get(lab.hosts.client, f"http://{PEER}/api/v1/services")
    doc = json.loads(body)
    assert status == 200
    # the address the client cannot route to is listed, and never probed (see above)
    assert set(doc["addresses"]) == {S4, S6, UNROUTED}


def test_scans_go_on_while_rounds_run(lab: Lab):
    t0 = lab.client_metrics().get("bindscope_last_scan_timestamp_seconds")
    later = lab.wait_client(
        lambda m: (m.get("bindscope_last_scan_timestamp_seconds") or 0) > t0 + 1, "scans go on"
    )
    assert later.get("bindscope_scan_success") == 1
