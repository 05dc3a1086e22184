"""`bindscope`, the operator's tool: scan, check-config, init and diagnose, printed for people.

Every subcommand runs the exporter's own engine (Scanner: discover, judge, probe) once;
this module only parses arguments and renders what the engine and diagnose.py return.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from bindscope import __version__
from bindscope.cli.common import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, Parser, load
from bindscope.cli.init import ephemeral_range, plan, render
from bindscope.config.load import Config, ConfigError, load_config
from bindscope.diagnose.steps import (
    Case,
    Culprit,
    Diagnosis,
    diagnose,
    probe_word,
    read_source,
    recognize,
)
from bindscope.logs import setup as setup_logging
from bindscope.model import (
    HOST_NETNS,
    Exposure,
    Listener,
    Protocol,
    Published,
    PublishedStatus,
    ServiceSpec,
    Snapshot,
    Status,
    Verdict,
)
from bindscope.netfilter.read import read_ruleset
from bindscope.scan import Scanner

JSON_VERSION = 1  # bump only on an incompatible change of the --json shape


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="bindscope",
        description="Check what listens on this host against what "
        "should listen, and find out why a service cannot be reached.",
    )
    p.add_argument("--version", action="version", version=f"bindscope {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def config_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--config.file",
            dest="config_file",
            default=None,
            help="YAML config (default: the embedded one, no declared services)",
        )

    def probe_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--probe",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="connect to each service port on each host address",
        )

    scan = sub.add_parser(
        "scan", help="scan once and print services and listeners; exit 1 if any service is not ok"
    )
    config_flag(scan)
    scan.add_argument(
        "--json",
        action="store_true",
        help="machine-readable output (stable shape, docs/operator.md)",
    )
    probe_flag(scan)

    check = sub.add_parser("check-config", help="validate config files; exit 2 if any is bad")
    check.add_argument("files", nargs="+", metavar="FILE")

    init = sub.add_parser("init", help="write a starting config from what listens now")
    init.add_argument(
        "--expose-from-current",
        action="store_true",
        help="declare each service with its current exposure (adopt what runs "
        "now) instead of the usual default",
    )
    init.add_argument(
        "--output", "-o", default="-", metavar="FILE", help="where to write, - for stdout"
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing --output")

    diag = sub.add_parser("diagnose", help="why can (or can't) another host reach this port?")
    diag.add_argument(
        "target", metavar="PORT|SERVICE", help="a port number or a service name from the config"
    )
    config_flag(diag)
    probe_flag(diag)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # scan errors are summed up in the output; only real failures are logged
    setup_logging("error")
    commands = {
        "scan": cmd_scan,
        "check-config": cmd_check_config,
        "init": cmd_init,
        "diagnose": cmd_diagnose,
    }
    return commands[args.command](args)


# --- colour ---


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


STATUS_STYLE = {Status.OK: "green", Status.PROCESS_UNKNOWN: "yellow"}


def status_style(status: Status) -> str:
    return STATUS_STYLE.get(status, "red")


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


# --- scan ---


def _load_or_report(path: str | None) -> Config | None:
    try:
        return load(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return None


def _with_probe(config: Config, enabled: bool) -> Config:
    if enabled:
        return config
    return dataclasses.replace(config, probe=dataclasses.replace(config.probe, enabled=False))


def cmd_scan(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config_file)
    if config is None:
        return EXIT_USAGE
    snap = Scanner().scan(_with_probe(config, args.probe))
    if args.json:
        print(json.dumps(snapshot_json(snap, config), indent=2))
    else:
        print("\n".join(render_scan(snap, Paint.for_stream(sys.stdout))))
    return EXIT_OK if scan_ok(snap) else EXIT_PROBLEM


def scan_ok(snap: Snapshot) -> bool:
    """Every declared service ok, and every published port leads to a listener: a port
    forwarded to an app on loopback is the seed's bug, declared or not."""
    return (
        snap.success
        and all(v.status is Status.OK for v in snap.verdicts)
        and all(p.status is PublishedStatus.OK for p in snap.published)
    )


def probe_summary(v: Verdict) -> str:
    return ", ".join(f"{p.address} {probe_word(p)}" for p in v.probes)


