"""The parsed packet filter of one namespace: chains, rules, named sets, and the
Decision the evaluator gives. Immutable, so a scan can share it with later ones."""

from __future__ import annotations

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
    # (family, table, chain) of every rule that accepts on some path, in order: where a
    # port is let in through several zones (interfaces, sources), each of them
    accepted_in: tuple[tuple[str, str, str], ...] = ()


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
    devices: tuple[str, ...] = ()  # an ingress chain sees only these devices' packets


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

    def __post_init__(self) -> None:
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


IFNAME_META = {"iif", "iifname", "oif", "oifname"}


def is_ifname(left: Any) -> bool:
    return isinstance(left, dict) and left.get("meta", {}).get("key") in IFNAME_META
