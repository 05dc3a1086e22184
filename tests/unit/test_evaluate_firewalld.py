"""Pure checks of the evaluator on constructs firewalld 1.3 writes (its real rulesets are
in the differential corpus; these are the shapes on their own)."""

from __future__ import annotations

import json

import pytest

from bindscope.model import Firewall
from bindscope.netfilter.evaluate import evaluate
from bindscope.netfilter.nft import render_rule, ruleset_from_nft
from bindscope.netfilter.ruleset import Ruleset

H4 = "198.51.100.1"
UDP_DPORT = {"payload": {"protocol": "udp", "field": "dport"}}
INPUT_DROP = {"name": "input", "hook": "input", "type": "filter", "prio": 0, "policy": "drop"}


def nft(rules: list[list]) -> Ruleset:
    items: list[dict] = [{"chain": {"family": "inet", "table": "t", **INPUT_DROP}}]
    items += [
        {"rule": {"family": "inet", "table": "t", "chain": "input", "expr": expr}} for expr in rules
    ]
    return ruleset_from_nft(json.loads(json.dumps(items)))


def dport(port: int) -> dict:
    return {"match": {"op": "==", "left": UDP_DPORT, "right": port}}


@pytest.mark.parametrize("statement", ["ct helper", "ct timeout", "ct expectation"])
def test_assigning_a_conntrack_object_does_not_decide_the_packet(statement: str):
    # firewalld's samba-client service, in zone internal:
    #   udp dport 137 ct helper set "helper-netbios-ns-udp"
    #   udp dport 137 accept
    rs = nft([[dport(137), {statement: "helper-netbios-ns-udp"}], [dport(137), {"accept": None}]])
    d = evaluate(rs, "udp", 4, H4, 137, interfaces=("eth0",))
    assert (d.verdict, d.rule) == (Firewall.ACCEPT, "udp dport 137 accept"), d
    # with nothing after it, the chain's policy decides
    alone = nft([[dport(137), {statement: "helper-netbios-ns-udp"}]])
    assert evaluate(alone, "udp", 4, H4, 137, interfaces=("eth0",)).rule == "policy drop"


def test_a_helper_assignment_reads_as_nft_writes_it():
    text = render_rule([dport(137), {"ct helper": "helper-netbios-ns-udp"}])
    assert text == 'udp dport 137 ct helper set "helper-netbios-ns-udp"'
