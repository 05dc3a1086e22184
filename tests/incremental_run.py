"""Randomized changes, each followed by an incremental scan and a full one: run by
test_incremental.py inside a test network namespace and a pid namespace of its own
(so that the namespaces in view are this run's alone), never on its own.

    python incremental_run.py SEED STEPS

Each step makes one change (listeners opened and closed, binds changed, processes
replaced on the same port, a socket handed over to another process, rules loaded,
addresses added or removed, namespaces with a listener appearing and going), then scans
with
the long-lived Scanner (and its Renderer) and with a fresh Scanner, and compares the
two: snapshot records equal, exposition byte-identical. Prints one JSON line: the
steps run and the mismatches, each with the operations that led to it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import subprocess
import sys

from bindscope.collector.snapshot import Renderer, render
from bindscope.config.load import parse_config
from bindscope.scan import Scanner

PORTS = (20001, 20002, 20003, 20004, 20005)
ADDRESSES = ("127.0.0.1", "0.0.0.0", "::1", "::", "198.51.100.7")
# the namespace starts with the first two (test_incremental.py adds them); removing
# every non-loopback address of a family narrows the wildcard sockets of that family
HOST = ("198.51.100.7/24", "2001:db8::7/64", "198.51.100.8/24", "2001:db8::8/64")
DEVICE = "bsi0"

CONFIG = """
probe: {enabled: false}
services:
  - {name: a, port: 20001, expose: private}
  - {name: b, port: 20002, expose: loopback}
  - {name: c, port: 20003, expose: public, process: '^holder$'}
  - {name: d, port: 20004, protocol: udp, expose: private}
  - {name: e, port: 20004, expose: private}
"""

# a child that names itself "holder", binds, and holds the socket until stdin closes
HOLDER = r"""
import ctypes, socket, sys
ctypes.CDLL(None).prctl(15, b"holder", 0, 0, 0)
addr, port, udp = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET,
                  socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((addr, port))
except OSError:
    print("busy", flush=True)
    sys.exit(0)
if not udp:
    s.listen(8)
