"""`bindscope diagnose`: the classic troubleshooting as data (findings and fixes), from one scan.

Everything here is pure except `read_source`, which reads a Python process's main script.
A diagnosis is a list of steps, each a function Case -> Finding; a later concern (a
published port followed into its container, the firewall rule that drops it) is one more
step in STEPS, and the last finding gathers every step's fixes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bindscope.classify import accepts_on, reachable_addresses
from bindscope.diagnose.fixes import (
    Fix,
    advice,
    bind_change,
    firewall_fix,
    narrow_host,
    widen_host,
)
from bindscope.diagnose.programs import Culprit
from bindscope.model import (
    HOST_NETNS,
    Exposure,
    Firewall,
    HostAddress,
    Listener,
    ProbeResult,
    Protocol,
    Published,
    PublishedStatus,
    Scope,
    Status,
    Verdict,
)
from bindscope.netfilter.evaluate import evaluate
from bindscope.netfilter.ruleset import Decision, Ruleset

FIREWALL_CHECK = "a firewall may drop it: check with `nft list ruleset` / `iptables -S`"


# --- the case and its findings ---


@dataclass(frozen=True)
class Finding:
    title: str
    lines: tuple[str, ...] = ()
    fixes: tuple[Fix, ...] = ()
    problem: bool = False
    step: str = ""  # the step's name in the --json document: listening, addresses, ...


@dataclass(frozen=True)
class Case:
    """The facts one diagnosis works from, all gathered by a single scan."""

    port: int
    verdicts: tuple[Verdict, ...]  # declared services on the port, or the default expectation
    declared: bool
    listeners: tuple[Listener, ...]  # every socket on the port, both protocols
    addresses: tuple[HostAddress, ...]
    culprits: Mapping[int, Culprit] = field(default_factory=dict)  # by pid
    probed: bool = True
    published: tuple[Published, ...] = ()  # NAT rules forwarding this host port inward
    # netns label -> its packet filter, or None and why it could not be read;
    # a namespace missing here was not read (the scan's verdict is all there is)
    rulesets: Mapping[str, tuple[Ruleset | None, str]] = field(default_factory=dict)

    def culprit(self, listener: Listener) -> Culprit | None:
        pid = listener.process.pid
        return self.culprits.get(pid) if pid is not None else None


@dataclass(frozen=True)
class Diagnosis:
    port: int
    subject: str  # "port 5000 (undeclared; ...)" or "service web (5000/tcp, ...)"
    findings: tuple[Finding, ...]
    statuses: tuple[str, ...] = ()  # each judged service's status, in order

    @property
    def problem(self) -> bool:
        return any(f.problem for f in self.findings)

    @property
    def fixes(self) -> tuple[Fix, ...]:
        return self.findings[-1].fixes if self.findings else ()


# a step that has nothing to say about this case (no published port) returns None
Step = Callable[[Case], Finding | None]


def _where(lst: Listener) -> str:
    s = lst.socket
    if s.container:
        return f" (container {s.container}, netns {s.netns})"
    return f" (netns {s.netns})" if s.netns != HOST_NETNS else ""


def _addr(lst: Listener) -> str:
    a = lst.socket.address
    return f"[{a}]:{lst.socket.port}" if ":" in a else f"{a}:{lst.socket.port}"


def step_listening(case: Case) -> Finding:
    lines = []
    for proto in Protocol:
        mine = [lst for lst in case.listeners if lst.socket.protocol is proto]
        if mine:
            n = len(mine)
            lines.append(f"{proto.value}: yes, {n} socket{'s' if n > 1 else ''}")
        else:
            lines.append(f"{proto.value}: nothing")
    return Finding(
        f"Is anything listening on port {case.port}?", tuple(lines), problem=not case.listeners
    )


_SCOPE_WORDS = {
    Scope.LOOPBACK: "loopback: only this host can connect",
    Scope.LINK_LOCAL: "link-local: only hosts on the same link",
    Scope.PRIVATE: "a private address: hosts on that network",
    Scope.PUBLIC: "a public address: anyone who can route to it",
}


def _scope_text(lst: Listener) -> str:
    s = lst.socket
    if lst.scope is not Scope.WILDCARD:
        return _SCOPE_WORDS[lst.scope]
    if s.family == 4:
        return f"wildcard: every IPv4 address of the host (exposure {lst.exposure.value})"
    if s.v6only:
        return f"wildcard, v6only on: every IPv6 address, no IPv4 (exposure {lst.exposure.value})"
    how = "v6only off" if s.v6only is False else "v6only unknown, taken as off"
    return f"wildcard, {how}: every IPv6 and IPv4 address (exposure {lst.exposure.value})"


def _firewall_text(lst: Listener) -> str:
    if lst.firewall is Firewall.DROP:
        return "; the firewall drops other hosts"
    if lst.firewall is Firewall.UNKNOWN:
        return "; the firewall's verdict is unknown"
    return ""


def step_addresses(case: Case) -> Finding:
    if not case.listeners:
        return Finding("On which addresses?", ("none",))
    lines = tuple(
        f"{lst.socket.protocol.value} {_addr(lst)}{_where(lst)}: {_scope_text(lst)}"
        + _firewall_text(lst)
        for lst in case.listeners
    )
    return Finding("On which addresses?", lines)


def step_processes(case: Case) -> Finding:
    lines = []
    seen: set[int | None] = set()
    for lst in case.listeners:
        p = lst.process
        if p.pid in seen:
            continue
        seen.add(p.pid)
        if not p.known:
            lines.append(
                f"{_addr(lst)}: owner unknown (reading other users' processes "
                "needs root or CAP_SYS_PTRACE)"
            )
            continue
        cmd = " ".join(p.cmdline) or p.name
        lines.append(f"pid {p.pid} {p.name}: {cmd}")
        c = case.culprit(lst)
        if c and c.line:
            lines.append(f"  recognised: {c.label}: `{c.call}` at {c.script} line {c.line}")
        elif c:
            lines.append(
                f"  recognised: {c.label} ({c.evidence})"
                if c.evidence
                else f"  recognised: {c.label}"
            )
    return Finding("Which process, with which command line?", tuple(lines) or ("none",))


def probe_word(p: ProbeResult) -> str:
    if p.success:
        return "ok"
    return {"ECONNREFUSED": "refused", "timeout": "timeout"}.get(p.error, p.error.lower())


def unexpected_failures(case: Case, v: Verdict) -> list[ProbeResult]:
    """Probes that failed on an address a listener of the service does accept."""
    tcp = [lst for lst in v.listeners if lst.socket.protocol is Protocol.TCP]
    return [
        p
        for p in v.probes
        if not p.success and any(accepts_on(lst.socket, p.address) for lst in tcp)
    ]


def step_probes(case: Case) -> Finding:
    title = "Can it be reached on each of the host's addresses? (a TCP connect, as telnet does)"
    probed = [v for v in case.verdicts if v.probes]
    if not probed:
        why = (
            "probing is disabled"
            if not case.probed
            else "only TCP services in the host's namespace are probed"
        )
        return Finding(title, (f"not probed: {why}",))
    lines: list[str] = []
    fixes: list[Fix] = []
    problem = False
    for v in probed:
        width = max(len(p.address) for p in v.probes)
        tcp = [lst for lst in v.listeners if lst.socket.protocol is Protocol.TCP]
        failed = unexpected_failures(case, v)
        for p in v.probes:
            text = f"{p.address:<{width}}  {probe_word(p)}"
            if p.success:
                text += f" ({p.duration * 1000:.1f} ms)"
            elif tcp and p in failed:
                text += " although a socket is bound to it"
            elif tcp:
                text += " (nothing is bound to this address)"
            lines.append(text)
        # NAT sends the connect into a container: the published-port step explains it
        forwarded = any(p.status is not PublishedStatus.OK for p in case.published)
        if failed and not forwarded:
            problem = True
            names = ", ".join(p.address for p in failed)
            fixes.append(
                advice(f"it listens on {names} but connecting there fails: {FIREWALL_CHECK}")
            )
    return Finding(title, tuple(lines), tuple(fixes), problem)


def _culprits_of(case: Case, v: Verdict) -> list[Culprit | None]:
    found = list(dict.fromkeys(case.culprit(lst) for lst in v.listeners))
    return found or [None]


def _meaning(case: Case, v: Verdict) -> tuple[list[str], list[Fix]]:
    spec = v.service
    declared = "Declared" if case.declared else "Expected (by default)"
    port = f"{spec.port}/{spec.protocol.value}"
    addrs = ", ".join(dict.fromkeys(lst.socket.address for lst in v.listeners))
    st = v.status
    if st is Status.NOT_LISTENING:
        other = [lst for lst in case.listeners if lst.socket.protocol is not spec.protocol]
        lines = [f'Nothing accepts on {port}: a client anywhere gets "connection refused".']
        if other:
            lines.append(
                f"Something listens on port {spec.port} with another protocol: "
                f"{other[0].socket.protocol.value}."
            )
        return lines, [
            advice(
                f"start the service and check that it is configured for port "
                f"{spec.port} ({spec.protocol.value})"
            )
        ]
    if st is Status.LOOPBACK_ONLY:
        host = widen_host(spec.expose, case.addresses)
        # a published port's local connects go on into its container (step above)
        here = "" if case.published else f": `curl localhost:{spec.port}` works on this host"
        lines = [
            f"It listens on loopback only ({addrs}){here}, but a client on another host "
            'gets "connection refused".',
            f"{declared} {spec.expose.value}: it must listen on an address other hosts reach.",
        ]
        fixes = [f for c in _culprits_of(case, v) for f in bind_change(c, spec.port, host)]
        return lines, fixes
    if st is Status.OVEREXPOSED:
        host = narrow_host(spec.expose, case.addresses)
        who = (
            "anyone who can route to this host"
            if v.exposure is Exposure.PUBLIC
            else "every host on the private networks this host is on"
        )
        lines = [f"{declared} {spec.expose.value}, but it listens on {addrs}, reachable by {who}."]
        fixes = [f for c in _culprits_of(case, v) for f in bind_change(c, spec.port, host)]
        return lines, fixes
    if st is Status.BLOCKED:
        # with the ruleset read, step_firewall names the rule and the command instead
        read = case.rulesets.get(HOST_NETNS, (None, ""))[0] is not None
        return (
            [
                f"It listens on {addrs}, wide enough, but the host's packet filter drops new "
                "connections from other hosts on every address: they time out."
            ],
            []
            if read
            else [advice(f"the listener is fine, the firewall is not: {FIREWALL_CHECK}")],
        )
    if st is Status.WRONG_PROCESS:
        names = ", ".join(dict.fromkeys(lst.process.name for lst in v.listeners))
        pattern = spec.process.pattern if spec.process else ""
        return (
            [
                f"It is reachable as declared, but held by {names}, not a process matching "
                f"/{pattern}/: clients talk to the wrong program."
            ],
            [
                advice(
                    f"stop {names} and start the intended service, or correct `process:` "
                    "in the config"
                )
            ],
        )
    if st is Status.PROCESS_UNKNOWN:
        return (
            [
                "It is reachable as declared; its owner could not be read, so `process:` "
                "is not checked."
            ],
            [advice("run bindscope as root or with CAP_SYS_PTRACE")],
        )
    effective = v.effective or v.exposure
    reach = {
        Exposure.LOOPBACK: "only this host",
        Exposure.PRIVATE: "hosts on its private networks",
        Exposure.PUBLIC: "any host that can route to it",
    }[effective]
    lines = [f"A client can connect from {reach}: {declared.lower()} {spec.expose.value}."]
    if v.exposure > Exposure.LOOPBACK:
        lines.append(_filter_words(v))
    db = [c for c in _culprits_of(case, v) if c and c.database]
    if db and not case.declared and effective > Exposure.LOOPBACK:
        lines.append(
            f"{db[0].label} is usually for this host only: if so, declare it "
            "expose: loopback and bind it to 127.0.0.1."
        )
    return lines, []


def _filter_words(v: Verdict) -> str:
    """What the scan's firewall verdicts say about other hosts, for a wide listener."""
    verdicts = {lst.firewall for lst in v.listeners if lst.exposure > Exposure.LOOPBACK}
    if verdicts == {Firewall.DROP}:
        return (
            "The firewall drops new connections from other hosts on every address it listens "
            "on (the firewall step names the rule): only this host gets in."
        )
    if verdicts == {Firewall.ACCEPT}:
        return "The firewall lets other hosts in (the firewall step names the rule)."
    if verdicts == {Firewall.DROP, Firewall.ACCEPT}:
        return (
            "The firewall drops other hosts on some of its addresses and lets them in on "
            "others (the firewall step names the rules)."
        )
    return (
        "Not seen from here: a firewall may still drop other hosts (the probe "
        "enters through lo): check with `nft list ruleset` / `iptables -S`."
    )


