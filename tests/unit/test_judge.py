"""Verdicts: one row per status and per tricky combination of sockets."""

import dataclasses
import re

import pytest

from bindscope.config.load import IgnoreRule
from bindscope.judge import Owner, judge, judge_published, status_of, unexpected
from bindscope.model import (
    NO_PROCESS,
    Exposure,
    Firewall,
    Listener,
    ProcessInfo,
    Protocol,
    PublishedPort,
    PublishedStatus,
    Scope,
    ServiceSpec,
    Socket,
    Status,
    worst_published,
)

GUNICORN = ProcessInfo(pid=10, name="gunicorn")
PYTHON = ProcessInfo(pid=11, name="python3")


def lst(
    address="0.0.0.0",
    port=5000,
    exposure=Exposure.PRIVATE,
    process=GUNICORN,
    protocol=Protocol.TCP,
    netns="host",
    container="",
    scope=None,
):
    family = 6 if ":" in address else 4
    s = Socket(protocol, address, port, family, None, inode=port, netns=netns, container=container)
    return Listener(s, process, scope or Scope.WILDCARD, exposure)


def spec(expose=Exposure.PRIVATE, process=None, port=5000, **kw):
    return ServiceSpec(
        name="web", port=port, expose=expose, process=re.compile(process) if process else None, **kw
    )


LOOP = Exposure.LOOPBACK
PRIV = Exposure.PRIVATE
PUB = Exposure.PUBLIC


@pytest.mark.parametrize(
    ("service", "listeners", "status", "exposure"),
    [
        (spec(), [], Status.NOT_LISTENING, Exposure.NONE),
        (spec(), [lst(exposure=PRIV)], Status.OK, PRIV),
        (spec(PUB), [lst(exposure=PUB)], Status.OK, PUB),
        (spec(PUB), [lst(exposure=PRIV)], Status.OK, PRIV),
        (spec(LOOP), [lst("127.0.0.1", exposure=LOOP)], Status.OK, LOOP),
        (spec(), [lst("127.0.0.1", exposure=LOOP)], Status.LOOPBACK_ONLY, LOOP),
        (
            spec(PUB),
            [lst("127.0.0.1", exposure=LOOP), lst("::1", exposure=LOOP)],
            Status.LOOPBACK_ONLY,
            LOOP,
        ),
        (spec(LOOP), [lst(exposure=PRIV)], Status.OVEREXPOSED, PRIV),
        (
            spec(LOOP),
            [lst("127.0.0.1", exposure=LOOP), lst("::", exposure=PUB)],
            Status.OVEREXPOSED,
            PUB,
        ),
        (spec(PRIV), [lst(exposure=PUB)], Status.OVEREXPOSED, PUB),
        (spec(PRIV), [lst("0.0.0.0", exposure=PRIV), lst("::", exposure=PRIV)], Status.OK, PRIV),
        (spec(process="^gunicorn$"), [lst()], Status.OK, PRIV),
        (spec(process="^gunicorn$"), [lst(process=PYTHON)], Status.WRONG_PROCESS, PRIV),
        (
            spec(process="^gunicorn$"),
            [lst(), lst("::", process=PYTHON)],
            Status.WRONG_PROCESS,
            PRIV,
        ),
        (spec(process="^gunicorn$"), [lst(process=NO_PROCESS)], Status.PROCESS_UNKNOWN, PRIV),
        (spec(process="^gunicorn$"), [lst(), lst("::", process=NO_PROCESS)], Status.OK, PRIV),
        (spec(LOOP, process="^gunicorn$"), [lst(process=PYTHON)], Status.OVEREXPOSED, PRIV),
        (
            spec(process="^gunicorn$"),
            [lst("127.0.0.1", exposure=LOOP, process=PYTHON)],
            Status.LOOPBACK_ONLY,
            LOOP,
        ),
    ],
    ids=[
        "nothing listens",
        "private as expected",
        "public as expected",
        "expected public, host only private: not an error",
        "loopback as expected",
        "expected private, loopback only (the Flask app.run() bug)",
        "expected public, 127.0.0.1 and ::1 only",
        "database expected loopback on 0.0.0.0",
        "expected loopback, one of two sockets wide",
        "expected private, public",
        "0.0.0.0 and [::] both private",
        "right process",
        "wrong process",
        "one of two sockets held by another process",
        "process unreadable: unknown, not wrong",
        "one known right owner is enough when the other is unreadable",
        "overexposed outranks wrong process",
        "loopback only outranks wrong process",
    ],
)
def test_status_of(service, listeners, status, exposure):
    assert status_of(service, listeners) == (status, exposure)


