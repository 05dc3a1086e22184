"""The `--json` document of `bindscope scan`: versioned, for machines."""

from __future__ import annotations

from typing import Any

from bindscope.config.load import Config
from bindscope.model import (
    Listener,
    PublishedStatus,
    Snapshot,
    Status,
)

JSON_VERSION = 1  # bump only on an incompatible change of the --json shape


def listener_json(lst: Listener, unexpected: set[Listener]) -> dict[str, Any]:
    s, p = lst.socket, lst.process
    return {
        "protocol": s.protocol.value,
        "address": s.address,
        "port": s.port,
        "family": s.family,
        "v6only": s.v6only,
        "scope": lst.scope.value,
        "exposure": lst.exposure.value,
        "netns": s.netns,
        "container": s.container,
        "service": lst.service,
        "unexpected": lst in unexpected,
        "process": {"pid": p.pid, "name": p.name, "cmdline": list(p.cmdline)},
    }


def snapshot_json(snap: Snapshot, config: Config) -> dict[str, Any]:
    """The --json document; its shape is public (docs/operator.md), `version` marks it."""
    unexpected = set(snap.unexpected)
    return {
        "version": JSON_VERSION,
        "ok": scan_ok(snap),
        "config": config.source,
        "timestamp": snap.timestamp,
        "scan": {
            "success": snap.success,
            "duration_seconds": snap.duration,
            "backend": snap.backend,
            "errors": dict(snap.errors),
        },
        "host_addresses": [
            {
                "address": a.address,
                "interface": a.interface,
                "family": a.family,
                "scope": a.scope.value,
            }
            for a in snap.host_addresses
        ],
        "services": [
            {
                "name": v.service.name,
                "port": v.service.port,
                "protocol": v.service.protocol.value,
                "expose": v.service.expose.value,
                "process": v.service.process.pattern if v.service.process else None,
                "netns": v.service.netns,
                "container": v.service.container.pattern if v.service.container else None,
                "status": v.status.value,
                "exposure": v.exposure.value,
                "listening": v.listening,
                # a verdict keeps its listeners as discovered, before judge labels them
                "listeners": [listener_json(lst, unexpected) for lst in v.listeners],
                "probes": [
                    {
                        "address": p.address,
                        "success": p.success,
                        "duration_seconds": p.duration,
                        "error": p.error,
                    }
                    for p in v.probes
                ],
            }
            for v in snap.verdicts
        ],
        "listeners": [listener_json(lst, unexpected) for lst in snap.listeners],
    }


def scan_ok(snap: Snapshot) -> bool:
    """Every declared service ok, and every published port leads to a listener: a port
    forwarded to an app on loopback is the Flask bug inside a container, declared or not."""
    return (
        snap.success
        and all(v.status is Status.OK for v in snap.verdicts)
        and all(p.status is PublishedStatus.OK for p in snap.published)
    )
