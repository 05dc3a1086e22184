"""The rules as templates for mixin/mixin.libsonnet: jsonnet fills in `_config`.

Every RulesConfig field becomes a `_config` key (camelCase) and a `%(key)s` placeholder in
the strings that use it, so jsonnet users change the selector, the `for:` durations and
the thresholds without Python, and the default `_config` gives the shipped rules file.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mixin import rules


def config_key(field: str) -> str:
    """`loopback_only_for` -> `loopbackOnlyFor`, the mixin convention for `_config` keys."""
    head, *rest = field.split("_")
    return head + "".join(word.capitalize() for word in rest)


def default_config() -> dict[str, Any]:
    """The `_config` of the mixin: RulesConfig's defaults under their jsonnet names."""
    return {config_key(f.name): f.default for f in dataclasses.fields(rules.RulesConfig)}


# Private-use characters cannot occur in a selector, a duration or PromQL: a safe marker.
_MARK = "\ue000{}\ue001"


def _placeholders(value: Any, marks: dict[str, str]) -> Any:
    """`value` with jsonnet's `%` escaped and each marker replaced by its placeholder."""
    if isinstance(value, dict):
        return {k: _placeholders(v, marks) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeholders(v, marks) for v in value]
    if isinstance(value, str):
        value = value.replace("%", "%%")
        for mark, key in marks.items():
            value = value.replace(mark, f"%({key})s")
    return value


def templates() -> dict[str, dict[str, Any]]:
    """{"rules": recording groups, "alerts": alerting groups}, with placeholders."""
    marks = {_MARK.format(key): key for key in default_config()}
    # scan_stale_seconds is an int field; the marker only passes through str formatting.
    marked = rules.RulesConfig(
        **{f.name: _MARK.format(config_key(f.name)) for f in dataclasses.fields(rules.RulesConfig)}
    )
    groups = rules.groups(marked)["groups"]

    def kind(group: dict[str, Any]) -> str:
        return "alerts" if any("alert" in r for r in group["rules"]) else "rules"

    return {
        k: {"groups": [_placeholders(g, marks) for g in groups if kind(g) == k]}
        for k in ("rules", "alerts")
    }


def render(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
