"""One scan: discover -> classify -> judge -> probe, producing an immutable Snapshot."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Collection

from bindscope.classify import exposure_of, scope_of
from bindscope.config import Config
from bindscope.discover import netlink, psutil_backend
from bindscope.discover.addresses import host_addresses
from bindscope.discover.processes import InodeResolver, read_process
from bindscope.judge import judge, unexpected
from bindscope.model import (
    HOST_NETNS,
    NO_PROCESS,
    HostAddress,
    Listener,
    Protocol,
    Snapshot,
    Socket,
    Verdict,
)
from bindscope.probe import Target, probe_all

log = logging.getLogger("bindscope.scan")


class Scanner:
    """Keeps what must survive between scans: the inode cache and the error counters."""

    def __init__(
        self, own: Collection[tuple[str, int]] = (), backend: str = "auto", max_listeners: int = 0
    ) -> None:
        self._own = frozenset(own)
        self._resolver = InodeResolver()
        self._errors: Counter[str] = Counter()
        self._logged: set[str] = set()
        self._backend = backend if backend != "auto" else ""
        self._max_listeners = max_listeners
        self._dropped = 0

    @property
    def backend(self) -> str:
        return self._backend or "netlink"

    def set_own(self, own: Collection[tuple[str, int]]) -> None:
        self._own = frozenset(own)

    def error(self, source: str, detail: str, count: int = 1) -> None:
        """Count an error; log the first of each source, the rest only at debug."""
        self._errors[source] += count
        if source not in self._logged:
            self._logged.add(source)
            log.warning(
                "scan error (further ones of this source are only counted)",
                extra={"source": source, "detail": detail},
            )
        else:
            log.debug("scan error", extra={"source": source, "detail": detail})

    def scan(self, config: Config) -> Snapshot:
        t0 = time.monotonic()
        success = True
        try:
            listeners, addresses = self._discover()
        except Exception as e:  # a scan must never take the daemon down
            self.error("scan", f"{type(e).__name__}: {e}")
            listeners, addresses, success = [], (), False
        verdicts, labelled = judge(config.services, listeners, self._own)
        if config.probe.enabled:
            verdicts = self._probe(config, verdicts, addresses)
        strays = unexpected(labelled, config.unexpected.ignore) if config.unexpected.report else ()
        if self._max_listeners and len(labelled) > self._max_listeners:
            self._dropped += len(labelled) - self._max_listeners
        return Snapshot(
            timestamp=time.time(),
            duration=time.monotonic() - t0,
            success=success,
            verdicts=verdicts,
            listeners=labelled,
            unexpected=strays,
            host_addresses=addresses,
            errors=dict(self._errors),
            backend=self.backend,
            dropped_listeners=self._dropped,
        )

    def _discover(self) -> tuple[list[Listener], tuple[HostAddress, ...]]:
        sockets, owners = self._list()
        try:
            addresses = host_addresses()
        except OSError as e:
            self.error("interfaces", str(e))
            addresses = ()
        listeners = []
        for sock in sockets:
            listeners.append(
                Listener(
                    socket=sock,
                    process=owners.get(sock, NO_PROCESS),
                    scope=scope_of(sock.address),
                    exposure=exposure_of(sock, addresses),
                )
            )
        return listeners, addresses

    def _list(self) -> tuple[list[Socket], dict[Socket, object]]:
        if self._backend in ("", "netlink"):
            try:
                sockets = netlink.list_sockets()
            except netlink.NetlinkUnavailable as e:
                if self._backend == "netlink":
                    raise
                log.warning("netlink sock_diag unavailable, using psutil", extra={"reason": str(e)})
                self._backend = "psutil"
            else:
                if not self._backend:
                    self._backend = "netlink"
                    log.info("discovery backend", extra={"backend": "netlink"})
                attribution = self._resolver.resolve(s.inode for s in sockets)
                for source, n in attribution.errors.items():
                    self.error(source, "reading /proc/PID/fd", n)
                owners = {
                    s: attribution.owners[s.inode] for s in sockets if s.inode in attribution.owners
                }
                return sockets, owners
        sockets, pids = psutil_backend.list_sockets()
        owners = {}
        for s in sockets:
            pid = pids.get((s.protocol.value, s.address, s.port))
            if pid is None:
                continue
            try:
                info = read_process(pid)
            except OSError as e:
                self.error("proc", f"pid {pid}: {e}")
                continue
            if info is None:
                self.error("proc_vanished", f"pid {pid}")
            else:
                owners[s] = info
        return sockets, owners

    def _probe(
        self, config: Config, verdicts: tuple[Verdict, ...], addresses: tuple[HostAddress, ...]
    ) -> tuple[Verdict, ...]:
        if config.probe.addresses is not None:
            hosts = list(config.probe.addresses)
        else:
            # one address on two interfaces must not make two series with the same labels
            hosts = list(dict.fromkeys(a.probe_target for a in addresses))

        # UDP has no handshake to probe; other namespaces are probed through their
        # published ports, not their own addresses
        def probed(v: Verdict) -> bool:
            s = v.service
            return (
                s.protocol is Protocol.TCP and s.netns in (None, HOST_NETNS) and s.container is None
            )

        targets = [Target(h, v.service.port) for v in verdicts if probed(v) for h in hosts]
        results = probe_all(targets, config.probe.timeout)
        return tuple(
            dataclasses.replace(v, probes=tuple(results[Target(h, v.service.port)] for h in hosts))
            if probed(v)
            else v
            for v in verdicts
        )
