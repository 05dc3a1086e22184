"""What the tests share besides fixtures: the exporter as a subprocess, parsed scrapes,
network namespaces, podman containers, waits, and the skip-or-fail rule for missing
prerequisites (outside CI a test that needs root or a binary skips with the reason; with
CI=true it fails, since CI installs everything: tests/run.sh).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


EXPORTER = [
    sys.executable,
    "-c",
    "import sys; from bindscope.cli.exporter import main; sys.exit(main())",
]


TOOL = [sys.executable, "-m", "bindscope.cli.tool"]


def unavailable(reason: str) -> None:
    """Skip outside CI; in CI a missing prerequisite is a failure."""
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces, other users' processes)")


def require_binary(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            unavailable(f"needs the {name} binary (tests/run.sh installs it as root)")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PICK = random.Random()  # its own stream: a test seeding `random` must not repeat ports


def free_port(family: int = socket.AF_INET) -> int:
    """A TCP port that no socket holds on any address, IPv4 or IPv6.

    Taken below the kernel's ephemeral range: a port the kernel hands to a socket bound
    to port 0 (or to an outgoing connection) in another process could otherwise be taken
    between this check and the test's own bind. `family` is kept for callers; the check
    covers both.
    """
    high = _ephemeral_low() - 1
    for _ in range(1000):
        port = _PICK.randint(10000, high)
        wildcard = ("::", port) if socket.has_ipv6 else ("0.0.0.0", port)
        with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
            if socket.has_ipv6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                s.bind(wildcard)
            except OSError:
                continue
            return port
    raise AssertionError("no free TCP port below the ephemeral range")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = ""):
    """Poll until predicate() is truthy; bounded in time. Returns its value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: {last}")


class Metrics:
    """A parsed scrape: look up samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def get(self, name: str, **labels: str) -> float | None:
        for s in self.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return None

    def all(self, name: str, **labels: str) -> list:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def status(self, service: str) -> str | None:
        for s in self.all("bindscope_service_status", service=service):
            if s.value == 1:
                return s.labels["status"]
        return None

    def exposure(self, service: str) -> str | None:
        for s in self.all("bindscope_service_exposure", service=service):
            if s.value == 1:
                return s.labels["exposure"]
        return None


class Exporter:
    """bindscope-exporter running as a subprocess on a loopback port."""

    def __init__(
        self,
        tmp: Path,
        config: str | None,
        extra_args: list[str] | None = None,
        prefix: list[str] | None = None,
        port: int | None = None,
        listen: str | None = None,
        base: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.listen = listen or f"127.0.0.1:{self.port}"
        self.config_path = None
        if config is not None:
            self.config_path = tmp / "bindscope.yml"
            self.config_path.write_text(config)
        args = [*(prefix or []), *EXPORTER, f"--web.listen-address={self.listen}"]
        if self.config_path is not None:
            args.append(f"--config.file={self.config_path}")
        args += extra_args or []
        if not any("published-ports" in a for a in args):
            # probes of published ports go to every DNAT target on the host, test
            # containers or not: only the container tests ask for them
            args.append("--no-collector.published-ports")
        self.log_path = tmp / f"exporter-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True
        )
        if base is None and listen is None:
            base = f"http://127.0.0.1:{self.port}"
        self.base = base

    def url(self, path: str) -> str:
        assert self.base is not None, "exporter not on 127.0.0.1; build the URL yourself"
        return self.base + path

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError):
                return self.get("/-/ready", timeout=1)[0] == 200
            return False

        wait_for(ready, timeout, what="exporter ready")

    def scrape(self) -> Metrics:
        code, body = self.get("/metrics")
        assert code == 200, body
        return Metrics(body)

    def wait_metrics(self, predicate, timeout: float = 10.0, what: str = "") -> Metrics:
        """Scrape until predicate(metrics) holds."""

        def attempt():
            m = self.scrape()
            return m if predicate(m) else None

        return wait_for(attempt, timeout, interval=0.1, what=what)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


class TwoHosts:
    """Namespaces "server" and "client" joined by a veth pair (documentation ranges).

    server: 198.51.100.1/24, 2001:db8::1/64; client: 198.51.100.2/24, 2001:db8::2/64.
    """

    SERVER4, CLIENT4 = "198.51.100.1", "198.51.100.2"
    SERVER6, CLIENT6 = "2001:db8::1", "2001:db8::2"

    _made = 0

    def __init__(self) -> None:
        # the creating pid is in the name, so a later run removes only what a dead run left
        TwoHosts._made += 1
        pid = os.getpid()
        self.server = f"bss-{pid}-{self._made}"
        self.client = f"bsc-{pid}-{self._made}"
        self._veth = f"bv{pid}x{self._made}"[:14]

    def create(self) -> None:
        run("ip", "netns", "add", self.server)
        run("ip", "netns", "add", self.client)
        run("ip", "link", "add", self._veth + "s", "type", "veth", "peer", "name", self._veth + "c")
        run("ip", "link", "set", self._veth + "s", "netns", self.server)
        run("ip", "link", "set", self._veth + "c", "netns", self.client)
        for ns, dev, v4, v6 in (
            (self.server, self._veth + "s", self.SERVER4, self.SERVER6),
            (self.client, self._veth + "c", self.CLIENT4, self.CLIENT6),
        ):
            self.exec(ns, "ip", "link", "set", "lo", "up")
            # no automatic fe80:: address: tests talk to the documentation ranges only
            self.exec(ns, "ip", "link", "set", "dev", dev, "addrgenmode", "none")
            self.exec(ns, "ip", "addr", "add", f"{v4}/24", "dev", dev)
            self.exec(ns, "ip", "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            self.exec(ns, "ip", "link", "set", dev, "up")

    def exec(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", ns, *args, check=check)

    def prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    @property
    def server_device(self) -> str:
        """The server's end of the veth pair."""
        return self._veth + "s"

    def delete(self) -> None:
        for ns in (self.server, self.client):
            # killing what still runs inside lets the namespace go away at once
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", self._veth + "s", check=False)

    def connect(self, address: str, port: int, timeout: float = 2.0, ns: str = "") -> str:
        """From the client namespace (or `ns`), as telnet does: 'ok' or the error."""
        code = (
            "import socket,sys\n"
            f"s=socket.create_connection(({address!r},{port}),timeout={timeout})\n"
            "s.close()\n"
        )
        r = run(
            "ip",
            "netns",
            "exec",
            ns or self.client,
            sys.executable,
            "-c",
            code,
            check=False,
            timeout=timeout + 10,
        )
        if r.returncode == 0:
            return "ok"
        return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc={r.returncode}"

    def fetch(self, url: str, timeout: float = 5.0) -> str:
        """GET a URL from inside the client namespace."""
        code = (
            "import urllib.request,sys\n"
            f"sys.stdout.write(urllib.request.urlopen({url!r},timeout={timeout})"
            ".read().decode())\n"
        )
        r = run(
            "ip", "netns", "exec", self.client, sys.executable, "-c", code, timeout=timeout + 10
        )
        return r.stdout


