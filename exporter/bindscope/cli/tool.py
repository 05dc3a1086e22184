"""`bindscope`, the operator's tool: scan, check-config, init and diagnose, printed for people.

Every subcommand runs the exporter's own engine (Scanner: discover, judge, probe) once;
this module only parses arguments and dispatches; cli/output.py and cli/document.py render.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence

from bindscope import __version__
from bindscope.cli.common import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, Parser, load
from bindscope.cli.document import scan_ok, snapshot_json
from bindscope.cli.init import ephemeral_range, plan, render
from bindscope.cli.output import Paint, render_diagnosis, render_scan, scan_notes
from bindscope.config.load import Config, ConfigError, load_config, split_target
from bindscope.diagnose.case import TargetError, build_case, culprits_of, resolve_target
from bindscope.diagnose.document import to_document
from bindscope.diagnose.remote import ExporterAccess, default_exporter_url, diagnose_remote
from bindscope.diagnose.remote import render as render_remote
from bindscope.diagnose.steps import diagnose
from bindscope.logs import setup as setup_logging
from bindscope.model import (
    HOST_NETNS,
    Snapshot,
)
from bindscope.netfilter.read import read_ruleset
from bindscope.scan import Scanner


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
        "target",
        metavar="PORT|SERVICE|HOST:PORT",
        help="a port number or a service name from the config; or HOST:PORT to connect "
        "from here and join the outcome with HOST's exporter's diagnosis",
    )
    config_flag(diag)
    probe_flag(diag)
    diag.add_argument(
        "--json", action="store_true", help="the diagnosis as a versioned JSON document"
    )
    diag.add_argument(
        "--exporter",
        dest="exporter_url",
        default=None,
        metavar="URL",
        help="with HOST:PORT: HOST's bindscope exporter (default http://HOST:9917)",
    )
    diag.add_argument("--exporter.username", dest="exporter_username", default=None)
    diag.add_argument(
        "--exporter.password-file",
        dest="exporter_password_file",
        default=None,
        help="file holding the exporter's basic auth password",
    )
    diag.add_argument(
        "--exporter.ca-file",
        dest="exporter_ca_file",
        default=None,
        help="CA certificate to check an https exporter's certificate",
    )
    diag.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        help="with HOST:PORT: seconds for the connect and for each step of asking the exporter",
    )
    return p


class FirstErrors(logging.Handler):
    """The first detail of each scan error source, for the `Scan errors:` line; the scan
    logs them as warnings, which the tool does not print."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.details: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        source, detail = getattr(record, "source", None), getattr(record, "detail", None)
        if isinstance(source, str) and isinstance(detail, str):
            self.details.setdefault(source, detail)
        if record.levelno >= logging.ERROR:
            logging.getLogger("bindscope").handle(record)


SCAN_ERRORS = FirstErrors()


def notes(snap: Snapshot, paint: Paint) -> list[str]:
    return scan_notes(snap, paint, SCAN_ERRORS.details, root=os.geteuid() == 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # scan errors are summed up in the output; only real failures are logged
    setup_logging("error")
    scan_log = logging.getLogger("bindscope.scan")
    scan_log.setLevel(logging.WARNING)
    scan_log.propagate = False
    scan_log.handlers[:] = [SCAN_ERRORS]
    commands = {
        "scan": cmd_scan,
        "check-config": cmd_check_config,
        "init": cmd_init,
        "diagnose": cmd_diagnose,
    }
    return commands[args.command](args)


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
        paint = Paint.for_stream(sys.stdout)
        print("\n".join([*render_scan(snap, paint), *notes(snap, paint)]))
    return EXIT_OK if scan_ok(snap) else EXIT_PROBLEM


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


def cmd_diagnose(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config_file)
    if config is None:
        return EXIT_USAGE
    if not any(s.name == args.target for s in config.services) and ":" in args.target:
        return cmd_diagnose_remote(args)
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
    doc = to_document(result, args.target)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        paint = Paint.for_stream(sys.stdout)
        print("\n".join(render_diagnosis(doc, paint, notes(snap, paint))))
    return EXIT_PROBLEM if result.problem or not snap.success else EXIT_OK


def cmd_diagnose_remote(args: argparse.Namespace) -> int:
    try:
        host, port = split_target(args.target)
    except ValueError as e:
        print(f"bindscope diagnose: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not 0 < args.timeout <= 60:
        print("bindscope diagnose: error: --timeout must be in (0, 60]", file=sys.stderr)
        return EXIT_USAGE
    access = ExporterAccess(
        args.exporter_url or default_exporter_url(host),
        args.exporter_username,
        args.exporter_password_file,
        args.exporter_ca_file,
    )
    doc = diagnose_remote(host, port, access, args.timeout)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(render_remote(doc)))
    return EXIT_PROBLEM if doc["result"] == "problem" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
