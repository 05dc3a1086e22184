"""Discovery bench: bindscope's listing and scans against the usual tools, on one host.

    .venv/bin/python bench/discovery.py

For L listeners in {100, 1000} and E established loopback connections in {0, 20000},
with ~2000 processes on the host, times bindscope's netlink listing against a raw
LISTEN-only dump (the floor), psutil.net_connections(), parsing /proc/net/tcp* and
`ss -ltnp`; then a cold and a steady-state Scanner.scan() (probes off, 500 declared services),
with every collector and with the host's namespace alone.
"""

from __future__ import annotations

import sys
import time
from functools import partial

import common

from bindscope.config.load import parse_config
from bindscope.discover import netlink
from bindscope.scan import Scanner

LISTENERS = (100, 1000)
CONNECTIONS = (0, 20000)
PROCESSES = 2000
SERVICES = 500

METHODS = (
    ("raw LISTEN-only dump (floor)", common.raw_listen_dump, 200),
    # with the memo a scanner keeps between scans, as the exporter lists
    ("bindscope netlink.list_sockets", partial(netlink.list_sockets, memo=netlink.Memo()), 200),
    ("parse /proc/net/tcp*,udp*", common.proc_net_listeners, 20),
    ("ss -ltnp", common.ss_listen, 7),
    ("psutil.net_connections()", common.psutil_connections, 5),
)


# Scanner options: every collector (the exporter's default), and the host's namespace
# alone with no packet filter (--no-collector.namespaces --no-collector.firewall)
SCANNERS = (
    ("all collectors", {}),
    ("host only", {"namespaces": False, "firewall": False, "published": False}),
)


def scans(n_services: int) -> dict[str, float]:
    """Cold first scan and steady-state scan, ms; probes off, n_services declared."""
    config = parse_config(common.services_config(n_services), "bench.yml")
    got = {}
    for label, options in SCANNERS:
        cold = []
        for _ in range(3):
            scanner = Scanner(**options)
            t0 = time.perf_counter()
            scanner.scan(config)
            cold.append(time.perf_counter() - t0)
        scanner.scan(config)
        got[f"scan cold, {label}"] = sorted(cold)[1] * 1000
        got[f"scan steady, {label}"] = common.median_ms(lambda s=scanner: s.scan(config), 50)
    return got


def run(h: common.Host) -> tuple[list[tuple[str, ...]], list[str], list[str]]:
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    h.set_processes(PROCESSES)
    results: dict[tuple[int, int], dict[str, float]] = {}
    for listeners in LISTENERS:
        h.set_listeners(listeners)
        for connections in CONNECTIONS:
            h.set_connections(connections)
            got = {name: common.median_ms(fn, repeat) for name, fn, repeat in METHODS}
            got |= scans(SERVICES)
            results[(listeners, connections)] = got
            print(f"  measured L={listeners} E={connections}", file=sys.stderr)
    procs = common.processes_on_host()
    names = list(next(iter(results.values())))
    for name in names:
        floor_ratio = ""
        row = [name]
        for key in results:
            row.append(f"{results[key][name]:.1f}")
        big = results[(max(LISTENERS), max(CONNECTIONS))]
        floor_ratio = f"{big[name] / big[METHODS[0][0]]:.1f}x"
        row.append(floor_ratio)
        rows.append(tuple(row))
    big = results[(max(LISTENERS), max(CONNECTIONS))]
    small_e = results[(max(LISTENERS), min(CONNECTIONS))]
    notes.append(f"processes on the host during the run: {procs}")
    notes.append(
        "bindscope listing vs floor at L=1000/E=20000: "
        f"{big[METHODS[1][0]] / big[METHODS[0][0]]:.2f}x (target <= 2x)"
    )
    notes.append(
        "bindscope listing E=20000 vs E=0 at L=1000: "
        f"{big[METHODS[1][0]] / small_e[METHODS[1][0]]:.2f}x (target: independent of E)"
    )
    for label, _options in SCANNERS:
        notes.append(
            f"cold scan ({label}) vs ss -ltnp at L=1000/E=20000: "
            f"{big[f'scan cold, {label}'] / big['ss -ltnp']:.2f}x (target <= 1x)"
        )
        notes.append(
            f"steady scan ({label}) at L=1000/E=20000: "
            f"{big[f'scan steady, {label}']:.1f} ms (target < 20 ms)"
        )
    return rows, [f"L={lst} E={con} (ms)" for lst, con in results], notes


def main() -> int:
    print(f"machine: {common.machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    with common.host() as h:
        rows, columns, notes = run(h)
    common.report(rows, ("method (median)", *columns, "vs floor @1000/20000"), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
