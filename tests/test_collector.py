"""Metrics rendered from a hand-built Snapshot, compared with a golden exposition."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import require_binary
from prometheus_client import CollectorRegistry, generate_latest

from bindscope.collector import ReloadState, RuntimeCollector, SnapshotCollector, render
from bindscope.model import (
    Exposure,
    HostAddress,
    Listener,
    ProbeResult,
    ProcessInfo,
    Protocol,
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
            Verdict(database, Status.OVEREXPOSED, Exposure.PRIVATE, (db,)),
            Verdict(cache, Status.NOT_LISTENING, Exposure.NONE),
        ),
        listeners=(flask, db, stray, dup, dns),
        unexpected=(stray, dup),
        host_addresses=(HostAddress("10.0.0.5", "eth0", 4, Scope.PRIVATE),),
        errors={"proc_vanished": 2},
        backend="netlink",
    )


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


def test_listener_cap_limits_series():
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot, max_listeners=2))
    text = generate_latest(registry).decode()
    assert text.count("bindscope_listener_info{") == 2


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
