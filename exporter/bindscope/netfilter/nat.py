"""Published ports: host address:port forwarded into a container, read from the host's
NAT rules (nft JSON or iptables-save) and from docker-proxy's arguments."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from bindscope.model import PublishedPort

ANY4 = "0.0.0.0"
ANY6 = "::"
_MAX_DEPTH = 16  # jump chains deeper than Kubernetes' four levels are not followed
# A host port range is read port by port up to this size: netavark writes consecutive
# `-p` mappings as one range rule, and Kubernetes' NodePort range is 2768 ports.
_MAX_RANGE = 4096


@dataclass(frozen=True)
class ToPorts:
    """The port part of a DNAT target: one port, or a range shifted by a base
    (`--to-destination ADDR:FIRST-LAST/BASE`, the kernel's NF_NAT_RANGE_PROTO_OFFSET),
    which maps each host port to its own target port."""

    first: int
    last: int | None = None
    base: int | None = None

    def port_for(self, host_port: int) -> int | None:
        """The target port a packet to `host_port` is sent to; None when the kernel picks
        one of a range (a range without a base)."""
        if self.last is None or self.last == self.first:
            return self.first
        if self.base is None:
            return None
        # nf_nat_l4proto_unique_tuple: a u16 offset from the base, wrapped into the range
        size = self.last - self.first + 1
        return self.first + ((host_port - self.base) % 65536) % size


@dataclass(frozen=True)
class _Match:
    """What a rule, or the path of jumps to it, requires of a packet."""

    protocols: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    daddr: str = ""

    def narrowed(self, inner: _Match) -> _Match | None:
        """Both conditions at once; None when no packet can meet them (the path from a
        jump for port 18081 never reaches the same chain's rule for port 18083)."""
        protocols = _both(self.protocols, inner.protocols)
        ports = _both(self.ports, inner.ports)
        if protocols is None or ports is None:
            return None
        if self.daddr and inner.daddr and self.daddr != inner.daddr:
            return None
        return _Match(protocols, ports, inner.daddr or self.daddr)


def _both(outer: tuple, inner: tuple) -> tuple | None:
    if not outer or not inner:
        return outer or inner
    within = set(outer)  # ranges are read port by port: thousands on each side
    common = tuple(v for v in inner if v in within)
    return common or None


# A rule's action: ("jump", chain), ("dnat", (address, ToPorts or None to keep the
# port)), ("opaque", name).
_Action = tuple[str, Any]
_Chains = dict[str, list[tuple[_Match, _Action]]]


def _walk(
    chains: _Chains, chain: str, outer: _Match, source: str, path: tuple[str, ...] = ()
) -> Iterator[PublishedPort]:
    if chain in path or len(path) >= _MAX_DEPTH:
        return
    for match, (kind, value) in chains.get(chain, ()):
        ctx = outer.narrowed(match)
        if ctx is None:
            continue
        if kind == "jump":
            # kube-proxy's KUBE-SERVICES also DNATs cluster IPs, which no host address
            # owns; only its NodePort branch publishes a port on the host.
            if chain == "KUBE-SERVICES" and value != "KUBE-NODEPORTS":
                continue
            yield from _walk(chains, value, ctx, source, (*path, chain))
        elif kind == "dnat":
            address, to_ports = value
            family = 6 if ":" in address else 4
            if ctx.daddr and (":" in ctx.daddr) != (family == 6):
                continue  # `dnat ip to` never applies to an IPv6 packet, nor the reverse
            host = ctx.daddr or (ANY6 if family == 6 else ANY4)
            # A DNAT without a protocol and port (a 1:1 address NAT) publishes no port.
            for protocol in ctx.protocols:
                for host_port in ctx.ports:
                    target = host_port if to_ports is None else to_ports.port_for(host_port)
                    if target is not None:
                        yield PublishedPort(protocol, host, host_port, address, target, source)


def dedupe(ports: Iterable[PublishedPort]) -> list[PublishedPort]:
    seen: dict[tuple[str, str, int, str, int], PublishedPort] = {}
    for p in ports:
        seen.setdefault(p.key, p)
    return list(seen.values())


# ---- nftables JSON (`nft -j list ruleset`) ----


def parse_nft_nat(json_text: str) -> list[PublishedPort]:
    """DNAT rules reachable from nat chains hooked at prerouting or output."""
    return nat_from_nft(json.loads(json_text)["nftables"])[0]


def nat_from_nft(items: list[Any]) -> tuple[list[PublishedPort], bool]:
    """The published ports, and whether some NAT target is an iptables-nft `xt`
    statement, whose arguments nft's JSON leaves out (iptables-save shows them)."""
    tables: dict[tuple[str, str], _Chains] = {}
    bases: list[tuple[tuple[str, str], str]] = []
    opaque = False
    for item in items:
        if "chain" in item:
            c = item["chain"]
            key = (c["family"], c["table"])
            tables.setdefault(key, {}).setdefault(c["name"], [])
            if c.get("type") == "nat" and c.get("hook") in ("prerouting", "output"):
                bases.append((key, c["name"]))
        elif "rule" in item:
            r = item["rule"]
            match, action = _nft_rule(r.get("expr", ()))
            if action is None or action[0] == "opaque":
                opaque = opaque or action is not None
                continue
            tables.setdefault((r["family"], r["table"]), {}).setdefault(r["chain"], []).append(
                (match, action)
            )
    found = [p for key, chain in bases for p in _walk(tables[key], chain, _Match(), "nft")]
    return dedupe(found), opaque


def _nft_rule(exprs: Iterable[dict]) -> tuple[_Match, _Action | None]:
    protocols: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    daddr = ""
    for e in exprs:
        if "match" in e:
            m = e["match"]
            if m.get("op") not in ("==", "in"):
                continue  # a negation narrows nothing we report
            left, right = m.get("left"), m.get("right")
            payload = left.get("payload", {}) if isinstance(left, dict) else {}
            field, proto = payload.get("field"), payload.get("protocol")
            if field == "dport" and proto in ("tcp", "udp", "th"):
                ports = _nft_ints(right)
                if proto != "th":
                    protocols = (proto,)
            elif field == "daddr" and proto in ("ip", "ip6"):
                daddr = _nft_address(right)
            elif (isinstance(left, dict) and left.get("meta", {}).get("key") == "l4proto") or (
                field in ("protocol", "nexthdr")
            ):
                protocols = tuple(p for p in _nft_values(right) if p in ("tcp", "udp"))
        elif "jump" in e or "goto" in e:
            return _Match(protocols, ports, daddr), ("jump", (e.get("jump") or e["goto"])["target"])
        elif "dnat" in e:
            d = e["dnat"] or {}
            addr, port = d.get("addr"), d.get("port")
            if isinstance(addr, str) and (port is None or isinstance(port, int)):
                to_ports = None if port is None else ToPorts(port)
                return _Match(protocols, ports, daddr), ("dnat", (addr, to_ports))
            return _Match(), None  # a map or a range: no single target to check
        elif "xt" in e and e["xt"].get("type") == "target" and e["xt"].get("name") == "DNAT":
            return _Match(), ("opaque", "DNAT")
    return _Match(), None


def _nft_values(right: Any) -> list[Any]:
    if isinstance(right, dict) and "set" in right:
        return list(right["set"])
    return [right]


def _nft_ints(right: Any) -> tuple[int, ...]:
    # Port ranges ({"range": [a, b]}) and named sets ("@name") are left out: a range
    # cannot be checked port by port.
    return tuple(v for v in _nft_values(right) if isinstance(v, int) and not isinstance(v, bool))


def _nft_address(right: Any) -> str:
    if isinstance(right, str) and not right.startswith("@"):
        return right
    if isinstance(right, dict) and "prefix" in right:
        p = right["prefix"]
        if p.get("len") == (128 if ":" in p.get("addr", "") else 32):
            return p["addr"]
    return ""  # a subnet or a set: reported as every host address


# ---- iptables-save -t nat ----


def parse_iptables_nat(save_text: str) -> list[PublishedPort]:
    """DNAT rules reachable from PREROUTING or OUTPUT of the *nat table."""
    chains: _Chains = {}
    in_nat = False
    for line in save_text.splitlines():
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif in_nat and line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif in_nat and line.startswith("-A "):
            tokens = shlex.split(line)
            rule = _iptables_rule(tokens[2:])
            if rule is not None:
                chains.setdefault(tokens[1], []).append(rule)
    found = [
        p for base in ("PREROUTING", "OUTPUT") for p in _walk(chains, base, _Match(), "iptables")
    ]
    return dedupe(found)


# The options that matter, by what they set; values of all others are skipped over.
_IPT_OPTIONS = {
    "-p": "protocol", "--protocol": "protocol",
    "--dport": "ports", "--destination-port": "ports",
    "--dports": "ports", "--destination-ports": "ports",  # -m multiport: "80,443,1000:2000"
    "-d": "daddr", "--destination": "daddr",
    "-j": "target", "--jump": "target", "-g": "target", "--goto": "target",
    "--to-destination": "to",
}  # fmt: skip


def _iptables_rule(args: list[str]) -> tuple[_Match, _Action] | None:
    values: dict[str, str] = {}
    negated = False
    it = iter(args)
    for tok in it:
        if tok == "!":
            negated = True
            continue
        option = _IPT_OPTIONS.get(tok)
        if option is not None:
            value = next(it, "")
            # `! -d 127.0.0.0/8` and the like narrow nothing we report.
            if not negated:
                values[option] = value
        negated = False
    protocol = values.get("protocol", "")
    match = _Match(
        (protocol,) if protocol in ("tcp", "udp") else (),
        _ipt_ports(values.get("ports", "")),
        _single_host(values.get("daddr", "")),
    )
    target = values.get("target", "")
    if target == "DNAT":
        parsed = _to_destination(values.get("to", ""))
        return (match, ("dnat", parsed)) if parsed else None
    # Other targets are chains or verdicts; _walk follows the names that are chains.
    return (match, ("jump", target)) if target else None


def _ipt_ports(value: str) -> tuple[int, ...]:
    """`--dport 80`, `--dport 8000:8002` or `--dports 80,8000:8002` as single ports; an
    open or larger range than _MAX_RANGE is left out."""
    ports: list[int] = []
    for part in value.split(",") if value else ():
        low, sep, high = part.partition(":")
        if not sep and low.isdigit():
            ports.append(int(low))
        elif low.isdigit() and high.isdigit() and 0 <= int(high) - int(low) < _MAX_RANGE:
            ports.extend(range(int(low), int(high) + 1))
    return tuple(ports)


def _single_host(value: str) -> str:
    addr, _, length = value.partition("/")
    if "," in addr or (length and length != ("128" if ":" in addr else "32")):
        return ""
    return addr


def _to_destination(value: str) -> tuple[str, ToPorts | None] | None:
    """--to-destination ADDR[:PORT] ([ADDR6]:PORT), or a port range shifted by a base
    (ADDR:FIRST-LAST/BASE, as netavark writes consecutive ports); an address range, and
    a port range without a base, have no single target."""
    if value.startswith("["):
        addr, _, rest = value[1:].partition("]")
        port = rest[1:]
    elif value.count(":") == 1:
        addr, port = value.split(":")
    else:
        addr, port = value, ""
    if not addr or "-" in addr:
        return None
    if not port:
        return addr, None
    if port.isdigit():
        return addr, ToPorts(int(port))
    span, _, base = port.partition("/")
    first, _, last = span.partition("-")
    if first.isdigit() and last.isdigit() and base.isdigit() and int(first) <= int(last):
        return addr, ToPorts(int(first), int(last), int(base))
    return None


# ---- docker-proxy ----


def docker_proxy_ports(proc: str = "/proc") -> list[PublishedPort]:
    """Ports Docker's userland proxy holds, from its command line (Go flags)."""
    found = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/comm") as f:
                if f.read().strip() != "docker-proxy":
                    continue
            with open(f"{entry.path}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue  # exited meanwhile
        port = _docker_proxy_port(argv[1:])
        if port is not None:
            found.append(port)
    return dedupe(found)


def _docker_proxy_port(args: list[str]) -> PublishedPort | None:
    flags: dict[str, str] = {}
    it = iter(args)
    for tok in it:
        if not tok.startswith("-"):
            continue
        name, eq, value = tok.lstrip("-").partition("=")
        flags[name] = value if eq else next(it, "")
    try:
        host_port, target_port = int(flags["host-port"]), int(flags["container-port"])
        protocol, host, target = flags["proto"], flags["host-ip"], flags["container-ip"]
    except (KeyError, ValueError):
        return None
    return PublishedPort(protocol, host, host_port, target, target_port, "docker-proxy")
