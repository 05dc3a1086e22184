"""The shipped rules: current with mixin/, valid, unit-tested, documented; example configs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from support import REPO, require_binary

from mixin import RULES_PATH, generate
from mixin.rules import RulesConfig, render

RULES = REPO / RULES_PATH
RUNBOOK = REPO / "docs" / "runbook.md"
UNIT_TESTS = sorted((REPO / "tests" / "rules").glob("*.test.yml"))
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"


def _rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


ALERTS = [r for r in _rules() if "alert" in r]
RECORDS = [r for r in _rules() if "record" in r]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO)


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {
        github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }


def test_committed_rules_are_generated():
    assert RULES.read_text() == generate()[RULES_PATH], "run `python -m mixin`"


def test_promtool_check_rules():
    require_binary("promtool")
    r = _run("promtool", "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in r.stdout


def test_unit_test_files_exist():
    assert UNIT_TESTS, "no tests/rules/*.test.yml"


@pytest.mark.parametrize("path", UNIT_TESTS, ids=[p.name for p in UNIT_TESTS])
def test_promtool_test_rules(path: Path):
    require_binary("promtool")
    r = _run("promtool", "test", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def _unit_tests() -> list[dict]:
    return [t for p in UNIT_TESTS for t in yaml.safe_load(p.read_text())["tests"]]


def test_every_alert_fires_in_a_unit_test():
    fired = {
        case["alertname"]
        for t in _unit_tests()
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {a["alert"] for a in ALERTS} - fired == set()


def test_every_alert_is_asserted_silent_in_a_unit_test():
    # Before `for:` runs out and after the fix, nothing may fire.
    silent = {
        case["alertname"]
        for t in _unit_tests()
        for case in t.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert {a["alert"] for a in ALERTS} - silent == set()


def test_every_recording_rule_is_unit_tested():
    tested = {case["expr"] for t in _unit_tests() for case in t.get("promql_expr_test", [])}
    assert {r["record"] for r in RECORDS} - tested == set()


@pytest.mark.parametrize("alert", ALERTS, ids=[a["alert"] for a in ALERTS])
def test_alert_is_documented(alert: dict):
    name = alert["alert"]
    assert re.fullmatch(r"Bindscope[A-Z]\w+", name)
    assert alert["labels"]["severity"] in {"info", "warning", "critical"}
    annotations = alert["annotations"]
    assert "{{" not in annotations["summary"], "summary is one fixed line"
    assert "{{ $labels.instance }}" in annotations["description"]
    url, _, anchor = annotations["runbook_url"].partition("#")
    assert url.endswith("/docs/runbook.md")
    assert anchor == name.lower()
    assert anchor in runbook_anchors(), f"docs/runbook.md has no section {name}"


@pytest.mark.parametrize("alert", ALERTS, ids=[a["alert"] for a in ALERTS])
def test_alert_uses_the_job_selector(alert: dict):
    assert 'job="bindscope"' in alert["expr"]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (RulesConfig(loopback_only_for="7m"), "for: 7m"),
        (RulesConfig(selector='job="hosts"'), 'bindscope_service_status{job="hosts", status='),
        (RulesConfig(scan_stale_seconds=900), "> 900"),
        (
            RulesConfig(runbook_url="https://wiki.example/bindscope"),
            "runbook_url: https://wiki.example/bindscope#bindscopeexporterdown",
        ),
    ],
    ids=["duration", "selector", "threshold", "runbook base url"],
)
def test_rules_config_is_applied(config: RulesConfig, expected: str):
    text = render(config)
    assert expected in text
    assert expected not in render(RulesConfig())


def test_example_prometheus_config_is_valid():
    require_binary("promtool")
    r = _run("promtool", "check", "config", str(PROMETHEUS_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout


def test_example_alertmanager_config_is_valid():
    require_binary("amtool")
    r = _run("amtool", "check-config", str(ALERTMANAGER_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=BindscopeServiceLoopbackOnly", "severity=critical"], "oncall"),
        (["alertname=BindscopeUnexpectedListener", "severity=warning"], "default"),
        (["alertname=BindscopeServiceProcessUnknown", "severity=info"], "blackhole"),
    ],
    ids=["critical pages", "warning notifies", "info is not sent"],
)
def test_example_alertmanager_routes_by_severity(labels: list[str], receiver: str):
    require_binary("amtool")
    r = _run("amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *labels)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == receiver


def test_example_alertmanager_inhibits_on_exporter_down():
    inhibit = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["inhibit_rules"]
    down = [i for i in inhibit if i["source_matchers"] == ['alertname="BindscopeExporterDown"']]
    assert down and "instance" in down[0]["equal"]
