"""Decides whether a NEW connection from another host to an address and port gets through it.

The evaluator is pure and conservative: what it cannot model makes the answer UNKNOWN,
never a guess. docs/firewall.md lists the supported subset.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bindscope.model import Firewall
from bindscope.netfilter.iptables import NOOP_TARGETS
from bindscope.netfilter.nft import render_rule, unwrap_elem
from bindscope.netfilter.ruleset import (
    Chain,
    Decision,
    Rule,
    Ruleset,
)

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
    "rt",  # an IPv6 routing header: a plain TCP or UDP packet from a host has none
}
_REJECT_FAMILY = {"icmp": 4, "icmpv6": 6}
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
    iface: str | None  # None: not known, and a rule that asks is unknown
    saddrs: Intervals  # the sources still possible on this branch
    sports: Intervals
    ct: str = "new"  # conntrack's state: the first packet, or those after ("established")


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
    via: tuple[Chain, ...] = ()  # on an accept: each chain whose rule accepted, base by base


class _Unsupported(Exception):
    """Raised while reading a match that the evaluator does not model."""


class _TooManyPaths(Exception):
    pass


# What conntrack has set by the handshake's last packet (its ACK): a reply was seen.
_ESTABLISHED_STATUS = frozenset({"seen-reply", "assured", "confirmed"})


def evaluate(
    ruleset: Ruleset | None,
    protocol: str,
    family: int,
    daddr: str,
    dport: int,
    from_loopback: bool = False,
    interfaces: Sequence[str] | None = None,
) -> Decision:
    """Is a NEW `protocol` connection to daddr:dport accepted?

    From another host (through one of `interfaces`, the namespace's own besides lo,
    from any address that is not loopback) unless from_loopback. daddr is taken to be
    one of the host's own addresses. ACCEPT when at least one source or interface gets
    in (`restricted` then says that others do not). interfaces None: not known, so a
    rule or chain that depends on the input interface makes the answer UNKNOWN.

    For TCP the connection is accepted only when the packets after its first are too:
    the handshake's ACK is already `ct state established`, so a ruleset that accepts the
    SYN and drops or rejects established packets lets no connection complete.
    """
    if ruleset is None:
        return Decision(Firewall.UNKNOWN, reason="the ruleset could not be read")
    addr = int(ipaddress.ip_address(daddr))
    if from_loopback:
        starts = deque(
            [_Packet(family, protocol, addr, dport, "lo", ((addr, addr),), ((1, 65535),))]
        )
    else:
        bits = 32 if family == 4 else 128
        sources = _iv_minus(((0, 2**bits - 1),), _iv_norm(_net(n) for n in _NOT_SOURCES[family]))
        # only the interfaces the namespace has: another host's packet arrives on one of them
        ifaces: list[str | None] = (
            [None] if interfaces is None else sorted(set(interfaces) - {"lo"})
        )
        if not ifaces:
            return Decision(Firewall.DROP, rule="no interface besides lo")
        starts = deque(
            _Packet(family, protocol, addr, dport, iface, sources, ((1, 65535),))
            for iface in ifaces
        )
    budget = [2 * _MAX_RUNS]  # every path may be walked twice: first packet, then later ones
    outcomes: list[_Outcome] = []
    try:
        for pkt, first in _paths(ruleset, starts, budget):
            if first.verdict is not Firewall.ACCEPT or protocol != "tcp":
                outcomes.append(first)
                continue
            # the same sources, interfaces and ports, once the connection is established
            later = deque([dataclasses.replace(pkt, ct="established")])
            for _, after in _paths(ruleset, later, budget):
                if after.verdict is Firewall.ACCEPT:
                    outcomes.append(first)  # the rule that let the connection in decides
                elif after.verdict is Firewall.DROP:
                    outcomes.append(
                        dataclasses.replace(
                            after,
                            reason="the connection's packets after the first (ct state "
                            "established) are dropped",
                        )
                    )
                else:
                    outcomes.append(after)
    except _TooManyPaths:
        return Decision(Firewall.UNKNOWN, reason=f"more than {_MAX_RUNS} source-dependent paths")
    return _decide(ruleset, outcomes)


def _paths(
    ruleset: Ruleset, starts: deque[_Packet], budget: list[int]
) -> Iterator[tuple[_Packet, _Outcome]]:
    """Each packet a split leaves (its sources, ports, interface), and its fate."""
    while starts:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooManyPaths
        pkt = starts.popleft()
        result = _walk(ruleset, pkt)
        if isinstance(result, _Fork):
            starts.extendleft(reversed(result.branches))  # depth first: interfaces in order
        else:
            yield pkt, result


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
    accepted_in = dict.fromkeys((v.family, v.table, v.name) for o in accepted for v in o.via)
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
        accepted_in=tuple(accepted_in),
    )


def _net(cidr: str) -> tuple[int, int]:
    n = ipaddress.ip_network(cidr, strict=False)
    return int(n.network_address), int(n.broadcast_address)


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
    via: list[Chain] = []  # every base chain's accepting rule's chain, for fixes
    last_policy: _Outcome | None = None
    pending: _Outcome | None = None  # an unknown that a later definite drop overrides
    for chain in _base_chains(ruleset, pkt.family):
        if chain.hook == "ingress" and (not chain.devices or pkt.iface is None):
            result: _Outcome | _Fork = _Outcome(
                Firewall.UNKNOWN,
                chain,
                reason="ingress chain: devices or input interface unknown",
            )
        elif chain.devices and pkt.iface not in chain.devices:
            continue  # an ingress chain sees its own devices' packets only
        else:
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
            if result.chain is not None:
                via.append(result.chain)
        elif chain.type == "filter":
            last_policy = result
    if pending:
        return pending
    if first_accept:
        return dataclasses.replace(first_accept, via=tuple(via))
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
# Objects attached to the connection (firewalld's samba-client, ftp, tftp services assign
# a helper ahead of their accept): they act on later, related packets, never on whether
# this NEW one gets in.
_CT_OBJECT_STMTS = {"ct helper", "ct timeout", "ct expectation"}
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
        elif (
            key in _NOOP_STMTS
            or key in _CT_OBJECT_STMTS
            or (key == "mangle" and _is_mark(v.get("key")))
        ):
            continue
        elif key == "xt" and v.get("type") == "target":
            if v.get("name") == "REJECT":
                effect = ("drop", "")
            elif v.get("name") not in NOOP_TARGETS:
                unknowns.append(f"iptables target {v.get('name')}")
                effect = ("unknown", "")
        elif key in _MATCHLIKE_STMTS:
            unknowns.append(
                f"{render_rule([e])}: not modelled"
                if key != "xt"
                else f"iptables extension {v.get('name')}: not modelled"
            )
        elif (
            key == "reject" and _REJECT_FAMILY.get((v or {}).get("type"), pkt.family) != pkt.family
        ):
            # nft keeps `reject with icmpv6` to IPv6 by an implicit `meta nfproto`, which
            # its JSON does not show: the rule does not match the other family
            return None
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
    if isinstance(left, dict) and "concat" in left:
        return _concat_match(ruleset, chain, op, left["concat"], right, pkt, what)
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
    elif kind == "iface" and value is None:
        # another host's packet never arrives on lo; any other name needs the real one
        if any(s != "lo" for s in matching):
            raise _Unsupported(f"{what}: input interface not known")
        hit = False
    else:
        hit = any(_str_match(value, s) for s in matching)
    return hit != negate


def _concat_match(
    ruleset: Ruleset, chain: Chain, op: str, parts: list, right: Any, pkt: _Packet, what: str
) -> bool:
    """`a . b` in a set of `x . y`: some element matches on every part. A part that
    depends on the source would split the packet per element: not modelled."""
    if op not in ("==", "in", "!="):
        raise _Unsupported(f"{what}: operator {op} not modelled")
    hit = False
    for el in _elements(ruleset, chain, right, what):
        values = el.get("concat") if isinstance(el, dict) else None
        if not isinstance(values, list) or len(values) != len(parts):
            raise _Unsupported(f"{what}: element {el!r} not modelled")
        every = True
        for part, value in zip(parts, values, strict=True):
            r = _match_or_raise(ruleset, chain, {"op": "==", "left": part, "right": value}, pkt)
            if not isinstance(r, bool):
                raise _Unsupported(f"{what}: a source-dependent part is not modelled")
            every = every and r
        hit = hit or every
    return hit != (op == "!=")


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
            return "iface", pkt.iface
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
            return "str", pkt.ct
        if v["key"] == "status":
            # a new, un-NATed connection has no status bit set
            return "str", _ESTABLISHED_STATUS if pkt.ct == "established" else frozenset()
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
        return [unwrap_elem(x) for x in right["set"]]
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
        elif kind == "proto" and x.isdigit():
            return int(x)  # `-p 6`, `meta l4proto 6`
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
