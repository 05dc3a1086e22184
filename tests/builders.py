"""Shared builders of model records for pure tests: listener(), spec(), snapshot().

Defaults describe a typical host: addresses on lo and one interface in the documentation
ranges, a Python process, the host's own network namespace.
"""

from __future__ import annotations

import re

from bindscope.classify import exposure_of, host_address, scope_of
from bindscope.model import (
    HOST_NETNS,
    Exposure,
    Firewall,
    HostAddress,
    Listener,
    ProcessInfo,
    Protocol,
    ServiceSpec,
    Snapshot,
    Socket,
    Verdict,
)

HOSTS: tuple[HostAddress, ...] = (
    host_address("lo", "127.0.0.1", 4),
    host_address("lo", "::1", 6),
    host_address("eth0", "198.51.100.1", 4),
    host_address("eth0", "2001:db8::1", 6),
)


def sock(
    address: str = "0.0.0.0",
    port: int = 5000,
    protocol: Protocol = Protocol.TCP,
    v6only: bool | None = None,
    inode: int | None = None,
    netns: str = HOST_NETNS,
    container: str = "",
) -> Socket:
    return Socket(
        protocol,
        address,
        port,
        6 if ":" in address else 4,
        v6only,
        port if inode is None else inode,
        netns=netns,
        container=container,
    )


def listener(
    address: str = "0.0.0.0",
    port: int = 5000,
    *,
    process: str | ProcessInfo = "python3",
    pid: int | None = 100,
    cmdline: tuple[str, ...] = (),
    protocol: Protocol = Protocol.TCP,
    v6only: bool | None = None,
    netns: str = HOST_NETNS,
    container: str = "",
    service: str = "",
    hosts: tuple[HostAddress, ...] = HOSTS,
    exposure: Exposure | None = None,
    firewall: Firewall | None = None,
    effective: Exposure | None = None,
) -> Listener:
    """A classified listener; scope and exposure follow from the address and `hosts`."""
    s = sock(address, port, protocol, v6only, netns=netns, container=container)
    owner = (
        process
        if isinstance(process, ProcessInfo)
        else ProcessInfo(pid=pid, name=process if pid is not None else "unknown", cmdline=cmdline)
    )
    return Listener(
        socket=s,
        process=owner,
        scope=scope_of(address),
        exposure=exposure if exposure is not None else exposure_of(s, hosts),
        service=service,
        firewall=firewall,
        effective=effective,
    )


def spec(
    name: str = "web",
    port: int = 5000,
    expose: Exposure = Exposure.PRIVATE,
    process: str | None = None,
    protocol: Protocol = Protocol.TCP,
    **kw,
) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        port=port,
        protocol=protocol,
        expose=expose,
        process=re.compile(process) if process else None,
        **kw,
    )


def snapshot(
    verdicts: tuple[Verdict, ...] = (),
    listeners: tuple[Listener, ...] = (),
    unexpected: tuple[Listener, ...] = (),
    host_addresses: tuple[HostAddress, ...] = HOSTS,
    **kw,
) -> Snapshot:
    return Snapshot(
        timestamp=kw.pop("timestamp", 0.0),
        duration=kw.pop("duration", 0.0),
        success=kw.pop("success", True),
        verdicts=verdicts,
        listeners=listeners,
        unexpected=unexpected,
        host_addresses=host_addresses,
        **kw,
    )
