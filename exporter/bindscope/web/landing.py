"""The landing page at `/`: the services' status, and for each service with a problem the
same findings and fixes `bindscope diagnose` gives, beside the listeners, unexpected
listeners, published ports and firewall verdicts of the latest scan."""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from bindscope.config.load import Config
from bindscope.diagnose.case import diagnosis_of
from bindscope.diagnose.document import to_document
from bindscope.model import HOST_NETNS, Listener, PublishedStatus, Snapshot, Status
from bindscope.netfilter.read import read_ruleset
from bindscope.netfilter.ruleset import Ruleset

log = logging.getLogger("bindscope.web")
MAX_LISTENERS = 300  # rows of the listeners table
RulesetReader = Callable[[], tuple[Ruleset | None, str]]


class _OncePerScan:
    """The host's packet filter read at most once per scan, however often `/` is asked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: float | None = None
        self._value: tuple[Ruleset | None, str] = (None, "")

    def get(self, snap: Snapshot, read: RulesetReader) -> tuple[Ruleset | None, str]:
        with self._lock:
            if self._key != snap.timestamp:
                self._value, self._key = read(), snap.timestamp
            return self._value


_rulesets = _OncePerScan()


def _e(text: object) -> str:
    return html.escape(str(text))


Row = tuple[bool, Sequence[str]]  # (shown as bad, the cells)


def _table(header: Sequence[str], rows: Iterable[Row], cls: str) -> str:
    """Every cell escaped here."""
    body = "".join(
        f"<tr{' class=bad' if bad else ''}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"
        for bad, cells in rows
    )
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table class={cls}><tr>{head}</tr>{body}</table>"


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _process(lst: Listener) -> str:
    p = lst.process
    return f"{p.name}[{p.pid}]" if p.known else p.name


def _listener_rows(listeners: Iterable[Listener], unexpected: set[Listener]) -> list[Row]:
    rows = []
    for lst in sorted(
        listeners,
        key=lambda x: (
            x.socket.netns != HOST_NETNS,
            x.socket.netns,
            x.socket.port,
            x.socket.address,
        ),
    ):
        s = lst.socket
        note = "unexpected" if lst in unexpected else lst.service or "-"
        rows.append(
            (
                lst in unexpected,
                [
                    s.protocol.value,
                    s.address,
                    str(s.port),
                    lst.scope.value,
                    lst.exposure.value,
                    lst.firewall.value if lst.firewall else "-",
                    (lst.effective or lst.exposure).value,
                    _process(lst),
                    note,
                    s.netns,
                    s.container or "-",
                ],
            )
        )
    return rows


LISTENER_HEADER = (
    "proto",
    "address",
    "port",
    "scope",
    "exposure",
    "firewall",
    "after firewall",
    "process",
    "service",
    "netns",
    "container",
)


def _fix_html(fix: Mapping[str, Any]) -> str:
    where = ""
    if fix.get("file"):
        line = f" line {fix['line']}" if fix.get("line") else ""
        where = f"<div class=where>{_e(fix['file'])}{_e(line)}</div>"
    setting = (
        f"<div class=setting><code>{_e(fix['setting'])}</code></div>" if "setting" in fix else ""
    )
    commands = "".join(f"<pre class=command>{_e(c)}</pre>" for c in fix.get("commands", ()))
    return (
        f"<li class='fix fix-{_e(fix['kind'])}'><span class=kind>{_e(fix['kind'])}</span> "
        f"<span class=summary>{_e(fix['summary'])}</span>{where}{setting}{commands}</li>"
    )


def render_document(doc: Mapping[str, Any], anchor: str) -> str:
    """One diagnosis document as HTML: its numbered findings, then its fixes."""
    steps = []
    for f in doc["findings"]:
        if f["step"] == "fixes":
            continue
        lines = "".join(f"<li>{_e(line)}</li>" for line in f["lines"])
        cls = " class=problem" if f["problem"] else ""
        steps.append(
            f"<li{cls} data-step='{_e(f['step'])}'><b>{_e(f['title'])}</b><ul>{lines}</ul></li>"
        )
    fixes = "".join(_fix_html(fix) for fix in doc["fixes"]) or "<li>see the findings above</li>"
    statuses = ", ".join(doc.get("statuses", ()))
    return (
        f"<section class=diagnosis id='{_e(anchor)}'><h3>{_e(doc['subject'])}: "
        f"{_e(statuses)}</h3><ol class=findings>{''.join(steps)}</ol>"
        f"<h4>What to change</h4><ul class=fixes>{fixes}</ul></section>"
    )


def _diagnoses(snap: Snapshot, read: RulesetReader) -> list[str]:
    problems = [v for v in snap.verdicts if v.status is not Status.OK]
    if not problems:
        return []
    # the declarations travel with the verdicts: the page needs no config of its own
    config = Config(services=tuple(v.service for v in snap.verdicts))
    rulesets = {HOST_NETNS: _rulesets.get(snap, read)}
    out = []
    for v in problems:
        name = v.service.name
        try:
            d = diagnosis_of(name, snap, config, probed=bool(v.probes), rulesets=rulesets)
        except Exception as e:  # one service's diagnosis never takes the page down
            log.warning("landing page diagnosis failed", extra={"service": name, "error": str(e)})
            out.append(f"<p>{_e(name)}: cannot be diagnosed here: {_e(e)}</p>")
            continue
        out.append(render_document(to_document(d, name), f"diagnosis-{name}"))
    return out


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:90em}td,th{padding:.2em .8em;"
    "text-align:left;vertical-align:top}tr.bad td,li.problem>b{color:#b00}"
    "section.diagnosis{border:1px solid #ccc;border-radius:4px;padding:0 1em 1em;margin:1em 0}"
    "pre.command{background:#f4f4f4;padding:.3em .6em;margin:.3em 0;white-space:pre-wrap}"
    ".kind{font-size:.8em;background:#eee;border-radius:3px;padding:0 .4em}"
    ".where,.setting{margin:.2em 0 0 1em;font-family:monospace}ul.fixes>li{margin:.6em 0}"
)


def render_landing(
    snap: Snapshot | None, telemetry_path: str, ruleset: RulesetReader = read_ruleset
) -> str:
    """The page at `/`, from the latest scan; `ruleset` reads the host's packet filter
    (once per scan) so a firewall fix names the rule and tool, as diagnose does."""
    path = _e(telemetry_path)
    body = "<p>Last scan: not yet.</p>" if snap is None else _body(snap, ruleset)
    return (
        "<!DOCTYPE html><html><head><meta charset=utf-8><title>bindscope exporter</title>"
        f"<style>{STYLE}</style></head><body><h1>bindscope exporter</h1>{body}"
        f'<p><a href="{path}">Metrics</a> · <a href="/-/healthy">Health</a> · '
        '<a href="/-/ready">Readiness</a></p></body></html>'
    )


def _body(snap: Snapshot, ruleset: RulesetReader) -> str:
    scanned = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.timestamp))
    out = [
        f"<p>Compares what listens on this host with what should. Last scan: {scanned}. "
        f"Unexpected listeners: {len(snap.unexpected)}.</p>"
    ]
    if snap.verdicts:
        rows = [
            (
                v.status is not Status.OK,
                [
                    v.service.name,
                    f"{v.service.port}/{v.service.protocol.value}",
                    v.service.expose.value,
                    v.exposure.value,
                    (v.effective or v.exposure).value,
                    v.status.value,
                    ", ".join(dict.fromkeys(lst.socket.address for lst in v.listeners)) or "-",
                ],
            )
            for v in snap.verdicts
        ]
        header = ("service", "port", "expected", "exposure", "after firewall", "status", "address")
        out.append("<h2>Services</h2>" + _table(header, rows, "services"))
    else:
        out.append("<p>No services declared.</p>")
    diagnoses = _diagnoses(snap, ruleset)
    if diagnoses:
        out.append("<h2>Services with a problem: findings and fixes</h2>" + "".join(diagnoses))
    unexpected = set(snap.unexpected)
    if snap.unexpected:
        out.append(
            f"<h2>Unexpected listeners ({len(snap.unexpected)})</h2>"
            + _table(LISTENER_HEADER, _listener_rows(snap.unexpected, unexpected), "unexpected")
        )
    # the host's own first; a busy host's thousands of sockets stay in /metrics
    shown = _listener_rows(snap.listeners, unexpected)[:MAX_LISTENERS]
    more = len(snap.listeners) - len(shown)
    out.append(
        f"<h2>Listeners ({len(snap.listeners)})</h2>"
        + _table(LISTENER_HEADER, shown, "listeners")
        + (f"<p>{more} more in bindscope_listener_info.</p>" if more > 0 else "")
    )
    if snap.published:
        rows = [
            (
                p.status is not PublishedStatus.OK,
                [
                    p.protocol.value,
                    _hostport(p.host_address, p.host_port),
                    _hostport(p.target_address, p.target_port),
                    p.container or "-",
                    p.netns,
                    p.status.value,
                    ", ".join(dict.fromkeys(lst.socket.address for lst in p.listeners)) or "-",
                ],
            )
            for p in snap.published
        ]
        header = ("proto", "host", "target", "container", "netns", "status", "inside")
        out.append(
            f"<h2>Published ports ({len(snap.published)})</h2>" + _table(header, rows, "published")
        )
    return "".join(out)