PODMAN = ["podman", "--runtime", "runc"]  # crun refuses this machine's hybrid cgroups


PODMAN_NETWORK = "bindscope-test"


PODMAN_SUBNET = "203.0.113.0/24"  # TEST-NET-3: the netns tests use 198.51.100.0/24


class Container:
    """A running test container: its name, id, a member pid and its address."""

    def __init__(self, name: str, cid: str, pid: int, ip: str) -> None:
        self.name, self.id, self.pid, self.ip = name, cid, pid, ip


class Podman:
    """Containers from the host's own root filesystem on the test network.

    Names are `bindscope-test-<pid>-<tag>`: a later run removes only what a dead run
    left. Every container started here is removed by close().
    """

    def __init__(self, network: str) -> None:
        self.network = network
        self.prefix = f"bindscope-test-{os.getpid()}-"
        self._started: list[str] = []

    def cmd(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        done = subprocess.run(
            [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def run(
        self,
        tag: str,
        command: list[str],
        publish: tuple[str, ...] = (),
        network: str | None = None,
    ) -> Container:
        """`network`: another podman --network, e.g. `container:NAME` to share its netns."""
        name = self.prefix + tag
        self._started.append(name)
        ports = [a for p in publish for a in ("-p", p)]
        cid = self.cmd(
            "run", "-d", "--name", name,
            # podman's default limits exceed the hard limit and there is no CAP_SYS_RESOURCE
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000",
            f"--network={network or self.network}", *ports, "--rootfs", "/:O", *command,
        )  # fmt: skip
        pid = int(self.cmd("inspect", "-f", "{{.State.Pid}}", name))
        ip = self.cmd(
            "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name
        )
        return Container(name, cid.splitlines()[-1], pid, ip)

    def remove(self, name: str) -> None:
        self.cmd("rm", "-f", "-t", "0", name, check=False)  # -t 0: no 10 s SIGTERM wait

    def close(self) -> None:
        # the last started first: a container sharing another's network namespace must go
        # before the one it joined, whose removal it would otherwise refuse
        for name in reversed(self._started):
            self.remove(name)

    def remove_leftovers(self) -> None:
        out = self.cmd("ps", "-a", "--filter", "name=^bindscope-test-", "--format", "{{.Names}}")
        for name in out.split():
            owner = name.split("-")[2]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                self.remove(name)


FIREWALL_FIXTURES = Path(__file__).parent / "fixtures" / "firewall"


def load_ruleset(name: str):
    """A recorded ruleset as read_ruleset leaves it: iptables-nft's tables taken from its
    own -save output (nft's JSON shows their extensions as opaque "xt")."""
    from bindscope.netfilter.iptables import parse_iptables_save
    from bindscope.netfilter.nft import parse_nft_json

    fix = FIREWALL_FIXTURES
    if name == "legacy":
        return parse_iptables_save(
            (fix / "legacy.save4").read_text(), (fix / "legacy.save6").read_text()
        )
    rs = parse_nft_json((fix / f"{name}.json").read_text())
    if (fix / f"{name}.save4").exists():
        saved = parse_iptables_save(
            (fix / f"{name}.save4").read_text(),
            (fix / f"{name}.save6").read_text(),
            backend="iptables-nft",
        )
        rs = rs.replace_tables(saved)
    return rs


def ufw_script(state: Path, args: list[str]) -> list[str]:
    """The command that runs ufw with its state in a private copy at `state`: the host's
    files, rules and sysctls are never touched (the copy's sysctl file is empty). Run it
    inside the namespace whose packet filter ufw is to write."""
    if not state.exists():
        state.mkdir()
        shutil.copytree("/etc/ufw", state / "etc-ufw", symlinks=True)
        shutil.copytree("/lib/ufw", state / "lib-ufw", symlinks=True)
        shutil.copytree("/etc/default", state / "etc-default", symlinks=True)
        (state / "sysctl.conf").write_text("")
        defaults = (state / "etc-default" / "ufw").read_text()
        (state / "etc-default" / "ufw").write_text(
            re.sub(r"(?m)^IPT_SYSCTL=.*$", f"IPT_SYSCTL={state / 'sysctl.conf'}", defaults)
        )
    mounts = " && ".join(
        f"mount --bind {state / src} {dst}"
        for src, dst in (
            ("etc-ufw", "/etc/ufw"),
            ("lib-ufw", "/lib/ufw"),
            ("etc-default", "/etc/default"),
        )
    )
    # `ip netns exec` already gives a mount namespace; unshare makes one this call owns
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f"{mounts} && ufw {' '.join(args)}",
    ]


FIREWALLD_READY_DEADLINE = 60.0  # seconds; it starts in about half a second here

# A private system bus: only root may connect, anyone on it may own any name (firewalld
# owns org.fedoraproject.FirewallD1), nothing is activated (no servicedir), and with no
# polkit on it firewalld authorizes its callers by uid 0.
_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# What the tests rely on, whatever the host's own firewalld.conf says: the package's
# defaults for the keys that shape the rules.
_FIREWALLD_CONF = {
    "DefaultZone": "public",
    "FirewallBackend": "nftables",
    "CleanupOnExit": "yes",  # SIGTERM removes its table: nothing outlives stop()
    "FlushAllOnReload": "yes",
    "IPv6_rpfilter": "yes",
    "IndividualCalls": "no",
    "LogDenied": "off",
    "Lockdown": "no",
}


class Firewalld:
    """A private firewalld inside the `ip netns` namespace `netns`, for tests.

    Its own dbus-daemon (a private system-bus config, its socket in a temporary
    directory; firewall-cmd reaches it through DBUS_SYSTEM_BUS_ADDRESS, `env`), and
    firewalld --nofork --nopid in a private mount namespace where /etc/firewalld is a copy
    in that directory, /run and /var/log are empty tmpfs (its temp dir, pid and log paths)
    and modprobe/rmmod are /bin/true (kernel modules are the host's). Both processes live in
    `netns`, so firewalld's rules and sysctls (ip_forward) are that namespace's alone.
    close() kills both and removes the directory; use it through `private_firewalld`.
    """

    def __init__(self, netns: str) -> None:
        self.netns = netns
        # under /tmp, not a test's tmp_path: a unix socket path has at most 107 bytes
        self.dir = Path(tempfile.mkdtemp(prefix="bs-firewalld-"))
        self.address = f"unix:path={self.dir / 'bus'}"
        self.env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}
        self.log_path = self.dir / "firewalld.log"
        self._bus: subprocess.Popen | None = None
        self._daemon: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def _in_netns(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]

    def _start_bus(self) -> None:
        conf = self.dir / "bus.conf"
        conf.write_text(_BUS_CONFIG.format(socket=self.dir / "bus"))
        self._bus = subprocess.Popen(
            self._in_netns("dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # it warns that it cannot raise its fd limit
            start_new_session=True,
        )
        wait_for(lambda: (self.dir / "bus").exists(), 10.0, what="the private D-Bus socket")

    def _fresh_config(self) -> Path:
        """The package's configuration as installed: firewalld.conf with the keys above,
        no zones, services or policies of the host's own."""
        etc = self.dir / "etc-firewalld"
        shutil.rmtree(etc, ignore_errors=True)
        etc.mkdir(mode=0o750)
        for sub in ("helpers", "icmptypes", "ipsets", "policies", "services", "zones"):
            (etc / sub).mkdir()
        for name in ("firewalld.conf", "lockdown-whitelist.xml"):
            if Path("/etc/firewalld", name).exists():
                shutil.copy2(Path("/etc/firewalld", name), etc / name)
        conf = (etc / "firewalld.conf").read_text() if (etc / "firewalld.conf").exists() else ""
        for key, value in _FIREWALLD_CONF.items():
            conf, n = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", conf)
            if not n:
                conf += f"{key}={value}\n"
        (etc / "firewalld.conf").write_text(conf)
        return etc

    def start(self) -> None:
        """firewalld from a fresh copy of the defaults (the last one's changes are gone),
        once it answers on the bus with state running."""
        self.stop()
        if self._bus is None or self._bus.poll() is not None:
            self._start_bus()
        etc = self._fresh_config()
        # the private mount namespace's mounts go away with firewalld; nothing is written
        # to the host's /etc, /run or /var/log
        script = " && ".join(
            [
                "mount -t tmpfs -o mode=0755 bs-firewalld-run /run",
                "mount -t tmpfs -o mode=0755 bs-firewalld-log /var/log",
                f"mount --bind {etc} /etc/firewalld",
                *(
                    f"mount --bind /bin/true {tool}"
                    for tool in ("/sbin/modprobe", "/sbin/rmmod")
                    if os.path.lexists(tool)
                ),
                "exec firewalld --nofork --nopid --log-target console",
            ]
        )
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
        self._daemon = subprocess.Popen(
            self._in_netns("unshare", "--mount", "--propagation", "private", "sh", "-c", script),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

        def running() -> bool:
            if self._daemon is None or self._daemon.poll() is not None:
                raise AssertionError(f"firewalld exited: {self.log()}")
            r = self.cmd("--state", check=False)
            return r.stdout.strip() == "running"

        wait_for(running, FIREWALLD_READY_DEADLINE, interval=0.1, what="firewalld running")

    def cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """firewall-cmd ARGS in the namespace, against this firewalld."""
        r = subprocess.run(
            self._in_netns("firewall-cmd", *args),
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        )
        if check and r.returncode != 0:
            raise RuntimeError(
                f"firewall-cmd {' '.join(args)}: exit {r.returncode}: "
                f"{(r.stderr or r.stdout).strip()}"
            )
        return r

    def shell(self, command: str) -> subprocess.CompletedProcess:
        """A command line as an admin would type it in that namespace (sh -c)."""
        return subprocess.run(
            self._in_netns("sh", "-c", command),
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
            check=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self._daemon is not None and self._daemon.poll() is None

    def stop(self) -> None:
        """firewalld only (its table goes with it: CleanupOnExit); the bus stays."""
        if self._daemon is not None:
            _end(self._daemon, timeout=30.0)
            self._daemon = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        if self._bus is not None:
            _end(self._bus, timeout=5.0)
            self._bus = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _end(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to its process group, SIGKILL if it outlives the timeout."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def private_firewalld(netns: str) -> Iterator[Firewalld]:
    """A started Firewalld in `netns`, closed however the block ends."""
    require_binary("firewalld", "firewall-cmd", "dbus-daemon", "unshare")
    fw = Firewalld(netns)
    try:
        fw.start()
        yield fw
    finally:
        fw.close()
