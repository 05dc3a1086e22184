"""Bind scope and exposure against the kernel: sockets bound every way a program binds
(each scope, v6only on and off, IPv4-mapped, one device) in the two-link server
namespace, no packet filter. Both clients connect to every server address over IPv4 and
IPv6; the exporter's `exposure` for each listener, and its own probes of each address,
must say what the kernel did. UDP (multicast groups among them) has no handshake to
test this way; classify's tests cover their scopes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from netlab import PROBE_TIMEOUT, SERVER_ADDRESSES, Bind, Lab, samples
from support import require_binary, require_root

pytestmark = [pytest.mark.root]

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
)
CONFIG = (
    f"probe: {{enabled: true, timeout: {int(PROBE_TIMEOUT * 1000)}ms}}\n"
    "unexpected: {report: false}\nservices:\n"
    + "".join(f"  - {{name: p{b.port}, port: {b.port}, expose: private}}\n" for b in BINDS)
)


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, dict, dict]]:
    require_root()
    require_binary("ip")
    lab = Lab("b")
    try:
        lab.create()
        lab.listen(BINDS)
        scanner = lab.start(lab.server, "scan")
        probers = [lab.start(c, "probe", str(PROBE_TIMEOUT)) for c in lab.clients]
        targets = [[a, b.port] for b in BINDS for a in SERVER_ADDRESSES]
        # the kernel's answer: which client got in on which address, per port
        got_in: dict[tuple[str, int], bool] = {(a, p): False for a, p in targets}
        for prober in probers:
            for (a, p), outcome in zip(targets, prober.ask(targets), strict=True):  # type: ignore[arg-type]
                got_in[(a, p)] |= outcome == "ok"
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
        if s.labels["port"] == str(bind.port) and s.labels["protocol"] == "tcp"
    ]
    assert len(listener) == 1, listener
    # documentation ranges are private: a socket another host reaches is private, one no
    # other host reaches is loopback
    reached = any(got_in[(a, bind.port)] for a in SERVER_ADDRESSES)
    assert listener[0].labels["exposure"] == ("private" if reached else "loopback")
    status = {
        s.labels["status"]
        for s in metrics["bindscope_service_status"]
        if s.labels["service"] == f"p{bind.port}" and s.value == 1
    }
    assert status == {"ok" if reached else "loopback_only"}


@pytest.mark.parametrize("bind", [b for b in BINDS if not b.device], ids=_id)
def test_each_probe_says_what_a_client_got_on_that_address(lab, bind: Bind) -> None:
    """Without a packet filter, the exporter's connect to its own address succeeds exactly
    where a connect from another host does (a device-bound socket is left out: the
    exporter's connect enters through lo, which the device is not)."""
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
    assert any(got_in.values()) and not all(got_in.values())
    sys.stderr.write(
        f"\nbind differential: {len(BINDS)} binds, {len(got_in)} address:port pairs, "
        f"{sum(got_in.values())} reached from a client\n"
    )
