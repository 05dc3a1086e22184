"""The landing page at `/`: the services' status as a human reads it."""

from __future__ import annotations

import html
import time

from bindscope.model import Snapshot, Status


def render_landing(snap: Snapshot | None, telemetry_path: str) -> str:
    """The page at `/`: each declared service's verdict, from the latest scan."""
    rows = []
    if snap is not None:
        for v in snap.verdicts:
            s = v.service
            cls = "ok" if v.status is Status.OK else "bad"
            rows.append(
                f"<tr class={cls}><td>{html.escape(s.name)}</td><td>{s.port}/"
                f"{s.protocol.value}</td><td>{s.expose.value}</td>"
                f"<td>{v.exposure.value}</td><td>{v.status.value}</td></tr>"
            )
    table = (
        "<table><tr><th>service</th><th>port</th><th>expected</th>"
        "<th>exposure</th><th>status</th></tr>" + "".join(rows) + "</table>"
        if rows
        else "<p>No services declared.</p>"
    )
    scanned = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.timestamp)) if snap else "not yet"
    )
    unexpected = len(snap.unexpected) if snap else 0
    path = html.escape(telemetry_path)
    return (
        "<!DOCTYPE html><html><head><meta charset=utf-8><title>bindscope exporter</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.2em .8em;"
        "text-align:left}tr.bad td{color:#b00}</style></head><body>"
        "<h1>bindscope exporter</h1>"
        f"<p>Compares what listens on this host with what should. Last scan: {scanned}. "
        f"Unexpected listeners: {unexpected}.</p>{table}"
        f'<p><a href="{path}">Metrics</a> · <a href="/-/healthy">Health</a> · '
        '<a href="/-/ready">Readiness</a></p></body></html>'
    )
