"""Sockets and interface addresses of the host's namespace and of every other one in view.

Each other namespace is listed with the same LISTEN-only netlink dump, from a socket
opened inside it by a thread that entered it (CAP_SYS_ADMIN); the socket is kept for the
next scan and closed when the namespace goes away. Without the capability a member
process's /proc/PID/net tables are read instead (v6only then unknown), and without
either the namespace is skipped. Every failure is counted, none is fatal.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bindscope.discover import netlink
from bindscope.discover.addresses import AddressWatch, interface_addresses
from bindscope.model import (
    HOST_NETNS,
    ErrorSource,
    InterfaceAddress,
    NamespaceKind,
    Protocol,
    Socket,
)

# other namespaces' and psutil's modules are imported when first needed: with the
# namespaces collector off, or netlink working, they cost nothing
if TYPE_CHECKING:
    from bindscope.discover.containers import ContainerNames
    from bindscope.discover.namespaces import Memberships, Namespace

log = logging.getLogger("bindscope.discover")

ErrorSink = Callable[[ErrorSource, str], None]  # (source, detail)


@dataclass(frozen=True)
class NamespaceView:
    """What one scan saw of one network namespace."""

    label: str  # the netns label
    kind: str  # host | container | named | other
    path: str  # opens it (for the firewall reader)
    container: str
    sockets: tuple[Socket, ...]
    interfaces: tuple[InterfaceAddress, ...] | None  # None: could not be read
    # pids psutil attributed sockets to (psutil backend only): (proto, addr, port) -> pid
    pids: dict[tuple[str, str, int], int] | None = None
    # several containers share it (a pod): each socket is its owner's container's
    shared: bool = False


def with_devices(
    sockets: tuple[Socket, ...], addresses: Iterable[InterfaceAddress] | None
) -> tuple[Socket, ...]:
    """The sockets, each bound to a device named after it in its namespace; the same
    tuple when none is (a steady scan compares the host's sockets by identity first)."""
    if not any(s.ifindex and not s.device for s in sockets):
        return sockets
    names = {a.index: a.interface for a in addresses or ()}
    # a device without addresses: no name known, and none of its addresses to count
    return tuple(
        dataclasses.replace(s, device=names.get(s.ifindex, f"#{s.ifindex}"))
        if s.ifindex and not s.device
        else s
        for s in sockets
    )


class Inventory:
    def __init__(self, error: ErrorSink, backend: str = "auto", namespaces: bool = True) -> None:
        self._error = error
        self._backend = backend if backend != "auto" else ""
        self._namespaces = namespaces
        self._sockets: dict[int, socket.socket] = {}  # netns inode -> netlink socket in it
        self._host_socket: socket.socket | None = None
        self._names: ContainerNames | None = None
        # pid -> its container, for the members of shared namespaces (pods)
        self._pod_members: dict[int, str] = {}
        self._pod_asked: set[int] = set()
        self._memberships: Memberships | None = None
        self._memo = netlink.Memo()
        # netns inode -> (its dump, container, label, addresses, the sockets labelled with them)
        self._labelled: dict[
            int,
            tuple[
                tuple[Socket, ...],
                str,
                str,
                tuple[InterfaceAddress, ...] | None,
                tuple[Socket, ...],
            ],
        ] = {}
        self._addresses: dict[str, tuple[InterfaceAddress, ...]] = {}
        # netns inode (0: the host's) -> the watch of its addresses, None where none opens
        self._watches: dict[int, AddressWatch | None] = {}

    @property
    def backend(self) -> str:
        return self._backend or "netlink"

    def collect(self) -> list[NamespaceView]:
        views = [self._host()]
        if not self._namespaces:
            return views
        from bindscope.discover.containers import ContainerNames
        from bindscope.discover.namespaces import Memberships, enumerate_namespaces

        if self._memberships is None or self._names is None:
            self._memberships, self._names = Memberships(), ContainerNames()
        try:
            found, errors = enumerate_namespaces(memo=self._memberships)
        except OSError as e:
            self._error(ErrorSource.NETNS, f"listing namespaces: {e}")
            return views
        for detail in errors:
            self._error(ErrorSource.NETNS, detail)
        seen = set()
        for ns in found[1:]:
            seen.add(ns.inode)
            try:
                view = self._other(ns)
            except Exception as e:  # one namespace (often one that vanished) spoils no scan
                self._error(ErrorSource.NETNS, f"{ns.label}: {type(e).__name__}: {e}")
                continue
            if view is not None:
                views.append(view)
        for inode in set(self._sockets) - seen:  # the namespace is gone: let it go
            self._sockets.pop(inode).close()
        for inode in set(self._watches) - seen - {0}:
            watch = self._watches.pop(inode)
            if watch is not None:
                watch.close()
        self._labelled = {i: v for i, v in self._labelled.items() if i in seen}
        labels = [v.label for v in views]
        self._addresses = {k: v for k, v in self._addresses.items() if k in labels}
        self._names.prune()
        # pids asked about during the last scan only: memory follows the pods' processes
        self._pod_members = {p: n for p, n in self._pod_members.items() if p in self._pod_asked}
        self._pod_asked = set()
        self._memo.forget(labels)
        return views

    def _read_addresses(
        self, key: int, label: str, path: str | None, read: Callable[[], list[InterfaceAddress]]
    ) -> tuple[InterfaceAddress, ...]:
        """The namespace's addresses: those of the last scan (the very tuple, so that later
        stages tell by identity that nothing changed) unless its watch saw a change.

        Raises OSError when they cannot be read."""
        if key not in self._watches:
            try:
                if path is None:
                    self._watches[key] = AddressWatch()
                else:
                    from bindscope.discover.namespaces import in_namespace

                    self._watches[key] = in_namespace(path, AddressWatch)
            except OSError:
                self._watches[key] = None  # read on every scan, as without a watch
        watch = self._watches[key]
        last = self._addresses.get(label)
        if watch is not None and not watch.changed() and last is not None:
            return last
        try:
            addresses = tuple(read())
        except OSError:
            if watch is not None:
                watch.invalidate()
            raise
        if last == addresses:
            return last
        self._addresses[label] = addresses
        return addresses

    def _host_dump(self) -> tuple[Socket, ...]:
        # one socket kept, as for other namespaces: the replies of a socket that stays are
        # the same bytes from dump to dump (they carry its port id), which the memo uses
        if self._host_socket is None:
            self._host_socket = netlink.open_socket()
        try:
            return netlink.list_sockets(self._host_socket, memo=self._memo)
        except Exception:
            # a dump that stopped half way leaves replies in the socket: never reuse it
            self._host_socket.close()
            self._host_socket = None
            raise

    def _host(self) -> NamespaceView:
        pids = None
        if self._backend in ("", "netlink"):
            try:
                sockets = self._host_dump()
            except netlink.NetlinkUnavailable as e:
                if self._backend == "netlink":
                    raise
                log.warning("netlink sock_diag unavailable, using psutil", extra={"reason": str(e)})
                self._backend = "psutil"
            else:
                if not self._backend:
                    self._backend = "netlink"
                    log.info("discovery backend", extra={"backend": "netlink"})
        if self._backend == "psutil":
            from bindscope.discover import psutil_backend

            sockets, pids = psutil_backend.list_sockets()
        try:
            addresses: tuple[InterfaceAddress, ...] | None = self._read_addresses(
                0, HOST_NETNS, None, interface_addresses
            )
        except OSError as e:
            self._error(ErrorSource.INTERFACES, str(e))
            addresses = None
        return NamespaceView(
            HOST_NETNS,
            NamespaceKind.HOST.value,
            "/proc/self/ns/net",
            "",
            with_devices(tuple(sockets), addresses),
            addresses,
            pids,
        )

    def _other(self, ns: Namespace) -> NamespaceView | None:
        # a remembered member pid may have been reused or have moved since: the path must
        # still open this namespace
        if os.stat(ns.path).st_ino != ns.inode:
            self._error(ErrorSource.NETNS, f"{ns.label}: {ns.path} no longer leads to it")
            return None
        from bindscope.discover.namespaces import addresses_in_namespace

        assert self._names is not None  # made by collect() before any namespace is seen
        container = self._names.name(ns.container) if ns.container is not None else ""
        sockets = self._dump(ns)
        if sockets is None:
            sockets = self._proc_net(ns)
        if sockets is None:
            return None
        try:
            addresses: tuple[InterfaceAddress, ...] | None = self._read_addresses(
                ns.inode,
                ns.label,
                ns.path,
                lambda: [InterfaceAddress(*a) for a in addresses_in_namespace(ns.path)],
            )
        except OSError as e:
            if e.errno != errno.EPERM:
                self._error(ErrorSource.NETNS, f"{ns.label}: interfaces: {e}")
            addresses = None
        last = self._labelled.get(ns.inode)
        if (
            last is not None
            and last[0] is sockets
            and last[1:4] == (container, ns.label, addresses)
        ):
            labelled = last[4]
        else:
            labelled = with_devices(
                tuple(dataclasses.replace(s, netns=ns.label, container=container) for s in sockets),
                addresses,
            )
            self._labelled[ns.inode] = (sockets, container, ns.label, addresses, labelled)
        return NamespaceView(
            ns.label,
            ns.kind,
            ns.path,
            container,
            labelled,
            addresses,
            shared=len(ns.containers) > 1,
        )

    def container_of(self, pid: int, proc: str = "/proc") -> str:
        """The container a process belongs to, from its cgroup; "" when none or unknown.
        Remembered per pid: a process does not change containers."""
        name = self._pod_members.get(pid)
        if name is None:
            from bindscope.discover.containers import ContainerNames, container_from_cgroup

            try:
                with open(f"{proc}/{pid}/cgroup") as f:
                    ref = container_from_cgroup(f.read())
            except OSError:
                return ""  # exited: the next scan will not ask
            if self._names is None:
                self._names = ContainerNames()
            name = self._names.name(ref) if ref is not None else ""
            self._pod_members[pid] = name
        self._pod_asked.add(pid)
        return name

    def _dump(self, ns: Namespace) -> tuple[Socket, ...] | None:
        from bindscope.discover.namespaces import in_namespace

        sock = self._sockets.get(ns.inode)
        try:
            if sock is None:
                sock = in_namespace(ns.path, netlink.open_socket)
                self._sockets[ns.inode] = sock
            return netlink.list_sockets(sock, netns=ns.label, memo=self._memo)
        except Exception as e:
            # a dump that stopped half way leaves replies in the socket: never reuse it
            if sock is not None:
                self._sockets.pop(ns.inode, None)
                sock.close()
            if not isinstance(e, OSError) or e.errno not in (
                errno.EPERM,
                errno.ENOENT,
                errno.ESRCH,
            ):
                self._error(ErrorSource.NETNS, f"{ns.label}: netlink: {e}")
            return None

    def _proc_net(self, ns: Namespace) -> tuple[Socket, ...] | None:
        from bindscope.discover.namespaces import read_proc_net

        for pid in ns.pids:
            try:
                rows = read_proc_net(pid)
            except FileNotFoundError:
                continue  # exited: try another member
            except OSError as e:
                self._error(ErrorSource.NETNS, f"{ns.label}: /proc/{pid}/net: {e}")
                return None
            return tuple(
                Socket(Protocol(proto), addr, port, fam, None, inode, uid)
                for proto, fam, addr, port, inode, uid in rows
            )
        self._error(
            ErrorSource.NETNS,
            f"{ns.label}: cannot enter it (no CAP_SYS_ADMIN) nor read a member's /proc/PID/net",
        )
        return None
