"""Metrics rendered from a hand-built Snapshot, compared with a golden exposition."""

import dataclasses
import gzip
import os
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import require_binary

from bindscope.collector.runtime import ReloadState, RuntimeCollector
from bindscope.collector.snapshot import Renderer, SnapshotCollector, render, render_openmetrics
from bindscope.model import (
    Exposure,
    Firewall,
    HostAddress,
    Listener,
    ProbeResult,
    ProcessInfo,
    Protocol,
    Published,
    PublishedStatus,
    Scope,
    ServiceSpec,
    Snapshot,
    Socket,
    Status,
    Verdict,
)

GOLDEN = Path(__file__).parent / "fixtures" / "snapshot.prom"


def listener(address, port, exposure, scope, name="python3", service="", protocol=Protocol.TCP):
    s = Socket(protocol, address, port, 6 if ":" in address else 4, None, inode=port)
    return Listener(s, ProcessInfo(pid=1, name=name), scope, exposure, service)


def snapshot() -> Snapshot:
    flask = listener("127.0.0.1", 5000, Exposure.LOOPBACK, Scope.LOOPBACK, service="web")
    db = listener("0.0.0.0", 5432, Exposure.PRIVATE, Scope.WILDCARD, "postgres", "db")
    stray = listener("::", 8080, Exposure.PRIVATE, Scope.WILDCARD, "node")
    dup = listener("::", 8080, Exposure.PRIVATE, Scope.WILDCARD, "node")  # SO_REUSEPORT
    dns = listener(
        "127.0.0.53",
        53,
        Exposure.LOOPBACK,
        Scope.LOOPBACK,
        "systemd-resolve",
        protocol=Protocol.UDP,
    )
    web = ServiceSpec("web", 5000, expose=Exposure.PRIVATE)
    database = ServiceSpec("db", 5432, expose=Exposure.LOOPBACK, process=re.compile("^postgres$"))
    cache = ServiceSpec("cache", 11211, protocol=Protocol.UDP, expose=Exposure.LOOPBACK)
    db = dataclasses.replace(db, firewall=Firewall.DROP, effective=Exposure.LOOPBACK)
    boxed = Listener(
        Socket(Protocol.TCP, "127.0.0.1", 8080, 4, None, 9, netns="netns:4026532", container="app"),
        ProcessInfo(pid=2, name="python3"),
        Scope.LOOPBACK,
        Exposure.LOOPBACK,
    )
    forwarded = Published(
        Protocol.TCP,
        "127.0.0.1",
        18081,
        "203.0.113.2",
        8080,
        PublishedStatus.LOOPBACK_ONLY,
        "netns:4026532",
        "app",
        (boxed,),
        ProbeResult("203.0.113.2", False, 0.0001, "ECONNREFUSED"),
    )
    return Snapshot(
        timestamp=1764000000.5,
        duration=0.0042,
        success=True,
        verdicts=(
            Verdict(
                web,
                Status.LOOPBACK_ONLY,
                Exposure.LOOPBACK,
                (flask,),
                (
                    ProbeResult("127.0.0.1", True, 0.0001),
                    ProbeResult("10.0.0.5", False, 0.0002, "ECONNREFUSED"),
                ),
            ),
            Verdict(database, Status.OK, Exposure.PRIVATE, (db,), (), Exposure.LOOPBACK),
            Verdict(cache, Status.NOT_LISTENING, Exposure.NONE),
        ),
        listeners=(flask, db, stray, dup, dns, boxed),
        unexpected=(stray, dup),
        host_addresses=(HostAddress("10.0.0.5", "eth0", 4, Scope.PRIVATE),),
        errors={"proc_vanished": 2},
        backend="netlink",
        # docker-proxy publishes one port on 0.0.0.0 and on :: to the same target
        published=(forwarded, dataclasses.replace(forwarded, host_address="::")),
        namespaces={"host": 1, "container": 1},
    )


def test_renderer_renders_again_only_what_moved(monkeypatch):
    import bindscope.collector.snapshot as module

    renderer = Renderer()
    first = snapshot()
    plain, zipped = renderer.render(first)
    assert plain == render(first) and gzip.decompress(zipped) == plain
    rendered = []
    original = module._text
    monkeypatch.setattr(module, "_text", lambda f: rendered.append(1) or original(f))
    # a later scan that found the same: only the moving parts (probes, scan) again
    later = dataclasses.replace(first, timestamp=first.timestamp + 15, errors={"proc": 1})
    plain, zipped = renderer.render(later)
    moving = len(rendered)
    assert moving == sum(part.key is None for part in SnapshotCollector(lambda: None).parts())
    assert plain == render(later) and gzip.decompress(zipped) == plain
    # a changed verdict (equal records, new objects elsewhere) renders its part again
    changed = dataclasses.replace(
        later, verdicts=(dataclasses.replace(later.verdicts[0], status=Status.OK),)
    )
    rendered.clear()
    plain, zipped = renderer.render(changed)
    assert len(rendered) == moving + 1
    assert plain == render(changed) and gzip.decompress(zipped) == plain


