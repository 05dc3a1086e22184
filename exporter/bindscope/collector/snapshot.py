"""Prometheus metric families of a completed Snapshot, rendered once per scan: what did not
change since the last scan is not rendered again."""

from __future__ import annotations

import dataclasses
import enum
import gzip
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from bindscope.model import (
    ErrorSource,
    Exposure,
    NamespaceKind,
    Protocol,
    PublishedStatus,
    Snapshot,
    Status,
    worst_published,
)

Family = GaugeMetricFamily | CounterMetricFamily


def _one_of(vocabulary: type[enum.Enum]) -> str:
    return ", ".join(v.value for v in vocabulary)


class SnapshotCollector(Collector):
    """Renders the latest scan, e.g.

    bindscope_service_status{service="web",status="loopback_only"} 1.0
    """

    def __init__(self, latest: Callable[[], Snapshot | None], max_listeners: int = 0) -> None:
        self._latest = latest
        self._max_listeners = max_listeners

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snap = self._latest()
        if snap is None:
            return
        for part in self.parts():
            yield from part.families(snap)

    def parts(self) -> tuple[Part, ...]:
        """The families in exposition order, in runs that are stable (they depend only on
        verdicts, listeners and config) or moving (timestamps, durations, counters, probes)."""
        return (
            Part(self._services, _services_key),
            Part(self._probes),
            Part(self._listeners, lambda s: (s.listeners, s.unexpected)),
            Part(self._published, _published_key),
            Part(self._published_probes),
            Part(self._namespaces, lambda s: s.namespaces),
            Part(self._scan),
        )

    def _services(self, snap: Snapshot) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "bindscope_service_info",
            "A declared service: its port, protocol and expected exposure. Always 1.",
            labels=["service", "protocol", "port", "expose"],
        )
        listening = GaugeMetricFamily(
            "bindscope_service_listening",
            "1 if any socket listens on the service's port and protocol.",
            labels=["service"],
        )
        status = GaugeMetricFamily(
            "bindscope_service_status",
            "Verdict for each declared service, one-hot: " + _one_of(Status) + ".",
            labels=["service", "status"],
        )
        effective = GaugeMetricFamily(
            "bindscope_service_effective_exposure",
            "Who can reach the service after the firewall, one-hot: "
            + _one_of(Exposure)
            + ". Equal to bindscope_service_exposure when the firewall is not read.",
            labels=["service", "exposure"],
        )
        exposure = GaugeMetricFamily(
            "bindscope_service_exposure",
            "Who can reach the service judging by its bind addresses, one-hot: "
            + _one_of(Exposure)
            + ".",
            labels=["service", "exposure"],
        )
        for v in snap.verdicts:
            s = v.service
            info.add_metric([s.name, s.protocol.value, str(s.port), s.expose.value], 1)
            listening.add_metric([s.name], float(v.listening))
            for st in Status:
                status.add_metric([s.name, st.value], float(v.status is st))
            for ex in Exposure:
                exposure.add_metric([s.name, ex.value], float(v.exposure is ex))
                effective.add_metric([s.name, ex.value], float(v.effective_exposure is ex))
        yield from (info, listening, status, exposure, effective)

    def _probes(self, snap: Snapshot) -> Iterator[GaugeMetricFamily]:
        success = GaugeMetricFamily(
            "bindscope_probe_success",
            "1 if a TCP connect to the address and the service's port succeeded in the last scan.",
            labels=["service", "address"],
        )
        duration = GaugeMetricFamily(
            "bindscope_probe_duration_seconds",
            "How long the probe's TCP connect took.",
            labels=["service", "address"],
        )
        for v in snap.verdicts:
            for p in v.probes:
                success.add_metric([v.service.name, p.address], float(p.success))
                duration.add_metric([v.service.name, p.address], p.duration)
        yield from (success, duration)

    def _listeners(self, snap: Snapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        info = GaugeMetricFamily(
            "bindscope_listener_info",
            "A listening socket; service is empty when undeclared. Always 1.",
            labels=[
                "protocol",
                "address",
                "port",
                "scope",
                "exposure",
                "process",
                "service",
                "netns",
                "container",
            ],
        )
        seen: set[tuple[str, ...]] = set()
        for lst in snap.listeners:
            s = lst.socket
            labels = (
                s.protocol.value,
                s.address,
                str(s.port),
                lst.scope.value,
                lst.exposure.value,
                lst.process.name,
                lst.service,
                s.netns,
                s.container,
            )
            if labels in seen:  # SO_REUSEPORT groups share one series
                continue
            seen.add(labels)
            if self._kept(len(seen)):
                info.add_metric(list(labels), 1)
        yield info
        yield self._dropped("bindscope_listener_info", len(seen))
        counts = GaugeMetricFamily(
            "bindscope_listeners",
            "Listening sockets by protocol and exposure.",
            labels=["protocol", "exposure"],
        )
        tally = {(p, e): 0 for p in Protocol for e in Exposure if e is not Exposure.NONE}
        for lst in snap.listeners:
            tally[(lst.socket.protocol, lst.exposure)] += 1
        for (p, e), n in tally.items():
            counts.add_metric([p.value, e.value], n)
        yield counts
        strays = GaugeMetricFamily(
            "bindscope_unexpected_listener_info",
            "An undeclared listener reachable beyond "
            "loopback and not ignored by the config. Always 1.",
            labels=["protocol", "address", "port", "exposure", "process", "netns", "container"],
        )
        seen.clear()
        for lst in snap.unexpected:
            s = lst.socket
            labels = (
                s.protocol.value,
                s.address,
                str(s.port),
                lst.exposure.value,
                lst.process.name,
                s.netns,
                s.container,
            )
            if labels not in seen:
                seen.add(labels)
                if self._kept(len(seen)):
                    strays.add_metric(list(labels), 1)
        yield strays
        yield self._dropped("bindscope_unexpected_listener_info", len(seen))
        fw = GaugeMetricFamily(
            "bindscope_listener_firewall_info",
            "What the packet filter does to a new connection from another host to a listener "
            "reachable beyond loopback: accept (on some address), drop (on every one) or "
            "unknown. Always 1.",
            labels=["protocol", "address", "port", "netns", "verdict"],
        )
        seen.clear()
        for lst in snap.listeners:
            if lst.firewall is None:
                continue
            s = lst.socket
            labels = (s.protocol.value, s.address, str(s.port), s.netns, lst.firewall.value)
            if labels not in seen:
                seen.add(labels)
                if self._kept(len(seen)):
                    fw.add_metric(list(labels), 1)
        yield fw
        yield self._dropped("bindscope_listener_firewall_info", len(seen))

    def _kept(self, nth: int) -> bool:
        """Whether the nth distinct series of a per-listener family is within the cap."""
        return not self._max_listeners or nth <= self._max_listeners

    def _dropped(self, family: str, series: int) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            f"{family}_dropped",
            f"Series of the last scan left out of {family} by --collector.listeners.max.",
            value=max(0, series - self._max_listeners) if self._max_listeners else 0,
        )

    def _published(self, snap: Snapshot) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "bindscope_published_port_info",
            "A host port that NAT forwards into a container or namespace. Always 1.",
            labels=[
                "container",
                "protocol",
                "host_address",
                "host_port",
                "target_address",
                "target_port",
            ],
        )
        seen: set[tuple[str, ...]] = set()
        for p in snap.published:
            labels = (
                p.container,
                p.protocol.value,
                p.host_address,
                str(p.host_port),
                p.target_address,
                str(p.target_port),
            )
            if labels not in seen:
                seen.add(labels)
                info.add_metric(list(labels), 1)
        status = GaugeMetricFamily(
            "bindscope_published_port_status",
            "Whether a published port leads to a listener, one-hot: ok, not_listening, "
            "loopback_only (inside, the app listens on loopback only).",
            labels=["container", "protocol", "host_port", "status"],
        )
        for (container, protocol, host_port), p in worst_published(snap.published).items():
            for st in PublishedStatus:
                status.add_metric(
                    [container, protocol, str(host_port), st.value], float(p.status is st)
                )
        yield from (info, status)

    def _published_probes(self, snap: Snapshot) -> Iterator[GaugeMetricFamily]:
        probe = GaugeMetricFamily(
            "bindscope_published_port_probe_success",
            "1 if a TCP connect from the host to the published port's target succeeded.",
            labels=["container", "protocol", "host_port", "target_address", "target_port"],
        )
        probed: set[tuple[str, ...]] = set()
        for p in snap.published:
            # docker-proxy publishes one port on 0.0.0.0 and on :: to the same target:
            # one probe series for both
            target = (
                p.container,
                p.protocol.value,
                str(p.host_port),
                p.target_address,
                str(p.target_port),
            )
            if p.probe is not None and target not in probed:
                probed.add(target)
                probe.add_metric(list(target), float(p.probe.success))
        yield probe

    def _namespaces(self, snap: Snapshot) -> Iterator[GaugeMetricFamily]:
        kinds = GaugeMetricFamily(
            "bindscope_network_namespaces",
            "Network namespaces scanned, by kind: host, container, named (ip netns), other.",
            labels=["kind"],
        )
        for kind in (k.value for k in NamespaceKind):
            kinds.add_metric([kind], snap.namespaces.get(kind, 0))
        yield kinds

    def _scan(self, snap: Snapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "bindscope_scan_success", "1 if the last scan completed.", value=float(snap.success)
        )
        yield GaugeMetricFamily(
            "bindscope_scan_duration_seconds", "How long the last scan took.", value=snap.duration
        )
        yield GaugeMetricFamily(
            "bindscope_last_scan_timestamp_seconds",
            "When the last scan completed, in Unix time.",
            value=snap.timestamp,
        )
        errors = CounterMetricFamily(
            "bindscope_scan_errors",
            "Errors met while scanning, by source (e.g. unreadable "
            "/proc entries, processes that exited mid-scan).",
            labels=["source"],
        )
        # every source listed at 0 from the start: rate() and alerts see a series before the
        # first error
        counts = dict.fromkeys((e.value for e in ErrorSource), 0) | snap.errors
        for source in sorted(counts):
            errors.add_metric([source], counts[source])
        yield errors


