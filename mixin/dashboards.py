"""Grafana dashboards for bindscope as plain dicts: a fleet overview and a host view.

Queries reuse the PromQL builders of mixin.rules on raw metrics, so an imported dashboard
works without the recording rules loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bindscope.model import Exposure, Status
from mixin.rules import (
    EXPOSURE_RANKS,
    LOOPBACK_ADDRESS_RE,
    PUBLISHED_PORT_LABELS,
    SERVICE_LABELS,
    STATUS_CODES,
    exposure_rank_expr,
    peers_all_fail_expr,
    quote,
    status_code_expr,
)

SCHEMA_VERSION = 39
FLEET_UID = "bindscope-fleet"
HOST_UID = "bindscope-host"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Dashboards select by variables; the rules' job selector does not apply here.
VARS = 'job=~"$job", instance=~"$instance"'

STATUS_COLORS = {
    Status.OK: "green",
    Status.PROCESS_UNKNOWN: "blue",
    Status.WRONG_PROCESS: "orange",
    Status.BLOCKED: "orange",
    Status.NOT_LISTENING: "yellow",
    Status.LOOPBACK_ONLY: "red",
    Status.OVEREXPOSED: "dark-red",
}
_STATUS_COLORS = {s.value: STATUS_COLORS[s] for s in sorted(Status, key=lambda s: s.severity)}
EXPOSURE_COLORS = {
    Exposure.NONE: "text",
    Exposure.LOOPBACK: "green",
    Exposure.PRIVATE: "blue",
    Exposure.PUBLIC: "orange",
}
_EXPOSURE_COLORS = {e.value: EXPOSURE_COLORS[e] for e in Exposure}
# Grafana's own interval variables, for running panel queries outside Grafana.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


@dataclass(frozen=True)
class DashboardsConfig:
    """Knobs of the generated dashboards; the defaults are the committed files."""

    refresh: str = "30s"
    time_from: str = "now-6h"
    tags: tuple[str, ...] = ("bindscope",)


# --- building blocks --------------------------------------------------------------------


def _target(expr: str, ref: str = "A", legend: str = "", table: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DATASOURCE, "refId": ref, "expr": expr}
    if table:
        t |= {"format": "table", "instant": True, "range": False}
    else:
        t |= {"legendFormat": legend or "__auto", "range": True}
    return t


def _value_mappings(names: Mapping[str, int], colors: Mapping[str, str]) -> list[dict[str, Any]]:
    options = {
        str(code): {"text": name, "color": colors[name], "index": i}
        for i, (name, code) in enumerate(names.items())
    }
    return [{"type": "value", "options": options}]


def _text_mappings(colors: Mapping[str, str]) -> list[dict[str, Any]]:
    options = {name: {"color": color, "index": i} for i, (name, color) in enumerate(colors.items())}
    return [{"type": "value", "options": options}]


def _organize(hide: tuple[str, ...] = (), rename: Mapping[str, str] | None = None) -> dict:
    excluded = dict.fromkeys(("Time", "__name__", "job", *hide), True)
    return {
        "id": "organize",
        "options": {"excludeByName": excluded, "renameByName": dict(rename or {})},
    }


def _only_positive(field: str = "Value") -> dict[str, Any]:
    """Show only rows whose value is above 0: the query returns the 0s too, so it is
    never empty on a healthy host, while the table lists only what is wrong."""
    return {
        "id": "filterByValue",
        "options": {
            "type": "include",
            "match": "any",
            "filters": [{"fieldName": field, "config": {"id": "greater", "options": {"value": 0}}}],
        },
    }


def _panel(
    kind: str,
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    size: tuple[int, int],
    *,
    defaults: dict[str, Any] | None = None,
    overrides: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
    transformations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    p: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": size[0], "h": size[1]},
        "targets": targets,
        "fieldConfig": {"defaults": defaults or {}, "overrides": overrides or []},
        "options": options or {},
    }
    if transformations:
        p["transformations"] = transformations
    return p


def _table(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    size: tuple[int, int],
    transformations: list[dict[str, Any]],
    overrides: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return _panel(
        "table",
        title,
        description,
        targets,
        size,
        overrides=overrides,
        options={"showHeader": True, "cellHeight": "sm"},
        transformations=transformations,
    )


def _stat(title: str, description: str, expr: str, unit: str = "none") -> dict[str, Any]:
    return _panel(
        "stat",
        title,
        description,
        [_target(expr)],
        (4, 4),
        defaults={"unit": unit},
        options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
    )


def _column_mappings(column: str, colors: Mapping[str, str]) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": column},
        "properties": [
            {"id": "mappings", "value": _text_mappings(colors)},
            {"id": "custom.cellOptions", "value": {"type": "color-text"}},
        ],
    }


def _layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Place panels left to right in 24-column rows; ids follow the order."""
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        p["id"] = i
        x, row_h = x + w, max(row_h, h)
    return panels


