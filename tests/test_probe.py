"""The prober on loopback: refused, accepted and timed-out connects, and the time bound."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from bindscope import probe
from bindscope.config.load import Config, ProbeConfig
from bindscope.model import (
    Exposure,
    HostAddress,
    Protocol,
    Scope,
    ServiceSpec,
    Status,
    Verdict,
)
from bindscope.probe import Target, probe_all
from bindscope.scan import Scanner

TIMEOUT = 2.0
# what the bounds tell apart is one round of connects from two (targets waiting for a
# slot must not add a timeout of their own); a busy host gets most of a timeout of room
SLACK = 0.9 * TIMEOUT


@pytest.fixture
def bound() -> Iterator[Callable[[str], int]]:
    """Factory: a port bound on the address but not listening, so a connect is refused.

    The socket stays open, so no other test can start listening on the port meanwhile.
    """
    opened: list[socket.socket] = []

    def make(address: str) -> int:
        s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
        opened.append(s)
        s.bind((address, 0))
        return s.getsockname()[1]

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def unanswered() -> Iterator[Callable[[str], int]]:
    """Factory: a listening port whose SYNs the kernel drops, so a connect times out.

    Linux drops a SYN while the listener's accept queue is full. With backlog 0 one
    connection that nobody accepts fills it; no firewall is needed for a loopback timeout.
    """
    opened: list[socket.socket] = []

    def make(address: str) -> int:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.socket(family)
        opened.append(listener)
        listener.bind((address, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        opened.append(socket.create_connection((address, port), timeout=2))
        return port

    yield make
    for s in opened:
        s.close()


@pytest.mark.parametrize(
    ("address", "kind", "success", "error"),
    [
        ("127.0.0.1", "listening", True, ""),
        ("127.0.0.1", "bound", False, "ECONNREFUSED"),
        ("127.0.0.1", "unanswered", False, "timeout"),
        ("::1", "listening", True, ""),
        ("::1", "bound", False, "ECONNREFUSED"),
        ("::1", "unanswered", False, "timeout"),
    ],
    ids=[
        "ipv4-listening-port-accepts",
        "ipv4-port-without-listener-refuses",
        "ipv4-full-accept-queue-times-out",
        "ipv6-listening-port-accepts",
        "ipv6-port-without-listener-refuses",
        "ipv6-full-accept-queue-times-out",
    ],
)
def test_one_probe(listen, bound, unanswered, address, kind, success, error):
    if kind == "listening":
        port = listen(address).getsockname()[1]
    else:
        port = (bound if kind == "bound" else unanswered)(address)
    result = probe_all([Target(address, port)], TIMEOUT)[Target(address, port)]
    assert (result.address, result.success, result.error) == (address, success, error)
    if error == "timeout":
        assert TIMEOUT <= result.duration < TIMEOUT + SLACK
    else:
        assert result.duration < TIMEOUT


def test_probe_sends_nothing_and_closes(listen):
    server = listen("127.0.0.1")
    port = server.getsockname()[1]
    assert probe_all([Target("127.0.0.1", port)], TIMEOUT)[Target("127.0.0.1", port)].success
    server.settimeout(2)
    conn, _peer = server.accept()
    with conn:
        conn.settimeout(2)
        # end of stream at once: no payload, and the prober already closed its side
        assert conn.recv(1) == b""


def test_many_targets_finish_within_the_timeout(monkeypatch, listen, bound, unanswered):
    # a pool smaller than the targets: those never started must not extend the wait
    monkeypatch.setattr(probe, "MAX_IN_FLIGHT", 2)
    accepting = Target("127.0.0.1", listen("127.0.0.1").getsockname()[1])
    refused = Target("::1", bound("::1"))
    stuck = [Target("127.0.0.1", unanswered("127.0.0.1")) for _ in range(3)]
    stuck += [Target("::1", unanswered("::1")) for _ in range(3)]
    targets = [accepting, refused, *stuck, accepting]
    t0 = time.monotonic()
    results = probe_all(targets, TIMEOUT)
    elapsed = time.monotonic() - t0
    assert elapsed < TIMEOUT + SLACK
    assert set(results) == set(targets)
    assert results[accepting].success
    assert results[refused].error == "ECONNREFUSED"
    assert {results[t].error for t in stuck} == {"timeout"}
    assert not any(results[t].success for t in stuck)


@pytest.mark.parametrize(
    ("address", "error"),
    [("fe80::1%no-such-if0", "bad_address"), ("localhost", "bad_address")],
    ids=["unknown-zone", "name-not-address"],
)
def test_unusable_address_fails_without_raising(address, error):
    result = probe_all([Target(address, 9)], TIMEOUT)[Target(address, 9)]
    assert (result.success, result.error, result.duration) == (False, error, 0.0)


def test_link_local_target_carries_its_zone():
    # without the scope id a link-local connect fails with EINVAL: the zone must reach it
    family, sockaddr = probe._sockaddr(Target("fe80::1%lo", 80))
    assert family == socket.AF_INET6
    assert sockaddr[3] == socket.if_nametoindex("lo")


def _verdict(name: str, port: int, protocol: Protocol = Protocol.TCP) -> Verdict:
    spec = ServiceSpec(name=name, port=port, protocol=protocol, expose=Exposure.PRIVATE)
    return Verdict(service=spec, status=Status.NOT_LISTENING, exposure=Exposure.NONE)


LO4 = HostAddress("127.0.0.1", "lo", 4, Scope.LOOPBACK)
LO6 = HostAddress("::1", "lo", 6, Scope.LOOPBACK)
# the same address on a second interface (anycast on lo and a dummy, say)
LO4_AGAIN = HostAddress("127.0.0.1", "dummy0", 4, Scope.LOOPBACK)


@pytest.mark.parametrize(
    ("probe_config", "expected"),
    [
        (ProbeConfig(timeout=TIMEOUT), ["127.0.0.1", "::1"]),
        (ProbeConfig(timeout=TIMEOUT, addresses=("::1",)), ["::1"]),
    ],
    ids=["auto-probes-each-host-address-once", "configured-addresses-replace-auto"],
)
def test_scan_probes_tcp_services_on_each_address(listen, probe_config, expected):
    port = listen("127.0.0.1").getsockname()[1]
    listen("::1", port)
    web = _verdict("web", port)
    dns = _verdict("dns", 53, Protocol.UDP)
    config = Config(probe=probe_config, services=(web.service, dns.service))
    (probed_web, probed_dns), _published = Scanner()._probe(
        config, (web, dns), (), (LO4, LO6, LO4_AGAIN)
    )
    assert [(p.address, p.success) for p in probed_web.probes] == [(a, True) for a in expected]
    # UDP has no handshake to probe
    assert probed_dns.probes == ()
