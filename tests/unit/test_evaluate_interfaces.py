"""Pure checks of the evaluator on the shapes the differential harness found wrong."""

from __future__ import annotations

import json

import pytest

from bindscope.classify import host_address, reachable_addresses, scope_of
from bindscope.model import Firewall, Protocol, Scope, Socket
from bindscope.netfilter.evaluate import evaluate
from bindscope.netfilter.iptables import parse_iptables_save
from bindscope.netfilter.nft import ingress_devices, ruleset_from_nft, with_ingress_devices
from bindscope.netfilter.ruleset import Ruleset

H4 = "198.51.100.1"


def nft(chains: list[dict], rules: list[tuple[str, list]], sets: list[dict] = ()) -> Ruleset:
    items = [{"chain": {"family": "inet", "table": "t", **c}} for c in chains]
    items += [
        {"rule": {"family": "inet", "table": "t", "chain": ch, "expr": expr}} for ch, expr in rules
    ]
    items += [{"set": {"family": "inet", "table": "t", **s}} for s in sets]
    return ruleset_from_nft(json.loads(json.dumps(items)))


def m(left: dict, right: object, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


IIF = {"meta": {"key": "iifname"}}
DPORT = {"payload": {"protocol": "tcp", "field": "dport"}}
INPUT_DROP = {"name": "input", "hook": "input", "type": "filter", "prio": 0, "policy": "drop"}

VMAP = [["lo", {"accept": None}], ["eth1", {"jump": {"target": "lan"}}]]
ROUTER = nft(
    [INPUT_DROP, {"name": "lan"}],
    [
        ("lan", [m(DPORT, 5432), {"accept": None}]),
        ("input", [{"vmap": {"key": IIF, "data": {"set": VMAP}}}]),
    ],
)
IFSET = nft(
    [INPUT_DROP],
    [("input", [m(IIF, "@lanif"), m(DPORT, 5432), {"accept": None}])],
    [{"name": "lanif", "type": "ifname", "elem": ["eth1"]}],
)
ETH0_DROP = nft(
    [{**INPUT_DROP, "policy": "accept"}],
    [("input", [m(IIF, "eth0"), m(DPORT, 5432), {"drop": None}])],
)


@pytest.mark.parametrize(
    "ruleset, interfaces, verdict",
    [
        (ROUTER, ("eth0", "eth1"), Firewall.ACCEPT),
        (ROUTER, ("eth0",), Firewall.DROP),
        (IFSET, ("eth0", "eth1"), Firewall.ACCEPT),
        (IFSET, ("eth0",), Firewall.DROP),
        (ETH0_DROP, ("eth0",), Firewall.DROP),
        (ETH0_DROP, ("eth0", "eth1"), Firewall.ACCEPT),
        (ETH0_DROP, None, Firewall.UNKNOWN),
        (ETH0_DROP, (), Firewall.DROP),
    ],
    ids=[
        "vmap-jump-on-eth1", "vmap-no-eth1", "named-ifset", "named-ifset-absent",
        "eth0-only-host-drops", "eth1-still-accepts", "interfaces-unknown", "only-lo",
    ],
)  # fmt: skip
def test_only_real_interfaces(ruleset, interfaces, verdict):
    assert evaluate(ruleset, "tcp", 4, H4, 5432, interfaces=interfaces).verdict is verdict


def test_ingress_chain_applies_to_its_device_only():
    rs = nft([{**INPUT_DROP, "name": "in", "hook": "ingress"}], [])
    text = (
        "table inet t {\n\tchain in {\n"
        '\t\ttype filter hook ingress device "eth0" priority 0; policy drop;\n\t}\n}\n'
    )
    rs = with_ingress_devices(rs, ingress_devices(text))
    assert evaluate(rs, "tcp", 4, H4, 22, interfaces=("eth0",)).verdict is Firewall.DROP
    assert evaluate(rs, "tcp", 4, H4, 22, interfaces=("eth0", "eth1")).verdict is Firewall.ACCEPT
    # its devices unread: unknown, never "every device"
    bare = nft([{**INPUT_DROP, "name": "in", "hook": "ingress"}], [])
    assert evaluate(bare, "tcp", 4, H4, 22, interfaces=("eth1",)).verdict is Firewall.UNKNOWN


@pytest.mark.parametrize("proto", ["6", "tcp", "all"])
def test_numeric_protocol(proto):
    save = f"*filter\n:INPUT DROP [0:0]\n-A INPUT -p {proto} -j ACCEPT\nCOMMIT\n"
    rs = parse_iptables_save(save, "")
    assert evaluate(rs, "tcp", 4, H4, 22, interfaces=("eth0",)).verdict is Firewall.ACCEPT


@pytest.mark.parametrize(
    "address, scope",
    [
        ("224.0.0.251", Scope.LINK_LOCAL),
        ("ff02::fb", Scope.LINK_LOCAL),
        ("239.255.255.250", Scope.PRIVATE),
        ("ff05::1:3", Scope.PRIVATE),
        ("ff0e::101", Scope.PUBLIC),
    ],
    ids=["mdns4", "mdns6", "ssdp", "site-local-v6", "global-v6"],
)
def test_multicast_scope(address, scope):
    assert scope_of(address) is scope


def test_device_bound_socket_counts_its_device_only():
    sock = Socket(Protocol.TCP, "0.0.0.0", 80, 4, None, 1, device="eth1")
    addrs = [host_address("eth0", "198.51.100.1", 4), host_address("eth1", "198.51.100.129", 4)]
    assert [a.address for a in reachable_addresses(sock, addrs)] == ["198.51.100.129"]