def step_meaning(case: Case) -> Finding:
    lines: list[str] = []
    fixes: list[Fix] = []
    problem = False
    for v in case.verdicts:
        spec = v.service
        head = (
            f"{spec.name}: {v.status.value}"
            if case.declared
            else f"{spec.port}/{spec.protocol.value}: {v.status.value}"
        )
        text, fix = _meaning(case, v)
        lines.append(head)
        lines.extend(f"  {t}" for t in text)
        fixes.extend(fix)
        problem = problem or v.status is not Status.OK
    return Finding(
        "What does that mean for a client on another host?",
        tuple(lines),
        tuple(dict.fromkeys(fixes)),
        problem,
    )


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def step_published(case: Case) -> Finding | None:
    """A published port followed into its container: the target, what listens there, the fix."""
    if not case.published:
        return None
    lines: list[str] = []
    fixes: list[Fix] = []
    problem = False
    for p in case.published:
        where = f"container {p.container}" if p.container else f"netns {p.netns}"
        target = f"{_bracket(p.target_address)}:{p.target_port}"
        lines.append(
            f"{p.protocol.value} {_bracket(p.host_address)}:{p.host_port} is forwarded (NAT) "
            f"to {target} in {where}"
        )
        for lst in p.listeners:
            scope = (
                f"loopback: only processes in {where} can connect"
                if lst.scope is Scope.LOOPBACK
                else _scope_text(lst)
            )
            lines.append(f"  inside: {_addr(lst)}: {scope}")
            proc = lst.process
            if proc.known:
                cmd = " ".join(proc.cmdline) or proc.name
                lines.append(f"    pid {proc.pid} {proc.name}: {cmd}")
                c = case.culprit(lst)
                if c:
                    lines.append(f"    recognised: {c.label}")
            else:
                lines.append("    owner unknown (needs root or CAP_SYS_PTRACE)")
        if p.probe is not None:
            lines.append(f"  a connect from the host to {target}: {probe_word(p.probe)}")
        wide = "::" if ":" in p.target_address else "0.0.0.0"
        if p.status is PublishedStatus.LOOPBACK_ONLY:
            problem = True
            lines.append(
                f"  {p.status.value}: forwarded connections arrive on {p.target_address}, but "
                f"inside {where} the app listens on loopback only: every client of port "
                f"{p.host_port} fails to connect, though the host shows it listening"
            )
            culprits = dict.fromkeys(case.culprit(lst) for lst in p.listeners) or {None: None}
            fixes += [
                dataclasses.replace(fix, summary=f"inside {where}: {fix.summary}")
                for c in culprits
                for fix in bind_change(c, p.target_port, wide)
            ]
        elif p.status is PublishedStatus.NOT_LISTENING:
            problem = True
            lines.append(
                f"  {p.status.value}: nothing accepts on {target} inside {where}: "
                f"clients of port {p.host_port} are refused"
            )
            fixes.append(
                advice(
                    f"inside {where}: start the app and make it listen on {wide} port "
                    f"{p.target_port} ({p.protocol.value})"
                )
            )
        elif p.probe is not None and not p.probe.success:
            problem = True
            fixes.append(
                advice(f"it listens on {target} in {where}, the connect fails: {FIREWALL_CHECK}")
            )
        else:
            lines.append(f"  {p.status.value}: the app inside accepts on {target}")
    return Finding(
        f"Where does published port {case.port} lead? (NAT into a container)",
        tuple(lines),
        tuple(dict.fromkeys(fixes)),
        problem,
    )


