"""Prometheus metric families of a completed Snapshot, rendered once per scan."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator

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
        yield from self._services(snap)
        yield from self._listeners(snap)
        yield from self._published(snap)
        yield from self._scan(snap)

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
            s = v.service
            info.add_metric([s.name, s.protocol.value, str(s.port), s.expose.value], 1)
            listening.add_metric([s.name], float(v.listening))
            for st in Status:
                status.add_metric([s.name, st.value], float(v.status is st))
            for ex in Exposure:
                exposure.add_metric([s.name, ex.value], float(v.exposure is ex))
                effective.add_metric([s.name, ex.value], float(v.effective_exposure is ex))
            for p in v.probes:
                success.add_metric([s.name, p.address], float(p.success))
                duration.add_metric([s.name, p.address], p.duration)
        yield from (info, listening, status, exposure, effective, success, duration)

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
        probe = GaugeMetricFamily(
            "bindscope_published_port_probe_success",
            "1 if a TCP connect from the host to the published port's target succeeded.",
            labels=["container", "protocol", "host_port", "target_address", "target_port"],
        )
        seen: set[tuple[str, ...]] = set()
        probed: set[tuple[str, ...]] = set()
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
        yield from (info, status, probe)
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


def render(snap: Snapshot | None, max_listeners: int = 0) -> bytes:
    """The text exposition of a snapshot, made once per scan and served to every scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap, max_listeners))
    return generate_latest(registry)


def render_openmetrics(snap: Snapshot | None, max_listeners: int = 0) -> bytes:
    """The same exposition in OpenMetrics, made once per scan beside the text one."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap, max_listeners))
    return generate_openmetrics(registry)
