"""A diagnosis as a versioned JSON document, the form `diagnose --json`, the exporter's
`/api/v1/diagnose` and a remote `diagnose HOST:PORT` share."""

from __future__ import annotations

from typing import Any

from bindscope.diagnose.steps import Diagnosis

VERSION = 1  # bump only on an incompatible change of the shape


def to_document(d: Diagnosis, target: str) -> dict[str, Any]:
    """{"version", "target", "result", "findings": [...], "fixes": [...]}."""
    return {
        "version": VERSION,
        "target": target,
        "subject": d.subject,
        "result": "problem" if d.problem else "ok",
        "findings": [
            {"step": f.step, "title": f.title, "lines": list(f.lines), "problem": f.problem}
            for f in d.findings
        ],
        "fixes": [{"kind": _kind(fix), "summary": fix} for fix in d.fixes],
    }


def _kind(fix: str) -> str:
    if fix.startswith(("nft ", "iptables ", "ip6tables ", "ufw ", "firewall-cmd ")):
        return "firewall"
    return "config"