def _process_text(listeners: Iterable[Listener]) -> str:
    seen = dict.fromkeys(
        f"{lst.process.name}[{lst.process.pid}]" if lst.process.known else lst.process.name
        for lst in listeners
    )
    return ", ".join(seen)


def render_scan(snap: Snapshot, paint: Paint) -> list[str]:
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
    return out + scan_notes(snap, paint)


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


def scan_notes(snap: Snapshot, paint: Paint) -> list[str]:
    out = []
    if not snap.success:
        out.append(paint("The scan failed: what is shown above is incomplete.", "red"))
    if snap.errors:
        errs = ", ".join(f"{k}={n}" for k, n in sorted(snap.errors.items()))
        out.append(
            paint(
                f"Scan errors: {errs} (some need root or capabilities: docs/operator.md)", "yellow"
            )
        )
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


def listener_json(lst: Listener, unexpected: set[Listener]) -> dict[str, Any]:
    s, p = lst.socket, lst.process
    return {
        "protocol": s.protocol.value,
        "address": s.address,
        "port": s.port,
        "family": s.family,
        "v6only": s.v6only,
        "scope": lst.scope.value,
        "exposure": lst.exposure.value,
        "netns": s.netns,
        "container": s.container,
        "service": lst.service,
        "unexpected": lst in unexpected,
        "process": {"pid": p.pid, "name": p.name, "cmdline": list(p.cmdline)},
    }


def snapshot_json(snap: Snapshot, config: Config) -> dict[str, Any]:
    """The --json document; its shape is public (docs/operator.md), `version` marks it."""
    unexpected = set(snap.unexpected)
    return {
        "version": JSON_VERSION,
        "ok": scan_ok(snap),
        "config": config.source,
        "timestamp": snap.timestamp,
        "scan": {
            "success": snap.success,
            "duration_seconds": snap.duration,
            "backend": snap.backend,
            "errors": dict(snap.errors),
        },
        "host_addresses": [
            {
                "address": a.address,
                "interface": a.interface,
                "family": a.family,
                "scope": a.scope.value,
            }
            for a in snap.host_addresses
        ],
        "services": [
            {
                "name": v.service.name,
                "port": v.service.port,
                "protocol": v.service.protocol.value,
                "expose": v.service.expose.value,
                "process": v.service.process.pattern if v.service.process else None,
                "netns": v.service.netns,
                "container": v.service.container.pattern if v.service.container else None,
                "status": v.status.value,
                "exposure": v.exposure.value,
                "listening": v.listening,
                # a verdict keeps its listeners as discovered, before judge labels them
                "listeners": [listener_json(lst, unexpected) for lst in v.listeners],
                "probes": [
                    {
                        "address": p.address,
                        "success": p.success,
                        "duration_seconds": p.duration,
                        "error": p.error,
                    }
                    for p in v.probes
                ],
            }
            for v in snap.verdicts
        ],
        "listeners": [listener_json(lst, unexpected) for lst in snap.listeners],
    }


# --- check-config ---


def cmd_check_config(args: argparse.Namespace) -> int:
    rc = EXIT_OK
    for path in args.files:
        try:
            load_config(path)
        except ConfigError as e:
            print(e, file=sys.stderr)
            rc = EXIT_USAGE
        else:
            print(f"{path}: ok")
    return rc


# --- init ---


def culprits_of(listeners: Iterable[Listener], port_of_interest: int = 0) -> dict[int, Culprit]:
    """What program holds each socket, by pid (reads Python main scripts)."""
    found: dict[int, Culprit] = {}
    for lst in listeners:
        p = lst.process
        if p.pid is None or p.pid in found:
            continue
        culprit = recognize(p, read_source(p), port_of_interest or lst.socket.port)
        if culprit is not None:
            found[p.pid] = culprit
    return found


def cmd_init(args: argparse.Namespace) -> int:
    if args.output != "-" and os.path.exists(args.output) and not args.force:
        print(f"bindscope init: {args.output} exists (--force overwrites it)", file=sys.stderr)
        return EXIT_USAGE
    config = dataclasses.replace(Config(), probe=dataclasses.replace(Config().probe, enabled=False))
    snap = Scanner().scan(config)
    entries, skipped = plan(
        snap.listeners, culprits_of(snap.listeners), args.expose_from_current, ephemeral_range()
    )
    text = render(
        entries,
        skipped,
        args.expose_from_current,
        host=socket.gethostname(),
        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.timestamp)),
    )
    if args.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        print(f"bindscope init: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"wrote {args.output}: {len(entries)} services; check it with "
        f"`bindscope check-config {args.output}`",
        file=sys.stderr,
    )
    return EXIT_OK


