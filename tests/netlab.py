"""A server namespace on two links with a client behind each, for differential tests: the
kernel's answer to real connects against the exporter's verdicts on the same ruleset.

server: eth0 198.51.100.1/25 2001:db8::1/64, eth1 198.51.100.129/25 2001:db8:1::1/64
c0 (behind eth0): 198.51.100.2/25 2001:db8::2/64; c1 (behind eth1): 198.51.100.130/25
2001:db8:1::2/64. Each client routes every documentation address through the server, so
either client reaches every server address, through its own link. Neighbours are
static: a ruleset that drops ICMPv6 neighbour discovery must not decide the TCP answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from support import Firewalld, require_binary, run, ufw_script

AGENT = str(Path(__file__).with_name("netlab_agent.py"))
LINKS = (
    # (server device, server v4, server v6, client v4, client v6, prefix lengths)
    ("eth0", "198.51.100.1", "2001:db8::1", "198.51.100.2", "2001:db8::2"),
    ("eth1", "198.51.100.129", "2001:db8:1::1", "198.51.100.130", "2001:db8:1::2"),
)
SERVER_ADDRESSES = tuple(a for link in LINKS for a in link[1:3])
PROBE_TIMEOUT = 1.0  # on a veth an accepted SYN is answered in microseconds


@dataclass(frozen=True)
class Bind:
    """One listening socket of the server."""

    address: str
    port: int
    v6only: bool = False
    device: str = ""
    protocol: str = "tcp"

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    def reachable(self) -> tuple[str, ...]:
        """Server addresses a connection to which this socket takes (kernel semantics)."""
        if self.address in ("0.0.0.0", "::"):
            fams = {4} if self.family == 4 else ({6} if self.v6only else {4, 6})
            addrs = [a for a in SERVER_ADDRESSES if (6 if ":" in a else 4) in fams]
        else:
            addrs = [self.address]
        if self.device:
            on = {a for link in LINKS if link[0] == self.device for a in link[1:3]}
            addrs = [a for a in addrs if a in on] if self.address in ("0.0.0.0", "::") else addrs
        return tuple(addrs)


@dataclass
class Agent:
    proc: subprocess.Popen

    def ask(self, request: object) -> object:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"lab agent ended: {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        return json.loads(line)


@dataclass
class Lab:
    """The namespaces and the helper processes inside them; delete() removes them all."""

    tag: str
    server: str = ""
    clients: tuple[str, ...] = ()
    procs: list[subprocess.Popen] = field(default_factory=list)
    legacy_used: bool = False
    firewalld: Firewalld | None = None  # made by the first .firewalld entry, kept for the next

    def __post_init__(self) -> None:
        # the creating pid is in the name, so conftest removes what a killed run left
        pid = os.getpid()
        self.server = f"bss-{pid}-{self.tag}"
        self.clients = tuple(f"bsc-{pid}-{self.tag}c{i}" for i in range(len(LINKS)))
        self._veth = f"bl{pid % 100000}{self.tag}"[:11]

    def exec(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", ns, *args, check=check)

    def create(self) -> None:
        run("ip", "netns", "add", self.server)
        self.exec(self.server, "ip", "link", "set", "lo", "up")
        self.exec(self.server, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
        for i, (dev, s4, s6, c4, c6) in enumerate(LINKS):
            client = self.clients[i]
            run("ip", "netns", "add", client)
            a, b = f"{self._veth}s{i}", f"{self._veth}c{i}"
            run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            run("ip", "link", "set", a, "netns", self.server)
            run("ip", "link", "set", b, "netns", client)
            for ns, old, mine, plen4, plen6 in (
                (self.server, a, (s4, s6), 25, 64),
                (client, b, (c4, c6), 25, 64),
            ):
                self.exec(ns, "ip", "link", "set", "lo", "up")
                self.exec(ns, "ip", "link", "set", old, "name", dev)
                self.exec(ns, "ip", "link", "set", "dev", dev, "addrgenmode", "none")
                self.exec(ns, "ip", "addr", "add", f"{mine[0]}/{plen4}", "dev", dev)
                self.exec(ns, "ip", "-6", "addr", "add", f"{mine[1]}/{plen6}", "dev", dev, "nodad")
                self.exec(ns, "ip", "link", "set", dev, "up")
            self.exec(client, "ip", "route", "add", "198.51.100.0/24", "via", s4)
            self.exec(client, "ip", "-6", "route", "add", "2001:db8::/32", "via", s6)
            mac = {
                ns: json.loads(self.exec(ns, "ip", "-j", "link", "show", dev).stdout)[0]["address"]
                for ns in (self.server, client)
            }
            for ns, other, addrs in (
                (self.server, client, (c4, c6)),
                (client, self.server, (s4, s6)),
            ):
                for addr in addrs:
                    self.exec(
                        ns, "ip", "neigh", "replace", addr, "lladdr", mac[other],
                        "nud", "permanent", "dev", dev,
                    )  # fmt: skip

    def start(self, ns: str, *args: str) -> Agent:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, AGENT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(
                f"lab agent did not start: {proc.stderr.read() if proc.stderr else ''}"
            )
        return Agent(proc)

    def listen(self, binds: Iterable[Bind]) -> Agent:
        spec = [
            {
                "address": b.address,
                "port": b.port,
                "v6only": b.v6only,
                "device": b.device,
                "protocol": b.protocol,
            }
            for b in binds
        ]
        return self.start(self.server, "listen", json.dumps(spec))

    def delete(self) -> None:
        if self.firewalld is not None:
            self.firewalld.close()
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for ns in (self.server, *self.clients):
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)  # its veth ends go with it

    # --- rulesets -------------------------------------------------------------------

    def reset(self) -> None:
        if self.firewalld is not None:
            self.firewalld.stop()  # else it would write its rules again (on a reload, say)
        self.exec(self.server, "nft", "flush", "ruleset")
        # The last ruleset's connections must not decide the next one's: a SYN that reuses
        # the 4-tuple of an entry left established (its FIN dropped by a later ruleset)
        # is `ct state established`, not new. Mid-stream packets arriving after the flush
        # create no entry either (tcp_loose is off in the server namespace).
        self.exec(self.server, "conntrack", "-F")
        if self.legacy_used:
            for tool in ("iptables-legacy-restore", "ip6tables-legacy-restore"):
                self._stdin(tool, EMPTY_LEGACY)

    def _stdin(self, tool: str, text: str, *args: str) -> None:
        r = subprocess.run(
            ["ip", "netns", "exec", self.server, tool, *args],
            input=text, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if r.returncode:
            raise RuntimeError(f"{tool}: {r.stderr.strip()}")

    def load_text(self, text: str) -> None:
        """An nft ruleset given as text, after emptying what the last one left."""
        self.reset()
        self._stdin("nft", text, "-f", "-")

    def load(self, path: Path, tmp: Path) -> None:
        """Loads one corpus entry by its kind, after emptying what the last one left."""
        self.reset()
        text = path.read_text()
        kind = path.suffix
        if kind == ".nft":
            self.exec(self.server, "nft", "-f", str(path))
        elif kind == ".sh":
            self.legacy_used |= "legacy" in text
            self.exec(self.server, "sh", "-e", str(path))
        elif kind in (".ipt", ".legacy"):
            v4, _, v6 = text.partition("\n# ip6tables\n")
            nft = kind == ".ipt"
            self.legacy_used |= not nft
            suffix = "nft" if nft else "legacy"
            self._stdin(f"iptables-{suffix}-restore", v4 + "\n")
            if v6.strip():
                self._stdin(f"ip6tables-{suffix}-restore", v6)
        elif kind == ".ufw":
            shutil.rmtree(tmp / "ufw", ignore_errors=True)  # each entry from ufw's defaults
            for line in text.splitlines():
                if line.strip() and not line.startswith("#"):
                    ufw(self, tmp, line.split())
        elif kind == ".firewalld":
            require_binary("firewalld", "firewall-cmd", "dbus-daemon")
            if self.firewalld is None:  # one bus for the lab; firewalld anew for each entry
                self.firewalld = Firewalld(self.server)
            self.firewalld.start()  # from a fresh copy of the defaults
            for line in text.splitlines():
                if line.strip() and not line.startswith("#"):
                    self.firewalld.cmd(*shlex.split(line))
        else:
            raise ValueError(f"unknown corpus entry kind {path}")


EMPTY_LEGACY = "".join(
    f"*{table}\n" + "".join(f":{c} ACCEPT [0:0]\n" for c in chains) + "COMMIT\n"
    for table, chains in (
        ("filter", ("INPUT", "FORWARD", "OUTPUT")),
        ("nat", ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")),
        ("mangle", ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")),
        ("raw", ("PREROUTING", "OUTPUT")),
    )
)


def ufw(lab: Lab, tmp: Path, args: list[str]) -> None:
    """ufw in the server namespace, its state in a private copy (support.ufw_script)."""
    lab.exec(lab.server, *ufw_script(tmp / "ufw", args))


# --- the comparison ----------------------------------------------------------------


@dataclass
class Tally:
    rulesets: int = 0
    probes: int = 0
    checks: int = 0
    agree: int = 0
    unknown: int = 0
    disagreements: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"differential: {self.rulesets} rulesets, {self.probes} probes, {self.checks} "
            f"verdicts: {self.agree} agree, {self.unknown} unknown, "
            f"{len(self.disagreements)} disagree"
        )


def config_for(binds: Iterable[Bind]) -> str:
    ports = sorted({b.port for b in binds})
    services = "".join(f"  - {{name: p{p}, port: {p}, expose: private}}\n" for p in ports)
    return f"probe: {{enabled: false}}\nunexpected: {{report: false}}\nservices:\n{services}"


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def compare(
    name: str,
    binds: tuple[Bind, ...],
    metrics_text: str,
    answers: dict[tuple[str, int], bool],
    tally: Tally,
    unknown_ok: set[int] | None,
) -> None:
    """The kernel's answers (address, port) -> any client got in, against the metrics.

    unknown_ok: ports where `unknown` is the right answer (None: every port).
    """
    m = samples(metrics_text)
    verdicts = {
        (s.labels["address"], int(s.labels["port"])): s.labels["verdict"]
        for s in m.get("bindscope_listener_firewall_info", [])
        if s.labels["protocol"] == "tcp"
    }
    status = {
        s.labels["service"]: s.labels["status"]
        for s in m.get("bindscope_service_status", [])
        if s.value == 1
    }
    effective = {
        s.labels["service"]: s.labels["exposure"]
        for s in m.get("bindscope_service_effective_exposure", [])
        if s.value == 1
    }
    tally.rulesets += 1

    def check(what: str, reported: str | None, truth: str, port: int) -> None:
        tally.checks += 1
        if reported == "unknown":
            tally.unknown += 1
            if unknown_ok is None or port in unknown_ok:
                return
        elif reported == truth:
            tally.agree += 1
            return
        tally.disagreements.append(f"{name}: {what}: bindscope says {reported}, kernel {truth}")

    by_port: dict[int, list[str]] = {}
    for b in binds:
        truth = "accept" if any(answers[(a, b.port)] for a in b.reachable()) else "drop"
        reported = verdicts.get((b.address, b.port))
        check(f"{b.address}:{b.port} firewall", reported, truth, b.port)
        by_port.setdefault(b.port, []).append(reported or "missing")
    for port, reported_all in by_port.items():
        if "unknown" in reported_all:
            continue  # an unknown verdict counts as reachable: status and exposure follow it
        got_in = any(answers[(a, b.port)] for b in binds if b.port == port for a in b.reachable())
        check(f"p{port} status", status.get(f"p{port}"), "ok" if got_in else "blocked", port)
        check(
            f"p{port} effective exposure",
            effective.get(f"p{port}"),
            "private" if got_in else "loopback",
            port,
        )


def probe_all(
    probers: list[Agent], binds: Iterable[Bind], tally: Tally
) -> dict[tuple[str, int], bool]:
    """Every client connects to every (address, port) a listener takes, concurrently."""
    targets = sorted({(a, b.port) for b in binds for a in b.reachable()})
    answers = {t: False for t in targets}
    for prober in probers:
        prober.proc.stdin.write(json.dumps([list(t) for t in targets]) + "\n")  # type: ignore[union-attr]
        prober.proc.stdin.flush()  # type: ignore[union-attr]
    for prober in probers:
        outcomes = json.loads(prober.proc.stdout.readline())  # type: ignore[union-attr]
        tally.probes += len(targets)
        for t, o in zip(targets, outcomes, strict=True):
            answers[t] |= o == "ok"
    return answers
