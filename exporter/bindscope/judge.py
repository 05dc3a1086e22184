"""Declared services + classified listeners -> one verdict per service. Pure functions.

When several things are wrong at once the most severe status wins (Status.severity):
overexposed, loopback_only, blocked, wrong_process, process_unknown; not_listening
excludes the others. Over-exposure is judged on what really reaches the socket (bind
scope and firewall together); a wide bind narrowed by the firewall alone is not an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence

from bindscope.classify import accepts_on, loopback_only
from bindscope.config.load import IgnoreRule
from bindscope.model import (
    HOST_NETNS,
    Exposure,
    Listener,
    Protocol,
    Published,
    PublishedPort,
    PublishedStatus,
    ServiceSpec,
    Status,
    Verdict,
)

OWN_SERVICE = "bindscope"


def located(spec: ServiceSpec, listener: Listener) -> bool:
    """Whether the listener lives where the service says it does (host by default)."""
    sock = listener.socket
    if spec.container is not None:
        return bool(sock.container) and spec.container.search(sock.container) is not None
    return sock.netns == (spec.netns or HOST_NETNS)


def status_of(spec: ServiceSpec, listeners: Sequence[Listener]) -> tuple[Status, Exposure]:
    """The verdict for one service given the listeners it claims, and its bind exposure."""
    if not listeners:
        return Status.NOT_LISTENING, Exposure.NONE
    exposure = max(lst.exposure for lst in listeners)
    effective = max(lst.effective_exposure for lst in listeners)
    # expected public: anything goes; a host with only private addresses behind a
    # 1:1 NAT serves the public from a private exposure, so narrower is not an error
    if effective > spec.expose:
        return Status.OVEREXPOSED, exposure
    if spec.expose > Exposure.LOOPBACK and exposure is Exposure.LOOPBACK:
        return Status.LOOPBACK_ONLY, exposure
    if spec.expose > Exposure.LOOPBACK and effective is Exposure.LOOPBACK:
        return Status.BLOCKED, exposure
    if spec.process is not None:
        known = [lst for lst in listeners if lst.process.known]
        if any(spec.process.search(lst.process.name) is None for lst in known):
            return Status.WRONG_PROCESS, exposure
        if not known:
            return Status.PROCESS_UNKNOWN, exposure
    return Status.OK, exposure


def judge(
    services: Iterable[ServiceSpec],
    listeners: Iterable[Listener],
    own: Collection[tuple[str, int]] = (),
) -> tuple[tuple[Verdict, ...], tuple[Listener, ...]]:
    """Verdicts for the services, and every listener labelled with its service.

    `own` holds the (address, port) of the exporter's TCP listeners in the host's
    namespace: they are labelled `bindscope` and never count as unexpected.
    """
    specs = tuple(services)
    labelled: list[Listener] = []
    claimed: dict[str, list[Listener]] = {s.name: [] for s in specs}
    # by port and protocol, in declaration order: a scan is O(listeners), not
    # O(listeners x services), and the first declared match still wins
    candidates: dict[tuple[int, Protocol], list[ServiceSpec]] = {}
    for spec in specs:
        candidates.setdefault((spec.port, spec.protocol), []).append(spec)
    for lst in listeners:
        name = ""
        for spec in candidates.get((lst.socket.port, lst.socket.protocol), ()):
            if located(spec, lst):
                name = spec.name
                break
        else:
            sock = lst.socket
            if (
                sock.protocol is Protocol.TCP
                and sock.netns == HOST_NETNS
                and (sock.address, sock.port) in own
            ):
                name = OWN_SERVICE
        if name:
            lst = dataclasses.replace(lst, service=name)
            if name in claimed:
                claimed[name].append(lst)
        labelled.append(lst)
    verdicts = []
    for spec in specs:
        mine = tuple(claimed[spec.name])
        status, exposure = status_of(spec, mine)
        effective = max((lst.effective_exposure for lst in mine), default=Exposure.NONE)
        verdicts.append(
            Verdict(
                service=spec,
                status=status,
                exposure=exposure,
                listeners=mine,
                effective=effective,
            )
        )
    return tuple(verdicts), tuple(labelled)


def unexpected(listeners: Iterable[Listener], ignore: Sequence[IgnoreRule]) -> tuple[Listener, ...]:
    """Undeclared listeners reachable beyond loopback that no ignore rule covers."""
    return tuple(
        lst
        for lst in listeners
        if not lst.service
        and lst.exposure > Exposure.LOOPBACK
        and not any(rule.matches(lst) for rule in ignore)
    )


@dataclasses.dataclass(frozen=True)
class Owner:
    """The namespace that holds a published port's target address."""

    netns: str  # its label
    container: str
    interface: str = ""  # the device the address is on: where forwarded packets arrive


def judge_published(
    ports: Iterable[PublishedPort],
    owners: Mapping[str, Owner],
    listeners: Sequence[Listener],
) -> tuple[Published, ...]:
    """A verdict for each published port whose target lives in a namespace on this host.

    `owners` maps a namespace's address to its Owner. Targets on other hosts (a
    NodePort's pods elsewhere) are not ours to judge and are left out.
    """
    out = []
    for p in ports:
        owner = owners.get(p.target_address)
        if owner is None:
            continue
        netns, container = owner.netns, owner.container
        inside = tuple(
            lst
            for lst in listeners
            if lst.socket.netns == netns
            and lst.socket.protocol.value == p.protocol
            and lst.socket.port == p.target_port
        )
        if any(accepts_on(lst.socket, p.target_address, owner.interface) for lst in inside):
            status = PublishedStatus.OK
        elif inside and all(loopback_only(lst.socket) for lst in inside):
            status = PublishedStatus.LOOPBACK_ONLY
        else:
            status = PublishedStatus.NOT_LISTENING
        out.append(
            Published(
                protocol=Protocol(p.protocol),
                host_address=p.host_address,
                host_port=p.host_port,
                target_address=p.target_address,
                target_port=p.target_port,
                status=status,
                netns=netns,
                container=container,
                listeners=inside,
            )
        )
    return tuple(out)