# --- diagnose ---


class TargetError(ValueError):
    pass


def resolve_target(target: str, config: Config) -> tuple[int, tuple[ServiceSpec, ...], bool]:
    """The port, the services to judge it by, and whether they are declared.

    A service name wins over a port number (a service may be named "8080"). An undeclared
    port is judged against the default expectation, private, for TCP and UDP.
    """
    for spec in config.services:
        if spec.name == target:
            return spec.port, (spec,), True
    if not target.isdigit():
        names = ", ".join(s.name for s in config.services) or "none"
        raise TargetError(
            f"{target!r} is neither a port nor a service of {config.source} (services: {names})"
        )
    port = int(target)
    if not 1 <= port <= 65535:
        raise TargetError(f"{port} is not a port (1-65535)")
    declared = tuple(
        s
        for s in config.services
        if s.port == port and s.netns in (None, HOST_NETNS) and s.container is None
    )
    if declared:
        return port, declared, True
    return (
        port,
        tuple(
            ServiceSpec(
                name=f"{port}/{proto.value}", port=port, protocol=proto, expose=Exposure.PRIVATE
            )
            for proto in Protocol
        ),
        False,
    )


def build_case(port: int, snap: Snapshot, declared: bool, probed: bool) -> Case:
    verdicts = snap.verdicts
    if not declared:
        # the default expectation is judged only for the protocols something listens on
        verdicts = tuple(v for v in verdicts if v.listening) or verdicts[:1]
    listeners = tuple(
        lst
        for lst in snap.listeners
        if lst.socket.port == port and (lst.socket.netns == HOST_NETNS or lst.service)
    )
    published = tuple(p for p in snap.published if p.host_port == port)
    inside = [lst for p in published for lst in p.listeners]
    return Case(
        port=port,
        verdicts=verdicts,
        declared=declared,
        listeners=listeners,
        addresses=snap.host_addresses,
        culprits={**culprits_of(inside), **culprits_of(listeners, port)},
        probed=probed,
        published=published,
    )


def cmd_diagnose(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config_file)
    if config is None:
        return EXIT_USAGE
    try:
        port, specs, declared = resolve_target(args.target, config)
    except TargetError as e:
        print(f"bindscope diagnose: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    # only this port's services: the scan probes just this port
    scan_config = dataclasses.replace(
        _with_probe(config, args.probe),
        services=specs,
        unexpected=dataclasses.replace(config.unexpected, report=False),
    )
    snap = Scanner().scan(scan_config)
    case = build_case(port, snap, declared, args.probe)
    # read again, not taken from the scan: diagnose names the rule, the scan keeps verdicts
    case = dataclasses.replace(case, rulesets={HOST_NETNS: read_ruleset()})
    result = diagnose(case)
    paint = Paint.for_stream(sys.stdout)
    print("\n".join(render_diagnosis(result, case, paint, scan_notes(snap, paint))))
    return EXIT_PROBLEM if result.problem or not snap.success else EXIT_OK


def render_diagnosis(
    d: Diagnosis, case: Case, paint: Paint, notes: Sequence[str] = ()
) -> list[str]:
    out = [paint(f"bindscope diagnose: {d.subject}", "bold")]
    last = len(d.findings)
    for n, f in enumerate(d.findings, 1):
        out.append("")
        out.append(paint(f"{n}. {f.title}", "bold"))
        bullet = "- " if n == last and f.fixes else ""
        out.extend(f"   {bullet}{line}" for line in f.lines)
    statuses = ", ".join(dict.fromkeys(v.status.value for v in case.verdicts))
    out.append("")
    out.extend(notes)
    if d.problem:
        out.append(paint(f"Result: PROBLEM ({statuses})", "red"))
    else:
        out.append(paint(f"Result: ok ({statuses})", "green"))
    return out


if __name__ == "__main__":
    sys.exit(main())
