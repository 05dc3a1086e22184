"""Fixtures: real sockets, the exporter as a subprocess, network namespaces, podman.

The helpers they use live in support.py; tests import those from there.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    PODMAN,
    PODMAN_NETWORK,
    PODMAN_SUBNET,
    Exporter,
    Podman,
    TwoHosts,
    require_binary,
    require_root,
    run,
)


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator:
    """Factory: exporter(config_text, extra_args) -> a ready Exporter; stopped at the end."""
    started: list[Exporter] = []

    def start(
        config: str | None = None, extra_args: list[str] | None = None, ready: bool = True, **kw
    ) -> Exporter:
        exp = Exporter(tmp_path, config, extra_args, **kw)
        started.append(exp)
        if ready:
            exp.wait_ready()
        return exp

    yield start
    for exp in started:
        exp.stop()


@pytest.fixture
def listen() -> Iterator:
    """Factory: listen(address, port=0, udp=False, v6only=None) -> a bound socket.

    TCP sockets are put in LISTEN; every socket is closed at the end.
    """
    opened: list[socket.socket] = []

    def make(
        address: str, port: int = 0, udp: bool = False, v6only: bool | None = None
    ) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        opened.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        s.bind((address, port))
        if not udp:
            s.listen(16)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    require_root()
    require_binary("ip")
    hosts = TwoHosts()
    try:
        hosts.create()
        yield hosts
    finally:
        hosts.delete()


@pytest.fixture(scope="session", autouse=True)
def _leftover_namespaces() -> Iterator[None]:
    """Remove test namespaces a killed earlier run left behind."""
    if os.geteuid() == 0 and shutil.which("ip"):
        out = run("ip", "netns", "list", check=False).stdout
        for line in out.splitlines():
            name = line.split()[0] if line.split() else ""
            parts = name.split("-")
            if (
                name.startswith(("bss-", "bsc-"))
                and len(parts) == 3
                and parts[1].isdigit()
                and not Path(f"/proc/{parts[1]}").exists()
            ):
                run("ip", "netns", "del", name, check=False)
    yield


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged exporter can read."""
    d = Path(tempfile.mkdtemp(prefix="bs-nobody-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    """Podman on the shared test network, which is made only if missing and removed only
    by whoever made it (removal fails while another test still uses it)."""
    require_root()
    require_binary("podman", "runc")

    def exists() -> bool:
        return run(*PODMAN, "network", "exists", PODMAN_NETWORK, check=False).returncode == 0

    created = False
    if not exists():
        made = run(*PODMAN, "network", "create", "--subnet", PODMAN_SUBNET, PODMAN_NETWORK,
                   check=False)  # fmt: skip
        # another test run may have made it meanwhile
        assert made.returncode == 0 or exists(), made.stderr
        created = made.returncode == 0
    pm = Podman(PODMAN_NETWORK)
    try:
        pm.remove_leftovers()
        yield pm
    finally:
        pm.close()
        if created:
            run(*PODMAN, "network", "rm", PODMAN_NETWORK, check=False)
