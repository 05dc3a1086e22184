"""Scope and exposure: table tests over every scope, family and v6only case."""

import pytest

from bindscope.classify import (
    accepts_on,
    after_firewall,
    exposure_of,
    host_address,
    loopback_only,
    reachable_addresses,
    scope_of,
)
from bindscope.model import Exposure, Firewall, Protocol, Scope, Socket


@pytest.mark.parametrize(
    ("address", "scope"),
    [
        ("127.0.0.1", Scope.LOOPBACK),
        ("127.0.0.53", Scope.LOOPBACK),
        ("::1", Scope.LOOPBACK),
        ("::ffff:127.0.0.1", Scope.LOOPBACK),
        ("169.254.10.1", Scope.LINK_LOCAL),
        ("fe80::1", Scope.LINK_LOCAL),
        ("fe80::1%eth0", Scope.LINK_LOCAL),
        ("10.1.2.3", Scope.PRIVATE),
        ("192.168.1.1", Scope.PRIVATE),
        ("172.16.0.1", Scope.PRIVATE),
        ("100.64.0.1", Scope.PRIVATE),
        ("198.51.100.1", Scope.PRIVATE),
        ("fd00::1", Scope.PRIVATE),
        ("2001:db8::1", Scope.PRIVATE),
        ("::ffff:10.0.0.1", Scope.PRIVATE),
        ("8.8.8.8", Scope.PUBLIC),
        ("2a00:1450::1", Scope.PUBLIC),
        ("::ffff:8.8.8.8", Scope.PUBLIC),
        ("0.0.0.0", Scope.WILDCARD),
        ("::", Scope.WILDCARD),
    ],
    ids=lambda v: str(v),
)
def test_scope_of(address, scope):
    assert scope_of(address) is scope


def sock(address, v6only=None, family=None, device=""):
    fam = family or (6 if ":" in address else 4)
    return Socket(
        Protocol.TCP, address, 5000, fam, v6only, inode=1, ifindex=int(bool(device)), device=device
    )


LO = [host_address("lo", "127.0.0.1", 4), host_address("lo", "::1", 6)]
PRIVATE_V4 = [*LO, host_address("eth0", "10.0.0.5", 4)]
PUBLIC_V4 = [*LO, host_address("eth0", "203.0.114.7", 4)]  # never contacted: only classified
PUBLIC_V6_PRIVATE_V4 = [*PRIVATE_V4, host_address("eth0", "2a00:1450::5", 6)]
LINK_LOCAL_ONLY = [*LO, host_address("eth0", "fe80::5", 6)]


@pytest.mark.parametrize(
    ("socket_", "addresses", "exposure"),
    [
        (sock("127.0.0.1"), PUBLIC_V4, Exposure.LOOPBACK),
        (sock("::1"), PUBLIC_V4, Exposure.LOOPBACK),
        (sock("::ffff:127.0.0.1", v6only=False), PUBLIC_V4, Exposure.LOOPBACK),
        (sock("10.0.0.5"), PRIVATE_V4, Exposure.PRIVATE),
        (sock("0.0.0.0"), PRIVATE_V4, Exposure.PRIVATE),
        (sock("0.0.0.0"), PUBLIC_V4, Exposure.PUBLIC),
        (sock("0.0.0.0"), LO, Exposure.LOOPBACK),
        (sock("::", v6only=False), PUBLIC_V4, Exposure.PUBLIC),
        (sock("::", v6only=True), PUBLIC_V4, Exposure.LOOPBACK),
        (sock("::", v6only=True), PUBLIC_V6_PRIVATE_V4, Exposure.PUBLIC),
        (sock("0.0.0.0"), PUBLIC_V6_PRIVATE_V4, Exposure.PRIVATE),
        (sock("::", v6only=None), PUBLIC_V4, Exposure.PUBLIC),
        (sock("::", v6only=True), LINK_LOCAL_ONLY, Exposure.PRIVATE),
        (sock("fe80::5"), LINK_LOCAL_ONLY, Exposure.PRIVATE),
        (sock("203.0.114.7"), PUBLIC_V4, Exposure.PUBLIC),
    ],
    ids=[
        "ipv4 loopback on a public host",
        "ipv6 loopback",
        "ipv4-mapped loopback",
        "private address",
        "ipv4 wildcard, private host",
        "ipv4 wildcard, public host",
        "ipv4 wildcard, host with loopback only",
        "ipv6 wildcard v6only off takes public ipv4",
        "ipv6 wildcard v6only on ignores ipv4",
        "ipv6 wildcard v6only on, public ipv6",
        "ipv4 wildcard ignores public ipv6",
        "ipv6 wildcard v6only unknown counts as off",
        "ipv6 wildcard, link-local only",
        "link-local address",
        "public address",
    ],
)
def test_exposure_of(socket_, addresses, exposure):
    assert exposure_of(socket_, addresses) is exposure


def test_several_sockets_on_one_port_take_the_widest():
    both_loopback = [sock("127.0.0.1"), sock("::1")]
    assert max(exposure_of(s, PUBLIC_V4) for s in both_loopback) is Exposure.LOOPBACK
    both_wildcard = [sock("0.0.0.0"), sock("::", v6only=True)]
    assert max(exposure_of(s, PUBLIC_V6_PRIVATE_V4) for s in both_wildcard) is Exposure.PUBLIC


