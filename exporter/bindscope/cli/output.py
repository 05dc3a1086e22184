"""What the tool prints for people: tables of a scan and the diagnosis as text."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from bindscope.diagnose.steps import probe_word
from bindscope.model import (
    HOST_NETNS,
    Listener,
    Published,
    PublishedStatus,
    Snapshot,
    Status,
    Verdict,
)


class Paint:
    """ANSI colour only for a terminal, and never when NO_COLOR is set (no-color.org)."""

    CODES = {"red": "31", "green": "32", "yellow": "33", "bold": "1", "dim": "2"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: TextIO) -> Paint:
        return cls(stream.isatty() and not os.environ.get("NO_COLOR"))

    def __call__(self, text: str, style: str) -> str:
        if not self.enabled or not style:
            return text
        return f"\x1b[{self.CODES[style]}m{text}\x1b[0m"


# every status spelled out: a new one must be given a colour here (a test checks)
STATUS_STYLE = {
    Status.OK: "green",
    Status.PROCESS_UNKNOWN: "yellow",
    Status.WRONG_PROCESS: "red",
    Status.BLOCKED: "red",
    Status.NOT_LISTENING: "red",
    Status.LOOPBACK_ONLY: "red",
    Status.OVEREXPOSED: "red",
}


def status_style(status: Status) -> str:
    return STATUS_STYLE[status]


Cell = tuple[str, str]  # text, style


def table(header: Sequence[str], rows: Sequence[Sequence[Cell]], paint: Paint) -> list[str]:
    """Columns padded on the plain text, then coloured, so escapes never break alignment."""
    widths = [max([len(h)] + [len(r[i][0]) for r in rows]) for i, h in enumerate(header)]
    out = [
        "  ".join(
            paint(h.ljust(w) if i < len(header) - 1 else h, "bold")
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        ).rstrip()
    ]
    for row in rows:
        cells = [
            paint(text.ljust(w) if i < len(row) - 1 else text, style)
            for i, ((text, style), w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def probe_summary(v: Verdict) -> str:
    return ", ".join(f"{p.address} {probe_word(p)}" for p in v.probes)


def _process_text(listeners: Iterable[Listener]) -> str:
    seen = dict.fromkeys(
        f"{lst.process.name}[{lst.process.pid}]" if lst.process.known else lst.process.name
        for lst in listeners
    )
    return ", ".join(seen)


def render_scan(snap: Snapshot, paint: Paint) -> list[str]:
    """Services, other listeners and published ports; the caller adds scan_notes."""
    out: list[str] = []
    if snap.verdicts:
        rows = []
        for v in snap.verdicts:
            s = v.service
            addresses = ", ".join(dict.fromkeys(lst.socket.address for lst in v.listeners))
            rows.append(
                [
                    (s.name, ""),
                    (f"{s.port}/{s.protocol.value}", ""),
                    (s.expose.value, ""),
                    (v.exposure.value, ""),
                    (v.status.value, status_style(v.status)),
                    (addresses or "-", ""),
                    (_process_text(v.listeners) or "-", ""),
                    (probe_summary(v) or "-", ""),
                ]
            )
        out += table(
            ["SERVICE", "PORT", "EXPECTED", "EXPOSURE", "STATUS", "ADDRESS", "PROCESS", "PROBES"],
            rows,
            paint,
        )
    else:
        out.append(
            "No services declared: --config.file FILE declares them "
            "(`bindscope init` writes a starting one)."
        )
    others = [lst for lst in snap.listeners if lst.service in ("", "bindscope")]
    out.append("")
    out.append(paint(f"Other listeners ({len(others)}):", "bold"))
    if others:
        out += listeners_table(others, set(snap.unexpected), paint)
    if snap.published:
        out.append("")
        out.append(paint(f"Published ports ({len(snap.published)}):", "bold"))
        out += published_table(snap.published, paint)
    out.append("")
    out.append(scan_summary(snap))
    return out


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def published_table(published: Sequence[Published], paint: Paint) -> list[str]:
    """One row per NAT rule into a namespace: where it leads and what listens there."""
    rows = []
    for p in sorted(published, key=lambda p: (p.container, p.netns, p.host_port, p.host_address)):
        inside = ", ".join(dict.fromkeys(lst.socket.address for lst in p.listeners))
        rows.append(
            [
                (p.protocol.value, ""),
                (_hostport(p.host_address, p.host_port), ""),
                (_hostport(p.target_address, p.target_port), ""),
                (p.container or "-", ""),
                (p.netns, ""),
                (p.status.value, "green" if p.status is PublishedStatus.OK else "red"),
                (inside or "-", ""),
                (_process_text(p.listeners) or "-", ""),
                (probe_word(p.probe) if p.probe else "-", ""),
            ]
        )
    header = ["PROTO", "HOST", "TARGET", "CONTAINER", "NETNS", "STATUS", "INSIDE", "PROCESS"]
    return table([*header, "PROBE"], rows, paint)


def scan_notes(
    snap: Snapshot, paint: Paint, details: Mapping[str, str] | None = None, root: bool = False
) -> list[str]:
    """The scan's failure and errors, each source with the first error it gave."""
    out = []
    if not snap.success:
        out.append(paint("The scan failed: what is shown above is incomplete.", "red"))
    if snap.errors:
        details = details or {}
        errs = "; ".join(
            f"{k}={n}" + (f": {details[k]}" if k in details else "")
            for k, n in sorted(snap.errors.items())
        )
        # as root, missing privileges are not the cause: the first error says what is
        why = "docs/operator.md" if root else "some need root or capabilities: docs/operator.md"
        out.append(paint(f"Scan errors: {errs} ({why})", "yellow"))
    return out


