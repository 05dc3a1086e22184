"""Where a DNAT target sends each host port: one port, or a range shifted by a base, as
netavark writes consecutive `-p` mappings (`--to-destination IP:7001-7003/27001`)."""

import pytest

from bindscope.netfilter.nat import ToPorts


@pytest.mark.parametrize(
    ("to", "host_port", "target"),
    [
        (ToPorts(8080), 18081, 8080),
        (ToPorts(8080), 8080, 8080),
        # the shifted range: each host port to its own target port
        (ToPorts(7001, 7003, 27001), 27001, 7001),
        (ToPorts(7001, 7003, 27001), 27002, 7002),
        (ToPorts(7001, 7003, 27001), 27003, 7003),
        # outside the base's span the kernel's u16 offset wraps into the range
        (ToPorts(7001, 7003, 27001), 27004, 7001),
        (ToPorts(7001, 7003, 27001), 27000, 7001 + (65535 % 3)),
        # a one-port range with a base is that port
        (ToPorts(7001, 7001, 27001), 27005, 7001),
        # a range without a base: the kernel picks any free port of it
        (ToPorts(7001, 7003), 27001, None),
    ],
    ids=[
        "one port",
        "one port, same number",
        "range: first",
        "range: second",
        "range: last",
        "range: past the end wraps",
        "range: below the base wraps",
        "one-port range",
        "range without base: no single target",
    ],
)
def test_port_for(to: ToPorts, host_port: int, target: int | None) -> None:
    assert to.port_for(host_port) == target
