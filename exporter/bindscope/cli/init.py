"""`bindscope init`: a starting config, one service per (port, protocol) listening now.

Pure except `ephemeral_range`; the tool gathers the listeners and culprits with one scan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bindscope.config.load import RESERVED_SERVICE_NAME
from bindscope.diagnose.programs import ROLES, Culprit, recognize
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


def _program(listener: Listener, culprit: Culprit | None) -> str:
    """The program part of a name: its kind, else its process name, else "port"."""
    raw = culprit.kind if culprit else listener.process.name
    if not listener.process.known and not culprit:
        raw = ""
    name = _UNSAFE_NAME_RE.sub("-", raw).lstrip(".:-")[:40]
    if not name or name == RESERVED_SERVICE_NAME:
        return "port"
    return name


def _unique(name: str, taken: set[str]) -> str:
    """Two processes of one program on one port and protocol (other namespaces are not
    planned, so only by a race): a number tells them apart."""
    n, candidate = 2, name
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def _names(keys: Sequence[tuple[Protocol, int, str]]) -> list[str]:
    """A name per (protocol, port, program) that says the program, and the port's role and
    protocol where the program has several: redis, rabbitmq-amqp, dnsmasq-udp."""
    per_program: dict[str, set[int]] = {}
    per_port: dict[tuple[str, int], set[Protocol]] = {}
    for proto, port, program in keys:
        per_program.setdefault(program, set()).add(port)
        per_port.setdefault((program, port), set()).add(proto)
    names: list[str] = []
    taken: set[str] = set()
    for proto, port, program in keys:
        name = program
        if program == "port" or len(per_program[program]) > 1:
            role = ROLES.get(port, "")
            name += f"-{role}" if role and role != program and program != "port" else f"-{port}"
        if len(per_port[(program, port)]) > 1:
            name += f"-{proto.value}"
        name = _unique(name, taken)
        taken.add(name)
        names.append(name)
    return names


def default_expose(now: Exposure, culprit: Culprit | None) -> Exposure:
    """Without --expose-from-current: what a service usually should be, not what it is.
    A database, epmd or an Erlang distribution port beyond loopback is usually a mistake:
    declared loopback, the first scan flags it."""
    if now <= Exposure.LOOPBACK or (
        culprit is not None and (culprit.database or culprit.erlang_internal)
    ):
        return Exposure.LOOPBACK
    return Exposure.PRIVATE


def _hint(now: Exposure, culprit: Culprit | None, addresses: Sequence[str]) -> str:
    if culprit is None:
        return ""
    if now is Exposure.LOOPBACK and (culprit.kind in _DEV_SERVERS or culprit.web_server):
        return f"{culprit.label}: if other hosts should reach it, set private"
    if now > Exposure.LOOPBACK and culprit.erlang_internal:
        return (
            f"{culprit.label} is for the cluster's own nodes, never clients: declared "
            "loopback (list the nodes' network as private only for a cluster)"
        )
    if now > Exposure.LOOPBACK and culprit.database:
        wild = any(a in ("0.0.0.0", "::") for a in addresses)
        on = " on every address" if wild else ""
        return f"{culprit.label}{on} is usually a mistake: declared loopback"
    return ""


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
    kept: list[tuple[Protocol, int, Listener, Culprit | None, list[Listener]]] = []
    for (protocol, port), group in sorted(
        groups.items(), key=lambda kv: (kv[0][1], kv[0][0].value)
    ):
        owner = next((lst for lst in group if lst.process.known), group[0])
        culprit = culprits.get(owner.process.pid) if owner.process.known else None
        if culprit is not None and culprit.kind == "rabbitmq":
            # one process, several ports: each port's own role (AMQP, distribution, ...)
            culprit = recognize(owner.process, None, port) or culprit
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
        kept.append((protocol, port, owner, culprit, group))
    names = _names([(proto, port, _program(o, c)) for proto, port, o, c, _ in kept])
    for name, (protocol, port, owner, culprit, group) in zip(names, kept, strict=True):
        now = max(lst.exposure for lst in group)
        addresses = tuple(dict.fromkeys(lst.socket.address for lst in group))
        p = owner.process
        about = (
            f"{p.name} (pid {p.pid}): {' '.join(p.cmdline) or p.name}"
            if p.known
            else "owner unknown (run as root to see it)"
        )
        entries.append(
            Entry(
                name=name,
                port=port,
                protocol=protocol,
                expose=now if expose_from_current else default_expose(now, culprit),
                now=now,
                addresses=addresses,
                process=p.name if p.known and not _CONTROL_RE.search(p.name) else "",
                about=_clean(about),
                hint=_hint(now, culprit, addresses),
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
