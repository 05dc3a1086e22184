"""bindscope's monitoring mixin: alert and recording rules and Grafana dashboards as code.

Not shipped in the wheel; `python -m mixin` regenerates the committed files from it.
"""

from __future__ import annotations

from pathlib import Path

from mixin import dashboards, rules

ROOT = Path(__file__).resolve().parent.parent

RULES_PATH = "deploy/prometheus/bindscope.rules.yml"
FLEET_PATH = "grafana/bindscope-fleet.json"
HOST_PATH = "grafana/bindscope-host.json"


def generate(
    rules_config: rules.RulesConfig | None = None,
    dashboards_config: dashboards.DashboardsConfig | None = None,
) -> dict[str, str]:
    """Every generated file's text, by path relative to the repository root."""
    rc = rules_config or rules.RulesConfig()
    dc = dashboards_config or dashboards.DashboardsConfig()
    return {
        RULES_PATH: rules.render(rc),
        FLEET_PATH: dashboards.render(dashboards.fleet(dc)),
        HOST_PATH: dashboards.render(dashboards.host(dc)),
    }
