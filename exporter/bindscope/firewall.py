"""Reads a namespace's packet filter (nftables JSON, iptables-save) and decides whether
a NEW connection from another host to an address and port gets through it.

The evaluator is pure and conservative: what it cannot model makes the answer UNKNOWN,
never a guess. docs/firewall.md lists the supported subset.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shlex
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bindscope.model import Firewall


@dataclass(frozen=True)
class Decision:
    """The answer for one (protocol, family, address, port), and the rule that gave it."""

    verdict: Firewall
    table: str = ""
    chain: str = ""
    handle: int | None = None
    rule: str = ""  # the deciding rule as text, or "policy drop", "no filter"
    family: str = ""  # nft family of the table: ip, ip6, inet, netdev
    restricted: bool = False  # accepted for some sources or interfaces only
    reason: str = ""  # why UNKNOWN, or what restricts an ACCEPT
    backend: str = ""  # nft, iptables-nft or iptables-legacy
    manager: str = ""  # ufw, firewalld, or "" when rules are written by hand


@dataclass(frozen=True)
class Rule:
    handle: int | None
    exprs: tuple[Any, ...]  # nft JSON expressions; never mutated after parsing
    text: str


@dataclass(frozen=True)
class Chain:
    family: str
    table: str
    name: str
    rules: tuple[Rule, ...]
    hook: str = ""  # empty for a regular (jump target) chain
    type: str = ""
    prio: int = 0
    policy: str = "accept"
    backend: str = "nft"


@dataclass(frozen=True)
class NamedSet:
    family: str
    table: str
    name: str
    elements: tuple[Any, ...]  # JSON values; a map's elements are [key, data] pairs


@dataclass(frozen=True)
class Ruleset:
    """A parsed packet filter: every chain and named set, immutable."""

    chains: tuple[Chain, ...] = ()
    sets: tuple[NamedSet, ...] = ()
    _chains: dict = field(init=False, repr=False, compare=False)
    _sets: dict = field(init=False, repr=False, compare=False)
    _ifaces: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ifaces", _interface_classes(self.chains))
        object.__setattr__(
            self, "_chains", {(c.family, c.table, c.name, c.backend): c for c in self.chains}
        )
        object.__setattr__(self, "_sets", {(s.family, s.table, s.name): s for s in self.sets})

    def chain(self, family: str, table: str, name: str, backend: str) -> Chain | None:
        return self._chains.get((family, table, name, backend))

    def named_set(self, family: str, table: str, name: str) -> NamedSet | None:
        return self._sets.get((family, table, name))

    @property
    def xt_tables(self) -> frozenset[tuple[str, str]]:
        """Tables holding iptables extensions whose arguments nft's JSON does not show."""
        return frozenset(
            (c.family, c.table)
            for c in self.chains
            for r in c.rules
            if any("xt" in e and e["xt"].get("type") == "match" for e in r.exprs)
        )

    def replace_tables(self, other: Ruleset) -> Ruleset:
        """These rules with every table `other` has taken from `other` instead."""
        theirs = {(c.family, c.table) for c in other.chains}
        return Ruleset(
            tuple(c for c in self.chains if (c.family, c.table) not in theirs) + other.chains,
            tuple(s for s in self.sets if (s.family, s.table) not in theirs) + other.sets,
        )

    def merge(self, other: Ruleset) -> Ruleset:
        """Both filters at once, as legacy iptables hooks run beside nftables."""
        return Ruleset(self.chains + other.chains, self.sets + other.sets)

    @property
    def manager(self) -> str:
        if any(c.table == "firewalld" for c in self.chains):
            return "firewalld"
        if any(c.name.startswith(("ufw-", "ufw6-")) for c in self.chains):
            return "ufw"
        return ""


# --- nft JSON -----------------------------------------------------------------------