print("ready", flush=True)
sys.stdin.read()
"""


# a child that names itself "heir" and keeps the sockets it inherited until stdin closes
HEIR = r"""
import ctypes, sys
ctypes.CDLL(None).prctl(15, b"heir", 0, 0, 0)
print("ready", flush=True)
sys.stdin.read()
"""


class World:
    """The sockets, children, rules and addresses of the namespace, changed at random."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.held: list[socket.socket] = []
        self.children: dict[tuple[str, int, bool], subprocess.Popen] = {}
        self.namespaces: list[subprocess.Popen] = []
        self.heirs: list[subprocess.Popen] = []

    def step(self) -> str:
        ops = (self.open, self.open, self.close, self.rebind, self.child, self.replace)
        return self.rng.choice((*ops, self.handover, self.rules, self.address, self.namespace))()

    def _bind(self, address: str, port: int, udp: bool) -> socket.socket | None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address == "::":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, self.rng.randint(0, 1))
        try:
            s.bind((address, port))
        except OSError:  # taken, or the address is not there now
            s.close()
            return None
        if not udp:
            s.listen(8)
        return s

    def open(self) -> str:
        address = self.rng.choice(ADDRESSES)
        port = self.rng.choice((*PORTS, 0))
        udp = self.rng.random() < 0.25
        s = self._bind(address, port, udp)
        if s is None:
            return f"open {address} {port} udp={udp}: refused"
        self.held.append(s)
        return f"open {address} {s.getsockname()[1]} udp={udp}"

    def close(self) -> str:
        if not self.held:
            return "close: nothing held"
        s = self.held.pop(self.rng.randrange(len(self.held)))
        name = s.getsockname()[:2]
        s.close()
        return f"close {name}"

    def rebind(self) -> str:
        """The same port, another address: as a service restarted with another bind."""
        if not self.held:
            return "rebind: nothing held"
        i = self.rng.randrange(len(self.held))
        old = self.held[i]
        port, udp = old.getsockname()[1], old.type == socket.SOCK_DGRAM
        old.close()
        address = self.rng.choice(ADDRESSES)
        s = self._bind(address, port, udp)
        if s is None:
            del self.held[i]
            return f"rebind {port} -> {address}: refused"
        self.held[i] = s
        return f"rebind {port} -> {address}"

    def handover(self) -> str:
        """Another process takes over a socket, the same one: a child inherits it and this
        process closes its own copy (as a server handing its socket to a new version)."""
        if not self.held:
            return "handover: nothing held"
        s = self.held.pop(self.rng.randrange(len(self.held)))
        p = subprocess.Popen(
            [sys.executable, "-c", HEIR],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=[s.fileno()],
        )
        line = p.stdout.readline().strip() if p.stdout else ""
        name = s.getsockname()[:2]
        s.close()
        if line != "ready":
            self._stop(p)
            return f"handover {name}: failed"
        self.heirs.append(p)
        return f"handover {name} to pid {p.pid}"

    def namespace(self) -> str:
        """A process in a network namespace of its own with one listener, or one gone."""
        if self.namespaces and self.rng.random() < 0.4:
            p = self.namespaces.pop(self.rng.randrange(len(self.namespaces)))
            self._stop(p)
            return f"namespace of pid {p.pid} gone"
        address, port = self.rng.choice(("0.0.0.0", "127.0.0.1", "::")), self.rng.choice(PORTS)
        holder = [sys.executable, "-c", HOLDER, address, str(port), "0"]
        p = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *holder],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = p.stdout.readline().strip() if p.stdout else ""
        if line != "ready":
            self._stop(p)
            return f"namespace {address} {port}: {line or 'failed'}"
        self.namespaces.append(p)
        return f"namespace pid {p.pid} {address} {port}"

    def child(self) -> str:
        key = (self.rng.choice(ADDRESSES), self.rng.choice(PORTS), self.rng.random() < 0.2)
        if key in self.children:
            return f"child {key}: already"
        return self._start(key)

    def _start(self, key: tuple[str, int, bool]) -> str:
        address, port, udp = key
        p = subprocess.Popen(
            [sys.executable, "-c", HOLDER, address, str(port), "1" if udp else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = p.stdout.readline().strip() if p.stdout else ""
        if line != "ready":
            self._stop(p)
            return f"child {key}: {line or 'failed'}"
        self.children[key] = p
        return f"child {key} pid {p.pid}"

    def replace(self) -> str:
        """Another process on the same port: the old one exits, a new one binds."""
        if not self.children:
            return self.child()
        key = self.rng.choice(sorted(self.children))
        self._stop(self.children.pop(key))
        return f"replace {key}: " + self._start(key)

    def rules(self) -> str:
        # mostly a port something listens on, so that verdicts move
        listening = [s.getsockname()[1] for s in self.held] + [k[1] for k in self.children]
        port = self.rng.choice(listening or PORTS) if self.rng.random() < 0.7 else 20005
        action = self.rng.choice(["drop", "accept", "flush"])
        if action == "flush":
            script = "flush ruleset\n"
        else:
            script = (
                "flush ruleset\n"
                "table inet t {\n"
                "  chain input {\n"
                "    type filter hook input priority 0; policy accept;\n"
                f"    iif != lo tcp dport {port} {action}\n"
                "  }\n"
                "}\n"
            )
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, timeout=10)
        return f"rules {action} {port}"

    def address(self) -> str:
        cidr = self.rng.choice(HOST)
        verb = "del" if cidr in self._present() else "add"
        extra = ["nodad"] if verb == "add" and ":" in cidr else []
        subprocess.run(["ip", "addr", verb, cidr, "dev", DEVICE, *extra], check=True, timeout=10)
        return f"address {verb} {cidr}"

    @staticmethod
    def _present() -> set[str]:
        """The device's addresses now (removing a primary IPv4 address removes the
        secondaries of its subnet too)."""
        out = subprocess.run(
            ["ip", "-o", "addr", "show", "dev", DEVICE],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return {line.split()[3] for line in out.splitlines()}

    @staticmethod
    def _stop(p: subprocess.Popen) -> None:
        p.kill()
        p.wait()

    def close_all(self) -> None:
        for s in self.held:
            s.close()
        for p in [*self.children.values(), *self.namespaces, *self.heirs]:
            self._stop(p)


def compare(incremental, full) -> list[str]:
    """The snapshot fields that differ, but for what moves on every scan."""
    return [
        f.name
        for f in dataclasses.fields(incremental)
        if f.name not in ("timestamp", "duration", "errors")
        and getattr(incremental, f.name) != getattr(full, f.name)
    ]


def _stable(exposition: bytes) -> list[bytes]:
    """The exposition without what moves on every scan."""
    return [
        line
        for line in exposition.splitlines()
        if not line.startswith((b"bindscope_scan_", b"bindscope_last_scan_"))
    ]


def main() -> int:
    seed, steps = int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    config = parse_config(CONFIG, "incremental.yml")
    options = {"published": False}
    scanner, renderer = Scanner(**options), Renderer()
    world = World(rng)
    done: list[str] = []
    mismatches = []
    changed = 0  # steps whose exposition differs from the step before: what was tested
    try:
        last, _ = renderer.render(scanner.scan(config))
        for _ in range(steps):
            done.append(world.step())
            incremental = scanner.scan(config)
            plain, _ = renderer.render(incremental)
            changed += _stable(plain) != _stable(last)
            last = plain
            full = Scanner(**options).scan(config)
            # what moves is the incremental scan's: the rest must be the same bytes
            same_moving = dataclasses.replace(
                full,
                timestamp=incremental.timestamp,
                duration=incremental.duration,
                errors=incremental.errors,
            )
            differ = compare(incremental, full)
            if plain != render(same_moving):
                differ.append("exposition")
            if differ:
                mismatches.append({"step": len(done), "differ": differ, "ops": list(done)})
    finally:
        world.close_all()
    summary = {"seed": seed, "steps": len(done), "changed": changed, "mismatches": mismatches}
    json.dump(summary, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
