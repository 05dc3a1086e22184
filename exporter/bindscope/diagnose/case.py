"""A diagnose target resolved against the config, and the Case built from one scan."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from bindscope.config.load import Config
from bindscope.diagnose.programs import Culprit, read_source, recognize
from bindscope.diagnose.settings import Files, locate, master
from bindscope.diagnose.steps import Case, Diagnosis, diagnose
from bindscope.judge import judge
from bindscope.model import (
    HOST_NETNS,
    Exposure,
    Listener,
    Protocol,
    ServiceSpec,
    Snapshot,
)
from bindscope.netfilter.ruleset import Ruleset


def culprits_of(listeners: Iterable[Listener], port_of_interest: int = 0) -> dict[int, Culprit]:
    """What program holds each socket, by pid (reads Python main scripts)."""
    found: dict[int, Culprit] = {}
    for lst in listeners:
        p = lst.process
        if p.pid is None or p.pid in found:
            continue
        port = port_of_interest or lst.socket.port
        culprit = recognize(p, read_source(p), port)
        if culprit is not None:
            owner = master(p) if culprit.kind == "nginx" else p
            settings = locate(culprit.kind, owner, port, Files.of(owner))
            found[p.pid] = dataclasses.replace(culprit, settings=settings)
    return found


class TargetError(ValueError):
    pass


def resolve_target(target: str, config: Config) -> tuple[int, tuple[ServiceSpec, ...], bool]:
    """The port, the services to judge it by, and whether they are declared.

    A service name wins over a port number (a service may be named "8080"). An undeclared
    port is judged against the default expectation, private, for TCP and UDP.
    """
    for spec in config.services:
        if spec.name == target:
            return spec.port, (spec,), True
    if not target.isdigit():
        names = ", ".join(s.name for s in config.services) or "none"
        raise TargetError(
            f"{target!r} is neither a port nor a service of {config.source} (services: {names})"
        )
    port = int(target)
    if not 1 <= port <= 65535:
        raise TargetError(f"{port} is not a port (1-65535)")
    declared = tuple(
        s
        for s in config.services
        if s.port == port and s.netns in (None, HOST_NETNS) and s.container is None
    )
    if declared:
        return port, declared, True
    return (
        port,
        tuple(
            ServiceSpec(
                name=f"{port}/{proto.value}", port=port, protocol=proto, expose=Exposure.PRIVATE
            )
            for proto in Protocol
        ),
        False,
    )


def build_case(port: int, snap: Snapshot, declared: bool, probed: bool) -> Case:
    verdicts = snap.verdicts
    if not declared:
        # the default expectation is judged only for the protocols something listens on
        verdicts = tuple(v for v in verdicts if v.listening) or verdicts[:1]
    listeners = tuple(
        lst
        for lst in snap.listeners
        if lst.socket.port == port and (lst.socket.netns == HOST_NETNS or lst.service)
    )
    published = tuple(p for p in snap.published if p.host_port == port)
    inside = [lst for p in published for lst in p.listeners]
    return Case(
        port=port,
        verdicts=verdicts,
        declared=declared,
        listeners=listeners,
        addresses=snap.host_addresses,
        culprits={**culprits_of(inside), **culprits_of(listeners, port)},
        probed=probed,
        published=published,
    )


def diagnosis_of(
    target: str,
    snap: Snapshot,
    config: Config,
    probed: bool,
    rulesets: Mapping[str, tuple[Ruleset | None, str]] | None = None,
) -> Diagnosis:
    """Diagnose a port or service from a scan already made (the exporter's latest);
    `rulesets`, when read, let the firewall step name the rule and the command."""
    port, specs, declared = resolve_target(target, config)
    names = {s.name for s in specs}
    own = tuple(v for v in snap.verdicts if v.service.name in names)
    if not declared:
        # an undeclared port was not judged by the scan: judge it now, as the tool does
        verdicts, _ = judge(specs, [lst for lst in snap.listeners if lst.socket.port == port])
        own = verdicts
    case = build_case(port, dataclasses.replace(snap, verdicts=own), declared, probed)
    if rulesets is not None:
        case = dataclasses.replace(case, rulesets=rulesets)
    return diagnose(case)
