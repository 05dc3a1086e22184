"""`bindscope-exporter`: flags, start-up, signals, and serving until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import platform
import signal
import sys
import threading
from collections.abc import Sequence

from bindscope import __version__

# The rest of bindscope is imported once the signal handlers are in place (main() says why).

log = logging.getLogger("bindscope")


def exporter_parser() -> argparse.ArgumentParser:
    from bindscope.cli.common import Help, Parser
    from bindscope.logs import LEVELS

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
        "--web.max-requests",
        dest="max_requests",
        type=int,
        default=40,
        help="most requests answered at once; beyond, 503",
    )
    p.add_argument(
        "--web.max-connections",
        dest="max_connections",
        type=int,
        default=1024,
        help="most client connections open at once (and never so many that scans run out of "
        "file descriptors); beyond, the one idle longest is closed",
    )
    p.add_argument(
        "--web.systemd-socket",
        dest="systemd_socket",
        action="store_true",
        help="serve on the listening sockets systemd passes (a .socket unit) instead of "
        "--web.listen-address",
    )
    p.add_argument(
        "--web.disable-exporter-metrics",
        dest="no_exporter_metrics",
        action="store_true",
        help="leave out the exporter's own process, platform and gc metrics",
    )
    p.add_argument(
        "--collector.listeners.max",
        dest="max_listeners",
        type=int,
        default=2000,
        help="most series exported per per-listener family (0: no limit)",
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
    p.add_argument(
        "--version",
        action="version",
        version=f"bindscope-exporter {__version__} (python {platform.python_version()}, "
        f"{platform.system().lower()}/{platform.machine()})",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # First of all: SIGHUP's default action kills, and the rest of start-up (imports, a
    # large config, binding) takes a while. The handlers only set flags: a reload runs in
    # a thread of its own (a SIGHUP before it starts is answered once it does), so a slow
    # one never holds up SIGTERM, and no exception is raised wherever the main thread is.
    hup, stop = threading.Event(), threading.Event()
    signal.signal(signal.SIGHUP, lambda _s, _f: hup.set())
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    signal.signal(signal.SIGINT, lambda _s, _f: stop.set())
    try:
        return _run(argv, hup, stop)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _run(argv: Sequence[str] | None, hup: threading.Event, stop: threading.Event) -> int:
    from bindscope.cli.common import EXIT_OK, EXIT_USAGE, load
    from bindscope.config.load import ConfigError
    from bindscope.daemon import Daemon, read_config
    from bindscope.logs import setup as setup_logging
    from bindscope.scan import Scanner
    from bindscope.web.api import Api
    from bindscope.web.landing import render_landing
    from bindscope.web.server import (
        MAIN_THREAD_SIGNALS,
        Endpoints,
        HTTPServer,
        Limits,
        ListenAddressError,
        bind,
        connection_limit,
        endpoint,
        parse_listen_address,
        systemd_sockets,
    )

    args = exporter_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    for flag, value, least in (
        ("--collector.listeners.max", args.max_listeners, 0),
        ("--web.max-requests", args.max_requests, 1),
        ("--web.max-connections", args.max_connections, 1),
    ):
        if value < least:
            print(f"bindscope-exporter: error: {flag} must be >= {least}", file=sys.stderr)
            return EXIT_USAGE
    try:
        if args.config_file is not None and args.config_file.strip():
            config = read_config(args.config_file)
        else:  # None: the embedded default; empty or blank: a usage error
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
        exporter_metrics=not args.no_exporter_metrics,
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
    sockets = []
    try:
        if args.systemd_socket:
            sockets = systemd_sockets()
        else:
            for text in args.listen or [":9917"]:
                sockets.append(bind(*parse_listen_address(text)))
    except (ListenAddressError, OSError) as e:
        for sock in sockets:
            sock.close()
        print(f"bindscope-exporter: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    scanner.set_own(endpoint(s) for s in sockets)
    limits = Limits(
        max_requests=args.max_requests, max_connections=connection_limit(args.max_connections)
    )
    server = HTTPServer(sockets, endpoints, security, limits)
    if stop.is_set():  # asked to stop during start-up: nothing runs yet
        server.stop()
        return EXIT_OK
    try:
        log.info(
            "starting bindscope-exporter",
            extra={
                "version": __version__,
                "config": args.config_file or "<embedded default>",
                "services": len(config.services),
                "listen": ",".join(
                    f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in map(endpoint, sockets)
                ),
                "max_connections": limits.max_connections,
            },
        )
        daemon.start()
        if security is not None:
            security.start()
        server.start()

        def reloads() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
            while True:  # SIGHUPs during a reload are answered by one more
                hup.wait()
                hup.clear()
                daemon.reload()

        threading.Thread(target=reloads, name="reload", daemon=True).start()
        stop.wait()
        log.info("shutting down")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut cleanup
        server.stop()
        if security is not None:
            security.stop()
        daemon.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
