"""`bindscope-exporter`: flags, start-up, signals, and serving until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence

from bindscope import __version__
from bindscope.cli.common import EXIT_OK, EXIT_USAGE, Help, Parser, load
from bindscope.config.load import ConfigError
from bindscope.logs import LEVELS
from bindscope.logs import setup as setup_logging

log = logging.getLogger("bindscope")


class _Shutdown(Exception):
    pass


def exporter_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="bindscope-exporter",
        description="Prometheus exporter: compares the sockets listening on this "
        "host with what should listen, and probes their reachability.",
        formatter_class=Help,
    )
    p.add_argument(
        "--config.file",
        dest="config_file",
        default=None,
        help="YAML config; without it the embedded default runs (no declared "
        "services, every listener inventoried, unexpected listeners reported)",
    )
    p.add_argument(
        "--web.listen-address",
        dest="listen",
        action="append",
        default=None,
        help="address to listen on, repeatable (default :9917: every interface, IPv4 and IPv6)",
    )
    p.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        default="/metrics",
        help="path under which to expose metrics",
    )
    p.add_argument(
        "--web.config.file",
        dest="web_config",
        default=None,
        help="TLS and basic auth, in the Prometheus exporter-toolkit format",
    )
    p.add_argument(
        "--web.enable-lifecycle",
        dest="lifecycle",
        action="store_true",
        help="enable POST /-/reload",
    )
    p.add_argument(
        "--collector.listeners.max",
        dest="max_listeners",
        type=int,
        default=2000,
        help="most bindscope_listener_info series exported (0: no limit)",
    )
    p.add_argument(
        "--collector.namespaces",
        dest="namespaces",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scan every network namespace in view (containers, ip netns), not only the "
        "exporter's own; needs CAP_SYS_ADMIN, or CAP_SYS_PTRACE for the slower fallback",
    )
    p.add_argument(
        "--collector.firewall",
        dest="firewall",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read each namespace's packet filter (nftables, iptables) to tell what other "
        "hosts can reach; needs CAP_NET_ADMIN",
    )
    p.add_argument(
        "--collector.published-ports",
        dest="published",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="follow ports published by NAT (Docker, Podman, Kubernetes) into their "
        "namespace; needs CAP_NET_ADMIN",
    )
    p.add_argument(
        "--discovery.backend",
        dest="backend",
        default="auto",
        choices=["auto", "netlink", "psutil"],
        help="how to list sockets; auto uses netlink and falls back to psutil",
    )
    p.add_argument("--log.level", dest="log_level", default="info", choices=list(LEVELS))
    p.add_argument("--log.format", dest="log_format", default="logfmt", choices=["logfmt", "json"])
    p.add_argument("--version", action="version", version=f"bindscope-exporter {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from bindscope.daemon import Daemon
    from bindscope.scan import Scanner
    from bindscope.web.api import Api
    from bindscope.web.landing import render_landing
    from bindscope.web.server import (
        Endpoints,
        ListenAddressError,
        Server,
        parse_listen_address,
        serve,
    )

    args = exporter_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.max_listeners < 0:
        print("bindscope-exporter: error: --collector.listeners.max must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load(args.config_file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    security = None
    if args.web_config:
        from bindscope.web.webconfig import WebConfigError, WebConfigWatcher

        try:
            security = WebConfigWatcher(args.web_config)
        except WebConfigError as e:
            print(e, file=sys.stderr)
            return EXIT_USAGE

    scanner = Scanner(
        backend=args.backend,
        namespaces=args.namespaces,
        firewall=args.firewall,
        published=args.published,
    )
    daemon = Daemon(
        config,
        args.config_file,
        scanner,
        args.max_listeners,
        web_config_errors=(lambda: security.errors) if security is not None else None,
    )
    endpoints = Endpoints(
        metrics=daemon.metrics,
        landing=lambda: render_landing(daemon.snapshot, args.telemetry_path),
        ready=daemon.ready,
        reload=daemon.reload,
        telemetry_path=args.telemetry_path,
        enable_lifecycle=args.lifecycle,
        api=Api(lambda: daemon.snapshot, lambda: daemon.config),
    )
    servers: list[Server] = []
    try:
        for text in args.listen or [":9917"]:
            host, port = parse_listen_address(text)
            servers.append(Server(host, port, endpoints, security))
    except (ListenAddressError, OSError) as e:
        for srv in servers:
            srv.server_close()
        print(f"bindscope-exporter: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    scanner.set_own(srv.endpoint for srv in servers)

    def on_term(signum: int, _frame: object) -> None:
        raise _Shutdown

    def on_hup(_signum: int, _frame: object) -> None:
        daemon.reload()

    serving: list[Server] = []
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        log.info(
            "starting bindscope-exporter",
            extra={
                "version": __version__,
                "config": args.config_file or "<embedded default>",
                "services": len(config.services),
                "listen": ",".join(
                    f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                    for h, p in (s.endpoint for s in servers)
                ),
            },
        )
        daemon.start()
        serve(servers)
        serving = servers  # shutdown() waits forever on a server that never served
        while True:
            time.sleep(3600)
    except (_Shutdown, KeyboardInterrupt):
        log.info("shutting down")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        for srv in serving:
            srv.shutdown()
        for srv in servers:
            srv.server_close()
        daemon.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
