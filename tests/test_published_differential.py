"""Published-port verdicts against the kernel. Real podman containers on the test network
publish ports every way `-p` allows (`127.0.0.1:H:T`, `H:T`, `[::1]:H:T`, TCP and UDP,
consecutive ports, a host port equal to its target, several host ports to one target);
inside, a tiny server binds each target port one way (0.0.0.0, 127.0.0.1, `::` dual
stack, `::1`, `::` v6only, the container's own address, IPv4-mapped addresses, both
loopbacks, SO_BINDTODEVICE eth0 or lo, nothing) and answers every connection or datagram
with a banner naming the run and the port. A second container, where nothing listens,
publishes the same target port numbers.

The kernel's answer is whether the banner comes back, within a generous deadline:
(a) from the host's loopback to the published port, (b) from a peer namespace through a
veth to the host's address, (c) from the host to the target address:port (the path the
forwarded traffic takes), and (d) inside the container on its loopback. A connect alone
proves nothing: conmon holds every published port, and one it holds without forwarding
accepts the connection and never answers.

The exporter's answer is bindscope_published_port_status (and _info, _probe_success)
from a real exporter on the host; every disagreement fails, and the summary line
`published differential: ...` goes to stderr and $BINDSCOPE_DIFFERENTIAL_REPORT.

Traffic stays on loopback, the containers' 203.0.113.0/24 and the veth's 198.51.100.0/24.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import Exporter, Metrics, Podman, require_binary, require_root, run, wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(300)]

OWN = "own"
DEADLINE = 5.0  # seconds for a banner: ms on an idle machine, generous on a loaded one
TOKEN = f"bindscope-pd-{os.getpid()}"  # in every banner: an answer is this run's app's


@dataclass(frozen=True)
class Bind:
    """One socket of the app inside; `own` in the address stands for the container's
    address, which the server finds itself."""

    address: str
    v6only: bool = False
    device: str = ""  # SO_BINDTODEVICE

    @property
    def loopback(self) -> bool:
        """It takes packets from loopback alone: by its address, or by its device."""
        return self.device == "lo" or self.address in ("127.0.0.1", "::1", "::ffff:127.0.0.1")

    def answers_inside(self, lo: str) -> bool:
        """Whether a connect inside the container to `lo` (127.0.0.1 or ::1) reaches it,
        by the kernel's rules: the test's own check that the app bound what it says."""
        if self.device not in ("", "lo"):
            return False
        if lo == "::1":
            return self.address in ("::", "::1")
        return self.address in ("0.0.0.0", "127.0.0.1", "::ffff:127.0.0.1") or (
            self.address == "::" and not self.v6only
        )


@dataclass(frozen=True)
class Inside:
    """How the app inside binds one target port, the same for TCP and UDP."""

    tag: str
    binds: tuple[Bind, ...]

    @property
    def loopback_only(self) -> bool:
        return bool(self.binds) and all(b.loopback for b in self.binds)


INSIDE = (
    Inside("any4", (Bind("0.0.0.0"),)),
    Inside("lo4", (Bind("127.0.0.1"),)),  # app.run(): the Flask bug
    Inside("dual", (Bind("::"),)),  # IPv4 too: DNAT to the IPv4 address reaches it
    Inside("lo6", (Bind("::1", v6only=True),)),
    Inside("v6only", (Bind("::", v6only=True),)),  # IPv6 only: the IPv4 target is refused
    Inside("own", (Bind(OWN),)),
    Inside("mapped", (Bind(f"::ffff:{OWN}"),)),  # its own IPv4 address, on an IPv6 socket
    Inside("lo4mapped", (Bind("::ffff:127.0.0.1"),)),
    Inside("lo46", (Bind("127.0.0.1"), Bind("::1", v6only=True))),  # "localhost", both
    Inside("dev", (Bind("0.0.0.0", device="eth0"),)),  # what arrives on eth0: DNAT does
    Inside("devlo", (Bind("0.0.0.0", device="lo"),)),  # what arrives on lo alone
    Inside("none", ()),
)
BY_TAG = {i.tag: i for i in INSIDE}
NOTHING = BY_TAG["none"]
LOOPBACK = ("127.0.0.1", "::1")

# How a port is published: -p 127.0.0.1:H:T, -p H:T, -p [::1]:H:T, -p T:T. Podman takes
# [::1] on this IPv4-only network: conmon holds the port and nothing forwards it.
HOST_ADDRESS = {"lo": "127.0.0.1", "all": "0.0.0.0", "lo6": "::1", "same": "0.0.0.0"}


@dataclass(frozen=True)
class Case:
    """One published port, before its numbers are picked."""

    container: str  # "matrix" or "idle" (nothing listens in there)
    inside: str  # Inside.tag: which target port
    protocol: str
    column: str  # a HOST_ADDRESS key

    @property
    def id(self) -> str:
        return f"{self.container}-{self.inside}-{self.protocol}-{self.column}"


CASES = (
    *(
        Case("matrix", i.tag, proto, column)
        for i in INSIDE
        for proto, columns in (("tcp", ("lo", "all", "lo6")), ("udp", ("lo", "all")))
        for column in columns
    ),
    Case("matrix", "any4", "tcp", "same"),
    # the same target port numbers in a container where nothing listens: the verdict
    # must come from the target's own namespace, not from another with that port
    Case("idle", "any4", "tcp", "lo"),
    Case("idle", "any4", "tcp", "all"),
    Case("idle", "any4", "udp", "all"),
)


@dataclass(frozen=True)
class Port:
    case: Case
    container: str  # the container's name
    target_address: str
    host_port: int
    target_port: int

    @property
    def host_address(self) -> str:
        return HOST_ADDRESS[self.case.column]

    @property
    def publish(self) -> str:
        host = {"lo": "127.0.0.1:", "lo6": "[::1]:"}.get(self.case.column, "")
        return f"{host}{self.host_port}:{self.target_port}/{self.case.protocol}"


# ---- the app inside and the prober, each a python3 -c program ----

SERVER = r"""
import json, socket, sys, threading
token, specs = sys.argv[1], json.loads(sys.argv[2])
# the address the container's route to its network leaves from (a UDP connect sends nothing)
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect(("203.0.113.254", 9))
own = probe.getsockname()[0]
probe.close()

