"""The JSON API under /api/v1/: what other hosts' exporters and `diagnose HOST:PORT` ask.

`services` lists this host's non-loopback addresses and its declared services with their
verdicts; `diagnose` is the diagnosis document of `bindscope diagnose --json`, plus the
judged services of that port in the `services` shape. Both come from the latest scan:
a request never starts one. docs/api.md documents the shapes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from bindscope.config.load import Config
from bindscope.diagnose.case import TargetError, diagnosis_of, resolve_target
from bindscope.diagnose.document import to_document
from bindscope.judge import judge
from bindscope.model import HOST_NETNS, Firewall, Scope, Snapshot, Verdict
from bindscope.netfilter.read import read_ruleset
from bindscope.netfilter.ruleset import Ruleset

log = logging.getLogger("bindscope.web")

API_VERSION = 1  # bump only on an incompatible change of a shape
MAX_TARGET = 128


def firewall_of(v: Verdict) -> str | None:
    """What the packet filter does to other hosts on this service's non-loopback
    sockets: accept if any accepts, drop if all drop, else unknown; None: nothing listens
    beyond loopback."""
    verdicts = {lst.firewall for lst in v.listeners if lst.scope is not Scope.LOOPBACK}
    if not verdicts:
        return None
    if Firewall.ACCEPT in verdicts:
        return Firewall.ACCEPT.value
    if verdicts == {Firewall.DROP}:
        return Firewall.DROP.value
    return Firewall.UNKNOWN.value


def service_json(v: Verdict) -> dict[str, Any]:
    s = v.service
    return {
        "name": s.name,
        "port": s.port,
        "protocol": s.protocol.value,
        "expose": s.expose.value,
        "status": v.status.value,
        "exposure": v.exposure.value,
        "effective_exposure": v.effective_exposure.value,
        "firewall": firewall_of(v),
    }


def services_json(snap: Snapshot) -> dict[str, Any]:
    addresses = [
        a.address
        for a in snap.host_addresses
        if a.scope not in (Scope.LOOPBACK, Scope.LINK_LOCAL, Scope.WILDCARD)
    ]
    return {
        "version": API_VERSION,
        "timestamp": snap.timestamp,
        "addresses": list(dict.fromkeys(addresses)),
        "services": [service_json(v) for v in snap.verdicts],
    }


class Api:
    """`Endpoints.api`: (path, query) -> (HTTP status, JSON body)."""

    def __init__(self, snapshot: Callable[[], Snapshot | None], config: Callable[[], Config]):
        self._snapshot = snapshot
        self._config = config
        # the host's packet filter as diagnose names its rules: read at most once a scan
        self._rulesets: tuple[float, dict[str, tuple[Ruleset | None, str]]] = (-1.0, {})

    def __call__(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes]:
        handlers = {"/api/v1/services": self._services, "/api/v1/diagnose": self._diagnose}
        handler = handlers.get(path)
        if handler is None:
            return _error(404, f"no such endpoint {path[:80]!r}; there are: {', '.join(handlers)}")
        snap = self._snapshot()
        if snap is None:
            return _error(503, "the first scan has not completed")
        try:
            return handler(snap, query)
        except Exception:  # a bug in one diagnosis must answer, not drop the connection
            log.exception("api request failed", extra={"path": path})
            return _error(500, "internal error; the exporter's log has the details")

    def _services(self, snap: Snapshot, _query: dict[str, list[str]]) -> tuple[int, bytes]:
        return 200, _body(services_json(snap))

    def _diagnose(self, snap: Snapshot, query: dict[str, list[str]]) -> tuple[int, bytes]:
        targets = query.get("target", [])
        if len(targets) != 1 or not targets[0] or len(targets[0]) > MAX_TARGET:
            return _error(400, "give one target: ?target=PORT or ?target=SERVICE")
        target, config = targets[0], self._config()
        try:
            port, specs, declared = resolve_target(target, config)
        except TargetError as e:
            return _error(400, str(e))
        if self._rulesets[0] != snap.timestamp:
            self._rulesets = (snap.timestamp, {HOST_NETNS: read_ruleset()})
        diagnosis = diagnosis_of(
            target, snap, config, config.probe.enabled, rulesets=self._rulesets[1]
        )
        doc = to_document(diagnosis, target)
        names = {s.name for s in specs}
        verdicts = [v for v in snap.verdicts if v.service.name in names]
        if not declared:
            # judged as the diagnosis judged it: against the default expectation
            verdicts, _ = judge(specs, [lst for lst in snap.listeners if lst.socket.port == port])
            verdicts = [v for v in verdicts if v.listening] or verdicts[:1]
        doc["services"] = [service_json(v) for v in verdicts]
        return 200, _body(doc)


def _body(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1) + "\n").encode()


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, _body({"version": API_VERSION, "error": message})
