"""A diagnosis as a versioned JSON document, the form `diagnose --json`, the exporter's
`/api/v1/diagnose` and a remote `diagnose HOST:PORT` share; the text and the landing page
are rendered from it."""

from __future__ import annotations

from typing import Any

from bindscope.diagnose.fixes import Fix
from bindscope.diagnose.steps import Diagnosis

VERSION = 1  # bump only on an incompatible change of the shape


def to_document(d: Diagnosis, target: str) -> dict[str, Any]:
    """{"version", "target", "result", "findings": [...], "fixes": [...]}."""
    return {
        "version": VERSION,
        "target": target,
        "subject": d.subject,
        "result": "problem" if d.problem else "ok",
        "statuses": list(d.statuses),
        "findings": [
            {"step": f.step, "title": f.title, "lines": list(f.lines), "problem": f.problem}
            for f in d.findings
        ],
        "fixes": [fix_document(fix) for fix in d.fixes],
    }


def fix_document(fix: Fix) -> dict[str, Any]:
    """A fix with only the fields it knows: file, line, setting and commands are optional."""
    out: dict[str, Any] = {"kind": fix.kind, "summary": fix.summary}
    if fix.file:
        out["file"] = fix.file
    if fix.file and fix.line:
        out["line"] = fix.line
    if fix.setting:
        out["setting"] = fix.setting
    if fix.commands:
        out["commands"] = list(fix.commands)
    return out
