"""Verdicts: one row per status and per tricky combination of sockets."""

import re

import pytest

from bindscope.config import IgnoreRule
from bindscope.judge import judge, status_of, unexpected
from bindscope.model import (
    NO_PROCESS,
    Exposure,
    Listener,
    ProcessInfo,
    Protocol,
    Scope,
    ServiceSpec,
    Socket,
    Status,
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
