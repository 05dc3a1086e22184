"""`nft -j list ruleset` JSON -> Ruleset, and rules rendered back as nft text. Pure."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from typing import Any

from bindscope.netfilter.ruleset import (
    IFNAME_META,
    Chain,
    NamedSet,
    Rule,
    Ruleset,
    is_ifname,
)

# --- nft JSON -----------------------------------------------------------------------


def parse_nft_json(text: str) -> Ruleset:
    """`nft -j list ruleset` output -> Ruleset; ValueError when it is not that."""
    try:
        return ruleset_from_nft(json.loads(text)["nftables"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not nft JSON output: {e!r}") from e


def ruleset_from_nft(items: list[Any]) -> Ruleset:
    """The items of `nft -j list ruleset` -> Ruleset."""
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
            elems = tuple(unwrap_elem(e) for e in s.get("elem", ()))
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
                devices=_devices(c),
            )
        )
    return Ruleset(tuple(out), tuple(sets))


_TABLE = re.compile(r"^table (\S+) (\S+) \{")
_CHAIN = re.compile(r"^\s*chain (\S+) \{")
_DEVICES = re.compile(r'\bdevices? = \{ ([^}]*) \}|\bdevice "?([^";\s]+)"?')


def ingress_devices(text: str) -> dict[tuple[str, str, str], tuple[str, ...]]:
    """(family, table, chain) -> devices, from `nft list chains`: nft 1.0's JSON leaves
    an ingress chain's device out."""
    out: dict[tuple[str, str, str], tuple[str, ...]] = {}
    table: tuple[str, str] | None = None
    chain = ""
    for line in text.splitlines():
        if m := _TABLE.match(line):
            table = (m[1], m[2])
        elif m := _CHAIN.match(line):
            chain = m[1]
        elif table and chain and "hook ingress" in line and (d := _DEVICES.search(line)):
            names = d[1].split(",") if d[1] is not None else [d[2]]
            out[(*table, chain)] = tuple(n.strip().strip('"') for n in names)
    return out


def with_ingress_devices(
    ruleset: Ruleset, devices: dict[tuple[str, str, str], tuple[str, ...]]
) -> Ruleset:
    chains = tuple(
        dataclasses.replace(c, devices=devices.get((c.family, c.table, c.name), c.devices))
        for c in ruleset.chains
    )
    return Ruleset(chains, ruleset.sets)


def _devices(chain: dict) -> tuple[str, ...]:
    # nft 1.0 writes one device as "dev": "eth0", several as "dev": ["eth0", "eth1"]
    dev = chain.get("dev", ())
    return (dev,) if isinstance(dev, str) else tuple(dev)


def unwrap_elem(e: Any) -> Any:
    # Elements with a timeout or counter come wrapped as {"elem": {"val": ...}}.
    if isinstance(e, dict) and "elem" in e:
        return e["elem"]["val"]
    if isinstance(e, list) and e and isinstance(e[0], dict) and "elem" in e[0]:
        return [e[0]["elem"]["val"], *e[1:]]
    return e


_VERDICT_WORDS = ("accept", "drop", "return", "continue")


def render_rule(exprs: Iterable[Any]) -> str:
    """nft-like text of a rule's JSON expressions, for people (not for nft)."""
    parts = [_render_stmt(e) for e in exprs]
    return " ".join(p for p in parts if p)


def _render_stmt(e: Any) -> str:
    ((key, v),) = e.items()
    if key == "match":
        left = _render_value(v["left"])
        quote = is_ifname(v["left"])
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
    if key in ("ct helper", "ct timeout", "ct expectation") and isinstance(v, str):
        return f'{key} set "{v}"'
    if v is None:
        return key
    return json.dumps(e, separators=(",", ":"))


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
            return x["key"] if x["key"] in IFNAME_META else f"meta {x['key']}"
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
