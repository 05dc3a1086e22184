"""`iptables-save` text -> Ruleset, translated into the nft JSON expressions the
evaluator reads. Pure."""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterator
from typing import Any

from bindscope.netfilter.ruleset import (
    Chain,
    Rule,
    Ruleset,
)

# --- iptables-save ------------------------------------------------------------------

_IPT_PRIO = {"raw": -300, "mangle": -150, "nat": -100, "filter": 0, "security": 50}
_IPT_TYPE = {"nat": "nat"}
_IPT_PORT_OPTS = ("--dport", "--sport", "--destination-port", "--source-port")
_IPT_BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
NOOP_TARGETS = {
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
            proto = {"6": "tcp", "17": "udp"}.get(arg, arg)
            if arg not in ("all", "0"):  # any protocol: no match at all
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
        elif (module, opt) == ("rt", "--rt-type"):
            yield match({"payload": {"protocol": "rt", "field": "type"}}, arg, neg)
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
    if target in NOOP_TARGETS:
        return {"counter": None}
    if target in ("DNAT", "REDIRECT"):
        return {"dnat": {"addr": " ".join(rest)}}
    if target == "NOTRACK" or (target == "CT" and "--notrack" in rest):
        return {"notrack": None}
    if target in chains:
        return {"jump": {"target": target}}
    return {"xt": {"type": "target", "name": target}}