def _variables(multi_instance: bool) -> list[dict[str, Any]]:
    def query_var(name: str, query: str, multi: bool) -> dict[str, Any]:
        v: dict[str, Any] = {
            "type": "query",
            "name": name,
            "label": name,
            "datasource": DATASOURCE,
            "definition": query,
            "query": {"query": query, "refId": "StandardVariableQuery"},
            "refresh": 2,  # on time range change: hosts come and go
            "sort": 1,
            "multi": multi,
            "includeAll": multi,
        }
        if multi:
            # A regex of every value grows with the fleet; `.+` stays one matcher.
            v["allValue"] = ".+"
            v["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
        return v

    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "refresh": 1,
            "regex": "",
        },
        query_var("job", "label_values(bindscope_build_info, job)", False),
        query_var(
            "instance", 'label_values(bindscope_build_info{job=~"$job"}, instance)', multi_instance
        ),
    ]


def _dashboard(
    c: DashboardsConfig,
    uid: str,
    title: str,
    description: str,
    panels: list[dict[str, Any]],
    multi_instance: bool,
) -> dict[str, Any]:
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "description": description,
        "tags": list(c.tags),
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": c.refresh,
        "time": {"from": c.time_from, "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": list(c.tags),
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "title": "bindscope",
            }
        ],
        "templating": {"list": _variables(multi_instance)},
        "panels": _layout(panels),
    }


# --- queries shared by both dashboards ------------------------------------------------------


def _none_per_instance() -> str:
    """A 0 row for each selected exporter, so a table of problems is never an empty query."""
    return f"0 * group by (instance, job) (bindscope_build_info{{{VARS}}})"


def _service_table_expr(status_matcher: str) -> str:
    return (
        f"bindscope_service_status{{{VARS}, {status_matcher}}}\n"
        f"* on ({SERVICE_LABELS}) group_left (port, protocol, expose)\n"
        f"  bindscope_service_info{{{VARS}}}"
    )


def _unexpected_expr() -> str:
    return (
        "max by (instance, job, protocol, address, port, exposure, process, netns, container) "
        f"(bindscope_unexpected_listener_info{{{VARS}}})\n"
        f"or on (instance, job) {_none_per_instance()}"
    )


def _published_ports_expr() -> str:
    return (
        f'bindscope_published_port_status{{{VARS}, status!="ok"}}\n'
        f"* on ({PUBLISHED_PORT_LABELS}) group_left (host_address, target_address, target_port)\n"
        f"  topk by ({PUBLISHED_PORT_LABELS}) (1, bindscope_published_port_info{{{VARS}}})\n"
        f"or on (instance, job) {_none_per_instance()}"
    )