def test_golden_exposition():
    got = render(snapshot()).decode()
    if os.environ.get("BINDSCOPE_UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text()


def test_single_values():
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot))
    get = registry.get_sample_value
    assert get("bindscope_service_status", {"service": "web", "status": "loopback_only"}) == 1
    assert get("bindscope_service_status", {"service": "web", "status": "ok"}) == 0
    assert get("bindscope_service_listening", {"service": "cache"}) == 0
    assert get("bindscope_service_exposure", {"service": "cache", "exposure": "none"}) == 1
    assert get("bindscope_probe_success", {"service": "web", "address": "10.0.0.5"}) == 0
    assert get("bindscope_listeners", {"protocol": "tcp", "exposure": "private"}) == 3
    assert get("bindscope_scan_errors_total", {"source": "proc_vanished"}) == 2
    assert get("bindscope_scan_errors_total", {"source": "proc"}) == 0
    # the database binds wide, the firewall narrows it: shown, not judged overexposed
    assert get("bindscope_service_exposure", {"service": "db", "exposure": "private"}) == 1
    assert (
        get("bindscope_service_effective_exposure", {"service": "db", "exposure": "loopback"}) == 1
    )
    fw = {"protocol": "tcp", "address": "0.0.0.0", "port": "5432", "netns": "host"}
    assert get("bindscope_listener_firewall_info", {**fw, "verdict": "drop"}) == 1
    # loopback listeners have no firewall verdict: lo is always accepted
    fw |= {"address": "127.0.0.1", "port": "5000"}
    assert get("bindscope_listener_firewall_info", {**fw, "verdict": "accept"}) is None
    key = {"container": "app", "protocol": "tcp", "host_port": "18081"}
    assert get("bindscope_published_port_status", {**key, "status": "loopback_only"}) == 1
    assert get("bindscope_network_namespaces", {"kind": "container"}) == 1
    assert get("bindscope_network_namespaces", {"kind": "named"}) == 0


def test_listener_cap_limits_series():
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot, max_listeners=2))
    text = generate_latest(registry).decode()
    assert text.count("bindscope_listener_info{") == 2


def test_every_per_listener_family_is_capped_and_its_rest_counted():
    strays = tuple(
        dataclasses.replace(
            listener("0.0.0.0", 10000 + i, Exposure.PUBLIC, Scope.WILDCARD),
            firewall=Firewall.ACCEPT,
        )
        for i in range(50)
    )
    snap = dataclasses.replace(snapshot(), listeners=strays, unexpected=strays)
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: snap, max_listeners=7))
    for family in (
        "bindscope_listener_info",
        "bindscope_unexpected_listener_info",
        "bindscope_listener_firewall_info",
    ):
        assert len([s for s in _samples(registry, family)]) == 7, family
        assert registry.get_sample_value(f"{family}_dropped") == 43, family


def _samples(registry: CollectorRegistry, family: str) -> list[object]:
    return [s for m in registry.collect() if m.name == family for s in m.samples]


def test_nothing_before_the_first_scan():
    assert render(None) == b""


def test_runtime_collector():
    registry = CollectorRegistry()
    registry.register(RuntimeCollector(lambda: ReloadState(False, 12.0), lambda: "psutil"))
    get = registry.get_sample_value
    assert get("bindscope_config_last_reload_successful") == 0
    assert get("bindscope_config_last_reload_success_timestamp_seconds") == 12.0
    text = generate_latest(registry).decode()
    assert re.search(
        r'bindscope_build_info\{discovery="psutil",python_version="[^"]+",'
        r'version="[^"]+"\} 1.0',
        text,
    )


def test_promtool_check_metrics_on_golden():
    require_binary("promtool")
    r = subprocess.run(
        ["promtool", "check", "metrics"],
        input=GOLDEN.read_text(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("status", list(Status), ids=lambda s: s.value)
def test_status_is_one_hot(status):
    snap = snapshot()
    v = snap.verdicts[0]
    one = Snapshot(**{**snap.__dict__, "verdicts": (Verdict(v.service, status, v.exposure),)})
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: one))
    values = {
        s.value: registry.get_sample_value(
            "bindscope_service_status", {"service": "web", "status": s.value}
        )
        for s in Status
    }
    assert values == {s.value: float(s is status) for s in Status}


def test_no_series_twice():
    """Every sample's name and label set is unique, or Prometheus rejects the scrape."""
    seen = set()
    for family in text_string_to_metric_families(render(snapshot()).decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in seen, key
            seen.add(key)


def test_openmetrics_is_rendered_by_parts_too_and_parses():
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om

    renderer = Renderer(fmt="openmetrics")
    first = snapshot()
    plain, zipped = renderer.render(first)
    later = dataclasses.replace(first, timestamp=first.timestamp + 15)
    plain, zipped = renderer.render(later)
    assert plain + b"# EOF\n" == render_openmetrics(later)
    assert gzip.decompress(zipped) == plain
    names = {f.name for f in om((plain + b"# EOF\n").decode())}
    assert {"bindscope_service_status", "bindscope_scan_errors"} <= names
