"""`bindscope init`: a starting config, one service per (port, protocol) listening now.

Pure except `ephemeral_range`; the tool gathers the listeners and culprits with one scan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bindscope.config.load import RESERVED_SERVICE_NAME
from bindscope.diagnose.programs import Culprit
from bindscope.model import HOST_NETNS, Exposure, Listener, Protocol

DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default net.ipv4.ip_local_port_range
# kinds whose loopback bind is often the `app.run()` default rather than the intent
_DEV_SERVERS = {
    "flask",
    "flask-cli",
    "django",
    "uvicorn",
    "jupyter",
    "node",
    "next",
    "vite",
    "http.server",
}
_UNSAFE_NAME_RE = re.compile(r"[^A-Za-z0-9_.:-]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Entry:
    """One service to declare, with what the comments say about it."""

    name: str
    port: int
    protocol: Protocol
    expose: Exposure
    now: Exposure
    addresses: tuple[str, ...]
    process: str  # comm, "" when unknown
    about: str  # "sshd (pid 612): /usr/sbin/sshd -D"
    hint: str = ""  # said after `# now:`


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def _clean(text: str, limit: int = 120) -> str:
    text = _CONTROL_RE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _base_name(listener: Listener, culprit: Culprit | None) -> str:
    raw = culprit.kind if culprit else listener.process.name
    if not listener.process.known and not culprit:
        raw = ""
    name = _UNSAFE_NAME_RE.sub("-", raw).lstrip(".:-")[:40]
    if not name or name == RESERVED_SERVICE_NAME:
        return f"port-{listener.socket.port}"
    return name


def _unique(base: str, port: int, protocol: Protocol, taken: set[str]) -> str:
    for candidate in (base, f"{base}-{port}", f"{base}-{port}-{protocol.value}"):
        if candidate not in taken:
            return candidate
    n = 2
    while f"{base}-{port}-{protocol.value}-{n}" in taken:
        n += 1
    return f"{base}-{port}-{protocol.value}-{n}"


def default_expose(now: Exposure, culprit: Culprit | None) -> Exposure:
    """Without --expose-from-current: what a service usually should be, not what it is."""
    if now <= Exposure.LOOPBACK or (culprit is not None and culprit.database):
        return Exposure.LOOPBACK
    return Exposure.PRIVATE


def plan(
    listeners: Sequence[Listener],
    culprits: Mapping[int, Culprit],
    expose_from_current: bool,
    ephemeral: tuple[int, int] = DEFAULT_EPHEMERAL,
) -> tuple[list[Entry], list[str]]:
    """The services to declare, and a line for each (port, protocol) left out and why."""
    groups: dict[tuple[Protocol, int], list[Listener]] = {}
    for lst in listeners:
        if lst.socket.netns == HOST_NETNS and not lst.socket.container:
            groups.setdefault((lst.socket.protocol, lst.socket.port), []).append(lst)
    entries: list[Entry] = []
    skipped: list[str] = []
    taken: set[str] = set()
    for (protocol, port), group in sorted(
        groups.items(), key=lambda kv: (kv[0][1], kv[0][0].value)
    ):
        owner = next((lst for lst in group if lst.process.known), group[0])
        culprit = culprits.get(owner.process.pid) if owner.process.known else None
        what = f"{protocol.value} {port} ({_clean(owner.process.name, 40)})"
        if (culprit and culprit.kind == "bindscope") or owner.service == RESERVED_SERVICE_NAME:
            skipped.append(f"{what}: bindscope-exporter itself")
            continue
        if ephemeral[0] <= port <= ephemeral[1]:
            skipped.append(
                f"{what}: in the ephemeral port range {ephemeral[0]}-{ephemeral[1]}, "
                "likely another port after a restart"
            )
            continue
        now = max(lst.exposure for lst in group)
        name = _unique(_base_name(owner, culprit), port, protocol, taken)
        taken.add(name)
        p = owner.process
        about = (
            f"{p.name} (pid {p.pid}): {' '.join(p.cmdline) or p.name}"
            if p.known
            else "owner unknown (run as root to see it)"
        )
        hint = ""
        if now is Exposure.LOOPBACK and culprit and culprit.kind in _DEV_SERVERS:
            hint = f"{culprit.label}: if other hosts should reach it, set private"
        elif culprit and culprit.database and now > Exposure.LOOPBACK:
            hint = f"{culprit.label} is usually for this host only"
        entries.append(
            Entry(
                name=name,
                port=port,
                protocol=protocol,
                expose=now if expose_from_current else default_expose(now, culprit),
                now=now,
                addresses=tuple(dict.fromkeys(lst.socket.address for lst in group)),
                process=p.name if p.known and not _CONTROL_RE.search(p.name) else "",
                about=_clean(about),
                hint=hint,
            )
        )
    return entries, skipped


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


HEADER = """\
# bindscope config, written by `bindscope init`{where}
# from the sockets listening then in the host's network namespace. Review every service.
# expose: who should reach it: loopback (this host only), private (hosts on private
# networks), public (anyone). {how}
# `# now:` is the exposure at the time of writing.
# Check it:  bindscope check-config FILE    Use it:  bindscope scan --config.file FILE
# docs/config.md describes every key.
"""
_HOW_CURRENT = "Each expose is the current exposure (--expose-from-current)."
_HOW_DEFAULT = (
    "Each expose is a default: loopback for what listens on\n# loopback only "
    "and for databases, private otherwise; widen to public only on purpose."
)


def render(
    entries: Sequence[Entry],
    skipped: Sequence[str],
    expose_from_current: bool,
    host: str = "",
    when: str = "",
) -> str:
    """The YAML text; it passes `bindscope check-config`."""
    where = "".join((f" on {_clean(host, 64)}" if host else "", f" at {when}" if when else ""))
    out = [HEADER.format(where=where, how=_HOW_CURRENT if expose_from_current else _HOW_DEFAULT)]
    out.append(
        "scan_interval: 15s\nprobe:\n  enabled: true\n  timeout: 1s\n  addresses: auto\n"
        "unexpected:\n  report: true\n  ignore: []\n"
    )
    if not entries:
        out.append("services: []  # nothing listened in the host's namespace\n")
    else:
        out.append("services:\n")
    for e in entries:
        now = f"  # now: {e.now.value} on {', '.join(e.addresses)}"
        if e.hint:
            now += f"; {e.hint}"
        out.append(f"  # {e.about}\n")
        out.append(
            f"  - name: {_quote(e.name)}\n    port: {e.port}\n"
            f"    protocol: {e.protocol.value}\n    expose: {e.expose.value}{now}\n"
        )
        if e.process:
            out.append(f"    process: {_quote('^' + re.escape(e.process) + '$')}\n")
    if skipped:
        out.append("# Not declared:\n")
        out.extend(f"#   {_clean(s)}\n" for s in skipped)
    return "".join(out)