def parse_nft_json(text: str) -> Ruleset:
    """`nft -j list ruleset` output -> Ruleset; ValueError when it is not that."""
    try:
        return _parse_nft(json.loads(text)["nftables"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not nft JSON output: {e!r}") from e


def _parse_nft(items: list[Any]) -> Ruleset:
    chains: dict[tuple[str, str, str], dict] = {}
    rules: dict[tuple[str, str, str], list[Rule]] = {}
    sets: list[NamedSet] = []
    for item in items:
        if "chain" in item:
            c = item["chain"]
            key = (c["family"], c["table"], c["name"])
            chains[key] = c
            rules.setdefault(key, [])
        elif "rule" in item:
            r = item["rule"]
            exprs = tuple(r.get("expr", ()))
            text = render_rule(exprs)
            if r.get("comment"):
                text += f' comment "{r["comment"]}"'
            rules.setdefault((r["family"], r["table"], r["chain"]), []).append(
                Rule(r.get("handle"), exprs, text)
            )
        elif "set" in item or "map" in item:
            s = item.get("set") or item["map"]
            elems = tuple(_unwrap_elem(e) for e in s.get("elem", ()))
            sets.append(NamedSet(s["family"], s["table"], s["name"], elems))
    out = []
    for key, c in chains.items():
        out.append(
            Chain(
                family=c["family"],
                table=c["table"],
                name=c["name"],
                rules=tuple(rules[key]),
                hook=c.get("hook", ""),
                type=c.get("type", ""),
                prio=int(c.get("prio", 0)),
                policy=c.get("policy", "accept"),
            )
        )
    return Ruleset(tuple(out), tuple(sets))


def _unwrap_elem(e: Any) -> Any:
    # Elements with a timeout or counter come wrapped as {"elem": {"val": ...}}.
    if isinstance(e, dict) and "elem" in e:
        return e["elem"]["val"]
    if isinstance(e, list) and e and isinstance(e[0], dict) and "elem" in e[0]:
        return [e[0]["elem"]["val"], *e[1:]]
    return e


_BARE_META = {"iif", "iifname", "oif", "oifname"}
_VERDICT_WORDS = ("accept", "drop", "return", "continue")


def render_rule(exprs: Iterable[Any]) -> str:
    """nft-like text of a rule's JSON expressions, for people (not for nft)."""
    parts = [_render_stmt(e) for e in exprs]
    return " ".join(p for p in parts if p)


def _render_stmt(e: Any) -> str:
    ((key, v),) = e.items()
    if key == "match":
        left = _render_value(v["left"])
        quote = _is_ifname(v["left"])
        right = _render_value(v["right"], quote)
        op = "" if v["op"] in ("==", "in") else v["op"] + " "
        return f"{left} {op}{right}"
    if key in _VERDICT_WORDS:
        return key
    if key in ("jump", "goto"):
        return f"{key} {v['target']}"
    if key == "reject":
        return "reject" + (f" with {v.get('type')} {v.get('expr')}" if v and "expr" in v else "")
    if key == "counter":
        return "counter"
    if key == "log":
        return "log" + (f' prefix "{v["prefix"]}"' if v and "prefix" in v else "")
    if key == "limit":
        return f"limit rate {v.get('rate')}/{v.get('per')}"
    if key == "vmap":
        items = (
            ", ".join(f"{_render_value(k)} : {_render_stmt(d)}" for k, d in v["data"]["set"])
            if isinstance(v["data"], dict)
            else v["data"]
        )
        return f"{_render_value(v['key'])} vmap {{ {items} }}"
    if key == "xt":
        return f'xt {v.get("type")} "{v.get("name")}"'
    if key in ("dnat", "snat"):
        to = v.get("addr", "") + (f":{v['port']}" if "port" in v else "")
        return f"{key} to {to}"
    if key == "mangle":
        return f"{_render_value(v['key'])} set {_render_value(v['value'])}"
    if v is None:
        return key
    return json.dumps(e, separators=(",", ":"))


def _is_ifname(left: Any) -> bool:
    return isinstance(left, dict) and left.get("meta", {}).get("key") in _BARE_META


def _render_value(v: Any, quote: bool = False) -> str:
    if isinstance(v, bool):
        return "exists" if v else "missing"
    if isinstance(v, str):
        return f'"{v}"' if quote else v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return ",".join(_render_value(x, quote) for x in v)
    if isinstance(v, dict):
        ((key, x),) = v.items()
        if key == "payload":
            return f"{x.get('protocol', '')} {x.get('field', '')}".strip()
        if key == "meta":
            return x["key"] if x["key"] in _BARE_META else f"meta {x['key']}"
        if key == "ct":
            return f"ct {x['key']}"
        if key == "fib":
            return f"fib {' . '.join(x.get('flags', []))} {x.get('result')}"
        if key == "prefix":
            return f"{x['addr']}/{x['len']}"
        if key == "range":
            return f"{_render_value(x[0])}-{_render_value(x[1])}"
        if key == "set":
            return "{ " + ", ".join(_render_value(i, quote) for i in x) + " }"
        if key == "concat":
            return " . ".join(_render_value(i) for i in x)
    return json.dumps(v, separators=(",", ":"))


# --- iptables-save ------------------------------------------------------------------

_IPT_PRIO = {"raw": -300, "mangle": -150, "nat": -100, "filter": 0, "security": 50}
_IPT_TYPE = {"nat": "nat"}
_IPT_PORT_OPTS = ("--dport", "--sport", "--destination-port", "--source-port")
_IPT_BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
_IPT_NOOP_TARGETS = {
    "LOG",
    "NFLOG",
    "MARK",
    "CONNMARK",
    "MASQUERADE",
    "SNAT",
    "CLASSIFY",
    "TCPMSS",
    "TRACE",
    "AUDIT",
}


def parse_iptables_save(text4: str, text6: str, backend: str = "iptables-legacy") -> Ruleset:
    """`iptables-save` and `ip6tables-save` output -> Ruleset in nft's terms.

    Each rule is translated into the nft JSON expressions the evaluator knows; an
    extension it does not know becomes an `xt` expression, which evaluates as unknown.
    """
    chains: list[Chain] = []
    for family, text in (("ip", text4), ("ip6", text6)):
        chains += _parse_save(family, text, backend)
    return Ruleset(tuple(chains))


def _parse_save(family: str, text: str, backend: str) -> list[Chain]:
    out: list[Chain] = []
    table = ""
    policies: dict[str, str] = {}
    rules: dict[str, list[Rule]] = {}

    def flush() -> None:
        for name, rs in rules.items():
            builtin = name in _IPT_BUILTIN
            out.append(
                Chain(
                    family=family,
                    table=table,
                    name=name,
                    rules=tuple(rs),
                    hook=name.lower() if builtin else "",
                    type=_IPT_TYPE.get(table, "filter") if builtin else "",
                    prio=(100 if table == "nat" and name == "INPUT" else _IPT_PRIO.get(table, 0)),
                    policy=policies.get(name, "accept"),
                    backend=backend,
                )
            )

    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line.startswith("[") and "]" in line:  # counters from `iptables-save -c`
            line = line.split("]", 1)[1].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table, policies, rules = line[1:], {}, {}
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            rules[name] = []
            if policy != "-":
                policies[name] = policy.lower()
        elif line == "COMMIT":
            flush()
            table, policies, rules = "", {}, {}
        elif line.startswith("-A "):
            words = shlex.split(line)
            rules.setdefault(words[1], []).append(
                Rule(n, tuple(_translate_ipt(family, words[2:], set(rules))), line)
            )
    return out


def _translate_ipt(family: str, words: list[str], chains: set[str]) -> Iterator[dict]:
    """One iptables rule's options -> nft JSON expressions (verdict last)."""
    ipfam = "ip" if family == "ip" else "ip6"
    proto = ""
    module = ""
    verdict: list[dict] = []
    i = 0

    def match(left: dict, right: Any, neg: bool) -> dict:
        return {"match": {"op": "!=" if neg else "==", "left": left, "right": right}}

    while i < len(words):
        neg = words[i] == "!"
        if neg:
            i += 1
        opt = words[i]
        args = []
        i += 1
        while i < len(words) and not words[i].startswith("-") and words[i] != "!":
            args.append(words[i])
            i += 1
        arg = args[0] if args else ""
        if opt in ("-p", "--protocol"):
            proto = arg
            yield match({"meta": {"key": "l4proto"}}, arg, neg)
        elif opt in ("-s", "--source", "-d", "--destination"):
            net = ipaddress.ip_network(arg, strict=False)
            right: Any = (
                str(net.network_address)
                if net.prefixlen == net.max_prefixlen
                else {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
            )
            fld = "saddr" if opt in ("-s", "--source") else "daddr"
            yield match({"payload": {"protocol": ipfam, "field": fld}}, right, neg)
        elif opt in ("-i", "--in-interface", "-o", "--out-interface"):
            key = "iifname" if opt.startswith("-i") or opt == "--in-interface" else "oifname"
            yield match({"meta": {"key": key}}, arg.replace("+", "*"), neg)
        elif opt in ("-m", "--match"):
            module = arg
        elif opt in ("-j", "--jump", "-g", "--goto"):
            verdict = [_ipt_target(opt, arg, words[i:], chains)]
            break
        elif opt in _IPT_PORT_OPTS and module in ("", "tcp", "udp", proto):
            fld = "dport" if opt in ("--dport", "--destination-port") else "sport"
            yield match(
                {"payload": {"protocol": proto or "th", "field": fld}}, _ipt_ports(arg), neg
            )
        elif module == "multiport" and opt in ("--dports", "--sports"):
            fld = "dport" if opt == "--dports" else "sport"
            ports = [_ipt_ports(p) for p in arg.split(",")]
            yield match({"payload": {"protocol": proto or "th", "field": fld}}, {"set": ports}, neg)
        elif (module, opt) in (("conntrack", "--ctstate"), ("state", "--state")):
            yield match({"ct": {"key": "state"}}, [s.lower() for s in arg.split(",")], neg)
        elif (module, opt) == ("conntrack", "--ctstatus"):
            yield match({"ct": {"key": "status"}}, [s.lower() for s in arg.split(",")], neg)
        elif (module, opt) == ("addrtype", "--dst-type"):
            types = [t.lower() for t in arg.split(",")]
            yield match({"fib": {"result": "type", "flags": ["daddr"]}}, {"set": types}, neg)
        elif module == "comment":
            continue
        elif module == "limit":
            if opt == "--limit":  # --limit-burst only shapes the same limit
                yield {"limit": {"rate": arg}}
        elif (module, opt) in (("icmp", "--icmp-type"), ("icmp6", "--icmpv6-type")):
            yield match(
                {
                    "payload": {
                        "protocol": "icmp" if module == "icmp" else "icmpv6",
                        "field": "type",
                    }
                },
                arg,
                neg,
            )
        elif (module, opt) == ("pkttype", "--pkt-type"):
            yield match({"meta": {"key": "pkttype"}}, arg, neg)
        else:
            yield {"xt": {"type": "match", "name": f"{module} {opt}".strip()}}
    yield from verdict


def _ipt_ports(arg: str) -> Any:
    if ":" in arg:
        lo, hi = arg.split(":")
        return {"range": [int(lo or 0), int(hi or 65535)]}
    return int(arg) if arg.isdigit() else arg


def _ipt_target(opt: str, target: str, rest: list[str], chains: set[str]) -> dict:
    if opt in ("-g", "--goto"):
        return {"goto": {"target": target}}
    if target in ("ACCEPT", "DROP", "RETURN"):
        return {target.lower(): None}
    if target == "REJECT":
        return {"reject": None}
    if target in _IPT_NOOP_TARGETS:
        return {"counter": None}
    if target in ("DNAT", "REDIRECT"):
        return {"dnat": {"addr": " ".join(rest)}}
    if target == "NOTRACK" or (target == "CT" and "--notrack" in rest):
        return {"notrack": None}
    if target in chains:
        return {"jump": {"target": target}}
    return {"xt": {"type": "target", "name": target}}


# --- evaluation ---------------------------------------------------------------------

# Sources another host can have: no loopback, "this network", multicast or reserved.
_NOT_SOURCES = {
    4: ["0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/3"],
    6: ["::/127", "::ffff:0:0/96", "ff00::/8"],
}
_PROTO_NUM = {
    "tcp": 6,
    "udp": 17,
    "icmp": 1,
    "ipv6-icmp": 58,
    "icmpv6": 58,
    "sctp": 132,
    "udplite": 136,
    "dccp": 33,
    "esp": 50,
    "ah": 51,
    "gre": 47,
    "igmp": 2,
}
# Headers a TCP or UDP packet never has: a match on them fails, whatever the operator.
_ABSENT_HEADERS = {
    "icmp",
    "icmpv6",
    "sctp",
    "dccp",
    "esp",
    "ah",
    "comp",
    "udplite",
    "igmp",
    "gre",
    "arp",
}
_MAX_RUNS = 256  # bound on source-dependent branches per evaluation
_MAX_STEPS = 100_000  # rules visited in one walk; nft itself forbids loops
_HOOK_ORDER = {"ingress": 0, "prerouting": 1, "input": 2}

Intervals = tuple[tuple[int, int], ...]


def _iv_norm(pairs: Iterable[tuple[int, int]]) -> Intervals:
    out: list[list[int]] = []
    for lo, hi in sorted(pairs):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def _iv_and(a: Intervals, b: Intervals) -> Intervals:
    return _iv_norm((max(x, y), min(p, q)) for x, p in a for y, q in b if max(x, y) <= min(p, q))


def _iv_minus(a: Intervals, b: Intervals) -> Intervals:
    out = []
    for lo, hi in a:
        cur = lo
        for x, y in b:
            if y < cur or x > hi:
                continue
            if x > cur:
                out.append((cur, x - 1))
            cur = max(cur, y + 1)
        if cur <= hi:
            out.append((cur, hi))
    return _iv_norm(out)


@dataclass(frozen=True)
class _Packet:
    family: int
    protocol: str
    daddr: int
    dport: int
    iface: str
    saddrs: Intervals  # the sources still possible on this branch
    sports: Intervals


@dataclass(frozen=True)
class _Unknown:
    reason: str


@dataclass(frozen=True)
class _Fork:
    branches: tuple[_Packet, ...]


@dataclass(frozen=True)
class _Outcome:
    verdict: Firewall
    chain: Chain | None = None
    rule: Rule | None = None
    text: str = ""
    reason: str = ""


class _Unsupported(Exception):
    """Raised while reading a match that the evaluator does not model."""


def evaluate(
    ruleset: Ruleset | None,
    protocol: str,
    family: int,
    daddr: str,
    dport: int,
    from_loopback: bool = False,
) -> Decision:
    """Is a NEW `protocol` connection to daddr:dport accepted?

    From another host (through an interface other than lo, from any address that is
    not loopback) unless from_loopback. daddr is taken to be one of the host's own
    addresses. ACCEPT when at least one source or interface gets in (`restricted`
    then says that others do not).
    """
    if ruleset is None:
        return Decision(Firewall.UNKNOWN, reason="the ruleset could not be read")
    addr = int(ipaddress.ip_address(daddr))
    if from_loopback:
        starts = [_Packet(family, protocol, addr, dport, "lo", ((addr, addr),), ((1, 65535),))]
    else:
        bits = 32 if family == 4 else 128
        sources = _iv_minus(((0, 2**bits - 1),), _iv_norm(_net(n) for n in _NOT_SOURCES[family]))
        starts = [
            _Packet(family, protocol, addr, dport, iface, sources, ((1, 65535),))
            for iface in ruleset._ifaces
        ]
    outcomes: list[_Outcome] = []
    runs = 0
    while starts:
        runs += 1
        if runs > _MAX_RUNS:
            return Decision(
                Firewall.UNKNOWN, reason=f"more than {_MAX_RUNS} source-dependent paths"
            )
        result = _walk(ruleset, starts.pop())
        if isinstance(result, _Fork):
            starts.extend(result.branches)
        else:
            outcomes.append(result)
    return _decide(ruleset, outcomes)


def _decide(ruleset: Ruleset, outcomes: list[_Outcome]) -> Decision:
    accepted = [o for o in outcomes if o.verdict is Firewall.ACCEPT]
    unknown = [o for o in outcomes if o.verdict is Firewall.UNKNOWN]
    if accepted:
        chosen = accepted[0]
        restricted = len(accepted) < len(outcomes)
        reason = "other sources or interfaces are dropped" if restricted else ""
        if restricted and unknown:
            reason = "other sources or interfaces: " + unknown[0].reason
    else:
        chosen = unknown[0] if unknown else outcomes[0]
        restricted = False
        reason = chosen.reason
    c, r = chosen.chain, chosen.rule
    return Decision(
        verdict=chosen.verdict,
        table=c.table if c else "",
        chain=c.name if c else "",
        handle=r.handle if r else None,
        rule=r.text if r else chosen.text,
        family=c.family if c else "",
        restricted=restricted,
        reason=reason,
        backend=c.backend if c else "",
        manager=ruleset.manager,
    )


def _net(cidr: str) -> tuple[int, int]:
    n = ipaddress.ip_network(cidr, strict=False)
    return int(n.network_address), int(n.broadcast_address)


def _interface_classes(chains: Iterable[Chain]) -> tuple[str, ...]:
    """One interface name per class the rules tell apart (lo excluded)."""
    names: set[str] = set()
    for c in chains:
        for r in c.rules:
            for e in r.exprs:
                _collect_ifnames(e, names)
    exact = sorted(n for n in names if not n.endswith("*") and n != "lo")
    # A name that matches a wildcard but none of the exact names.
    wild = sorted(n[:-1] + "\x00" for n in names if n.endswith("*"))
    return (*exact, *wild, "\x00other")


def _collect_ifnames(e: Any, names: set[str]) -> None:
    if isinstance(e, dict):
        m = e.get("match")
        if m and _is_ifname(m["left"]):
            r = m["right"]
            items = r["set"] if isinstance(r, dict) and "set" in r else [r]
            names.update(i for i in items if isinstance(i, str) and not i.startswith("@"))
        for v in e.values():
            _collect_ifnames(v, names)
    elif isinstance(e, list):
        for v in e:
            _collect_ifnames(v, names)


def _base_chains(ruleset: Ruleset, family: int) -> list[Chain]:
    fams = {"inet", "netdev", "ip" if family == 4 else "ip6"}
    chains = [
        c
        for c in ruleset.chains
        if c.family in fams
        and c.hook in _HOOK_ORDER
        and (c.type == "filter" or (c.type == "nat" and c.hook == "prerouting"))
    ]
    return sorted(chains, key=lambda c: (_HOOK_ORDER[c.hook], c.prio))


def _walk(ruleset: Ruleset, pkt: _Packet) -> _Outcome | _Fork:
    """Every base chain in hook and priority order; drop is final, accept goes on."""
    first_accept: _Outcome | None = None
    last_policy: _Outcome | None = None
    pending: _Outcome | None = None  # an unknown that a later definite drop overrides
    for chain in _base_chains(ruleset, pkt.family):
        result = _run_chain(ruleset, chain, pkt)
        if isinstance(result, _Fork):
            return result
        if result.verdict is Firewall.DROP:
            return result
        if result.verdict is Firewall.UNKNOWN:
            if result.text == "packet changed":
                return pending or result
            pending = pending or result
        elif result.rule is not None and chain.type == "filter":
            first_accept = first_accept or result
        elif chain.type == "filter":
            last_policy = result
    if pending:
        return pending
    if first_accept:
        return first_accept
    return last_policy or _Outcome(Firewall.ACCEPT, text="no filter")


def _run_chain(ruleset: Ruleset, base: Chain, pkt: _Packet) -> _Outcome | _Fork:
    stack: list[tuple[Chain, int]] = []
    chain, i = base, 0
    for _ in range(_MAX_STEPS):
        if i >= len(chain.rules):
            if stack:
                chain, i = stack.pop()
                continue
            return _policy(base)
        rule = chain.rules[i]
        i += 1
        eff = _rule_effect(ruleset, chain, rule, pkt)
        if eff is None:
            continue
        if isinstance(eff, _Fork):
            return eff
        if isinstance(eff, _Unknown):
            changed = eff.reason.startswith(("dnat", "notrack", "redirect"))
            return _Outcome(
                Firewall.UNKNOWN,
                chain,
                rule,
                "packet changed" if changed else "",
                eff.reason,
            )
        kind, target = eff
        if kind == "accept":
            return _Outcome(Firewall.ACCEPT, chain, rule)
        if kind == "drop":
            return _Outcome(Firewall.DROP, chain, rule)
        if kind in ("jump", "goto"):
            nxt = ruleset.chain(chain.family, chain.table, target, chain.backend)
            if nxt is None:
                return _Outcome(
                    Firewall.UNKNOWN, chain, rule, reason=f"{kind} to missing chain {target}"
                )
            if kind == "jump":
                if len(stack) >= 16:
                    return _Outcome(Firewall.UNKNOWN, chain, rule, reason="jumps nested too deep")
                stack.append((chain, i))
            chain, i = nxt, 0
        elif kind == "return":
            if not stack:
                return _policy(base)
            chain, i = stack.pop()
    return _Outcome(Firewall.UNKNOWN, base, reason="too many rules visited")


def _policy(chain: Chain) -> _Outcome:
    if chain.type == "nat" or chain.policy == "accept":
        return _Outcome(Firewall.ACCEPT, chain, text="policy accept")
    return _Outcome(Firewall.DROP, chain, text=f"policy {chain.policy}")


_NOOP_STMTS = {"counter", "log", "comment", "masquerade", "snat"}
_MATCHLIKE_STMTS = {"limit", "quota", "meter", "set", "xt", "synproxy", "flow"}


def _rule_effect(
    ruleset: Ruleset, chain: Chain, rule: Rule, pkt: _Packet
) -> _Unknown | _Fork | tuple[str, str] | None:
    """What a rule does to the packet: None (no match or no effect), a verdict, etc."""
    unknowns: list[str] = []
    forks: list[_Fork] = []
    effect: Any = None
    for e in rule.exprs:
        ((key, v),) = e.items()
        if key == "match":
            r = _match(ruleset, chain, v, pkt)
            if r is False:
                return None
            if isinstance(r, _Fork):
                forks.append(r)
            elif isinstance(r, _Unknown):
                unknowns.append(r.reason)
        elif key in _NOOP_STMTS or (key == "mangle" and _is_mark(v.get("key"))):
            continue
        elif key == "xt" and v.get("type") == "target":
            if v.get("name") == "REJECT":
                effect = ("drop", "")
            elif v.get("name") not in _IPT_NOOP_TARGETS:
                unknowns.append(f"iptables target {v.get('name')}")
                effect = ("unknown", "")
        elif key in _MATCHLIKE_STMTS:
            unknowns.append(
                f"{render_rule([e])}: not modelled"
                if key != "xt"
                else f"iptables extension {v.get('name')}: not modelled"
            )
        elif key in ("accept", "drop", "reject", "return", "continue"):
            effect = ("drop" if key == "reject" else key, "")
        elif key in ("jump", "goto"):
            effect = (key, v["target"])
        elif key == "vmap":
            effect = ("vmap", v)
        elif key in ("dnat", "redirect", "notrack", "tproxy"):
            effect = ("changed", key)
        else:
            unknowns.append(f"statement {key}: not modelled")
            effect = effect or ("unknown", "")
    if effect is None or effect[0] == "continue":
        return None
    if forks:
        return forks[0]
    if unknowns:
        return _Unknown(unknowns[0])
    if effect[0] == "changed":
        return _Unknown(f"{effect[1]}: the packet is rewritten or untracked here")
    if effect[0] == "vmap":
        return _vmap(ruleset, chain, effect[1], pkt)
    return effect


def _is_mark(key: Any) -> bool:
    # Setting a mark changes nothing until a rule matches on it, and that is unknown.
    return isinstance(key, dict) and (
        key.get("meta", {}).get("key") == "mark" or key.get("ct", {}).get("key") == "mark"
    )


def _vmap(ruleset: Ruleset, chain: Chain, v: dict, pkt: _Packet) -> Any:
    data = v["data"]
    if isinstance(data, str) and data.startswith("@"):
        s = ruleset.named_set(chain.family, chain.table, data[1:])
        if s is None:
            return _Unknown(f"verdict map {data} not found")
        pairs = s.elements
    else:
        pairs = data["set"]
    for k, verdict in pairs:
        r = _match(ruleset, chain, {"op": "==", "left": v["key"], "right": k}, pkt)
        if r is False:
            continue
        if r is True:
            return _rule_effect(ruleset, chain, Rule(None, (verdict,), ""), pkt)
        return r
    return None


def _match(ruleset: Ruleset, chain: Chain, m: dict, pkt: _Packet) -> bool | _Unknown | _Fork:
    try:
        return _match_or_raise(ruleset, chain, m, pkt)
    except _Unsupported as e:
        return _Unknown(str(e))


def _match_or_raise(ruleset: Ruleset, chain: Chain, m: dict, pkt: _Packet) -> bool | _Fork:
    op, left, right = m["op"], m["left"], m["right"]
    what = render_rule([{"match": m}])
    kind, value = _left_value(left, pkt, what)
    if kind == "absent":
        return False
    if op in ("<", ">", "<=", ">="):
        if not isinstance(right, int) or kind not in ("port", "sport"):
            raise _Unsupported(f"{what}: not modelled")
        bound = {
            "<": (0, right - 1),
            ">": (right + 1, 2**128),
            "<=": (0, right),
            ">=": (right, 2**128),
        }[op]
        matching: Any = _iv_norm([bound])
        op = "=="
    elif kind in ("port", "sport", "addr", "saddr", "proto"):
        matching = _iv_norm(_numeric(ruleset, chain, right, kind, pkt.family, what))
    else:
        matching = _strings(ruleset, chain, right, what)
    if op not in ("==", "!=", "in"):
        raise _Unsupported(f"{what}: operator {op} not modelled")
    negate = op == "!="
    if kind in ("saddr", "sport"):
        have = pkt.saddrs if kind == "saddr" else pkt.sports
        inside, outside = _iv_and(have, matching), _iv_minus(have, matching)
        yes, no = (outside, inside) if negate else (inside, outside)
        if not yes:
            return False
        if not no:
            return True
        attr = "saddrs" if kind == "saddr" else "sports"
        return _Fork(tuple(dataclasses.replace(pkt, **{attr: part}) for part in (yes, no)))
    if isinstance(matching, tuple):
        hit = any(lo <= value <= hi for lo, hi in matching)
    else:
        hit = any(_str_match(value, s) for s in matching)
    return hit != negate


def _str_match(value: Any, pattern: str) -> bool:
    if isinstance(value, frozenset):  # flags (ct status): any of them
        return pattern in value
    if pattern.endswith("*"):
        return str(value).startswith(pattern[:-1])
    return value == pattern


def _left_value(left: Any, pkt: _Packet, what: str) -> tuple[str, Any]:
    """(kind, concrete value) of what a match looks at; kind "absent" never matches."""
    if not isinstance(left, dict) or len(left) != 1:
        raise _Unsupported(f"{what}: not modelled")
    ((key, v),) = left.items()
    l4 = pkt.protocol
    if key == "payload":
        proto, fld = v.get("protocol"), v.get("field")
        if proto in ("ip", "ip6"):
            if (proto == "ip") != (pkt.family == 4):
                return "absent", None
            if fld == "saddr":
                return "saddr", None
            if fld == "daddr":
                return "addr", pkt.daddr
            if fld in ("protocol", "nexthdr"):
                return "proto", _PROTO_NUM[l4]
        elif proto in ("tcp", "udp", "th"):
            if proto not in (l4, "th"):
                return "absent", None
            if fld == "dport":
                return "port", pkt.dport
            if fld == "sport":
                return "sport", None
        elif proto in _ABSENT_HEADERS:
            return "absent", None
    elif key == "meta":
        k = v["key"]
        if k in ("iifname", "iif"):
            return "str", pkt.iface
        if k == "l4proto":
            return "proto", _PROTO_NUM[l4]
        if k == "nfproto":
            return "str", "ipv4" if pkt.family == 4 else "ipv6"
        if k == "protocol":
            return "str", "ip" if pkt.family == 4 else "ip6"
        if k == "pkttype":
            return "str", "host"
    elif key == "ct":
        if v["key"] == "state":
            return "str", "new"
        if v["key"] == "status":
            return "str", frozenset()  # a new, un-NATed connection has no status bit set
    elif key == "fib":
        flags = set(v.get("flags", ()))
        if v.get("result") == "type" and flags == {"daddr"}:
            return "str", "local"  # daddr is one of the host's own addresses
        if v.get("result") == "oif" and "saddr" in flags and "daddr" not in flags:
            # Reverse-path check: a legitimate host's address routes back.
            return "str", "exists"
    raise _Unsupported(f"{what}: not modelled")


def _elements(ruleset: Ruleset, chain: Chain, right: Any, what: str) -> list[Any]:
    if isinstance(right, str) and right.startswith("@"):
        s = ruleset.named_set(chain.family, chain.table, right[1:])
        if s is None:
            raise _Unsupported(f"{what}: set not found")
        return list(s.elements)
    if isinstance(right, dict) and "set" in right:
        return [_unwrap_elem(x) for x in right["set"]]
    if isinstance(right, list):
        return right
    return [right]


def _numeric(
    ruleset: Ruleset, chain: Chain, right: Any, kind: str, family: int, what: str
) -> list[tuple[int, int]]:
    out = []
    for el in _elements(ruleset, chain, right, what):
        if isinstance(el, dict) and "range" in el:
            lo, hi = (_scalar(x, kind, family, what) for x in el["range"])
            out.append((lo, hi))
        elif isinstance(el, dict) and "prefix" in el and kind in ("addr", "saddr"):
            p = el["prefix"]
            out.append(_net(f"{p['addr']}/{p['len']}"))
        else:
            n = _scalar(el, kind, family, what)
            out.append((n, n))
    return out


def _scalar(x: Any, kind: str, family: int, what: str) -> int:
    if isinstance(x, bool):
        raise _Unsupported(f"{what}: not modelled")
    if isinstance(x, int):
        return x
    if isinstance(x, str):
        if kind in ("addr", "saddr"):
            try:
                return int(ipaddress.ip_address(x))
            except ValueError:
                pass
        elif kind == "proto" and x in _PROTO_NUM:
            return _PROTO_NUM[x]
        elif kind == "proto":
            return -1  # a protocol this table does not name is neither TCP nor UDP
        elif x.isdigit():
            return int(x)
        else:
            try:
                return socket.getservbyname(x)
            except OSError:
                pass
    raise _Unsupported(f"{what}: value {x!r} not modelled")


def _strings(ruleset: Ruleset, chain: Chain, right: Any, what: str) -> list[str]:
    out = []
    for el in _elements(ruleset, chain, right, what):
        if isinstance(el, bool):
            out.append("exists" if el else "missing")
        elif isinstance(el, str):
            out.append(el)
        else:
            raise _Unsupported(f"{what}: value {el!r} not modelled")
    return out


# --- reading ------------------------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess]


def read_ruleset(
    netns_path: str | None = None,
    runner: Runner = subprocess.run,
    legacy: bool | None = None,
    timeout: float = 5.0,
) -> tuple[Ruleset | None, str]:
    """The packet filter of the current namespace, or of the one at netns_path.

    Returns (ruleset, "") or (None, error). Needs CAP_NET_ADMIN. `legacy`: whether to
    read legacy iptables too; None looks for legacy tables in /proc.
    """
    prefix = ["nsenter", f"--net={netns_path}", "--"] if netns_path else []

    def run(*cmd: str) -> str:
        try:
            r = runner([*prefix, *cmd], capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError as e:
            raise OSError(f"{cmd[0]}: not installed ({e.filename})") from e
        except subprocess.TimeoutExpired as e:
            raise OSError(f"{cmd[0]}: no answer in {timeout}s") from e
        if r.returncode != 0:
            msg = (r.stderr or "").strip().splitlines()
            raise OSError(f"{cmd[0]}: {msg[-1] if msg else f'exit status {r.returncode}'}")
        return r.stdout

    try:
        rs = parse_nft_json(run("nft", "-j", "list", "ruleset"))
        xt = rs.xt_tables
        if xt:
            # iptables-nft's own view shows the extensions' arguments nft hides.
            s4 = run("iptables-nft-save") if any(f == "ip" for f, _ in xt) else ""
            s6 = run("ip6tables-nft-save") if any(f == "ip6" for f, _ in xt) else ""
            rs = rs.replace_tables(parse_iptables_save(s4, s6, backend="iptables-nft"))
        if legacy is None:
            legacy = _legacy_tables_present(netns_path)
        if legacy:
            rs = rs.merge(
                parse_iptables_save(run("iptables-legacy-save"), run("ip6tables-legacy-save"))
            )
    except (OSError, ValueError) as e:
        return None, str(e)
    return rs, ""


def _legacy_tables_present(netns_path: str | None) -> bool:
    """Whether legacy iptables tables exist there; True when that cannot be told."""
    if netns_path is None:
        base = "/proc/net"
    elif netns_path.startswith("/proc/") and netns_path.endswith("/ns/net"):
        base = netns_path[: -len("/ns/net")] + "/net"
    else:
        return True
    for name in ("ip_tables_names", "ip6_tables_names"):
        try:
            with open(os.path.join(base, name)) as f:
                if f.read().strip():
                    return True
        except OSError:
            continue  # the legacy module is not loaded: no legacy tables anywhere
    return False


_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_GETGEN = 16
_NFTA_GEN_ID = 1


def generation_id() -> int | None:
    """The nftables ruleset generation of the calling thread's network namespace.

    One netlink round trip (no subprocess): a scan can skip re-reading the ruleset
    while this is unchanged. None when it cannot be asked (no CAP_NET_ADMIN).
    Legacy iptables changes do not move it.
    """
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12) as s:  # NETLINK_NETFILTER
            s.settimeout(1.0)
            msg_type = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETGEN
            body = struct.pack("BBH", socket.AF_UNSPEC, 0, 0)
            s.send(struct.pack("=IHHII", 16 + len(body), msg_type, 1, 1, 0) + body)
            data = s.recv(65536)
    except OSError:
        return None
    length, mtype = struct.unpack_from("=IH", data)
    if mtype == 2:  # NLMSG_ERROR
        return None
    off = 16 + 4
    while off + 4 <= min(length, len(data)):
        alen, atype = struct.unpack_from("=HH", data, off)
        if atype & 0x7FFF == _NFTA_GEN_ID and alen >= 8:
            return struct.unpack_from(">I", data, off + 4)[0]
        off += (alen + 3) & ~3
    return None


# --- hints for diagnose -------------------------------------------------------------


def opening_command(decision: Decision, protocol: str, port: int) -> str:
    """A command that lets other hosts in, for a DROP decision; "" otherwise."""
    if decision.verdict is not Firewall.DROP:
        return ""
    return _command(decision, protocol, port, allow=True)


def closing_command(decision: Decision, protocol: str, port: int) -> str:
    """A command that keeps other hosts out, for an ACCEPT decision; "" otherwise."""
    if decision.verdict is not Firewall.ACCEPT:
        return ""
    return _command(decision, protocol, port, allow=False)


def _command(d: Decision, protocol: str, port: int, allow: bool) -> str:
    if d.manager == "ufw":
        return f"ufw {'allow' if allow else 'deny'} {port}/{protocol}"
    if d.manager == "firewalld":
        zone = ""
        if d.chain.startswith("filter_IN_"):
            zone = " --zone=" + d.chain.removeprefix("filter_IN_").split("_")[0]
        verb = "add" if allow else "remove"
        return (
            f"firewall-cmd --permanent{zone} --{verb}-port={port}/{protocol}"
            " && firewall-cmd --reload"
        )
    target = "accept" if allow else "drop"
    # iptables-nft writes tables nft shows as plain `ip filter` with upper-case chains;
    # nft itself warns against editing those, so the fix goes through iptables
    written_by_iptables = d.family in ("ip", "ip6") and d.table == "filter" and d.chain.isupper()
    if d.backend.startswith("iptables") or not d.table or written_by_iptables:
        tool = "ip6tables" if d.family == "ip6" else "iptables"
        chain = d.chain if written_by_iptables else "INPUT"
        return f"{tool} -I {chain} -p {protocol} --dport {port} -j {target.upper()}"
    return f"nft insert rule {d.family} {d.table} {d.chain} {protocol} dport {port} {target}"