def _unreachable_from_peers_table(size: tuple[int, int]) -> dict[str, Any]:
    # the watchers' series carry the watcher's instance: select them by job alone and
    # let the watched host's own series pick the instances
    inside = (
        "max by (instance, job, service) (bindscope_probe_success{"
        f"{VARS}, address!~{quote(LOOPBACK_ADDRESS_RE)}}}) == 1"
    )
    expr = (
        f"bindscope_service_info{{{VARS}}}\n"
        f"and on ({SERVICE_LABELS}) ({inside})\n"
        f"and on ({SERVICE_LABELS}) (\n{peers_all_fail_expr('job=~' + quote('$job'))}\n)\n"
        f"or on (instance, job) {_none_per_instance()}"
    )
    return _table(
        "Reachable from inside, not from peers",
        "Services the host's own probe reaches on a non-loopback address while every "
        "connect from the bindscope peers watching the host fails: something between "
        "the hosts (a security group, a router ACL, a hypervisor filter) drops them.",
        [_target(expr, table=True)],
        size,
        [_only_positive(), _organize(hide=("Value",))],
    )


def _status_history(size: tuple[int, int]) -> dict[str, Any]:
    return _panel(
        "state-timeline",
        "Status history",
        "Each declared service's status over time; one row per host and service.",
        [_target(status_code_expr(VARS), legend="{{instance}} {{service}}")],
        size,
        defaults={
            "mappings": _value_mappings(STATUS_CODES, _STATUS_COLORS),
            "color": {"mode": "thresholds"},
            "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]},
        },
        options={"showValue": "never", "mergeValues": True, "rowHeight": 0.9},
    )


def _published_ports_table(size: tuple[int, int]) -> dict[str, Any]:
    return _table(
        "Published ports that cannot be reached",
        "Container ports published on the host whose app inside the container does not "
        "accept on the forwarded address: not_listening, or loopback_only (the app binds "
        "127.0.0.1 inside its container).",
        [_target(_published_ports_expr(), table=True)],
        size,
        [_only_positive(), _organize(hide=("Value",))],
        overrides=[_column_mappings("status", _STATUS_COLORS)],
    )


def _unexpected_table(size: tuple[int, int]) -> dict[str, Any]:
    return _table(
        "Unexpected listeners",
        "Listeners beyond loopback that no service declares and unexpected.ignore does not list.",
        [_target(_unexpected_expr(), table=True)],
        size,
        [_only_positive(), _organize(hide=("Value",))],
        overrides=[_column_mappings("exposure", _EXPOSURE_COLORS)],
    )


# --- the dashboards -----------------------------------------------------------------------


def _declared_rank_expr() -> str:
    """One series per service whose value ranks its declared `expose`."""
    terms = "\n  or ".join(
        f'bindscope_service_info{{{VARS}, expose="{e}"}} * {rank}'
        for e, rank in EXPOSURE_RANKS.items()
        if e != "none"
    )
    return f"(\n  {terms}\n)"


