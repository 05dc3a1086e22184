"""diagnose's firewall step on rulesets recorded from nft, iptables-nft and ufw's rules
(fixtures/firewall): the deciding rule, and the command that opens or closes the port."""

from __future__ import annotations

import dataclasses

import pytest
from support import load_ruleset

from bindscope.classify import exposure_of, host_address, scope_of
from bindscope.diagnose.fixes import closing_command, opening_command
from bindscope.diagnose.steps import BY_HAND, Case, diagnose, step_firewall
from bindscope.model import (
    HOST_NETNS,
    Exposure,
    Firewall,
    Listener,
    ProcessInfo,
    Protocol,
    ServiceSpec,
    Socket,
    Status,
    Verdict,
)
from bindscope.netfilter.ruleset import Decision

H4, H6 = "198.51.100.1", "2001:db8::1"
HOSTS = (
    host_address("lo", "127.0.0.1", 4),
    host_address("lo", "::1", 6),
    host_address("eth0", H4, 4),
    host_address("eth0", H6, 6),
)


load = load_ruleset


def listener(address: str, port: int, v6only: bool | None = None, netns: str = HOST_NETNS):
    sock = Socket(
        protocol=Protocol.TCP,
        address=address,
        port=port,
        family=6 if ":" in address else 4,
        v6only=v6only,
        inode=1,
        netns=netns,
    )
    return Listener(
        socket=sock,
        process=ProcessInfo(pid=100, name="python3", cmdline=("python3", "app.py")),
        scope=scope_of(address),
        exposure=exposure_of(sock, HOSTS),
    )


def case(
    listeners: list[Listener],
    status: Status,
    expose: Exposure = Exposure.PRIVATE,
    rulesets: dict | None = None,
) -> Case:
    port = listeners[0].socket.port
    spec = ServiceSpec(name="web", port=port, expose=expose)
    verdict = Verdict(
        service=spec, status=status, exposure=Exposure.PRIVATE, listeners=tuple(listeners)
    )
    return Case(
        port=port,
        verdicts=(verdict,),
        declared=True,
        listeners=tuple(listeners),
        addresses=HOSTS,
        rulesets=rulesets if rulesets is not None else {},
    )


