"""Declared services + classified listeners -> one verdict per service. Pure functions.

Precedence when several things are wrong at once: not_listening, then overexposed (a
security problem outranks an availability one), loopback_only, wrong_process,
process_unknown, ok.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence

from bindscope.config import IgnoreRule
from bindscope.model import (
    HOST_NETNS,
    Exposure,
    Listener,
    Protocol,
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


def claims(spec: ServiceSpec, listener: Listener) -> bool:
    sock = listener.socket
    return sock.port == spec.port and sock.protocol is spec.protocol and located(spec, listener)


def status_of(spec: ServiceSpec, listeners: Sequence[Listener]) -> tuple[Status, Exposure]:
    """The verdict for one service given the listeners it claims."""
    if not listeners:
        return Status.NOT_LISTENING, Exposure.NONE
    exposure = max(lst.exposure for lst in listeners)
    # expected public: anything goes; a host with only private addresses behind a
    # 1:1 NAT serves the public from a private exposure, so narrower is not an error
    if exposure > spec.expose:
        return Status.OVEREXPOSED, exposure
    if spec.expose > Exposure.LOOPBACK and exposure is Exposure.LOOPBACK:
        return Status.LOOPBACK_ONLY, exposure
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
    for lst in listeners:
        name = ""
        for spec in specs:
            if claims(spec, lst):
                name = spec.name
                claimed[name].append(lst)
                break
        else:
            sock = lst.socket
            if (
                sock.protocol is Protocol.TCP
                and sock.netns == HOST_NETNS
                and (sock.address, sock.port) in own
            ):
                name = OWN_SERVICE
        labelled.append(dataclasses.replace(lst, service=name) if name else lst)
    verdicts = []
    for spec in specs:
        mine = tuple(claimed[spec.name])
        status, exposure = status_of(spec, mine)
        verdicts.append(Verdict(service=spec, status=status, exposure=exposure, listeners=mine))
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