def test_judge_claims_by_port_protocol_and_namespace():
    web = ServiceSpec("web", 5000, expose=PRIV)
    dns = ServiceSpec("dns", 53, protocol=Protocol.UDP, expose=PRIV)
    boxed = ServiceSpec("boxed", 5000, expose=PRIV, container=re.compile("^app$"))
    named = ServiceSpec("named", 7000, expose=LOOP, netns="blue")
    listeners = [
        lst(port=5000),
        lst(port=53, protocol=Protocol.TCP),  # TCP 53 is not the UDP service
        lst("127.0.0.1", port=5000, exposure=LOOP, netns="netns:4026532", container="app"),
        lst("127.0.0.1", port=7000, exposure=LOOP, netns="blue"),
        lst(port=7000),  # the host's 7000 is not the named namespace's service
        lst(port=9917, exposure=PRIV),
    ]
    verdicts, labelled = judge([web, dns, boxed, named], listeners, own={("0.0.0.0", 9917)})
    by_name = {v.service.name: v for v in verdicts}
    assert by_name["web"].status is Status.OK
    assert by_name["dns"].status is Status.NOT_LISTENING
    assert by_name["boxed"].status is Status.LOOPBACK_ONLY
    assert by_name["named"].status is Status.OK
    assert [x.service for x in labelled] == ["web", "", "boxed", "named", "", "bindscope"]


def test_unexpected_skips_declared_own_loopback_and_ignored():
    listeners = [
        lst(port=5000),
        lst(port=22),
        lst("127.0.0.1", port=6379, exposure=LOOP),
        lst(port=8080),
        lst(port=9917),
        lst(port=5353, protocol=Protocol.UDP),
    ]
    _, labelled = judge([ServiceSpec("web", 5000, expose=PRIV)], listeners, own={("0.0.0.0", 9917)})
    ignore = [IgnoreRule(port=22, protocol=Protocol.TCP), IgnoreRule(protocol=Protocol.UDP)]
    assert [x.socket.port for x in unexpected(labelled, ignore)] == [8080]
    assert [x.socket.port for x in unexpected(labelled, [])] == [22, 8080, 5353]


def fw(address="0.0.0.0", exposure=PRIV, effective=PRIV, verdict=Firewall.ACCEPT, **kw):
    return dataclasses.replace(
        lst(address, exposure=exposure, **kw), firewall=verdict, effective=effective
    )


@pytest.mark.parametrize(
    ("service", "listeners", "status"),
    [
        (spec(PRIV), [fw(verdict=Firewall.DROP, effective=LOOP)], Status.BLOCKED),
        (spec(PUB), [fw(exposure=PUB, verdict=Firewall.DROP, effective=LOOP)], Status.BLOCKED),
        (spec(PRIV), [fw(verdict=Firewall.UNKNOWN, effective=PRIV)], Status.OK),
        (spec(LOOP), [fw(verdict=Firewall.DROP, effective=LOOP)], Status.OK),
        (spec(PRIV), [fw(exposure=PUB, effective=PRIV)], Status.OK),
        (spec(PRIV), [fw(exposure=PUB, effective=PUB)], Status.OVEREXPOSED),
        (spec(LOOP), [fw(verdict=Firewall.UNKNOWN, effective=PRIV)], Status.OVEREXPOSED),
        (spec(PRIV), [lst("127.0.0.1", exposure=LOOP)], Status.LOOPBACK_ONLY),
    ],
    ids=[
        "wide bind, firewall drops every other host: blocked",
        "public bind, dropped: blocked",
        "unknown firewall never blocks",
        "database expected loopback, protected by the firewall alone: ok",
        "public bind narrowed to private by the firewall: ok, shown on the dashboard",
        "public bind, firewall lets the public in: overexposed",
        "unknown firewall counts as open for over-exposure",
        "loopback only is not blocked",
    ],
)
def test_status_with_the_firewall(service, listeners, status):
    assert status_of(service, listeners)[0] is status