def _services_key(snap: Snapshot) -> object:
    return tuple((v.service, v.status, v.exposure, v.listening, v.effective) for v in snap.verdicts)


def _published_key(snap: Snapshot) -> object:
    return tuple(dataclasses.replace(p, probe=None) for p in snap.published)


@dataclass(frozen=True)
class Part:
    """A run of families; `key` gives what a stable run depends on (None: moving)."""

    families: Callable[[Snapshot], Iterable[Family]]
    key: Callable[[Snapshot], object] | None = None


class _Families(Collector):
    def __init__(self, families: Iterable[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Family]:
        yield from self._families


def _text(families: Iterable[Family]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


_EOF = b"# EOF\n"


def _openmetrics(families: Iterable[Family]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    # one `# EOF` ends the whole exposition, not each part of it
    return generate_openmetrics(registry).removesuffix(_EOF)


def _families_in(fmt: str, families: Iterable[Family]) -> bytes:
    return _openmetrics(families) if fmt == "openmetrics" else _text(families)


def render(snap: Snapshot | None, max_listeners: int = 0, fmt: str = "text") -> bytes:
    """The exposition of a snapshot, rendered in full; OpenMetrics without its `# EOF`
    (the runtime part, served last, ends the exposition)."""
    if snap is None:
        return b""
    collector = SnapshotCollector(lambda: snap, max_listeners)
    return b"".join(_families_in(fmt, part.families(snap)) for part in collector.parts())


def render_openmetrics(snap: Snapshot | None, max_listeners: int = 0) -> bytes:
    """The same exposition in OpenMetrics, whole: `# EOF` included."""
    return render(snap, max_listeners, "openmetrics") + _EOF


class Renderer:
    """The exposition of each scan, plain and gzipped, rendering only what moved.

    A stable part is rendered and compressed again only when what it depends on differs
    from the last scan (compared by value; a scan that found nothing new hands over the
    same records, so the comparison stops at their identity). Moving parts are small and
    made every time. The gzipped exposition is one gzip member per part: consecutive
    members are one valid gzip stream. Equal, byte for byte, to render() in its format.
    """

    def __init__(self, max_listeners: int = 0, fmt: str = "text") -> None:
        self._collector = SnapshotCollector(lambda: None, max_listeners)
        self._fmt = fmt
        # the last exposition, and where each stable part lies in it: part -> (key,
        # plain start, end, gzip start, end); the parts are kept only there, not twice
        self._last: tuple[bytes, bytes] = (b"", b"")
        self._where: dict[int, tuple[object, int, int, int, int]] = {}

    def render(self, snap: Snapshot) -> tuple[bytes, bytes]:
        last_plain, last_zipped = memoryview(self._last[0]), memoryview(self._last[1])
        plain: list[bytes | memoryview] = []
        zipped: list[bytes | memoryview] = []
        where: dict[int, tuple[object, int, int, int, int]] = {}
        at, zat = 0, 0
        for i, part in enumerate(self._collector.parts()):
            key = part.key(snap) if part.key is not None else None
            known = self._where.get(i)
            if part.key is not None and known is not None and known[0] == key:
                text, member = last_plain[known[1] : known[2]], last_zipped[known[3] : known[4]]
            else:
                text = _families_in(self._fmt, part.families(snap))
                member = gzip.compress(text, compresslevel=6)
            if part.key is not None:
                where[i] = (key, at, at + len(text), zat, zat + len(member))
            plain.append(text)
            zipped.append(member)
            at, zat = at + len(text), zat + len(member)
        self._last = (b"".join(plain), b"".join(zipped))
        self._where = where
        last_plain.release()
        last_zipped.release()
        return self._last
