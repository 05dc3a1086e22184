"""One scan: discover -> classify -> judge -> probe, producing an immutable Snapshot."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence

from bindscope.classify import after_firewall, exposure_of, host_address, scope_of
from bindscope.config.load import Config
from bindscope.discover.inventory import Inventory, NamespaceView
from bindscope.discover.namespaces import in_namespace
from bindscope.discover.processes import InodeResolver, read_process
from bindscope.judge import judge, judge_published, unexpected
from bindscope.model import (
    HOST_NETNS,
    NO_PROCESS,
    ErrorSource,
    Firewall,
    HostAddress,
    Listener,
    ProcessInfo,
    Protocol,
    Published,
    PublishedPort,
    Scope,
    Snapshot,
    Socket,
    Verdict,
)
from bindscope.netfilter.evaluate import evaluate
from bindscope.netfilter.read import Netfilter, generation_id, read_netfilter
from bindscope.netfilter.ruleset import Ruleset
from bindscope.probe import Target, probe_all

log = logging.getLogger("bindscope.scan")

# Without a change of the nftables generation, rules are re-read at most this often:
# legacy iptables and docker-proxy do not move the generation.
NETFILTER_MAX_AGE = 60.0

# A namespace whose interfaces cannot be read (no CAP_SYS_ADMIN) is taken to be on a
# private network, as container bridges are: its wildcard sockets count as private.
_ASSUMED = (
    host_address("", "127.0.0.1", 4),
    host_address("", "::1", 6),
    host_address("", "10.0.0.1", 4),
    host_address("", "fd00::1", 6),
)


class _Decisions:
    """One namespace's ruleset and the verdicts already evaluated on it.

    Evaluating costs ~0.5 ms, so a verdict is kept while the ruleset stays the same;
    only the keys used by the latest scan are kept, so memory follows the listeners.
    """

    def __init__(
        self,
        ruleset: Ruleset | None,
        previous: _Decisions | None,
        error: Callable[[ErrorSource, str], None],
        interfaces: tuple[str, ...],
    ) -> None:
        self.ruleset = ruleset
        self._error = error
        self._interfaces = interfaces
        self._old = (
            previous._new
            if previous and previous.ruleset is ruleset and previous._interfaces == interfaces
            else {}
        )
        self._new: dict[tuple[str, int, str, int, tuple[str, ...]], Firewall] = {}

    def decide(self, sock: Socket, address: HostAddress) -> Firewall:
        # a socket bound to a device takes packets that arrive on that device only
        ifaces = (sock.device,) if sock.device else self._interfaces
        key = (sock.protocol.value, address.family, address.address, sock.port, ifaces)
        verdict = self._new.get(key) or self._old.get(key)
        if verdict is None:
            if self.ruleset is None:
                verdict = Firewall.UNKNOWN
            else:
                try:
                    d = evaluate(self.ruleset, *key[:4], interfaces=ifaces)
                    verdict = d.verdict
                except Exception as e:  # a rule shape the evaluator chokes on: say unknown
                    self._error(ErrorSource.FIREWALL, f"evaluating {key}: {type(e).__name__}: {e}")
                    verdict = Firewall.UNKNOWN
        self._new[key] = verdict
        return verdict


class _Netfilter:
    """Each namespace's netfilter state, read once per generation for both consumers."""

    def __init__(
        self, error: Callable[[ErrorSource, str], None], firewall: bool, nat: bool
    ) -> None:
        self._error = error
        self._firewall = firewall
        self._nat = nat
        self._cache: dict[str, tuple[int | None, float, Netfilter]] = {}
        self._decisions: dict[str, _Decisions] = {}

    def decisions(self, view: NamespaceView) -> _Decisions:
        state = self._get(view.label, view.path)
        # the namespace's own interfaces: the ones another host's packet can arrive on
        interfaces = tuple(sorted({a.interface for a in view.interfaces or ()} - {"lo"}))
        decisions = _Decisions(
            state.ruleset, self._decisions.get(view.label), self._error, interfaces
        )
        self._decisions[view.label] = decisions
        return decisions

    def published(self) -> tuple[PublishedPort, ...]:
        return self._get(HOST_NETNS, "").nat

    def _get(self, label: str, path: str) -> Netfilter:
        host = label == HOST_NETNS
        try:
            gen = generation_id() if host else in_namespace(path, generation_id)
        except OSError:
            gen = None
        now = time.monotonic()
        cached = self._cache.get(label)
        # an unknown generation (no CAP_NET_ADMIN, no nftables) is retried only when the
        # entry is old: a failing read costs several subprocesses
        if cached is not None and cached[0] == gen and now - cached[1] < NETFILTER_MAX_AGE:
            return cached[2]
        try:
            state = read_netfilter(None if host else path, nat=host and self._nat)
        except Exception as e:  # output of a shape the parsers do not know
            state = Netfilter(None, f"{type(e).__name__}: {e}")
        # counted when a read fails, not on every scan that reuses its outcome
        if state.ruleset is None and self._firewall:
            self._error(ErrorSource.FIREWALL, f"{label}: {state.error}")
        for detail in state.nat_errors:
            self._error(ErrorSource.NAT, detail)
        self._cache[label] = (gen, now, state)
        return state

    def forget(self, labels: Collection[str]) -> None:
        for label in set(self._cache) - set(labels):
            del self._cache[label]
            self._decisions.pop(label, None)