def published(target="203.0.113.2", port=8080, protocol="tcp", host_port=18081):
    return PublishedPort(protocol, "127.0.0.1", host_port, target, port, "nft")


OWNERS = {
    "203.0.113.2": Owner("netns:4026532", "app", "eth0"),
    "2001:db8::2": Owner("netns:4026532", "app", "eth0"),
}


def inside(address, port=8080, v6only=None, device=""):
    family = 6 if ":" in address else 4
    s = Socket(
        Protocol.TCP, address, port, family, v6only, inode=1, netns="netns:4026532",
        container="app", ifindex=2 if device else 0, device=device,
    )  # fmt: skip
    scope = Scope.LOOPBACK if address in ("127.0.0.1", "::1") else Scope.WILDCARD
    return Listener(s, PYTHON, scope, LOOP if scope is Scope.LOOPBACK else PRIV)


@pytest.mark.parametrize(
    ("port", "listeners", "status"),
    [
        (published(), [inside("127.0.0.1")], PublishedStatus.LOOPBACK_ONLY),
        (published(), [inside("0.0.0.0")], PublishedStatus.OK),
        (published(), [inside("::", v6only=False)], PublishedStatus.OK),
        (published(), [inside("::", v6only=True)], PublishedStatus.NOT_LISTENING),
        (published(), [], PublishedStatus.NOT_LISTENING),
        (published(), [inside("0.0.0.0", port=5000)], PublishedStatus.NOT_LISTENING),
        (published(target="2001:db8::2"), [inside("::", v6only=True)], PublishedStatus.OK),
        (published(), [inside("127.0.0.1"), inside("203.0.113.2")], PublishedStatus.OK),
        (published(), [inside("0.0.0.0", device="eth0")], PublishedStatus.OK),
        (published(), [inside("0.0.0.0", device="eth1")], PublishedStatus.NOT_LISTENING),
        (published(), [inside("0.0.0.0", device="lo")], PublishedStatus.LOOPBACK_ONLY),
        (
            published(),
            [inside("127.0.0.1"), inside("0.0.0.0", device="lo")],
            PublishedStatus.LOOPBACK_ONLY,
        ),
    ],
    ids=[
        "app.run() inside: loopback only (the Flask bug behind -p)",
        "0.0.0.0 inside",
        "dual-stack wildcard inside takes the IPv4 target",
        "v6only wildcard does not take the IPv4 target",
        "nothing listens inside",
        "listens on another port",
        "IPv6 target, v6only wildcard",
        "bound to the target address itself",
        "bound to the device the target address is on: takes the forwarded packets",
        "bound to another device: they never reach it",
        "bound to lo: loopback only, whatever its address",
        "loopback address and lo device: loopback only",
    ],
)
def test_judge_published(port, listeners, status):
    (verdict,) = judge_published([port], OWNERS, listeners)
    assert verdict.status is status
    assert (verdict.container, verdict.netns) == ("app", "netns:4026532")


def test_published_targets_elsewhere_are_not_judged():
    assert judge_published([published(target="203.0.113.99")], OWNERS, []) == ()


def test_worst_published_keeps_one_status_per_host_port():
    v4 = judge_published([published()], OWNERS, [inside("0.0.0.0")])
    v6 = judge_published([published(target="2001:db8::2")], OWNERS, [])
    worst = worst_published(v4 + v6)
    assert list(worst) == [("app", "tcp", 18081)]
    assert worst["app", "tcp", 18081].status is PublishedStatus.NOT_LISTENING
