"""A TCP connection needs more than its SYN: the handshake's ACK and everything after it
are `ct state established`. The evaluator follows both, as the kernel does (the generated
rulesets found `ct state established,related ... reject` called open)."""

from __future__ import annotations

import pytest

from bindscope.model import Firewall
from bindscope.netfilter.evaluate import evaluate
from bindscope.netfilter.iptables import parse_iptables_save

H4 = "198.51.100.1"
IFACES = ("eth0", "eth1")


CT = "-m conntrack --ctstate"


def save(policy: str, *rules: str) -> str:
    return (
        f"*filter\n:INPUT {policy} [0:0]\n" + "".join(f"-A INPUT {r}\n" for r in rules) + "COMMIT\n"
    )


@pytest.mark.parametrize(
    "text, protocol, verdict, rule",
    [
        # the SYN passes, the ACK is rejected: no connection completes
        (
            save("ACCEPT", "-p tcp " + CT + " RELATED,ESTABLISHED -m tcp --dport 22 -j REJECT"),
            "tcp", Firewall.DROP, "-A INPUT -p tcp " + CT + " RELATED,ESTABLISHED -m tcp "
            "--dport 22 -j REJECT",
        ),
        # a UDP request is one datagram: its later ones do not decide reachability
        (
            save("ACCEPT", "-p udp " + CT + " RELATED,ESTABLISHED -m udp --dport 22 -j DROP"),
            "udp", Firewall.ACCEPT, "policy accept",
        ),
        # new connections accepted, the policy drops what follows them
        (
            save("DROP", "-p tcp " + CT + " NEW -m tcp --dport 22 -j ACCEPT"),
            "tcp", Firewall.DROP, "policy drop",
        ),
        # the usual shape: established first, then the port
        (
            save("DROP", CT + " RELATED,ESTABLISHED -j ACCEPT",
                 "-p tcp " + CT + " NEW -m tcp --dport 22 -j ACCEPT"),
            "tcp", Firewall.ACCEPT, "-A INPUT -p tcp " + CT + " NEW -m tcp --dport 22 -j ACCEPT",
        ),
        # `! --ctstate NEW` is the established packets: dropped
        (
            save("ACCEPT", "-p tcp -m conntrack ! --ctstate NEW -j DROP"),
            "tcp", Firewall.DROP, "-A INPUT -p tcp -m conntrack ! --ctstate NEW -j DROP",
        ),
        # a status only an established connection has
        (
            save("ACCEPT", "-p tcp -m conntrack --ctstatus ASSURED -j DROP"),
            "tcp", Firewall.DROP, "-A INPUT -p tcp -m conntrack --ctstatus ASSURED -j DROP",
        ),
    ],
    ids=["established-rejected", "udp-established-dropped", "new-only-policy-drop",
         "usual", "not-new-dropped", "assured-dropped"],
)  # fmt: skip
def test_a_tcp_connection_needs_its_later_packets_accepted(text, protocol, verdict, rule):
    d = evaluate(parse_iptables_save(text, ""), protocol, 4, H4, 22, interfaces=IFACES)
    assert (d.verdict, d.rule) == (verdict, rule)
    if verdict is Firewall.DROP and "NEW" not in rule:
        assert "after the first" in d.reason


def test_later_packets_dropped_for_some_sources_only_restrict_the_accept():
    text = save(
        "ACCEPT",
        "-p tcp -s 198.51.100.0/25 -m conntrack --ctstate ESTABLISHED -m tcp --dport 22 -j DROP",
    )
    d = evaluate(parse_iptables_save(text, ""), "tcp", 4, H4, 22, interfaces=IFACES)
    assert (d.verdict, d.restricted) == (Firewall.ACCEPT, True)


def test_later_packets_dropped_on_one_interface_leave_the_other():
    text = save("ACCEPT", "-i eth0 -p tcp -m conntrack --ctstate ESTABLISHED -j DROP")
    rs = parse_iptables_save(text, "")
    assert evaluate(rs, "tcp", 4, H4, 22, interfaces=("eth0",)).verdict is Firewall.DROP
    d = evaluate(rs, "tcp", 4, H4, 22, interfaces=IFACES)
    assert (d.verdict, d.restricted) == (Firewall.ACCEPT, True)