@pytest.mark.parametrize(
    ("fixture", "port", "expose", "status", "lines", "fixes"),
    [
        (
            "inet_drop",
            5000,
            Exposure.PRIVATE,
            Status.BLOCKED,
            [
                f"tcp {H4}: the firewall drops other hosts: "
                "table inet filter, chain input: policy drop"
            ],
            ["nft insert rule inet filter input tcp dport 5000 accept"],
        ),
        (
            "inet_drop",
            9100,
            Exposure.PRIVATE,
            Status.BLOCKED,
            [
                f"tcp {H4}: the firewall drops other hosts: table inet filter, chain input, "
                "handle 21: `tcp dport 9100 reject`"
            ],
            ["nft insert rule inet filter input tcp dport 9100 accept"],
        ),
        (
            "inet_drop",
            22,
            Exposure.PRIVATE,
            Status.OK,
            [
                f"tcp {H4}: the firewall accepts new connections from other hosts on {H4}: "
                "ruled out as the cause (table inet filter, chain input, handle 15: "
                '`tcp dport 22 counter accept comment "ssh"`)'
            ],
            [],
        ),
        (
            "ufw",
            9999,
            Exposure.PRIVATE,
            Status.BLOCKED,
            [
                f"tcp {H4}: the firewall drops other hosts: table ip filter, chain INPUT: "
                "policy drop (written by ufw)"
            ],
            ["ufw allow 9999/tcp"],
        ),
        (
            "ufw",
            5432,
            Exposure.PRIVATE,
            Status.OK,
            [f"tcp {H4}: only some hosts get in (other sources or interfaces are dropped)"],
            [],
        ),
        (
            "ufw",
            5000,
            Exposure.LOOPBACK,
            Status.OVEREXPOSED,
            [f"{H4}: nothing but the bind keeps them out (table ip filter, chain ufw-user-input"],
            ["ufw insert 1 deny 5000/tcp"],
        ),
        (
            "firewalld",
            5000,
            Exposure.LOOPBACK,
            Status.OVEREXPOSED,
            [
                "nothing but the bind keeps them out "
                "(table inet firewalld, chain filter_IN_public_allow"
            ],
            [
                'firewall-cmd --zone=public --add-rich-rule=\'rule port port="5000" '
                'protocol="tcp" drop\' && firewall-cmd --permanent --zone=public '
                '--add-rich-rule=\'rule port port="5000" protocol="tcp" drop\''
            ],
        ),
        (
            "ufw",
            8080,
            Exposure.LOOPBACK,
            Status.OK,
            [
                "-A ufw-user-input -p tcp -m tcp --dport 8080 -j DROP` (written by ufw)",
                "  protected by the firewall alone: bind it to loopback as well",
            ],
            [],
        ),
        (
            "unknown",
            9300,
            Exposure.PRIVATE,
            Status.OK,
            [f"tcp {H4}: undecided: limit rate 10/second: not modelled", BY_HAND],
            [],
        ),
        (
            "empty",
            5000,
            Exposure.PRIVATE,
            Status.OK,
            [f"{H4}: ruled out as the cause (no packet filter on the input path)"],
            [],
        ),
    ],
    ids=[
        "nft-policy-drop-opens-with-nft",
        "nft-reject-rule-named-by-handle",
        "nft-accept-rules-it-out",
        "ufw-policy-drop-opens-with-ufw-allow",
        "ufw-source-restricted-accept",
        "ufw-overexposed-closes-with-ufw-deny",
        "firewalld-overexposed-closes-with-firewall-cmd",
        "ufw-drop-protects-a-loopback-service",
        "unknown-rule-is-checked-by-hand",
        "no-filter-at-all",
    ],
)
def test_step_names_the_rule_and_the_command(fixture, port, expose, status, lines, fixes):
    c = case([listener("0.0.0.0", port)], status, expose, {HOST_NETNS: (load(fixture), "")})
    f = step_firewall(c)
    text = "\n".join(f.lines)
    for line in lines:
        assert line in text
    assert [c for fix in f.fixes for c in fix.commands] == fixes
    assert all(fix.kind == "firewall" for fix in f.fixes)
    # a problem only where the firewall is the cause or the missing guard
    assert f.problem == (status in (Status.BLOCKED, Status.OVEREXPOSED))


def test_every_address_the_socket_takes_is_evaluated():
    # an IPv6 wildcard with v6only off takes IPv4 too; the IPv6 side is dropped by policy
    c = case(
        [listener("::", 5432, v6only=False)],
        Status.OK,
        rulesets={HOST_NETNS: (load("inet_drop"), "")},
    )
    lines = step_firewall(c).lines
    assert [line.split(": ", 1)[0] for line in lines if not line.startswith(" ")] == [
        f"tcp {H4}",
        f"tcp {H6}",
    ]
    assert "only some hosts get in" in lines[0]
    assert "ip6 saddr 2001:db8::/64 accept" in lines[1]


@pytest.mark.parametrize(
    ("rulesets", "said"),
    [
        (
            {HOST_NETNS: (None, "nft: Operation not permitted")},
            "could not be read: nft: Operation not permitted",
        ),
        ({}, "was not read"),
    ],
    ids=["no-cap-net-admin", "not-read"],
)
def test_unreadable_firewall_is_said_with_the_commands_to_check_by_hand(rulesets, said):
    f = step_firewall(case([listener("0.0.0.0", 5000)], Status.OK, rulesets=rulesets))
    assert f.lines == (f"the firewall {said} (reading it needs CAP_NET_ADMIN)", BY_HAND)
    assert (f.fixes, f.problem) == ((), False)


def test_loopback_only_has_no_firewall_finding():
    c = case(
        [listener("127.0.0.1", 5000)],
        Status.LOOPBACK_ONLY,
        rulesets={HOST_NETNS: (load("ufw"), "")},
    )
    assert step_firewall(c) is None
    assert "Does the firewall let other hosts in?" not in [f.title for f in diagnose(c).findings]


def test_another_namespace_shows_the_scans_verdict():
    inside = listener("0.0.0.0", 5000, netns="web-container")
    inside = Listener(
        inside.socket, inside.process, inside.scope, inside.exposure, firewall=Firewall.DROP
    )
    f = step_firewall(case([inside], Status.OK))
    assert f.lines == (
        "tcp 0.0.0.0:5000 (netns web-container): the scan's verdict: drop "
        "(rules are named for this namespace only)",
    )