def tcp(s, banner):
    while True:
        c, _ = s.accept()
        try:
            c.sendall(banner)
        except OSError:
            pass
        c.close()

def udp(s, banner):
    while True:
        _, peer = s.recvfrom(2048)
        s.sendto(banner, peer)

for proto, address, port, v6only, device in specs:
    address = address.replace("own", own)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    if device:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    s.bind((address, port))
    banner = f"{token} {proto} {port}\n".encode()
    if proto == "tcp":
        s.listen(64)
    threading.Thread(target=tcp if proto == "tcp" else udp, args=(s, banner), daemon=True).start()
print("ready", own, flush=True)
threading.Event().wait()
"""

PROBER = r"""
import json, socket, sys, time
from concurrent.futures import ThreadPoolExecutor
token, deadline, targets = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])

def one(target):
    proto, address, port, app_port = target
    want = f"{token} {proto} {app_port}\n".encode()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    end = time.monotonic() + deadline
    if proto == "tcp":
        try:
            s = socket.create_connection((address, port), timeout=deadline)
        except OSError as e:
            return type(e).__name__
        got = b""
        with s:
            try:
                while not got.endswith(b"\n") and time.monotonic() < end:
                    s.settimeout(max(0.01, end - time.monotonic()))
                    chunk = s.recv(256)
                    if not chunk:
                        return "connected, then EOF" if not got else f"answer {got!r}"
                    got += chunk
            except OSError as e:
                return f"connected, then {type(e).__name__}"
        return "answered" if got == want else f"answer {got!r}"
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((address, port))
        # three datagrams over the deadline: one may be lost while a neighbour resolves
        for i in range(3):
            try:
                s.send(b"?")
                s.settimeout(max(0.01, (end - time.monotonic()) / (3 - i)))
                got = s.recv(256)
                return "answered" if got == want else f"answer {got!r}"
            except TimeoutError:
                continue
            except OSError as e:
                return type(e).__name__
        return "no answer"

with ThreadPoolExecutor(64) as pool:
    print(json.dumps(list(pool.map(one, targets))))