BY_HAND = "check by hand, as root: `nft list ruleset` / `iptables -S`"


def deciding_rule(d: Decision) -> str:
    """The rule (or chain policy) that decided, as `nft -a list ruleset` shows it."""
    if not d.chain:
        return "no packet filter on the input path" if d.rule == "no filter" else d.rule
    who = d.manager or (d.backend if d.backend not in ("", "nft") else "")
    by = f" (written by {who})" if who else ""
    where = f"table {d.family} {d.table}, chain {d.chain}"
    if d.handle is None:
        return f"{where}: {d.rule}{by}"
    return f"{where}, handle {d.handle}: `{d.rule}`{by}"


def _verdict_of(case: Case, lst: Listener) -> Verdict | None:
    for v in case.verdicts:
        if lst in v.listeners:
            return v
    return next((v for v in case.verdicts if v.service.protocol is lst.socket.protocol), None)


def step_firewall(case: Case) -> Finding | None:
    """For each host address a socket accepts on beyond loopback: the filter's verdict
    for a new connection from another host, the rule that gives it, and what to run."""
    title = "Does the firewall let other hosts in?"
    outside = tuple(a for a in case.addresses if a.scope is not Scope.LOOPBACK)
    wide = [
        lst
        for lst in case.listeners
        if lst.socket.netns == HOST_NETNS and reachable_addresses(lst.socket, outside)
    ]
    elsewhere = [
        f"{lst.socket.protocol.value} {_addr(lst)}{_where(lst)}: the scan's verdict: "
        f"{lst.firewall.value} (rules are named for this namespace only)"
        for lst in case.listeners
        if lst.socket.netns != HOST_NETNS and lst.firewall is not None
    ]
    if not wide:
        # loopback traffic is never filtered here: nothing to say unless elsewhere
        return Finding(title, tuple(elsewhere)) if elsewhere else None
    ruleset, error = case.rulesets.get(HOST_NETNS, (None, ""))
    if ruleset is None:
        why = f"could not be read: {error}" if error else "was not read"
        return Finding(
            title, (f"the firewall {why} (reading it needs CAP_NET_ADMIN)", BY_HAND, *elsewhere)
        )
    lines: list[str] = []
    fixes: list[Fix] = []
    problem = False
    seen: set[tuple[str, str]] = set()
    interfaces = tuple({a.interface for a in outside} - {"lo", ""})
    # per protocol: the service it belongs to and one decision per address family
    families: dict[str, tuple[Verdict | None, dict[int, Decision]]] = {}
    for lst in wide:
        v = _verdict_of(case, lst)
        expose = v.service.expose if v else Exposure.PRIVATE
        proto = lst.socket.protocol.value
        per_family = families.setdefault(proto, (v, {}))[1]
        for a in reachable_addresses(lst.socket, outside):
            if (proto, a.address) in seen:
                continue
            seen.add((proto, a.address))
            ifaces = (lst.socket.device,) if lst.socket.device else interfaces
            d = evaluate(ruleset, proto, a.family, a.address, case.port, interfaces=ifaces)
            per_family.setdefault(a.family, d)
            rule = deciding_rule(d)
            head = f"{proto} {a.address}:"
            if d.verdict is Firewall.ACCEPT:
                if d.restricted:
                    lines.append(f"{head} only some hosts get in ({d.reason}): {rule}")
                else:
                    # for a loopback service the firewall is no suspect but a missing guard
                    verdict = (
                        "ruled out as the cause"
                        if expose > Exposure.LOOPBACK
                        else "nothing but the bind keeps them out"
                    )
                    lines.append(
                        f"{head} the firewall accepts new connections from other hosts on "
                        f"{a.address}: {verdict} ({rule})"
                    )
            elif d.verdict is Firewall.DROP:
                lines.append(f"{head} the firewall drops other hosts: {rule}")
                if expose is Exposure.LOOPBACK:
                    lines.append(
                        "  protected by the firewall alone: bind it to loopback as well, "
                        "so it does not depend on this rule"
                    )
                elif v is None or v.status is not Status.BLOCKED:
                    opening = firewall_fix([(a.family, d)], ruleset, proto, case.port, allow=True)
                    if opening:
                        shown = " && ".join(opening.commands)
                        lines.append(
                            f"  other hosts get in on other addresses; to open this one: `{shown}`"
                        )
            else:
                lines.append(f"{head} undecided: {d.reason} ({rule}); {BY_HAND}")
    for proto, (v, per_family) in families.items():
        decisions = sorted(per_family.items())
        fix = None
        if v is not None and v.status is Status.BLOCKED:
            fix = firewall_fix(decisions, ruleset, proto, case.port, allow=True)
        elif (
            v is not None
            and v.status is Status.OVEREXPOSED
            and v.service.expose is Exposure.LOOPBACK
        ):
            fix = firewall_fix(decisions, ruleset, proto, case.port, allow=False)
            if fix:
                fix = dataclasses.replace(fix, summary="or, as well, " + fix.summary)
        if fix:
            fixes.append(fix)
            problem = True
    return Finding(title, (*lines, *elsewhere), tuple(dict.fromkeys(fixes)), problem)