def fleet(c: DashboardsConfig) -> dict[str, Any]:
    bind = exposure_rank_expr("bindscope_service_exposure", VARS)
    effective = exposure_rank_expr("bindscope_service_effective_exposure", VARS)
    declared = _declared_rank_expr()
    # only where the bind alone is wider than declared and the firewall brings it back
    # within the declaration: a blocked service, or one narrowed but still too wide, is
    # a failing status, not protected
    narrowed = (
        f"(\n(\n{bind}\n- {effective}\n)\n"
        f"and on ({SERVICE_LABELS}) ({bind}\n> on ({SERVICE_LABELS}) {declared})\n"
        f"and on ({SERVICE_LABELS}) ({effective}\n<= on ({SERVICE_LABELS}) {declared})\n)\n"
        f"* on ({SERVICE_LABELS}) group_left (port, protocol, expose, exposure)\n"
        f"  (bindscope_service_info{{{VARS}}}\n"
        f"   * on ({SERVICE_LABELS}) group_left (exposure)\n"
        f"     (bindscope_service_exposure{{{VARS}}} == 1))\n"
        f"or on (instance, job) {_none_per_instance()}"
    )
    scan_health = [
        _target(f"max by (instance, job) (up{{{VARS}}})", "A", table=True),
        _target(f"max by (instance, job) (bindscope_scan_success{{{VARS}}})", "B", table=True),
        _target(
            f"max by (instance, job) (time() - bindscope_last_scan_timestamp_seconds{{{VARS}}})",
            "C",
            table=True,
        ),
        _target(
            f"max by (instance, job) (bindscope_scan_duration_seconds{{{VARS}}})", "D", table=True
        ),
        _target(
            f"sum by (instance, job) (increase(bindscope_scan_errors_total{{{VARS}}}[1h]))\n"
            f"or on (instance, job) {_none_per_instance()}",
            "E",
            table=True,
        ),
        _target(
            f"max by (instance, job) (bindscope_config_last_reload_successful{{{VARS}}})",
            "F",
            table=True,
        ),
    ]
    health_columns = {
        "Value #A": "up",
        "Value #B": "last scan ok",
        "Value #C": "last scan age",
        "Value #D": "scan duration",
        "Value #E": "errors (1h)",
        "Value #F": "config loaded",
    }
    panels = [
        _panel(
            "bargauge",
            "Services by status",
            "Declared services across the selected hosts, counted by status.",
            [_target(f"sum by (status) (bindscope_service_status{{{VARS}}})", legend="{{status}}")],
            (8, 8),
            defaults={
                "color": {"mode": "fixed", "fixedColor": "text"},
                "min": 0,
                "decimals": 0,
            },
            overrides=[
                {
                    "matcher": {"id": "byName", "options": s},
                    "properties": [
                        {"id": "color", "value": {"mode": "fixed", "fixedColor": color}}
                    ],
                }
                for s, color in _STATUS_COLORS.items()
            ],
            options={
                "orientation": "horizontal",
                "displayMode": "basic",
                "showUnfilled": True,
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            },
        ),
        _stat(
            "Exporters up",
            "Targets of the selected jobs that Prometheus scrapes successfully.",
            f"sum(up{{{VARS}}})",
        ),
        _stat(
            "Exporters down",
            "Targets Prometheus cannot scrape: their hosts are not checked.",
            f"count(up{{{VARS}}} == 0) or vector(0)",
        ),
        _stat(
            "Unexpected listeners",
            "Undeclared listeners beyond loopback across the selected hosts.",
            f"count(bindscope_unexpected_listener_info{{{VARS}}}) or vector(0)",
        ),
        _stat(
            "Published ports unreachable",
            "Published container ports whose app does not accept on the forwarded address.",
            f'count(bindscope_published_port_status{{{VARS}, status!="ok"}} == 1) or vector(0)',
        ),
        _stat(
            "Hosts with failing scans",
            "Exporters whose last scan failed.",
            f"count(bindscope_scan_success{{{VARS}}} == 0) or vector(0)",
        ),
        _stat(
            "Listeners beyond loopback",
            "Listening sockets other hosts can reach, as bound.",
            f'sum(bindscope_listeners{{{VARS}, exposure!~"none|loopback"}}) or vector(0)',
        ),
        _table(
            "Loopback-only services",
            "Services declared private or public that listen on loopback only: clients on "
            "other hosts are refused (the app.run() default).",
            [_target(_service_table_expr(f'status="{Status.LOOPBACK_ONLY.value}"'), table=True)],
            (12, 8),
            [_only_positive(), _organize(hide=("Value", "status"))],
        ),
        _table(
            "Over-exposed services",
            "Services reachable more widely than declared, after the firewall.",
            [_target(_service_table_expr(f'status="{Status.OVEREXPOSED.value}"'), table=True)],
            (12, 8),
            [_only_positive(), _organize(hide=("Value", "status"))],
        ),
        _table(
            "Other failing services",
            "Services not listening, held by another process, blocked by the firewall, or "
            "whose process cannot be read.",
            [
                _target(
                    _service_table_expr(
                        f'status!~"{Status.OK.value}|{Status.LOOPBACK_ONLY.value}|{Status.OVEREXPOSED.value}"'
                    ),
                    table=True,
                )
            ],
            (12, 8),
            [_only_positive(), _organize(hide=("Value",))],
            overrides=[_column_mappings("status", _STATUS_COLORS)],
        ),
        _unexpected_table((12, 8)),
        _status_history((24, 10)),
        _published_ports_table((12, 8)),
        _unreachable_from_peers_table((12, 8)),
        _table(
            "Protected by the firewall alone",
            "Services bound wider than declared that only the firewall keeps within their "
            "declaration (status ok, no alert): exposure is the bind's, "
            "the value is how many levels (none < loopback < private < public) the "
            "firewall takes off. A firewall change would expose them.",
            [_target(narrowed, table=True)],
            (12, 8),
            [_only_positive(), _organize(rename={"Value": "levels narrowed"})],
            overrides=[_column_mappings("exposure", _EXPOSURE_COLORS)],
        ),
        _table(
            "Scan health",
            "Per exporter: scraped, last scan succeeded, its age and duration, scan errors "
            "in the last hour, and whether the config loaded.",
            scan_health,
            (24, 8),
            [{"id": "merge", "options": {}}, _organize(rename=health_columns)],
            overrides=[
                {
                    "matcher": {"id": "byName", "options": name},
                    "properties": [{"id": "unit", "value": "s"}],
                }
                for name in ("Value #C", "Value #D")
            ],
        ),
        _panel(
            "timeseries",
            "Listeners by exposure",
            "Listening sockets across the selected hosts, by how widely they are bound.",
            [_target(f"sum by (exposure) (bindscope_listeners{{{VARS}}})", legend="{{exposure}}")],
            (24, 8),
            defaults={"custom": {"drawStyle": "line", "fillOpacity": 10}, "decimals": 0},
        ),
    ]
    return _dashboard(
        c,
        FLEET_UID,
        "bindscope / Fleet",
        "Declared services and listeners across hosts: what regressed, where, and since when.",
        panels,
        multi_instance=True,
    )


