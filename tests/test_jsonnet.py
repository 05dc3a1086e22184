"""mixin/mixin.libsonnet, evaluated by jsonnet: the shipped rules and dashboards, and a
`_config` that really changes them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from support import REPO, require_binary

from mixin import FLEET_PATH, HOST_PATH, JSONNET_DIR, RULES_PATH, generate
from mixin.jsonnet import default_config

MIXIN = REPO / "mixin"


def evaluate(expression: str) -> dict:
    """`expression` in jsonnet, with `m` the mixin, as a user's file would import it."""
    require_binary("jsonnet")
    done = subprocess.run(
        ["jsonnet", "-e", f"local m = import 'mixin.libsonnet'; {expression}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=MIXIN,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "rel", [p for p in generate() if p.startswith(JSONNET_DIR)], ids=lambda p: Path(p).name
)
def test_committed_templates_are_generated(rel: str) -> None:
    assert (REPO / rel).read_text() == generate()[rel], "run `python -m mixin`"


def test_templates_have_no_unfilled_marker() -> None:
    for rel in ("rules.json", "alerts.json"):
        text = (MIXIN / "generated" / rel).read_text()
        assert not any("\ue000" <= ch <= "\ue001" for ch in text), rel


def test_default_config_gives_the_shipped_rules() -> None:
    out = evaluate("{groups: m.prometheusRules.groups + m.prometheusAlerts.groups}")
    assert out == yaml.safe_load((REPO / RULES_PATH).read_text())


def test_alerts_and_rules_are_split_as_mixins_expect() -> None:
    out = evaluate("{rules: m.prometheusRules, alerts: m.prometheusAlerts}")
    assert all("record" in r for g in out["rules"]["groups"] for r in g["rules"])
    assert all("alert" in r for g in out["alerts"]["groups"] for r in g["rules"])


def test_dashboards_are_the_shipped_ones() -> None:
    out = evaluate("m.grafanaDashboards")
    assert out == {
        Path(p).name: json.loads((REPO / p).read_text()) for p in (FLEET_PATH, HOST_PATH)
    }


def test_config_is_every_rules_knob() -> None:
    assert evaluate("m._config") == default_config()


def test_overridden_config_changes_selector_and_durations() -> None:
    out = evaluate(
        "(m + {_config+:: {selector: 'job=\"edge\"', loopbackOnlyFor: '7m',"
        " scanStaleSeconds: 900}}).prometheusAlerts"
    )
    alerts = {r["alert"]: r for g in out["groups"] for r in g["rules"]}
    assert alerts["BindscopeServiceLoopbackOnly"]["for"] == "7m"
    assert alerts["BindscopeServiceOverexposed"]["for"] == default_config()["overexposedFor"]
    assert all('job="bindscope"' not in r["expr"] for r in alerts.values())
    assert 'job="edge"' in alerts["BindscopeServiceLoopbackOnly"]["expr"]
    assert "> 900" in alerts["BindscopeScanFailing"]["expr"]