STEPS: tuple[Step, ...] = (
    step_listening,
    step_addresses,
    step_processes,
    step_probes,
    step_published,
    step_meaning,
    step_firewall,
)


def subject(case: Case) -> str:
    if case.declared:
        return ", ".join(
            f"service {v.service.name} ({v.service.port}/"
            f"{v.service.protocol.value}, expose {v.service.expose.value})"
            for v in case.verdicts
        )
    return f"port {case.port} (undeclared: expected private, the default)"


def diagnose(case: Case, steps: tuple[Step, ...] = STEPS) -> Diagnosis:
    """Run each step; the last finding gathers their fixes."""
    findings = [
        dataclasses.replace(f, step=f.step or step.__name__.removeprefix("step_"))
        for f, step in ((step(case), step) for step in steps)
        if f is not None
    ]
    fixes = tuple(dict.fromkeys(f for finding in findings for f in finding.fixes))
    if fixes:
        lines = tuple(f.summary for f in fixes)
    elif any(f.problem for f in findings):
        lines = ("see the findings above",)
    else:
        lines = ("nothing: it is reachable as expected",)
    final = Finding("What to change", lines, fixes, step="fixes")
    statuses = tuple(dict.fromkeys(v.status.value for v in case.verdicts))
    return Diagnosis(case.port, subject(case), (*findings, final), statuses)