def test_blocked_gathers_the_opening_command_instead_of_the_generic_hint():
    c = case([listener("0.0.0.0", 9999)], Status.BLOCKED, rulesets={HOST_NETNS: (load("ufw"), "")})
    d = diagnose(c)
    assert d.problem
    assert [(f.kind, f.commands) for f in d.fixes] == [("firewall", ("ufw allow 9999/tcp",))]


@pytest.mark.parametrize(
    ("firewall", "effective", "reach", "said"),
    [
        (
            Firewall.DROP,
            Exposure.LOOPBACK,
            "only this host",
            "The firewall drops new connections from other hosts on every address",
        ),
        (
            Firewall.ACCEPT,
            Exposure.PRIVATE,
            "hosts on its private networks",
            "The firewall lets other hosts in",
        ),
        (None, Exposure.PRIVATE, "hosts on its private networks", "a firewall may still drop"),
    ],
    ids=["dropped", "accepted", "not-read"],
)
def test_the_meaning_step_agrees_with_the_firewall(firewall, effective, reach, said):
    wide = listener("0.0.0.0", 5432)
    wide = Listener(wide.socket, wide.process, wide.scope, wide.exposure, firewall=firewall)
    spec = ServiceSpec(name="db", port=5432, expose=effective)
    v = Verdict(spec, Status.OK, Exposure.PRIVATE, (wide,), effective=effective)
    c = Case(5432, (v,), True, (wide,), HOSTS)
    (meaning,) = [f for f in diagnose(c).findings if f.step == "meaning"]
    assert f"A client can connect from {reach}" in meaning.lines[1]
    assert said in meaning.lines[2]


def test_firewalld_closes_in_every_zone_that_lets_hosts_in():
    # the recorded ruleset: eth0 in zone public (which allows 5000/tcp), eth1 in trusted
    hosts = (*HOSTS, host_address("eth1", "198.51.100.129", 4))
    rulesets = {HOST_NETNS: (load("firewalld"), "")}
    c = case([listener("0.0.0.0", 5000)], Status.OVEREXPOSED, Exposure.LOOPBACK, rulesets)
    c = dataclasses.replace(c, addresses=hosts)
    rule = '--add-rich-rule=\'rule port port="5000" protocol="tcp" drop\''
    assert [cmd for fix in step_firewall(c).fixes for cmd in fix.commands] == [
        f"firewall-cmd --zone={z} {rule} && firewall-cmd --permanent --zone={z} {rule}"
        for z in ("public", "trusted")
    ]


RICH = '--add-rich-rule=\'rule port port="6379" protocol="tcp" drop\''


@pytest.mark.parametrize(
    ("chains", "where"),
    [
        ((("inet", "firewalld", "filter_IN_public_allow"),), " --zone=public"),
        ((("inet", "firewalld", "filter_IN_trusted"),), " --zone=trusted"),
        # zone names may hold `_`: only firewalld's own suffix is taken off
        ((("inet", "firewalld", "filter_IN_my_zone_allow"),), " --zone=my_zone"),
        ((("inet", "firewalld", "filter_IN_policy_web-in_allow"),), " --policy=web-in"),
        # accepted by another table before firewalld's: the default zone
        ((("inet", "filter", "input"),), ""),
    ],
    ids=["zone-allow", "zone-target", "underscore", "policy", "not-firewalld"],
)
def test_firewalld_fix_names_the_zone_or_policy_of_the_accepting_chain(chains, where):
    d = Decision(Firewall.ACCEPT, "firewalld", chains[0][2], family="inet",
                 manager="firewalld", accepted_in=chains)  # fmt: skip
    assert closing_command(d, "tcp", 6379) == (
        f"firewall-cmd{where} {RICH} && firewall-cmd --permanent{where} {RICH}"
    )


def test_firewalld_opens_in_the_zone_that_rejected_without_a_reload():
    d = Decision(Firewall.DROP, "firewalld", "filter_IN_drop", family="inet", manager="firewalld")
    assert opening_command(d, "tcp", 5000) == (
        "firewall-cmd --zone=drop --add-port=5000/tcp && "
        "firewall-cmd --permanent --zone=drop --add-port=5000/tcp"
    )