@pytest.mark.parametrize(
    ("socket_", "expected"),
    [
        (sock("0.0.0.0"), ["127.0.0.1", "10.0.0.5"]),
        (sock("::", v6only=False), ["127.0.0.1", "::1", "10.0.0.5", "2a00:1450::5"]),
        (sock("::", v6only=True), ["::1", "2a00:1450::5"]),
        (sock("127.0.0.1"), ["127.0.0.1"]),
        (sock("::ffff:10.0.0.5", v6only=False), ["10.0.0.5"]),
    ],
    ids=["ipv4 wildcard", "dual-stack wildcard", "v6only wildcard", "loopback", "mapped"],
)
def test_reachable_addresses(socket_, expected):
    got = [a.address for a in reachable_addresses(socket_, PUBLIC_V6_PRIVATE_V4)]
    assert got == expected


def test_link_local_probe_target_carries_zone():
    a = host_address("eth0", "fe80::5", 6)
    assert a.scope is Scope.LINK_LOCAL
    assert a.probe_target == "fe80::5%eth0"
    assert host_address("eth0", "10.0.0.5", 4).probe_target == "10.0.0.5"


HOST = [*LO, host_address("eth0", "10.0.0.5", 4), host_address("eth0", "2a00:1450::5", 6)]


@pytest.mark.parametrize(
    ("socket_", "verdicts", "expected"),
    [
        (sock("127.0.0.1"), {}, (None, Exposure.LOOPBACK)),
        (sock("0.0.0.0"), {"10.0.0.5": Firewall.ACCEPT}, (Firewall.ACCEPT, Exposure.PRIVATE)),
        (sock("0.0.0.0"), {"10.0.0.5": Firewall.DROP}, (Firewall.DROP, Exposure.LOOPBACK)),
        (sock("0.0.0.0"), {"10.0.0.5": Firewall.UNKNOWN}, (Firewall.UNKNOWN, Exposure.PRIVATE)),
        (
            sock("::", v6only=False),
            {"10.0.0.5": Firewall.ACCEPT, "2a00:1450::5": Firewall.DROP},
            (Firewall.ACCEPT, Exposure.PRIVATE),
        ),
        (
            sock("::", v6only=False),
            {"10.0.0.5": Firewall.DROP, "2a00:1450::5": Firewall.DROP},
            (Firewall.DROP, Exposure.LOOPBACK),
        ),
        (
            sock("::", v6only=False),
            {"10.0.0.5": Firewall.DROP, "2a00:1450::5": Firewall.UNKNOWN},
            (Firewall.UNKNOWN, Exposure.PUBLIC),
        ),
    ],
    ids=[
        "loopback: the firewall does not matter",
        "accepted",
        "dropped on its only address",
        "unknown counts as open",
        "public dropped, private accepted: private",
        "dropped everywhere",
        "dropped and unknown: unknown, as wide as the unknown address",
    ],
)
def test_after_firewall(socket_, verdicts, expected):
    asked = []

    def decide(a):
        asked.append(a.address)
        return verdicts[a.address]

    assert after_firewall(socket_, HOST, decide) == expected
    assert "127.0.0.1" not in asked and "::1" not in asked  # lo is always accepted


@pytest.mark.parametrize(
    ("socket_", "address", "accepts"),
    [
        (sock("0.0.0.0"), "203.0.113.2", True),
        (sock("::", v6only=True), "203.0.113.2", False),
        (sock("::", v6only=False), "203.0.113.2", True),
        (sock("127.0.0.1"), "203.0.113.2", False),
        (sock("203.0.113.2"), "203.0.113.2", True),
        (sock("::", v6only=True), "2001:db8::2", True),
    ],
    ids=["ipv4 wildcard", "v6only wildcard", "dual-stack", "loopback", "exact", "ipv6"],
)
def test_accepts_on(socket_, address, accepts):
    assert accepts_on(socket_, address) is accepts


@pytest.mark.parametrize(
    ("socket_", "interface", "accepts"),
    [
        (sock("0.0.0.0", device="eth0"), "eth0", True),
        (sock("0.0.0.0", device="eth0"), "eth1", False),
        (sock("0.0.0.0", device="eth0"), "", False),
        (sock("0.0.0.0", device="lo"), "eth0", False),
        (sock("0.0.0.0"), "eth0", True),
        (sock("0.0.0.0"), "", True),
    ],
    ids=[
        "bound to the address's device",
        "bound to another device",
        "bound to a device, the address's unknown",
        "bound to lo",
        "no device, interface known",
        "no device, interface unknown",
    ],
)
def test_accepts_on_the_addresss_device(socket_, interface, accepts):
    """A DNAT target's packets arrive on the device that holds its address."""
    assert accepts_on(socket_, "203.0.113.2", interface) is accepts


@pytest.mark.parametrize(
    ("socket_", "only"),
    [
        (sock("127.0.0.1"), True),
        (sock("::1"), True),
        (sock("::ffff:127.0.0.1"), True),
        (sock("0.0.0.0", device="lo"), True),
        (sock("::", device="lo"), True),
        (sock("0.0.0.0"), False),
        (sock("::", v6only=True), False),
        (sock("0.0.0.0", device="eth0"), False),
        (sock("203.0.113.2"), False),
    ],
    ids=[
        "127.0.0.1",
        "::1",
        "ipv4-mapped loopback",
        "0.0.0.0 on lo",
        ":: on lo",
        "0.0.0.0",
        "v6only wildcard",
        "0.0.0.0 on eth0",
        "own address",
    ],
)
def test_loopback_only(socket_, only):
    assert loopback_only(socket_) is only
