"""Metric families of a peer round: what this host sees of the exporters it watches."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from bindscope.model import PeerError, PeerRound


class PeerCollector(Collector):
    """Renders the latest peer round, e.g.

    bindscope_peer_probe_success{address="198.51.100.1",peer="198.51.100.1:9917",service="api"} 0.0
    """

    def __init__(self, latest: Callable[[], PeerRound | None]) -> None:
        self._latest = latest

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        r = self._latest()
        if r is None:
            return
        up = GaugeMetricFamily(
            "bindscope_peer_up",
            "1 if the peer's bindscope API answered this host's last round with its services.",
            labels=["peer"],
        )
        success = GaugeMetricFamily(
            "bindscope_peer_probe_success",
            "1 if a TCP connect from this host to the peer's declared service on that "
            "address succeeded.",
            labels=["peer", "service", "address"],
        )
        duration = GaugeMetricFamily(
            "bindscope_peer_probe_duration_seconds",
            "How long that connect from this host took.",
            labels=["peer", "service", "address"],
            unit="seconds",
        )
        for p in r.peers:
            up.add_metric([p.peer], float(p.up))
            for probe in p.probes:
                labels = [p.peer, probe.service, probe.address]
                success.add_metric(labels, float(probe.success))
                duration.add_metric(labels, probe.duration)
        yield up
        yield success
        yield duration
        errors = CounterMetricFamily(
            "bindscope_peer_errors",
            "Peer fetches and rounds that failed or were cut short, by reason: "
            + ", ".join(e.value for e in PeerError)
            + ". For file_sd the peer label is the file.",
            labels=["peer", "reason"],
        )
        for (peer, reason), n in sorted(r.errors.items()):
            errors.add_metric([peer, reason], n)
        yield errors
        yield GaugeMetricFamily(
            "bindscope_peer_round_duration_seconds",
            "How long the last round over every peer took.",
            value=r.duration,
        )


def render(r: PeerRound) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PeerCollector(lambda: r))
    return generate_latest(registry)


def render_openmetrics(r: PeerRound) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PeerCollector(lambda: r))
    return generate_openmetrics(registry)