"""


Target = tuple[str, str, int, int]  # protocol, address, port, the app's port: its banner


def _probe_from(prefix: list[str], targets: list[Target]) -> subprocess.Popen:
    """The prober started under `prefix` (ip netns exec, nsenter, or nothing)."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", PROBER, TOKEN, str(DEADLINE), json.dumps(targets)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _outcomes(proc: subprocess.Popen, targets: list[Target]) -> dict[Target, str]:
    try:
        out, err = proc.communicate(timeout=DEADLINE + 60)
    finally:
        if proc.poll() is None:  # timed out or interrupted: no prober outlives the test
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return dict(zip(targets, json.loads(out), strict=True))


# ---- free ports: blocks of consecutive ones, so podman writes range rules ----


def _free(port: int) -> bool:
    """Free for TCP and UDP on every address of both families (conmon takes both)."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET6, kind) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                s.bind(("::", port))
            except OSError:
                return False
    return True


def _blocks(sizes: list[int]) -> list[list[int]]:
    """Disjoint runs of consecutive free ports below the ephemeral range."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        high = int(f.read().split()[0]) - 1
    taken: set[int] = set()
    out = []
    pick = random.Random()
    for size in sizes:
        for _ in range(1000):
            first = pick.randint(10000, high - size)
            block = list(range(first, first + size))
            # one port apart from other blocks too: podman must not merge two of them
            near = {p + d for p in block for d in (-1, 0, 1)}
            if not near & taken and all(_free(p) for p in block):
                taken |= set(block)
                out.append(block)
                break
        else:
            raise AssertionError(f"no {size} consecutive free ports")
    return out


def _allocate() -> list[Port]:
    """Host and target port numbers for every case. The targets are one block, free on
    the host too (`same` publishes a target port as its own host port); each `lo` column
    is one block of host ports, so netavark writes a single range rule for it
    (`--dport H:H+7 -j DNAT --to-destination IP:T-T+7/H`); every other host port stands
    apart, so its rule stays a single-port one."""
    n = len(INSIDE)
    columns = sorted({(c.protocol, c.column) for c in CASES if c.column != "same"})
    wanted: list[tuple[object, int]] = [("targets", n)]
    for proto, column in columns:
        if column == "lo":
            wanted.append(((proto, column), n))
        else:
            wanted += [((proto, column, i.tag), 1) for i in INSIDE]
    wanted += [(c, 1) for c in CASES if c.container == "idle"]
    blocks = dict(zip((k for k, _ in wanted), _blocks([n for _, n in wanted]), strict=True))
    targets = dict(zip((i.tag for i in INSIDE), blocks["targets"], strict=True))
    order = [i.tag for i in INSIDE]

    def host(c: Case) -> int:
        if c.container == "idle":
            return blocks[c][0]
        if c.column == "same":
            return targets[c.inside]
        if c.column == "lo":
            return blocks[(c.protocol, "lo")][order.index(c.inside)]
        return blocks[(c.protocol, c.column, c.inside)][0]

    return [Port(c, "", "", host(c), targets[c.inside]) for c in CASES]


# ---- the peer namespace: another host reaching this one through a veth ----


@contextlib.contextmanager
def peer_namespace() -> Iterator[tuple[list[str], str]]:
    """A namespace joined to the host by a veth: the host's end 198.51.100.H/32 and the
    peer's .H+1/32, point to point (the host gains one address and one route, for as long
    as the probes take). Yields (command prefix, the host's address)."""
    pid = os.getpid()
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = name.removeprefix("bsp-")
        if owner != name and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            run("ip", "netns", "del", name, check=False)  # a killed run's; its veth goes too
    ns, host_end, peer_end = f"bsp-{pid}", f"bsp{pid}h"[:15], f"bsp{pid}p"[:15]
    low = 160 + 2 * (pid % 40)  # two runs at once (other worktrees) pick other addresses
    host4, peer4 = f"198.51.100.{low}", f"198.51.100.{low + 1}"
    try:
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", peer_end, "netns", ns)
        run("ip", "link", "set", host_end, "addrgenmode", "none")  # no fe80:: on the host
        run("ip", "addr", "add", f"{host4}/32", "peer", f"{peer4}/32", "dev", host_end)
        run("ip", "link", "set", host_end, "up")
        for cmd in (
            "ip link set lo up",
            f"ip link set {peer_end} addrgenmode none",
            f"ip addr add {peer4}/32 peer {host4}/32 dev {peer_end}",
            f"ip link set {peer_end} up",
        ):
            run("ip", "netns", "exec", ns, *cmd.split())
        yield ["ip", "netns", "exec", ns], host4
    finally:
        run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", host_end, check=False)


