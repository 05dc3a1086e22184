"""`bindscope`, the operator's tool: one scan with the exporter's engine, printed for people."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from bindscope.cli import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, _Parser, load
from bindscope.config import ConfigError
from bindscope.model import Snapshot, Status
from bindscope.scan import Scanner


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bindscope", description="Check what listens on this host against what should listen."
    )
    sub = p.add_subparsers(dest="command", required=True)
    scan = sub.add_parser(
        "scan", help="scan once, print services and listeners; exit 1 if any service is not ok"
    )
    scan.add_argument("--config.file", dest="config_file", default=None)
    scan.add_argument("--json", action="store_true", help="machine-readable output")
    scan.add_argument(
        "--probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="probe reachability of each service on each host address",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load(args.config_file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    if not args.probe:
        import dataclasses

        config = dataclasses.replace(config, probe=dataclasses.replace(config.probe, enabled=False))
    snap = Scanner().scan(config)
    print(json.dumps(snapshot_json(snap), indent=2) if args.json else table(snap))
    return EXIT_OK if all(v.status is Status.OK for v in snap.verdicts) else EXIT_PROBLEM


def snapshot_json(snap: Snapshot) -> dict:
    return {
        "services": [
            {
                "name": v.service.name,
                "port": v.service.port,
                "protocol": v.service.protocol.value,
                "expose": v.service.expose.value,
                "status": v.status.value,
                "exposure": v.exposure.value,
                "probes": [{"address": p.address, "success": p.success} for p in v.probes],
            }
            for v in snap.verdicts
        ],
        "listeners": [
            {
                "protocol": lst.socket.protocol.value,
                "address": lst.socket.address,
                "port": lst.socket.port,
                "scope": lst.scope.value,
                "exposure": lst.exposure.value,
                "process": lst.process.name,
                "service": lst.service,
            }
            for lst in snap.listeners
        ],
    }


def table(snap: Snapshot) -> str:
    lines = [f"{'SERVICE':<20} {'PORT':<10} {'EXPECTED':<9} {'EXPOSURE':<9} STATUS"]
    for v in snap.verdicts:
        s = v.service
        lines.append(
            f"{s.name:<20} {f'{s.port}/{s.protocol.value}':<10} "
            f"{s.expose.value:<9} {v.exposure.value:<9} {v.status.value}"
        )
    return "\n".join(lines)
