"""The container image, built for real from the Containerfile on a Debian base made here
(no image registry needed) and run as docs/install.md says: the host's network and PID
namespaces, the documented capabilities, a non-root user; and as the DaemonSet runs it.

The base's root filesystem is cached under /var/cache/bindscope-tests/, keyed on the
mmdebstrap inputs, and podman's layer cache keeps the apt layer: a second run rebuilds only
the layers that hold the exporter's code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from support import (
    PODMAN,
    REPO,
    Metrics,
    free_port,
    require_binary,
    require_root,
    run,
    wait_for,
)

import bindscope

CACHE = Path("/var/cache/bindscope-tests")
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# minbase: what debian:bookworm-slim is made from, the Containerfile's default base.
MMDEBSTRAP = ("mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", SUITE)
BASE_REPO = "localhost/bindscope-test-base"
# One tag per checkout: suites of two checkouts running at once keep their own images.
IMAGE = "localhost/bindscope-test-image:" + hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
# The host's trust store: on a machine behind a TLS-inspecting proxy it holds the proxy's
# CA, which pip in the build needs to reach PyPI.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_UID = 65532
# Capability bits (linux/capability.h) of what docs/install.md grants, per feature.
ATTRIBUTION = {"SYS_PTRACE": 19, "DAC_READ_SEARCH": 2}
EVERY_FEATURE = ATTRIBUTION | {"SYS_ADMIN": 21, "NET_ADMIN": 12, "NET_RAW": 13}
NETNS_ADDRESS = "198.51.100.1"
NAME_PREFIX = f"bindscope-test-{os.getpid()}-image"
NETNS = f"bsi-{os.getpid()}"
INSTALL_DOC = REPO / "docs" / "install.md"

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _podman(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout.strip()


def _image_id(name: str) -> str:
    done = run(*PODMAN, "image", "inspect", "-f", "{{.Id}}", name, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def _base_image() -> str:
    """A Debian minbase image imported from a cached mmdebstrap tarball."""
    key = hashlib.sha256(json.dumps([MMDEBSTRAP, MIRRORS]).encode()).hexdigest()[:16]
    tag = f"{BASE_REPO}:{key}"
    if _image_id(tag):
        return tag
    tarball = CACHE / f"debian-{SUITE}-{key}.tar"
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        # written aside and renamed, so a killed run never leaves a truncated cache entry
        partial = tarball.with_name(f"{tarball.name}.{os.getpid()}.part")
        try:
            done = run(*MMDEBSTRAP, str(partial), *MIRRORS, check=False, timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
            os.replace(partial, tarball)
        finally:
            partial.unlink(missing_ok=True)
    _podman("import", str(tarball), tag, timeout=600)
    return tag


_NETWORK_ERRORS = (
    "No route to host",
    "Temporary failure in name resolution",
    "Connection refused",
    "Connection reset",
    "timed out",
    "Could not connect",
)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    require_root()
    require_binary("podman", "runc", "mmdebstrap", "ip", "nft")
    base = _base_image()
    previous = _image_id(IMAGE)
    log = tmp_path_factory.mktemp("image") / "build.log"
    # --network=host: apt and pip reach the package registries without podman's default
    # network; --layers: the cache that keeps a rebuild to the changed layers.
    args = [*PODMAN, "build", "--network=host", "--layers", "--build-arg", f"BASE={base}"]
    if HOST_CA.exists():
        args += ["-v", f"{HOST_CA}:/run/build-ca.crt:ro"]
        args += ["--build-arg", "PIP_CERT=/run/build-ca.crt"]
    args += ["-t", IMAGE, "-f", str(REPO / "Containerfile"), str(REPO)]
    # apt and pip inside the build reach the package registries: a connection that
    # fails on the way is tried again (at most three builds), any other failure is final
    for attempt in range(3):
        with log.open("wb") as out:
            done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=900)
        text = log.read_text(errors="replace")
        if done.returncode == 0 or not any(e in text for e in _NETWORK_ERRORS) or attempt == 2:
            break
        time.sleep(10)
    assert done.returncode == 0, text[-4000:]
    current = _image_id(IMAGE)
    if previous and previous != current:
        # the last build, untagged now; the layers it shares with this one stay cached
        run(*PODMAN, "rmi", previous, check=False)
    # by id: what this build made, even if the tag moves meanwhile
    return current


def _listener(prefix: list[str]) -> tuple[subprocess.Popen, int]:
    """A process listening on 0.0.0.0 (inside `prefix`'s namespace), and its port."""
    code = (
        "import signal, socket, sys\n"
        "s = socket.socket()\n"
        "s.bind(('0.0.0.0', 0))\n"
        "s.listen()\n"
        "print(s.getsockname()[1], flush=True)\n"
        "signal.pause()\n"
    )
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _delete_netns(name: str) -> None:
    for pid in run("ip", "netns", "pids", name, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    run("ip", "netns", "del", name, check=False)


def _remove_leftovers() -> None:
    """Containers and namespaces a killed earlier run of this module left behind."""
    names = _podman("ps", "-a", "--filter", "name=^bindscope-test-", "--format", "{{.Names}}")
    for name in names.split():
        owner = name.split("-")[2]
        ours = "-image-" in name and owner.isdigit()
        if ours and not Path(f"/proc/{owner}").exists():
            run(*PODMAN, "rm", "-f", "-t", "0", name, check=False)
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = name.removeprefix("bsi-")
        if name.startswith("bsi-") and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _delete_netns(name)


class Scene:
    """A listener on the host and one in a named namespace whose firewall drops its port."""

    def __init__(
        self, host: subprocess.Popen, host_port: int, ns: subprocess.Popen, ns_port: int,
        legacy_port: int,
    ) -> None:  # fmt: skip
        self.host, self.host_port, self.ns, self.ns_port = host, host_port, ns, ns_port
        self.legacy_port = legacy_port  # dropped by a legacy iptables table, not nftables

    @staticmethod
    def comm(proc: subprocess.Popen) -> str:
        return Path(f"/proc/{proc.pid}/comm").read_text().strip()


@pytest.fixture(scope="module")
def scene(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    _remove_leftovers()
    procs: list[subprocess.Popen] = []
    try:
        run("ip", "netns", "add", NETNS)
        ns = ["ip", "-n", NETNS]
        run(*ns, "link", "set", "lo", "up")
        # an address beyond loopback, so the namespace's listener is one a firewall guards;
        # a veth pair with both ends inside, as this kernel has no dummy interfaces
        run(*ns, "link", "add", "bsi0", "type", "veth", "peer", "name", "bsi1")
        run(*ns, "addr", "add", f"{NETNS_ADDRESS}/24", "dev", "bsi0")
        run(*ns, "link", "set", "bsi0", "up")
        run(*ns, "link", "set", "bsi1", "up")
        host, host_port = _listener([])
        procs.append(host)
        inside, ns_port = _listener(["ip", "netns", "exec", NETNS])
        procs.append(inside)
        ruleset = tmp_path_factory.mktemp("nft") / "drop.nft"
        ruleset.write_text(
            "table inet bindscope_test {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            f"    tcp dport {ns_port} drop\n"
            "  }\n"
            "}\n"
        )
        run("ip", "netns", "exec", NETNS, "nft", "-f", str(ruleset))
        # legacy tables beside nftables, as on a host an old tool still writes: reading
        # them takes a raw socket (CAP_NET_RAW), which the documented set must grant
        legacy, legacy_port = _listener(["ip", "netns", "exec", NETNS])
        procs.append(legacy)
        run("ip", "netns", "exec", NETNS, "iptables-legacy", "-A", "INPUT", "-p", "tcp",
            "--dport", str(legacy_port), "-j", "DROP")  # fmt: skip
        yield Scene(host, host_port, inside, ns_port, legacy_port)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        _delete_netns(NETNS)


def _scrape(port: int) -> Metrics:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return Metrics(r.read().decode())


class Running:
    def __init__(self, name: str, port: int, pid: int) -> None:
        self.name, self.port, self.pid = name, port, pid

    def status(self) -> dict[str, str]:
        lines = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        return dict(line.split(":\t", 1) for line in lines if ":\t" in line)

    def listens(self) -> bool:
        """Whether the container's exporter holds the port: another process on a port that
        was free a moment ago would answer the scrape in its place."""
        conns = psutil.Process(self.pid).net_connections(kind="tcp")
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns)

    def logs(self) -> str:
        return run(*PODMAN, "logs", self.name, check=False).stderr[-3000:]


@pytest.fixture
def exporter_image(image: str, shared_dir: Path) -> Iterator:
    """Factory: run the image as docs/install.md does, with `caps`; removed at the end."""
    # Probes only to loopback: published-port targets elsewhere on the host are not ours.
    config = shared_dir / "bindscope.yml"
    config.write_text("scan_interval: 1s\nprobe:\n  addresses: ['127.0.0.1']\n")
    config.chmod(0o644)
    started: list[str] = []

    def start(tag: str, caps: list[str], command: list[str] | None = None) -> Running:
        """`command`: an entrypoint and its arguments instead of the image's own, run as
        uid 0 (the image's user otherwise)."""
        name = f"{NAME_PREFIX}-{tag}"
        port = free_port()
        started.append(name)
        listen = f"--web.listen-address=127.0.0.1:{port}"
        if command is None:
            entry = [image, "--config.file=/etc/bindscope/bindscope.yml", listen]
        else:
            args = [listen if a.startswith("--web.listen-address=") else a for a in command[1:]]
            entry = ["--user", "0", "--entrypoint", command[0], image, *args]
        _podman(
            "run", "-d", "--name", name,
            # podman's default limits exceed the hard limit and there is no CAP_SYS_RESOURCE
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000",
            "--net=host", "--pid=host", "--cap-drop=ALL",
            *(f"--cap-add={c}" for c in caps),
            "--read-only", "--security-opt", "no-new-privileges",
            "-v", f"{config}:/etc/bindscope/bindscope.yml:ro",
            "-v", "/run/netns:/run/netns:ro",
            *entry,
        )  # fmt: skip
        pid = int(_podman("inspect", "-f", "{{.State.Pid}}", name))
        return Running(name, port, pid)

    yield start
    for name in started:
        run(*PODMAN, "rm", "-f", "-t", "0", name, check=False)


def _wait_scan(running: Running, scene: Scene) -> Metrics:
    """The first scrape that shows both of the scene's listeners."""

    def seen() -> Metrics | None:
        with contextlib.suppress(OSError):
            m = _scrape(running.port)
            ports = {s.labels["port"] for s in m.all("bindscope_listener_info")}
            if {str(scene.host_port), str(scene.ns_port), str(scene.legacy_port)} <= ports:
                return m
        return None

    try:
        metrics = wait_for(seen, timeout=60, interval=0.2, what="a scan with both listeners")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{running.logs()}") from None
    assert running.listens(), running.logs()
    return metrics


def _verdict(m: Metrics, netns: str, port: int) -> str:
    (sample,) = m.all("bindscope_listener_firewall_info", netns=netns, port=str(port))
    return sample.labels["verdict"]


def test_the_documented_run_grants_what_these_tests_grant() -> None:
    doc = INSTALL_DOC.read_text()
    every = doc[doc.index("Every feature, with container namespaces") :]
    run_block = every[: every.index("bindscope:0.1.0")]
    assert {c for c in EVERY_FEATURE if f"--cap-add={c}" in run_block} == set(EVERY_FEATURE)
    for flag in ("--net=host", "--pid=host", "--cap-drop=ALL", "--read-only",
                 "-v /run/netns:/run/netns:ro", "no-new-privileges"):  # fmt: skip
        assert flag in run_block


def test_every_feature_with_the_documented_capabilities(exporter_image, scene: Scene) -> None:
    running = exporter_image("full", list(EVERY_FEATURE))
    m = _wait_scan(running, scene)
    assert m.get("bindscope_build_info", version=bindscope.__version__) == 1
    assert m.get("bindscope_scan_success") == 1
    # attribution of another user's processes, in the host's namespace and in another one
    host = m.all("bindscope_listener_info", netns="host", port=str(scene.host_port))
    assert [s.labels["process"] for s in host] == [Scene.comm(scene.host)]
    inside = m.all("bindscope_listener_info", netns=NETNS, port=str(scene.ns_port))
    assert [s.labels["process"] for s in inside] == [Scene.comm(scene.ns)]
    # nft in the image reads both namespaces' rulesets
    assert _verdict(m, NETNS, scene.ns_port) == "drop"
    assert _verdict(m, NETNS, scene.legacy_port) == "drop"
    assert _verdict(m, "host", scene.host_port) in ("accept", "drop")
    for source in ("firewall", "nat"):
        assert m.get("bindscope_scan_errors_total", source=source) == 0, running.logs()


def test_runs_as_non_root_with_exactly_the_granted_capabilities(exporter_image, scene) -> None:
    running = exporter_image("full", list(EVERY_FEATURE))
    _wait_scan(running, scene)
    status = running.status()
    assert status["Uid"].split() == [str(IMAGE_UID)] * 4
    assert status["Gid"].split() == [str(IMAGE_UID)] * 4
    assert int(status["CapEff"], 16) == sum(1 << bit for bit in EVERY_FEATURE.values())
    assert status["NoNewPrivs"] == "1"


def test_without_net_admin_the_verdict_is_unknown(exporter_image, scene: Scene) -> None:
    running = exporter_image("attribution", list(ATTRIBUTION))
    m = _wait_scan(running, scene)
    host = m.all("bindscope_listener_info", netns="host", port=str(scene.host_port))
    assert [s.labels["process"] for s in host] == [Scene.comm(scene.host)]
    assert _verdict(m, "host", scene.host_port) == "unknown"


def test_without_net_raw_legacy_tables_are_unknown_and_counted(exporter_image, scene) -> None:
    caps = [c for c in EVERY_FEATURE if c != "NET_RAW"]
    running = exporter_image("no-net-raw", caps)
    m = _wait_scan(running, scene)
    # what the unread tables do (a DNAT ahead of nftables' drop, say) is not known: every
    # verdict of that namespace is unknown, never half a ruleset's answer
    assert _verdict(m, NETNS, scene.ns_port) == "unknown"
    assert _verdict(m, NETNS, scene.legacy_port) == "unknown"
    assert m.get("bindscope_scan_errors_total", source="firewall") >= 1


def test_daemonset_command_drops_to_non_root_in_the_image(exporter_image, scene: Scene) -> None:
    # Kubernetes gives no ambient capabilities: the DaemonSet starts as uid 0 and setpriv
    # (util-linux, in the image) drops to the image's user keeping attribution's two.
    (ds,) = yaml.safe_load_all((REPO / "deploy/kubernetes/daemonset.yaml").read_text())
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    caps = container["securityContext"]["capabilities"]["add"]
    running = exporter_image("daemonset", caps, [*container["command"], *container["args"]])
    m = _wait_scan(running, scene)
    status = running.status()
    assert status["Uid"].split() == [str(IMAGE_UID)] * 4
    assert int(status["CapEff"], 16) == sum(1 << bit for bit in ATTRIBUTION.values())
    host = m.all("bindscope_listener_info", netns="host", port=str(scene.host_port))
    assert [s.labels["process"] for s in host] == [Scene.comm(scene.host)]
