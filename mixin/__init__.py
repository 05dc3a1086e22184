"""bindscope's monitoring mixin: alert and recording rules and Grafana dashboards as code.

Not shipped in the wheel; `python -m mixin` regenerates the committed files from it,
including the JSON that mixin/mixin.libsonnet imports for jsonnet users.
"""

from __future__ import annotations

from pathlib import Path

from mixin import dashboards, jsonnet, rules

ROOT = Path(__file__).resolve().parent.parent

RULES_PATH = "deploy/prometheus/bindscope.rules.yml"
FLEET_PATH = "grafana/bindscope-fleet.json"
HOST_PATH = "grafana/bindscope-host.json"
# Inside mixin/, so jsonnet-bundler's vendored copy of that folder holds all it imports.
JSONNET_DIR = "mixin/generated"


def generate(
    rules_config: rules.RulesConfig | None = None,
    dashboards_config: dashboards.DashboardsConfig | None = None,
) -> dict[str, str]:
    """Every generated file's text, by path relative to the repository root."""
    rc = rules_config or rules.RulesConfig()
    dc = dashboards_config or dashboards.DashboardsConfig()
    fleet = dashboards.render(dashboards.fleet(dc))
    host = dashboards.render(dashboards.host(dc))
    templates = jsonnet.templates()
    return {
        RULES_PATH: rules.render(rc),
        FLEET_PATH: fleet,
        HOST_PATH: host,
        f"{JSONNET_DIR}/config.json": jsonnet.render(jsonnet.default_config()),
        f"{JSONNET_DIR}/rules.json": jsonnet.render(templates["rules"]),
        f"{JSONNET_DIR}/alerts.json": jsonnet.render(templates["alerts"]),
        f"{JSONNET_DIR}/{Path(FLEET_PATH).name}": fleet,
        f"{JSONNET_DIR}/{Path(HOST_PATH).name}": host,
    }