class Scanner:
    """Keeps what must survive between scans: caches and the error counters."""

    def __init__(
        self,
        own: Collection[tuple[str, int]] = (),
        backend: str = "auto",
        namespaces: bool = True,
        firewall: bool = True,
        published: bool = True,
    ) -> None:
        self._own = frozenset(own)
        self._resolver = InodeResolver()
        self._errors: Counter[str] = Counter()
        self._logged: set[ErrorSource] = set()
        self._inventory = Inventory(self.error, backend, namespaces)
        self._firewall = firewall
        self._published = published and namespaces
        self._netfilter = _Netfilter(self.error, firewall, self._published)
        # netns label -> (addresses and ruleset it was classified with, id(socket) -> Listener)
        self._memo: dict[str, tuple[object, dict[Socket, Listener]]] = {}

    @property
    def backend(self) -> str:
        return self._inventory.backend

    def set_own(self, own: Collection[tuple[str, int]]) -> None:
        self._own = frozenset(own)

    def error(self, source: ErrorSource, detail: str, count: int = 1) -> None:
        """Count an error; log the first of each source, the rest only at debug."""
        self._errors[source.value] += count
        if source not in self._logged:
            self._logged.add(source)
            log.warning(
                "scan error (further ones of this source are only counted)",
                extra={"source": source.value, "detail": detail},
            )
        else:
            log.debug("scan error", extra={"source": source.value, "detail": detail})

    def scan(self, config: Config) -> Snapshot:
        t0 = time.monotonic()
        try:
            return self._scan(config, t0)
        except Exception as e:  # a scan must never take the daemon down
            self.error(ErrorSource.SCAN, f"{type(e).__name__}: {e}")
            verdicts, _ = judge(config.services, [], self._own)
            return Snapshot(
                timestamp=time.time(),
                duration=time.monotonic() - t0,
                success=False,
                verdicts=verdicts,
                listeners=(),
                unexpected=(),
                host_addresses=(),
                errors=dict(self._errors),
                backend=self.backend,
            )

    def _scan(self, config: Config, t0: float) -> Snapshot:
        views = self._inventory.collect()
        addresses = {
            v.label: None
            if v.interfaces is None
            else tuple(host_address(a.interface, a.address, a.family) for a in v.interfaces)
            for v in views
        }
        listeners = self._classify(views, addresses)
        verdicts, labelled = judge(config.services, listeners, self._own)
        published = self._judge_published(views, addresses, labelled)
        host = addresses.get(HOST_NETNS) or ()
        if config.probe.enabled:
            verdicts, published = self._probe(config, verdicts, published, host)
        strays = unexpected(labelled, config.unexpected.ignore) if config.unexpected.report else ()
        return Snapshot(
            timestamp=time.time(),
            duration=time.monotonic() - t0,
            success=True,
            verdicts=verdicts,
            listeners=labelled,
            unexpected=strays,
            host_addresses=host,
            errors=dict(self._errors),
            backend=self.backend,
            published=published,
            namespaces=dict(Counter(v.kind for v in views)),
        )

    def _classify(
        self,
        views: Sequence[NamespaceView],
        addresses_of: Mapping[str, tuple[HostAddress, ...] | None],
    ) -> list[Listener]:
        owners = self._attribute(views)
        listeners = []
        memo: dict[str, tuple[object, dict[Socket, Listener]]] = {}
        for view in views:
            read = addresses_of[view.label]
            addresses = read if read is not None else _ASSUMED
            # a firewall verdict on assumed addresses would be made up: none then; and a
            # namespace where only loopback listens needs no ruleset read at all
            rules = (
                self._netfilter.decisions(view)
                if self._firewall
                and read is not None
                and any(scope_of(s.address) is not Scope.LOOPBACK for s in view.sockets)
                else None
            )
            # a listener is the same as at the last scan while its socket, owner, the
            # addresses and the ruleset are: reuse it rather than classify it again
            basis = (addresses, rules.ruleset if rules is not None else None)
            last_basis, last = self._memo.get(view.label, (None, {}))
            if last_basis != basis:
                last = {}
            kept: dict[Socket, Listener] = {}
            memo[view.label] = (basis, kept)
            for sock in view.sockets:
                owner = owners.get(sock, NO_PROCESS)
                # by value: other namespaces' sockets are new objects on every scan
                known = last.get(sock)
                if known is not None and known.process == owner:
                    kept[sock] = known
                    listeners.append(known)
                    continue
                verdict, effective = None, None
                if rules is not None:
                    verdict, effective = after_firewall(
                        sock, addresses, lambda a, s=sock, r=rules: r.decide(s, a)
                    )
                listener = Listener(
                    socket=sock,
                    process=owner,
                    scope=scope_of(sock.address),
                    exposure=exposure_of(sock, addresses),
                    firewall=verdict,
                    effective=effective if verdict is not None else None,
                )
                kept[sock] = listener
                listeners.append(listener)
        self._memo = memo
        self._netfilter.forget([v.label for v in views])
        return listeners

    def _attribute(self, views: Sequence[NamespaceView]) -> dict[Socket, ProcessInfo]:
        owners: dict[Socket, ProcessInfo] = {}
        netlink_sockets = [s for v in views if v.pids is None for s in v.sockets]
        attribution = self._resolver.resolve(s.inode for s in netlink_sockets if s.inode)
        for source, n in attribution.errors.items():
            self.error(source, "reading /proc/PID/fd", n)
        for s in netlink_sockets:
            info = attribution.owners.get(s.inode)
            if info is not None:
                owners[s] = info
        for view in views:
            for s in view.sockets if view.pids is not None else ():
                pid = view.pids.get((s.protocol.value, s.address, s.port))
                if pid is None:
                    continue
                try:
                    info = read_process(pid)
                except OSError as e:
                    self.error(ErrorSource.PROC, f"pid {pid}: {e}")
                    continue
                if info is None:
                    self.error(ErrorSource.PROC_VANISHED, f"pid {pid}")
                else:
                    owners[s] = info
        return owners

    def _judge_published(
        self,
        views: Sequence[NamespaceView],
        addresses_of: Mapping[str, tuple[HostAddress, ...] | None],
        listeners: Sequence[Listener],
    ) -> tuple[Published, ...]:
        if not self._published:
            return ()
        ports = self._netfilter.published()
        owners = {
            a.address: (v.label, v.container)
            for v in views
            if v.label != HOST_NETNS
            for a in addresses_of[v.label] or ()
            if a.scope is not Scope.LOOPBACK
        }
        return judge_published(ports, owners, listeners)

    def _probe(
        self,
        config: Config,
        verdicts: tuple[Verdict, ...],
        published: tuple[Published, ...],
        addresses: tuple[HostAddress, ...],
    ) -> tuple[tuple[Verdict, ...], tuple[Published, ...]]:
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

        # the path forwarded traffic takes: from the host to the target inside; an explicit
        # probe.addresses list is every address the prober may connect to
        def forwarded(p: Published) -> bool:
            listed = config.probe.addresses is None or p.target_address in hosts
            return p.protocol is Protocol.TCP and listed

        targets = [Target(h, v.service.port) for v in verdicts if probed(v) for h in hosts]
        targets += [Target(p.target_address, p.target_port) for p in published if forwarded(p)]
        results = probe_all(targets, config.probe.timeout)
        verdicts = tuple(
            dataclasses.replace(v, probes=tuple(results[Target(h, v.service.port)] for h in hosts))
            if probed(v)
            else v
            for v in verdicts
        )
        published = tuple(
            dataclasses.replace(p, probe=results[Target(p.target_address, p.target_port)])
            if forwarded(p)
            else p
            for p in published
        )
        return verdicts, published
