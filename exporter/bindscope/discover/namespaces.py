"""The network namespaces a scan can see, entering one from a thread, and reading one
through a member process's /proc/PID/net when entering is not allowed."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from bindscope.discover.addresses import interface_addresses
from bindscope.discover.containers import ContainerRef, container_from_cgroup
from bindscope.discover.processes import processes_signature
from bindscope.model import HOST_NETNS, NamespaceKind

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
TCP_LISTEN = 0x0A
TCP_CLOSE = 0x07  # a bound, unconnected UDP socket

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Namespace:
    inode: int
    label: str  # the netns label value: "host", the `ip netns` name, or "netns:INODE"
    path: str  # opens it: /run/netns/NAME or /proc/PID/ns/net
    pids: tuple[int, ...]  # member processes seen; empty for a named netns nobody uses
    kind: str  # host | container | named | other
    containers: tuple[ContainerRef, ...] = ()  # distinct containers of its members

    @property
    def container(self) -> ContainerRef | None:
        """The container the namespace belongs to (a pod's first one, usually its pause)."""
        return self.containers[0] if self.containers else None


class Memberships:
    """pid -> network namespace inode, remembered between scans.

    Reading /proc/PID/ns/net of 2000 processes costs ~10 ms a scan; a process's
    namespace rarely changes after its first milliseconds (`ip netns exec`, a runtime's
    init), so known pids are re-read only every REFRESH seconds and new ones every scan.
    The namespace inodes' containers are remembered the same way.
    """

    REFRESH = 30.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.inode_of: dict[int, int] = {}
        # inode -> (its member pids, their containers): read again when a member joins
        # (a second container of a pod) or leaves
        self.containers_of: dict[int, tuple[tuple[int, ...], tuple[ContainerRef, ...]]] = {}
        self._refreshed = -self.REFRESH
        # (processes signature, named namespaces) of the last walk, and what it found
        self.last: tuple[object, list[Namespace], list[str]] | None = None

    def begin(self) -> bool:
        """Start a scan; True when every pid is to be read again."""
        now = self._clock()
        if now - self._refreshed >= self.REFRESH:
            self._refreshed = now
            self.inode_of.clear()
            self.containers_of.clear()
            return True
        return False

    def end(self, alive: set[int], inodes: set[int]) -> None:
        self.inode_of = {p: i for p, i in self.inode_of.items() if p in alive}
        self.containers_of = {i: c for i, c in self.containers_of.items() if i in inodes}


def enumerate_namespaces(
    proc: str = "/proc", run_netns: str = "/run/netns", memo: Memberships | None = None
) -> tuple[list[Namespace], list[str]]:
    """The host's namespace first, then every other one, with errors that are not fatal.

    Other users' processes are unreadable without CAP_SYS_PTRACE: they are counted in one
    error, and their namespaces are missing unless named under /run/netns.
    """
    errors: list[str] = []
    own = os.stat(f"{proc}/self/ns/net")
    named_errors: list[str] = []
    named = _named_namespaces(run_netns, own.st_dev, named_errors)
    basis = (processes_signature(proc), named)
    if memo is not None:
        refresh = memo.begin()
        if not refresh and basis[0] is not None and memo.last and memo.last[0] == basis:
            return memo.last[1], list(memo.last[2])
    members: dict[int, list[int]] = {}
    denied = 0
    known = memo.inode_of if memo is not None else {}
    alive: set[int] = set()
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        alive.add(pid)
        inode = known.get(pid)
        if inode is None:
            try:
                # "net:[INODE]"; readlink costs half a stat of the magic link, which
                # counts with thousands of processes.
                inode = int(os.readlink(f"{entry.path}/ns/net")[5:-1])
            except (PermissionError, ProcessLookupError) as e:
                # ESRCH/ENOENT: it exited meanwhile (or is a kernel thread); not an error.
                denied += isinstance(e, PermissionError)
                continue
            except FileNotFoundError:
                continue
            known[pid] = inode
        members.setdefault(inode, []).append(pid)
    if denied:
        errors.append(f"{denied} processes' {proc}/PID/ns/net not readable (permission denied)")
    errors += named_errors
    found = [
        Namespace(
            own.st_ino,
            HOST_NETNS,
            f"{proc}/self/ns/net",
            _pids(members, own.st_ino),
            NamespaceKind.HOST.value,
        )
    ]
    for inode in sorted(set(members) | set(named)):
        if inode == own.st_ino:
            continue
        pids = _pids(members, inode)
        cached = memo.containers_of.get(inode) if memo is not None else None
        if cached is not None and cached[0] == pids:
            refs = cached[1]
        else:
            refs = _containers(pids, proc)
            if memo is not None:
                memo.containers_of[inode] = (pids, refs)
        if inode in named:
            label, path = named[inode], f"{run_netns}/{named[inode]}"
        else:
            label, path = f"netns:{inode}", f"{proc}/{pids[0]}/ns/net"
        kind = (
            NamespaceKind.CONTAINER
            if refs
            else NamespaceKind.NAMED
            if inode in named
            else NamespaceKind.OTHER
        ).value
        found.append(Namespace(inode, label, path, pids, kind, refs))
    if memo is not None:
        memo.end(alive, {ns.inode for ns in found})
        memo.last = (basis, found, list(errors))
    return found, errors


def _pids(members: dict[int, list[int]], inode: int) -> tuple[int, ...]:
    return tuple(sorted(members.get(inode, ())))


def _named_namespaces(run_netns: str, nsfs_dev: int, errors: list[str]) -> dict[int, str]:
    named: dict[int, str] = {}
    try:
        entries = sorted(os.scandir(run_netns), key=lambda e: e.name)
    except FileNotFoundError:
        return named
    except OSError as e:
        errors.append(f"{run_netns}: {e.strerror}")
        return named
    for entry in entries:
        try:
            st = os.stat(entry.path)
        except OSError as e:
            errors.append(f"{entry.path}: {e.strerror}")
            continue
        # A name whose bind mount is gone (a crashed `ip netns add`) is an empty file on
        # tmpfs: only nsfs inodes share the device of our own /proc/self/ns/net.
        if st.st_dev == nsfs_dev:
            named.setdefault(st.st_ino, entry.name)
    return named


def _containers(pids: tuple[int, ...], proc: str) -> tuple[ContainerRef, ...]:
    refs: list[ContainerRef] = []
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/cgroup") as f:
                ref = container_from_cgroup(f.read())
        except OSError:
            continue
        if ref is not None and ref not in refs:
            refs.append(ref)
    return tuple(refs)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def in_namespace(path: str, fn: Callable[[], T]) -> T:
    """fn's result, fn run by a short-lived thread that entered the namespace at path.

    Only that thread moves, never the process. Sockets fn opens stay in that namespace
    and can be used from any thread afterwards. Raises OSError (EPERM without
    CAP_SYS_ADMIN, ENOENT when the namespace is gone).
    """
    outcome: list = []

    def run() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(target)
                finally:
                    os.close(target)
                try:
                    outcome.append((True, fn()))
                finally:
                    # The thread exits next anyway; going back is belt and braces, so a
                    # failure here must not throw away fn's result.
                    with contextlib.suppress(OSError):
                        _setns(own)
            finally:
                os.close(own)
        except BaseException as e:
            outcome.append((False, e))

    thread = threading.Thread(target=run, name="bindscope-setns", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def addresses_in_namespace(path: str) -> list[tuple[str, str, int, int]]:
    """(interface, address, family 4|6, index) of the namespace's interfaces (getifaddrs opens
    its own netlink socket, so it answers for the namespace its thread is in)."""
    return in_namespace(path, interface_addresses)


_PROC_NET = (
    ("tcp", 4, "tcp", TCP_LISTEN),
    ("tcp", 6, "tcp6", TCP_LISTEN),
    ("udp", 4, "udp", TCP_CLOSE),
    ("udp", 6, "udp6", TCP_CLOSE),
)


def read_proc_net(pid: int, proc: str = "/proc") -> list[tuple[str, int, str, int, int, int]]:
    """(protocol, family, address, port, inode, uid) of the TCP listeners and bound UDP
    sockets in pid's namespace, from /proc/PID/net (needs ptrace access to pid, not
    CAP_SYS_ADMIN). Raises OSError when pid is gone or not readable."""
    found = []
    for protocol, family, name, state in _PROC_NET:
        try:
            with open(f"{proc}/{pid}/net/{name}") as f:
                text = f.read()
        except FileNotFoundError:
            if family == 6:  # a kernel without IPv6
                continue
            raise
        found.extend(parse_proc_net(text, protocol, family, state))
    return found


def parse_proc_net(
    text: str, protocol: str, family: int, state: int
) -> list[tuple[str, int, str, int, int, int]]:
    """The rows of one /proc/net/{tcp,tcp6,udp,udp6} table in the given state."""
    rows = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or int(fields[3], 16) != state:
            continue
        hexaddr, hexport = fields[1].split(":")
        port = int(hexport, 16)
        if protocol == "udp" and port == 0:
            continue
        rows.append((protocol, family, _decode(hexaddr), port, int(fields[9]), int(fields[7])))
    return rows


def _decode(hexaddr: str) -> str:
    # The kernel prints each 32-bit word of the address with %08X in host byte order.
    raw = b"".join(
        struct.pack("=I", int(hexaddr[i : i + 8], 16)) for i in range(0, len(hexaddr), 8)
    )
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    addr = ipaddress.IPv6Address(raw)
    if addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)
