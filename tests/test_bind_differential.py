"""Bind scope and exposure against the kernel: sockets bound every way a program binds
(each scope, v6only on and off, IPv4-mapped, link-local with its zone, one device; TCP and
UDP) in the two-link server namespace, no packet filter. Both clients connect to every
server address over IPv4 and IPv6 (UDP: a datagram the server sends back); the exporter's
`exposure` for each listener, and its own probes of each address, must say what the
kernel did. Multicast groups are not sent to: test traffic goes only to documentation
unicast ranges, so classify's tests alone cover the groups' scopes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from netlab import LINKS, PROBE_TIMEOUT, SERVER_ADDRESSES, Bind, Lab, samples
from support import require_binary, require_root

pytestmark = [pytest.mark.root]

LINK_LOCAL = "fe80::1"  # the server's on eth0 only; each client holds fe80::2 on its link

BINDS = (
    Bind("127.0.0.1", 7001),
    Bind("::1", 7002, v6only=True),
    Bind("0.0.0.0", 7003),
    Bind("::", 7004),  # v6only off: IPv4 too
    Bind("::", 7005, v6only=True),
    Bind("198.51.100.1", 7006),  # eth0's address only
    Bind("2001:db8:1::1", 7007, v6only=True),  # eth1's IPv6 address only
    Bind("::ffff:198.51.100.129", 7008),  # eth1's IPv4 address, through an IPv6 socket
    Bind("::ffff:127.0.0.1", 7009),  # loopback, IPv4-mapped
    Bind("0.0.0.0", 7010, device="eth1"),  # SO_BINDTODEVICE: what arrives on eth1
    Bind(f"{LINK_LOCAL}%eth0", 7011, v6only=True),  # eth0's link-local address, its zone
    Bind("127.0.0.1", 7101, protocol="udp"),
    Bind("0.0.0.0", 7102, protocol="udp"),
    Bind("::", 7103, protocol="udp"),  # v6only off: IPv4 datagrams too
    Bind("::", 7104, v6only=True, protocol="udp"),
    Bind("::1", 7105, v6only=True, protocol="udp"),
    Bind("198.51.100.129", 7106, protocol="udp"),
    Bind("0.0.0.0", 7107, device="eth0", protocol="udp"),
    Bind(f"{LINK_LOCAL}%eth0", 7108, v6only=True, protocol="udp"),
)
CONFIG = (
    f"probe: {{enabled: true, timeout: {int(PROBE_TIMEOUT * 1000)}ms}}\n"
    "unexpected: {report: false}\nservices:\n"
    + "".join(
        f"  - {{name: p{b.port}, port: {b.port}, protocol: {b.protocol}, expose: private}}\n"
        for b in BINDS
    )
)


def dialled(b: Bind, client: int) -> list[tuple[str, str]]:
    """(address as the results name it, address the client dials) for one listener: a
    link-local address is dialled in the zone of the client's own link."""
    if b.address.startswith(LINK_LOCAL):
        return [(LINK_LOCAL, f"{LINK_LOCAL}%{LINKS[client][0]}")]
    return [(a, a) for a in SERVER_ADDRESSES]


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, dict, dict]]:
    require_root()
    require_binary("ip")
    lab = Lab("b")
    try:
        lab.create()
        lab.exec(lab.server, "ip", "-6", "addr", "add", f"{LINK_LOCAL}/64", "dev", "eth0", "nodad")
        for client, (dev, *_) in zip(lab.clients, LINKS, strict=True):
            lab.exec(client, "ip", "-6", "addr", "add", "fe80::2/64", "dev", dev, "nodad")
        lab.listen(BINDS)
        scanner = lab.start(lab.server, "scan")
        probers = [lab.start(c, "probe", str(PROBE_TIMEOUT)) for c in lab.clients]
        # the kernel's answer: which client got in on which address, per port
        got_in: dict[tuple[str, int], bool] = {}
        for i, prober in enumerate(probers):
            names = [(a, b.port) for b in BINDS for a, _ in dialled(b, i)]
            targets = [[d, b.port, b.protocol] for b in BINDS for _, d in dialled(b, i)]
            for key, outcome in zip(names, prober.ask(targets), strict=True):  # type: ignore[arg-type]
                got_in[key] = got_in.get(key, False) or outcome == "ok"
        metrics = samples(scanner.ask({"config": CONFIG})["metrics"])  # type: ignore[index]
        yield lab, got_in, metrics
    finally:
        lab.delete()


def _id(b: Bind) -> str:
    return f"{b.address}:{b.port}" + (f"%{b.device}" if b.device else "")


@pytest.mark.parametrize("bind", BINDS, ids=_id)
def test_exposure_is_what_other_hosts_get(lab, bind: Bind) -> None:
    _, got_in, metrics = lab
    listener = [
        s
        for s in metrics["bindscope_listener_info"]
        if s.labels["port"] == str(bind.port) and s.labels["protocol"] == bind.protocol
    ]
    assert len(listener) == 1, listener
    assert listener[0].labels["address"] == bind.address.partition("%")[0]
    # documentation ranges are private, and so is a link: a socket another host reaches
    # is private, one no other host reaches is loopback
    reached = any(got_in[(a, bind.port)] for a, _ in dialled(bind, 0))
    assert listener[0].labels["exposure"] == ("private" if reached else "loopback")
    status = {
        s.labels["status"]
        for s in metrics["bindscope_service_status"]
        if s.labels["service"] == f"p{bind.port}" and s.value == 1
    }
    assert status == {"ok" if reached else "loopback_only"}


PROBED = [
    b for b in BINDS if not b.device and b.protocol == "tcp" and not b.address.startswith("fe80")
]


@pytest.mark.parametrize("bind", PROBED, ids=_id)
def test_each_probe_says_what_a_client_got_on_that_address(lab, bind: Bind) -> None:
    """Without a packet filter, the exporter's connect to its own address succeeds exactly
    where a connect from another host does (a device-bound socket is left out: the
    exporter's connect enters through lo, which the device is not; so is the link-local
    one, which is not among the addresses compared; UDP has no connect to probe)."""
    _, got_in, metrics = lab
    probed = {
        s.labels["address"]: s.value == 1
        for s in metrics["bindscope_probe_success"]
        if s.labels["service"] == f"p{bind.port}" and s.labels["address"] in SERVER_ADDRESSES
    }
    assert probed == {a: got_in[(a, bind.port)] for a in SERVER_ADDRESSES}


def test_the_lab_saw_both_answers(lab) -> None:
    # the tables above would pass vacuously if every connect failed or every one succeeded
    _, got_in, _ = lab
    for protocol in ("tcp", "udp"):
        seen = [
            got_in[(a, b.port)] for b in BINDS if b.protocol == protocol for a, _ in dialled(b, 0)
        ]
        assert any(seen) and not all(seen), protocol
    sys.stderr.write(
        f"\nbind differential: {len(BINDS)} binds, {len(got_in)} address:port pairs, "
        f"{sum(got_in.values())} reached from a client\n"
    )