# ---- the comparison ----


@dataclass
class Tally:
    ports: int = 0
    probes: int = 0
    verdicts: int = 0
    agree: int = 0
    unknown: int = 0
    disagreements: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def check(self, case: Case, ok: bool | None, what: str) -> None:
        """One verdict compared: True agree, False disagree, None unknown (said why)."""
        self.verdicts += 1
        if ok is None:
            self.unknown += 1
            self.notes.setdefault(case.id, []).append(what)
        elif ok:
            self.agree += 1
        else:
            self.disagreements.setdefault(case.id, []).append(what)

    def line(self) -> str:
        d = sum(len(v) for v in self.disagreements.values())
        return (
            f"published differential: {self.ports} ports, {self.probes} probes, "
            f"{self.verdicts} verdicts: {self.agree} agree, {self.unknown} unknown, {d} disagree"
        )


def report(tally: Tally) -> None:
    line = tally.line()
    sys.stderr.write(f"\n{line}\n")
    out = os.environ.get("BINDSCOPE_DIFFERENTIAL_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


@dataclass
class Kernel:
    """What the probes got, per published port and per target."""

    loopback: dict[Port, str]  # (a)
    peer: dict[Port, str]  # (b), where the publish address is one the peer can reach
    target: dict[tuple[str, str, int], str]  # (c) (protocol, address, port)
    inside: dict[tuple[str, str, str, int], str]  # (d) (container, protocol, lo address, port)


def expected(port: Port, inside: Inside, k: Kernel) -> str | None:
    """The status the kernel's answers call for; None when they fit none of the three
    (the target answers but the published port does not: nothing forwards it)."""
    a = k.loopback[port] == "answered"
    b = port.host_address != "0.0.0.0" or k.peer[port] == "answered"  # every address: peers too
    c = k.target[(port.case.protocol, port.target_address, port.target_port)] == "answered"
    if a and b and c:
        return "ok"
    if c:
        return None
    on_loopback = any(
        k.inside[(port.container, port.case.protocol, lo, port.target_port)] == "answered"
        for lo in LOOPBACK
    )
    # the app listens inside, on loopback alone: bound there, and the kernel answers there
    return "loopback_only" if inside.loopback_only and on_loopback else "not_listening"


def inside_of(port: Port) -> Inside:
    """What the app binds on the port's target: the idle container binds nothing."""
    return BY_TAG[port.case.inside] if port.case.container == "matrix" else NOTHING


def status_of(m: Metrics, port: Port) -> str | None:
    for s in m.all(
        "bindscope_published_port_status",
        container=port.container,
        protocol=port.case.protocol,
        host_port=str(port.host_port),
    ):
        if s.value == 1:
            return s.labels["status"]
    return None


def compare(port: Port, inside: Inside, k: Kernel, m: Metrics, tally: Tally) -> None:
    case = port.case
    got = status_of(m, port)
    want = expected(port, inside, k)
    # forwarded, by the kernel's word: the app answered, or (TCP) the host port refused,
    # which conmon, holding it, never does: the refusal came from the target namespace
    forwarded = (
        k.loopback[port] == "answered"
        or k.peer.get(port) == "answered"
        or (case.protocol == "tcp" and k.loopback[port] == "ConnectionRefusedError")
    )
    facts = (
        f"kernel: loopback {k.loopback[port]}, peer {k.peer.get(port, '-')}, target "
        f"{k.target[(case.protocol, port.target_address, port.target_port)]}; "
        f"exporter: {got}, expected {want}"
    )
    if got is None:
        # no series: right only where nothing forwards the port (no NAT rule to read)
        what = "no verdict for a forwarded port" if forwarded else "no verdict, not forwarded"
        tally.check(case, None if not forwarded else False, f"{what}; {facts}")
        return
    if want is None:
        tally.check(case, None if got != "ok" else False, f"kernel undecided; {facts}")
    else:
        tally.check(case, got == want, f"status; {facts}")
    info = m.get(
        "bindscope_published_port_info",
        container=port.container,
        protocol=case.protocol,
        host_address=port.host_address,
        host_port=str(port.host_port),
        target_address=port.target_address,
        target_port=str(port.target_port),
    )
    tally.check(case, info == 1, f"info {port.host_address}:{port.host_port} -> target; {facts}")
    if port.host_address == "127.0.0.1" and k.loopback[port] == "answered":
        # published on loopback: the kernel must keep the peer out, as the info label says
        tally.check(case, k.peer[port] != "answered", f"peer reached a loopback port; {facts}")
    if case.protocol == "tcp":
        # the exporter's connect to the target (a connect alone: no proxy in that path)
        probe = m.get(
            "bindscope_published_port_probe_success",
            container=port.container,
            host_port=str(port.host_port),
            target_address=port.target_address,
            target_port=str(port.target_port),
        )
        c = k.target[(case.protocol, port.target_address, port.target_port)] == "answered"
        tally.check(case, probe == float(c), f"probe_success {probe}; {facts}")


# ---- the lab ----


@dataclass(repr=False)  # a failing test shows its own case, not the whole lab
class Lab:
    ports: list[Port]
    kernel: Kernel
    metrics: Metrics
    tally: Tally


def _start_containers(podman: Podman, ports: list[Port]) -> dict[str, tuple[str, str, int]]:
    """Both containers, each with its ports published; tag -> (name, address, a member
    pid), once its app has bound every port."""
    made: dict[str, tuple[str, str, int]] = {}
    for tag in ("matrix", "idle"):
        mine = [p for p in ports if p.case.container == tag]
        targets = sorted({(p.case.inside, p.target_port) for p in mine})
        # the idle container runs the same app with nothing to bind
        specs = [
            [proto, b.address, port, b.v6only, b.device]
            for name, port in targets
            for b in BY_TAG[name].binds
            for proto in ("tcp", "udp")
            if tag == "matrix"
        ]
        ctr = podman.run(
            f"pd-{tag}",
            ["python3", "-c", SERVER, TOKEN, json.dumps(specs)],
            publish=tuple(p.publish for p in mine),
        )

        def ready(name: str = ctr.name) -> str:
            logs = podman.cmd("logs", name)
            assert "Traceback" not in logs, logs
            return logs if "ready" in logs else ""

        logs = wait_for(ready, 30, 0.2, f"{ctr.name}'s app")
        assert logs.split()[-1] == ctr.ip, (logs, ctr.ip)  # it found its own address
        made[tag] = (ctr.name, ctr.ip, ctr.pid)
    return made


def _kernel(ports: list[Port], pids: dict[str, int], tally: Tally) -> Kernel:
    """Every probe at once: from the host, from the peer, inside each container."""
    loopback: dict[Port, Target] = {
        p: (p.case.protocol, "::1" if p.host_address == "::1" else "127.0.0.1", p.host_port,
            p.target_port)
        for p in ports
    }  # fmt: skip
    direct = sorted({(p.case.protocol, p.target_address, p.target_port) for p in ports})
    inside = sorted(
        {(p.container, p.case.protocol, lo, p.target_port) for p in ports for lo in LOOPBACK}
    )
    with peer_namespace() as (prefix, host4):
        # the peer cannot address the host's ::1
        peer: dict[Port, Target] = {
            p: (p.case.protocol, host4, p.host_port, p.target_port)
            for p in ports
            if p.host_address != "::1"
        }
        batches: dict[str, list[Target]] = {
            "host": [*loopback.values(), *((*t, t[2]) for t in direct)],
            "peer": list(peer.values()),
        }
        for name in pids:
            batches[name] = [(pr, lo, pt, pt) for c, pr, lo, pt in inside if c == name]
        running = {
            name: _probe_from(
                [] if name == "host" else prefix if name == "peer" else
                ["nsenter", "-t", str(pids[name]), "-n"],
                targets,
            )
            for name, targets in batches.items()
        }  # fmt: skip
        try:
            got = {name: _outcomes(running[name], t) for name, t in batches.items()}
        finally:
            for proc in running.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    tally.probes = sum(len(t) for t in batches.values())
    return Kernel(
        loopback={p: got["host"][t] for p, t in loopback.items()},
        peer={p: got["peer"][t] for p, t in peer.items()},
        target={t: got["host"][(*t, t[2])] for t in direct},
        inside={(c, pr, lo, pt): got[c][(pr, lo, pt, pt)] for c, pr, lo, pt in inside},
    )


def _config(addresses: list[str]) -> str:
    listed = ", ".join(["127.0.0.1", "'::1'", *addresses])
    # the containers' addresses listed: only their published targets are probed
    return f"scan_interval: 1s\nprobe: {{addresses: [{listed}], timeout: 5s}}\n"


def _scrape_when_seen(exp: Exporter, ports: list[Port], matrix: str) -> Metrics:
    """The first scrape whose scan saw both containers: every socket of the matrix app
    among the listeners, and a published port of each container."""
    sockets = 2 * sum(len(i.binds) for i in INSIDE)
    names = {p.container for p in ports}

    def seen(m: Metrics) -> bool:
        mine = m.all("bindscope_listener_info", container=matrix)
        return len(mine) >= sockets and all(
            m.all("bindscope_published_port_info", container=n) for n in names
        )

    try:
        return exp.wait_metrics(seen, timeout=60, what="both containers in a scan")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{exp.log()[-3000:]}") from None


@pytest.fixture(scope="module")
def lab(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    require_binary("ip", "nsenter")
    tally = Tally()
    exp = None
    try:
        allocated = _allocate()
        made = _start_containers(podman, allocated)
        ports = [
            dataclasses.replace(p, container=made[p.case.container][0],
                                target_address=made[p.case.container][1])
            for p in allocated
        ]  # fmt: skip
        tally.ports = len(ports)
        kernel = _kernel(ports, {name: pid for name, _, pid in made.values()}, tally)
        exp = Exporter(
            tmp_path_factory.mktemp("published"),
            _config([ip for _, ip, _ in made.values()]),
            ["--collector.listeners.max=0", "--collector.published-ports"],
        )
        exp.wait_ready(timeout=60)
        metrics = _scrape_when_seen(exp, ports, made["matrix"][0])
        for p in ports:
            compare(p, inside_of(p), kernel, metrics, tally)
        yield Lab(ports, kernel, metrics, tally)
    finally:
        if exp is not None:
            exp.stop()
        for case_id, notes in sorted(tally.notes.items()):
            for note in notes:
                sys.stderr.write(f"\nunknown {case_id}: {note}")
        report(tally)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_published_verdict_is_the_kernels(lab: Lab, case: Case) -> None:
    bad = lab.tally.disagreements.get(case.id, [])
    assert not bad, "\n".join(bad)


def test_the_lab_saw_what_it_built(lab: Lab) -> None:
    """The tables above would pass vacuously if the apps had not bound what they say:
    inside each container the kernel answers on loopback exactly where a bind covers it,
    and the matrix holds every status."""
    for p in lab.ports:
        for lo in LOOPBACK:
            want = any(b.answers_inside(lo) for b in inside_of(p).binds)
            got = lab.kernel.inside[(p.container, p.case.protocol, lo, p.target_port)]
            assert (got == "answered") is want, (p.case.id, lo, got)
    statuses = {expected(p, inside_of(p), lab.kernel) for p in lab.ports}
    assert {"ok", "loopback_only", "not_listening"} <= statuses, statuses


def test_the_lab_has_netavark_range_rules(lab: Lab) -> None:
    """Consecutive mappings are one rule, `--dport H:H+n -j DNAT --to-destination
    IP:T-T+n/H`: the `lo` columns must have exercised that shape where netavark writes
    iptables rules (podman 4); a native nftables backend writes other shapes."""
    saved = run("iptables-save", "-t", "nat", check=False).stdout
    if "NETAVARK" not in saved:
        pytest.skip("netavark writes no iptables rules here: no range rule to look for")
    matrix = [p for p in lab.ports if p.case.container == "matrix" and p.case.column == "lo"]
    for proto in ("tcp", "udp"):
        mine = sorted((p for p in matrix if p.case.protocol == proto), key=lambda p: p.host_port)
        first, last = mine[0], mine[-1]
        shape = (
            f"--dport {first.host_port}:{last.host_port} -j DNAT --to-destination "
            f"{first.target_address}:{first.target_port}-{last.target_port}/{first.host_port}"
        )
        assert shape in saved, (proto, shape)
