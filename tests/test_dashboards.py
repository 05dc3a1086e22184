"""The Grafana dashboards: current with mixin/, importable, provisionable, valid PromQL."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import REPO, require_binary

from mixin import FLEET_PATH, HOST_PATH, generate
from mixin.dashboards import SCHEMA_VERSION, dashboard_queries

DASHBOARDS = [(FLEET_PATH, "bindscope-fleet"), (HOST_PATH, "bindscope-host")]
IDS = [uid for _, uid in DASHBOARDS]
SUBSTITUTIONS = {"job": "bindscope", "instance": "localhost:9917"}


def _load(rel: str) -> dict[str, Any]:
    return json.loads((REPO / rel).read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return [p for p in out if p["type"] != "row"]


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


@pytest.mark.parametrize(("rel", "uid"), DASHBOARDS, ids=IDS)
def test_committed_dashboard_is_generated(rel: str, uid: str):
    assert (REPO / rel).read_text() == generate()[rel], "run `python -m mixin`"


@pytest.mark.parametrize(("rel", "uid"), DASHBOARDS, ids=IDS)
def test_dashboard_identity(rel: str, uid: str):
    d = _load(rel)
    assert d["uid"] == uid
    assert d["id"] is None
    assert d["schemaVersion"] >= 39 and d["schemaVersion"] == SCHEMA_VERSION
    assert "__inputs" not in d, "provisioning cannot fill __inputs"


@pytest.mark.parametrize(("rel", "uid"), DASHBOARDS, ids=IDS)
def test_dashboard_variables(rel: str, uid: str):
    variables = {v["name"]: v for v in _load(rel)["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["definition"].startswith("label_values(")
    assert "$job" in variables["instance"]["definition"]


@pytest.mark.parametrize(("rel", "uid"), DASHBOARDS, ids=IDS)
def test_no_hard_coded_datasource(rel: str, uid: str):
    refs = [v for k, v in _walk(_load(rel)) if k == "datasource" and isinstance(v, dict)]
    assert refs
    assert all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs), refs


@pytest.mark.parametrize(("rel", "uid"), DASHBOARDS, ids=IDS)
def test_every_panel_queries(rel: str, uid: str):
    for p in _panels(_load(rel)):
        assert p.get("title"), p
        assert p.get("targets"), f"{p['title']}: no targets"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"{p['title']}: target {t.get('refId')} has no expr"
            assert "$job" in t["expr"] and "$instance" in t["expr"], (
                f"{p['title']}: ignores the job or instance variable"
            )
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"{p['title']}: duplicate refId"


@pytest.mark.parametrize(("rel", "uid"), DASHBOARDS, ids=IDS)
def test_panels_do_not_overlap(rel: str, uid: str):
    panels = _panels(_load(rel))
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


@pytest.mark.parametrize(("rel", "uid"), DASHBOARDS, ids=IDS)
def test_dashboard_queries_substitutes_every_variable(rel: str, uid: str):
    queries = dashboard_queries(REPO / rel, SUBSTITUTIONS)
    targets = sum(len(p["targets"]) for p in _panels(_load(rel)))
    assert len(queries) == targets
    for title, expr in queries:
        assert "$" not in expr, f"{title}: {expr}"
        assert 'instance=~"localhost:9917"' in expr, title


def test_dashboard_queries_rejects_unknown_variables(tmp_path: Path):
    d = {"panels": [{"title": "t", "targets": [{"expr": 'up{job="$jobb"}'}]}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"\$jobb"):
        dashboard_queries(path, SUBSTITUTIONS)


@pytest.mark.parametrize(("rel", "uid"), DASHBOARDS, ids=IDS)
def test_dashboard_queries_are_valid_promql(rel: str, uid: str, tmp_path: Path):
    # promtool parses every rule's expression: wrap each query in a recording rule.
    require_binary("promtool")
    queries = dashboard_queries(REPO / rel, SUBSTITUTIONS)
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": q} for i, (_, q) in enumerate(queries)
    ]
    path = tmp_path / "queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": uid, "rules": rules}]}))
    r = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_provisioning_points_at_the_dashboards():
    provider = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/dashboards/bindscope.yml").read_text()
    )["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
    datasource = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["type"] == "prometheus"
