"""Whether this host has a route to an address, as its kernel decides.

A UDP connect() makes the kernel look the route up (policy rules, VRFs and unreachable
routes included) and sends nothing; a failure is ENETUNREACH or EHOSTUNREACH. This reads
the routing the real connects will take, which parsing /proc/net/route would only imitate.
"""

from __future__ import annotations

import socket

_DISCARD_PORT = 9  # any port: a UDP connect only picks a route and a source address


def routable(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, _DISCARD_PORT))
        except OSError:
            return False
    return True