def listeners_table(
    listeners: Sequence[Listener], unexpected: set[Listener], paint: Paint
) -> list[str]:
    """One row per socket; namespace columns and grouping only when more than the host's."""
    spaces = {(lst.socket.netns, lst.socket.container) for lst in listeners}
    several = spaces != {(HOST_NETNS, "")}
    ordered = sorted(
        listeners,
        key=lambda lst: (
            lst.socket.netns != HOST_NETNS,
            lst.socket.netns,
            lst.socket.container,
            lst.socket.protocol.value,
            lst.socket.port,
            lst.socket.address,
        ),
    )
    header = ["PROTO", "ADDRESS", "PORT", "SCOPE", "EXPOSURE", "PROCESS", "NOTE"]
    if several:
        header += ["NETNS", "CONTAINER"]
    rows = []
    for lst in ordered:
        s = lst.socket
        note, style = "", ""
        if lst in unexpected:
            note, style = "unexpected", "yellow"
        elif lst.service:
            note = lst.service
        row = [
            (s.protocol.value, ""),
            (s.address, ""),
            (str(s.port), ""),
            (lst.scope.value, ""),
            (lst.exposure.value, ""),
            (_process_text([lst]), ""),
            (note or "-", style),
        ]
        if several:
            row += [(s.netns, ""), (s.container or "-", "")]
        rows.append(row)
    lines = table(header, rows, paint)
    if not several:
        return lines
    # a blank line between namespaces: each group reads as one host
    grouped, previous = [lines[0]], None
    for lst, line in zip(ordered, lines[1:], strict=True):
        key = (lst.socket.netns, lst.socket.container)
        if previous is not None and key != previous:
            grouped.append("")
        grouped.append(line)
        previous = key
    return grouped


def scan_summary(snap: Snapshot) -> str:
    counts: dict[str, int] = {}
    for v in snap.verdicts:
        counts[v.status.value] = counts.get(v.status.value, 0) + 1
    states = ", ".join(f"{n} {s}" for s, n in counts.items())
    services = f"{len(snap.verdicts)} services" + (f" ({states})" if states else "")
    return (
        f"{services}; {len(snap.listeners)} listeners, {len(snap.unexpected)} unexpected; "
        f"scan took {snap.duration * 1000:.0f} ms"
    )


def render_diagnosis(doc: Mapping[str, Any], paint: Paint, notes: Sequence[str] = ()) -> list[str]:
    """The diagnosis document (diagnose/document.py) as numbered steps for a terminal."""
    out = [paint(f"bindscope diagnose: {doc['subject']}", "bold")]
    for n, f in enumerate(doc["findings"], 1):
        out.append("")
        out.append(paint(f"{n}. {f['title']}", "bold"))
        if f["step"] != "fixes" or not doc["fixes"]:
            out.extend(f"   {line}" for line in f["lines"])
            continue
        for fix in doc["fixes"]:
            out.append(f"   - {fix['summary']}")
            out.extend(f"     $ {command}" for command in fix.get("commands", ()))
    statuses = ", ".join(doc.get("statuses", ()))
    out.append("")
    out.extend(notes)
    if doc["result"] == "problem":
        if statuses and set(doc.get("statuses", ())) == {Status.OK.value}:
            statuses = "judged ok, but a step above found a problem"
        out.append(paint(f"Result: PROBLEM ({statuses})", "red"))
    else:
        out.append(paint(f"Result: ok ({statuses})", "green"))
    return out
