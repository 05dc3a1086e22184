"""Which process owns a socket inode, through /proc/PID/fd, looking only for what is asked.

Walking every fd of every process costs ~300 ms on a busy host, so the resolver
remembers inode -> (pid, fd) and walks /proc only for inodes it has never seen. A
remembered entry is confirmed with one readlink, or, where the kernel reports a process's
number of open files as the size of /proc/PID/fd (Linux 6.2+), all of a process's
entries at once with one stat while that number stays the same (a process that closed
a socket and opened another file since is seen at the next full confirmation, at most
CONFIRM_ALL seconds later). Inodes that no readable process holds (other
users' processes without CAP_SYS_PTRACE, kernel sockets) are remembered too, and later
only processes started since are searched for them.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bindscope.model import NO_PROCESS, ErrorSource, ProcessInfo


@dataclass
class Attribution:
    """The outcome of one resolve() call."""

    owners: dict[int, ProcessInfo]  # inode -> owner, for the inodes found
    errors: Counter[ErrorSource] = field(default_factory=Counter)


class InodeResolver:
    CONFIRM_ALL = 30.0

    def __init__(self, proc: str = "/proc", clock: Callable[[], float] = time.monotonic) -> None:
        self._proc = proc
        self._clock = clock
        self._confirmed_all = -self.CONFIRM_ALL
        try:
            self._counts = os.stat(f"{proc}/self/fd").st_size > 0
        except OSError:
            self._counts = False
        self._fds: dict[int, int] = {}  # pid -> open files when its entries were confirmed
        self._last: dict[int, ProcessInfo] = {}  # the owners returned last
        # (inodes asked, how many of them unowned, owner pids) of the last call, when it
        # left nothing in doubt
        self._settled: tuple[frozenset[int], int, frozenset[int]] | None = None
        self._where: dict[int, tuple[int, int]] = {}  # inode -> (pid, fd)
        self._info: dict[int, ProcessInfo] = {}  # pid -> process
        self._unowned: set[int] = set()  # inodes no readable process held at the last walk
        self._walked: set[int] = set()  # pids walked completely
        self._walked_at: object = None  # processes_signature() of the last walk
        self._denied: set[int] = set()  # pids whose fd table we may not read

    def resolve(self, inodes: Iterable[int]) -> Attribution:
        wanted = inodes if isinstance(inodes, frozenset) else frozenset(inodes)
        now = self._clock()
        if now - self._confirmed_all >= self.CONFIRM_ALL:
            self._confirmed_all = now
            self._fds.clear()
            self._settled = None
        elif self._settled is not None and self._quiet(wanted, *self._settled):
            result = Attribution(owners=self._last)
            if self._denied and self._settled[1]:  # counted on every call, as a walk would
                result.errors[ErrorSource.PROCESS_ATTRIBUTION] += self._settled[1]
            return result
        result = Attribution(owners={})
        missing: set[int] = set()
        unchanged: dict[int, bool] = {}  # pid -> its open files are as many as confirmed
        counts: dict[int, int] = {}  # pid -> open files now, for those confirmed one by one
        for inode in wanted:
            where = self._where.get(inode)
            if where is not None:
                pid = where[0]
                same = unchanged.get(pid)
                if same is None:
                    same = unchanged[pid] = self._same_files(pid, counts)
                if same or self._confirm(inode, *where):
                    info = self._process(pid, result.errors)
                    if info is not None:
                        result.owners[inode] = info
                        continue
                counts.pop(pid, None)  # not every entry held: count again next time
            missing.add(inode)
        self._fds.update(counts)
        # a socket systemd (pid 1) holds is handed to the service it starts, and systemd
        # keeps its copy: while pid 1 owns it, any process started since may be the owner
        handed = {i for i, info in result.owners.items() if info.pid == 1}
        if handed:
            signature = processes_signature(self._proc)
            if signature is None or signature != self._walked_at:
                missing |= handed
        if missing:
            self._walk(missing, result, handed)
        # forget what no longer listens, so memory follows the listeners, not history
        self._where = {i: w for i, w in self._where.items() if i in wanted}
        self._unowned &= wanted
        live_pids = {pid for pid, _ in self._where.values()}
        self._info = {p: i for p, i in self._info.items() if p in live_pids}
        self._fds = {p: n for p, n in self._fds.items() if p in live_pids}
        # the very dict of the last call when nothing changed: callers tell by identity
        if result.owners == self._last:
            result.owners = self._last
        self._last = result.owners
        # a call that left nothing in doubt can be repeated as is while nothing moves
        unowned = wanted - result.owners.keys()
        settled = unowned <= self._unowned and set(result.errors) <= {
            ErrorSource.PROCESS_ATTRIBUTION
        }
        self._settled = (wanted, len(unowned), frozenset(live_pids)) if settled else None
        return result

    def _quiet(
        self, wanted: frozenset[int], last: frozenset[int], unowned: int, pids: frozenset[int]
    ) -> bool:
        """Whether the last call's owners still hold: the same inodes asked, each owner's
        number of open files as confirmed, and no process started that could hold an
        unowned one or one that pid 1 holds."""
        if not self._counts or (wanted is not last and wanted != last):
            return False
        if (unowned or 1 in pids) and processes_signature(self._proc) != self._walked_at:
            return False
        for pid in pids:
            try:
                if os.stat(f"{self._proc}/{pid}/fd").st_size != self._fds.get(pid):
                    return False
            except OSError:
                return False
        return True

    def _same_files(self, pid: int, counts: dict[int, int]) -> bool:
        if not self._counts:
            return False
        try:
            n = os.stat(f"{self._proc}/{pid}/fd").st_size
        except OSError:
            return False
        if self._fds.get(pid) == n:
            return True
        counts[pid] = n
        return False

    def _confirm(self, inode: int, pid: int, fd: int) -> bool:
        try:
            return os.readlink(f"{self._proc}/{pid}/fd/{fd}") == f"socket:[{inode}]"
        except OSError:
            return False

    def _walk(self, missing: set[int], result: Attribution, handed: set[int]) -> None:
        targets = {f"socket:[{i}]": i for i in missing}
        # inodes already unowned at the last walk, or held by pid 1 alone, can only be
        # held (too) by processes we have not walked since (none, when no process started
        # since); anything new needs every process
        only_new = missing <= self._unowned | handed
        signature = processes_signature(self._proc)
        if only_new and signature is not None and signature == self._walked_at:
            if self._denied:  # counted on every scan, as a walk would
                result.errors[ErrorSource.PROCESS_ATTRIBUTION] += len(missing)
            return
        self._walked_at = signature
        try:
            # newest first: a socket new since the last scan is most often a new process's,
            # so the walk ends early; and of the processes sharing a socket, the one that
            # got it last is named (a server's new version, or the service systemd, pid 1,
            # passed it to: systemd keeps its copy and comes last)
            pids = sorted((int(p) for p in os.listdir(self._proc) if p.isdigit()), reverse=True)
        except OSError:
            result.errors[ErrorSource.PROC] += 1
            return
        alive = set(pids)
        self._walked &= alive
        self._denied &= alive
        for pid in pids:
            if not targets:
                break
            if only_new and pid in self._walked:
                continue
            fd_dir = f"{self._proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except PermissionError:
                self._denied.add(pid)
                self._walked.add(pid)
                continue
            except OSError:  # exited since listdir(/proc)
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue  # closed meanwhile: common, and not an error
                inode = targets.get(link)
                if inode is None:
                    continue
                info = self._process(pid, result.errors)
                if info is None:
                    continue
                self._where[inode] = (pid, int(fd))
                result.owners[inode] = info
                del targets[link]
                if not targets:
                    break
            self._walked.add(pid)
        for inode in targets.values():
            if inode not in result.owners:
                self._unowned.add(inode)
        targets = {k: v for k, v in targets.items() if v not in result.owners}
        if targets and self._denied:
            # the sockets we could not attribute, when some processes were unreadable
            result.errors[ErrorSource.PROCESS_ATTRIBUTION] += len(targets)

    def _process(self, pid: int, errors: Counter[ErrorSource]) -> ProcessInfo | None:
        info = self._info.get(pid)
        if info is not None:
            return info
        try:
            info = read_process(pid, self._proc)
        except OSError:
            errors[ErrorSource.PROC] += 1
            return None
        if info is None:
            errors[ErrorSource.PROC_VANISHED] += 1
            return None
        self._info[pid] = info
        return info


def read_process(pid: int, proc: str = "/proc") -> ProcessInfo | None:
    """Name and command line of a process; None when it has exited."""
    base = f"{proc}/{pid}"
    try:
        with open(f"{base}/comm", encoding="utf-8", errors="replace") as f:
            name = f.read().rstrip("\n")
        with open(f"{base}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    cmdline = tuple(p.decode("utf-8", "replace") for p in raw.split(b"\0") if p)
    return ProcessInfo(pid=pid, name=name or NO_PROCESS.name, cmdline=cmdline)


def processes_signature(proc: str = "/proc") -> tuple[int, str] | None:
    """Changes whenever a process starts or exits, for the cost of two small reads
    (listing /proc costs ~1 ms with 2000 processes): /proc's link count follows the
    number of processes, and the last pid handed out (of a thread too) moves with every
    start. None when this /proc tells neither (a fake tree in tests)."""
    try:
        with open(f"{proc}/loadavg") as f:
            last_pid = f.read().rsplit(None, 1)[-1]
        return os.stat(proc).st_nlink, last_pid
    except (OSError, IndexError):
        return None