def host(c: DashboardsConfig) -> dict[str, Any]:
    probe_mapping = {"0": {"text": "fails", "color": "red"}, "1": {"text": "accepts"}}
    panels = [
        _panel(
            "bargauge",
            "Services by status",
            "This host's declared services, counted by status.",
            [_target(f"sum by (status) (bindscope_service_status{{{VARS}}})", legend="{{status}}")],
            (8, 6),
            defaults={"min": 0, "decimals": 0, "color": {"mode": "fixed", "fixedColor": "text"}},
            options={
                "orientation": "horizontal",
                "displayMode": "basic",
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            },
        ),
        _stat(
            "Listeners", "Listening sockets on this host.", f"sum(bindscope_listeners{{{VARS}}})"
        ),
        _stat(
            "Unexpected listeners",
            "Undeclared listeners beyond loopback.",
            f"count(bindscope_unexpected_listener_info{{{VARS}}}) or vector(0)",
        ),
        _stat(
            "Last scan age",
            "Time since the last completed scan.",
            f"time() - max(bindscope_last_scan_timestamp_seconds{{{VARS}}})",
            unit="s",
        ),
        _stat(
            "Listener series dropped",
            "bindscope_listener_info series not exported because of the exporter's "
            "cardinality cap; above 0, the Listeners table is incomplete.",
            f"max(bindscope_listener_info_dropped{{{VARS}}}) or vector(0)",
        ),
        _table(
            "Services",
            "Each declared service with its declaration and current status.",
            [
                _target(
                    f"(bindscope_service_status{{{VARS}}} == 1)\n"
                    f"* on ({SERVICE_LABELS}) group_left (port, protocol, expose)\n"
                    f"  bindscope_service_info{{{VARS}}}",
                    table=True,
                )
            ],
            (24, 7),
            [_organize(hide=("Value", "instance"))],
            overrides=[_column_mappings("status", _STATUS_COLORS)],
        ),
        _table(
            "Listeners",
            "Every listening socket: bind scope, who can reach it, owning process, the "
            "service it belongs to (empty when undeclared), network namespace, container.",
            [_target(f"bindscope_listener_info{{{VARS}}}", table=True)],
            (24, 10),
            [_organize(hide=("Value", "instance"))],
            overrides=[_column_mappings("exposure", _EXPOSURE_COLORS)],
        ),
        _table(
            "Probe results",
            "TCP connects from this host to each service on each of its addresses: the "
            "classic telnet test. Traffic to the host's own address enters through lo, so "
            "'accepts' does not prove a firewall lets other hosts in.",
            [
                _target(f"bindscope_probe_success{{{VARS}}}", "A", table=True),
                _target(f"bindscope_probe_duration_seconds{{{VARS}}}", "B", table=True),
            ],
            (12, 10),
            [
                {"id": "merge", "options": {}},
                _organize(
                    hide=("instance",), rename={"Value #A": "result", "Value #B": "duration"}
                ),
            ],
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "Value #A"},
                    "properties": [
                        {"id": "mappings", "value": [{"type": "value", "options": probe_mapping}]},
                        {"id": "custom.cellOptions", "value": {"type": "color-text"}},
                    ],
                },
                {
                    "matcher": {"id": "byName", "options": "Value #B"},
                    "properties": [{"id": "unit", "value": "s"}],
                },
            ],
        ),
        _table(
            "Firewall verdicts",
            "Whether the packet filter accepts a new connection from another host to each "
            "listener (unknown: the ruleset could not be read or evaluated).",
            [_target(f"bindscope_listener_firewall_info{{{VARS}}}", table=True)],
            (12, 10),
            [_organize(hide=("Value", "instance"))],
            overrides=[
                _column_mappings("verdict", {"accept": "green", "drop": "red", "unknown": "text"})
            ],
        ),
        _status_history((24, 8)),
        _unexpected_table((12, 8)),
        _published_ports_table((12, 8)),
        _panel(
            "timeseries",
            "Scan duration",
            "How long each scan took: discovery, attribution, judgement and probes.",
            [_target(f"bindscope_scan_duration_seconds{{{VARS}}}", legend="scan")],
            (8, 8),
            defaults={"unit": "s"},
        ),
        _panel(
            "timeseries",
            "Scan errors by source",
            "Errors per second while scanning, e.g. unreadable /proc entries (source=proc) "
            "or namespaces that could not be entered (source=netns).",
            [
                _target(
                    "sum by (source) "
                    f"(rate(bindscope_scan_errors_total{{{VARS}}}[$__rate_interval]))\n"
                    f"or on () 0 * group (bindscope_build_info{{{VARS}}})",
                    legend="{{source}}",
                )
            ],
            (8, 8),
            defaults={"unit": "ops"},
        ),
        _panel(
            "timeseries",
            "Listeners by exposure",
            "Listening sockets on this host by protocol and exposure.",
            [
                _target(
                    f"sum by (protocol, exposure) (bindscope_listeners{{{VARS}}})",
                    legend="{{protocol}} {{exposure}}",
                )
            ],
            (8, 8),
            defaults={"decimals": 0},
        ),
    ]
    return _dashboard(
        c,
        HOST_UID,
        "bindscope / Host",
        "One host: every listener, each service's verdict, probes, firewall verdicts, scans.",
        panels,
        multi_instance=False,
    )


def render(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2) + "\n"


# --- reading dashboards back --------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # collapsed rows hold their panels


def dashboard_queries(path: str | Path, substitutions: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every (panel title, PromQL) of a dashboard file, its variables replaced.

    `substitutions` maps variable names (job, instance) to values; Grafana's interval
    variables default to GRAFANA_BUILTINS. An unknown variable is an error, so a typo in
    a panel cannot pass as a query that returns nothing.
    """
    values = GRAFANA_BUILTINS | dict(substitutions)

    def replace(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        if name not in values:
            raise ValueError(f"{path}: no substitution for variable ${name}")
        return values[name]

    dashboard = json.loads(Path(path).read_text())
    return [
        (p["title"], _VARIABLE.sub(replace, t["expr"]))
        for p in _panels(dashboard["panels"])
        for t in p.get("targets", [])
        if "expr" in t
    ]
