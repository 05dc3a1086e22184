"""Each vocabulary is defined once, in the model; everything that spells a value (rules,
dashboards, the tool, the collector) must know every value, so adding one fails here
until each place handles it."""

from __future__ import annotations

import re

import pytest
import yaml
from builders import listener, snapshot, spec
from support import REPO

from bindscope.cli.output import STATUS_STYLE
from bindscope.collector.snapshot import render
from bindscope.judge import status_of
from bindscope.model import (
    ErrorSource,
    Exposure,
    NamespaceKind,
    PublishedStatus,
    Status,
)
from mixin import dashboards, rules

RULES = yaml.safe_load((REPO / "deploy/prometheus/bindscope.rules.yml").read_text())
ALERT_EXPRS = [r["expr"] for g in RULES["groups"] for r in g["rules"] if "alert" in r]


def test_every_status_has_a_code_a_colour_and_a_tool_style():
    assert set(rules.STATUS_CODES) == {s.value for s in Status}
    assert set(dashboards.STATUS_COLORS) == set(Status)
    assert set(STATUS_STYLE) == set(Status)
    assert [rules.STATUS_CODES[s.value] for s in Status] == [s.severity for s in Status]


@pytest.mark.parametrize("status", [s for s in Status if s is not Status.OK], ids=str)
def test_every_problem_status_has_an_alert(status):
    needle = re.compile(rf'bindscope_service_status{{[^}}]*status="{status.value}"')
    assert any(needle.search(e) for e in ALERT_EXPRS)


@pytest.mark.parametrize(
    "status", [s for s in PublishedStatus if s is not PublishedStatus.OK], ids=str
)
def test_every_published_port_problem_has_an_alert(status):
    needle = re.compile(rf'bindscope_published_port_status{{[^}}]*status="{status.value}"')
    assert any(needle.search(e) for e in ALERT_EXPRS)


def test_severity_orders_statuses_without_ties():
    assert len({s.severity for s in Status}) == len(Status)
    assert min(Status, key=lambda s: s.severity) is Status.OK


def test_every_error_source_and_namespace_kind_is_exported_from_the_start():
    text = render(snapshot()).decode()
    for source in ErrorSource:
        assert f'bindscope_scan_errors_total{{source="{source.value}"}} 0.0' in text
    for kind in NamespaceKind:
        assert re.search(rf'bindscope_network_namespaces{{kind="{kind.value}"}} ', text)


def test_the_exposition_help_lists_every_status():
    text = render(snapshot()).decode()
    help_line = next(
        x for x in text.splitlines() if x.startswith("# HELP bindscope_service_status")
    )
    assert all(s.value in help_line for s in Status)


# judge gives the most severe status that holds: every pair of problems that can hold at
# once for one service resolves to the more severe one
def test_judge_picks_the_most_severe_of_problems_that_hold_together():
    wide = listener("0.0.0.0", process="nginx")
    cases = {
        # declared loopback, listening wide, by the wrong process: overexposed wins
        (Status.OVEREXPOSED, Status.WRONG_PROCESS): (
            spec("db", expose=Exposure.LOOPBACK, process="^redis$"),
            [wide],
        ),
        # loopback only, by the wrong process: loopback_only wins
        (Status.LOOPBACK_ONLY, Status.WRONG_PROCESS): (
            spec("web", expose=Exposure.PRIVATE, process="^gunicorn$"),
            [listener("127.0.0.1", process="nginx")],
        ),
    }
    for (worse, milder), (service, listeners) in cases.items():
        assert worse.severity > milder.severity
        assert status_of(service, listeners)[0] is worse
