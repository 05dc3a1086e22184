"""`bindscope diagnose`: the seed's troubleshooting as data (findings and fixes), from one scan.

Everything here is pure except `read_source`, which reads a Python process's main script.
A diagnosis is a list of steps, each a function Case -> Finding; a later concern (a
published port followed into its container, the firewall rule that drops it) is one more
step in STEPS, and the last finding gathers every step's fixes.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bindscope.classify import accepted_families, reachable_addresses, scope_of
from bindscope.diagnose.fixes import closing_command, opening_command
from bindscope.model import (
    HOST_NETNS,
    Exposure,
    Firewall,
    HostAddress,
    Listener,
    ProbeResult,
    ProcessInfo,
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
MAX_SOURCE = 256 * 1024  # a main script larger than this is not read for app.run()


# --- culprits: what program holds the port, from its command line ---


@dataclass(frozen=True)
class Culprit:
    """A recognised program; `kind` picks the bind-address fix."""

    kind: str
    label: str  # "Flask development server", for people
    evidence: str = ""  # how it was recognised
    script: str = ""  # the Python main script, when the fix is in its code
    line: int = 0  # the line of the run() call in `script`
    call: str = ""  # that line's text, stripped
    var: str = "app"  # the object whose run() is called; gunicorn's module:VAR
    app: str = ""  # module:app as gunicorn/uvicorn were given it

    @property
    def database(self) -> bool:
        return self.kind in _DATABASES


_DATABASES = {"redis", "mysql", "postgres", "memcached", "mongod", "elasticsearch"}
_LABELS = {
    "flask": "Flask development server",
    "flask-cli": "Flask development server (flask run)",
    "django": "Django development server (runserver)",
    "gunicorn": "gunicorn",
    "uvicorn": "uvicorn",
    "jupyter": "Jupyter",
    "http.server": "Python http.server",
    "node": "Node.js server",
    "next": "Next.js server",
    "vite": "Vite dev server",
    "redis": "Redis",
    "mysql": "MySQL/MariaDB",
    "postgres": "PostgreSQL",
    "memcached": "memcached",
    "mongod": "MongoDB",
    "elasticsearch": "Elasticsearch",
    "bindscope": "bindscope-exporter",
    "publisher": "a container runtime's port publisher",
}
# the program's own name (comm or argv[0]'s basename) alone says what it is
_BY_NAME = {
    "redis-server": "redis",
    "mysqld": "mysql",
    "mariadbd": "mysql",
    "postgres": "postgres",
    "postmaster": "postgres",
    "memcached": "memcached",
    "mongod": "mongod",
    "bindscope-exporter": "bindscope",
    "bindscope-expor": "bindscope",  # comm is cut at 15 characters
    # they hold a published port on the host for the NAT rule behind it
    "conmon": "publisher",
    "docker-proxy": "publisher",
    "rootlessport": "publisher",
}
# a Python entry point (python -m X, or the console script X) and the kind it means
_PY_TOOLS = {
    "flask": "flask-cli",
    "gunicorn": "gunicorn",
    "uvicorn": "uvicorn",
    "jupyter": "jupyter",
    "jupyter-lab": "jupyter",
    "jupyter-notebook": "jupyter",
    "jupyter-server": "jupyter",
    "jupyterlab": "jupyter",
    "notebook": "jupyter",
    "http.server": "http.server",
}
_PYTHON_RE = re.compile(r"python[0-9.]*[dmu]?")
_APP_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(?:\(.*\))?")
_FLASK_IMPORT_RE = re.compile(r"^\s*(?:from\s+flask\b|import\s+flask\b)", re.M)
_RUN_CALL_RE = re.compile(r"^\s*(?!#)(?:.*?\b)?([A-Za-z_]\w*)\.run\(")
_UVICORN_RUN_RE = re.compile(r"^\s*(?!#).*\buvicorn\.run\(")
# ports whose Python owner is most likely this program, when nothing else says so
_PY_PORT_GUESS = {5000: "flask", 8888: "jupyter"}


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def python_entry(argv: tuple[str, ...]) -> tuple[str, str, tuple[str, ...]] | None:
    """For a Python command line: ("module" | "script" | "code", name, the arguments after)."""
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("-m", "-c"):
            name = argv[i + 1] if i + 1 < len(argv) else ""
            return ("module" if a == "-m" else "code"), name, argv[i + 2 :]
        if a.startswith("-m") and len(a) > 2:
            return "module", a[2:], argv[i + 1 :]
        if a in ("-W", "-X", "--check-hash-based-pycs"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return "script", a, argv[i + 1 :]
    return None


def _is_python(process: ProcessInfo) -> bool:
    argv0 = _base(process.cmdline[0]) if process.cmdline else ""
    return bool(_PYTHON_RE.fullmatch(argv0) or process.name.startswith("python"))


def _app_argument(args: tuple[str, ...]) -> str:
    """gunicorn's / uvicorn's module:app argument (not a host:port bind value)."""
    for a in args:
        if _APP_RE.fullmatch(a):
            return a
    return ""


def recognize(process: ProcessInfo, source: Source | None = None, port: int = 0) -> Culprit | None:
    """What program this is, from its name, command line and (Python) main script's text."""
    argv = process.cmdline or (process.name,)
    names = {process.name, _base(argv[0]), argv[0].split(":", 1)[0]}
    for name in names:
        kind = _BY_NAME.get(name)
        if kind:
            return Culprit(kind, _LABELS[kind], f"process name {name}")
    joined = " ".join(argv)
    if "org.elasticsearch" in joined:
        return Culprit("elasticsearch", _LABELS["elasticsearch"], "java main class")
    if any(n.startswith("gunicorn") for n in names):
        return Culprit("gunicorn", _LABELS["gunicorn"], "process name", app=_app_argument(argv[1:]))
    if process.name in ("node", "nodejs", "npm", "npx") or _base(argv[0]) in ("node", "nodejs"):
        return _node(argv)
    if _is_python(process):
        return _python(argv, source, port)
    kind = _PY_TOOLS.get(_base(argv[0]))
    if kind:
        return _python((process.name, *argv), source, port)
    return None


def _node(argv: tuple[str, ...]) -> Culprit:
    for a in argv[1:]:
        base = _base(a)
        for tool in ("next", "vite"):
            if base == tool or f"/{tool}/" in a or f"node_modules/.bin/{tool}" in a:
                return Culprit(tool, _LABELS[tool], f"command line runs {tool}")
    return Culprit("node", _LABELS["node"], "process name node")


def _python(argv: tuple[str, ...], source: Source | None, port: int) -> Culprit | None:
    entry = python_entry(argv)
    if entry is None:
        return None
    how, name, rest = entry
    tool = _base(name)
    kind = _PY_TOOLS.get(tool)
    if kind == "flask-cli" and "run" not in rest:
        kind = None
    if kind:
        return Culprit(
            kind,
            _LABELS[kind],
            f"command line runs {tool}",
            app=_app_argument(rest) if kind in ("gunicorn", "uvicorn") else "",
        )
    if tool in ("manage.py", "django-admin") and "runserver" in rest:
        return Culprit(
            "django",
            _LABELS["django"],
            f"command line runs {tool} runserver",
            script=name if how == "script" else "",
        )
    if how == "script" and source is not None:
        culprit = _from_source(source.path, source.text)
        if culprit:
            return culprit
    guess = _PY_PORT_GUESS.get(port)
    if guess:
        return Culprit(
            guess,
            _LABELS[guess],
            f"a Python process on port {port}, {_LABELS[guess]}'s default (a guess)",
        )
    return None


def _from_source(script: str, source: str) -> Culprit | None:
    lines = source.splitlines()
    if _FLASK_IMPORT_RE.search(source):
        for n, text in enumerate(lines, 1):
            m = _RUN_CALL_RE.match(text)
            if m:
                return Culprit(
                    "flask",
                    _LABELS["flask"],
                    f"{script} imports flask",
                    script=script,
                    line=n,
                    call=text.strip(),
                    var=m.group(1),
                )
        return Culprit("flask", _LABELS["flask"], f"{script} imports flask", script=script)
    for n, text in enumerate(lines, 1):
        if _UVICORN_RUN_RE.match(text):
            return Culprit(
                "uvicorn",
                _LABELS["uvicorn"],
                f"{script} calls uvicorn.run()",
                script=script,
                line=n,
                call=text.strip(),
            )
    return None


@dataclass(frozen=True)
class Source:
    """A Python process's main script: its path as resolved, and its text."""

    path: str
    text: str


def read_source(process: ProcessInfo, proc: str = "/proc") -> Source | None:
    """The main script of a Python process, when it has one and it is readable."""
    if not process.known or not _is_python(process):
        return None
    entry = python_entry(process.cmdline)
    if entry is None or entry[0] != "script":
        return None
    path = entry[1]
    try:
        if not os.path.isabs(path):
            path = os.path.join(os.readlink(f"{proc}/{process.pid}/cwd"), path)
        path = os.path.normpath(path)
        # through the process's own root: a script inside a container is found there
        with open(f"{proc}/{process.pid}/root{path}", encoding="utf-8", errors="replace") as f:
            return Source(path, f.read(MAX_SOURCE))
    except OSError:
        return None


def bind_change(culprit: Culprit | None, port: int, host: str) -> list[str]:
    """The concrete change that makes this program listen on `host` (an address)."""
    h = f"[{host}]" if ":" in host else host
    kind = culprit.kind if culprit else ""
    if kind == "flask":
        module = _base(culprit.script).removesuffix(".py") or "app"
        fixes = []
        if culprit.line:
            fixes.append(
                f"in {culprit.script} line {culprit.line}: change `{culprit.call}` to "
                f'`{culprit.var}.run(host="{host}", port={port})`'
            )
        else:
            fixes.append(f'call `app.run(host="{host}", port={port})`')
        fixes.append(
            f"or, better outside development, serve it with gunicorn: "
            f"`gunicorn -b {h}:{port} {module}:{culprit.var}` (or uWSGI: "
            f"`uwsgi --http {h}:{port} --module {module}:{culprit.var}`)"
        )
        return fixes
    if kind == "flask-cli":
        return [
            f"`flask run --host={host} --port={port}` (or set FLASK_RUN_HOST={host})",
            f"or serve it with gunicorn: `gunicorn -b {h}:{port} module:app`",
        ]
    if kind == "django":
        return [
            f"`python manage.py runserver {h}:{port}`, and add the host's name to "
            "ALLOWED_HOSTS in settings.py",
            f"or serve it with gunicorn: `gunicorn -b {h}:{port} project.wsgi`",
        ]
    if kind == "gunicorn":
        return [
            f"`gunicorn -b {h}:{port} {culprit.app or 'module:app'}` "
            f'(or bind = "{h}:{port}" in gunicorn.conf.py)'
        ]
    if kind == "uvicorn":
        if culprit.line:
            return [
                f'in {culprit.script} line {culprit.line}: pass host="{host}" to '
                f'uvicorn.run(): `uvicorn.run(app, host="{host}", port={port})`'
            ]
        return [f"`uvicorn {culprit.app or 'module:app'} --host {host} --port {port}`"]
    if kind == "jupyter":
        return [
            f"`jupyter lab --ip={host} --port={port}` (or c.ServerApp.ip = '{host}'); "
            "keep its token or password: it runs code for whoever connects"
        ]
    if kind == "http.server":
        return [f"`python3 -m http.server --bind {host} {port}`"]
    if kind == "node":
        return [
            f'`server.listen({port}, "{host}")` instead of "localhost" or "127.0.0.1" '
            '(since Node 17 "localhost" may mean ::1 only), or set the host your '
            "framework reads (HOST=" + host + ")"
        ]
    if kind == "next":
        return [f"`next start -H {host} -p {port}` (`next dev -H {host}` in development)"]
    if kind == "vite":
        return [f"`vite --host {host} --port {port}` (or server.host in vite.config)"]
    if kind == "redis":
        return [
            f"`bind {host}` in redis.conf (keep protected-mode and requirepass), then restart redis"
        ]
    if kind == "mysql":
        return [
            f"`bind-address = {host}` under [mysqld] (my.cnf, or "
            "/etc/mysql/mariadb.conf.d/50-server.cnf), then restart it"
        ]
    if kind == "postgres":
        return [
            f"`listen_addresses = '{host}'` in postgresql.conf (and a matching host line "
            "in pg_hba.conf), then restart PostgreSQL"
        ]
    if kind == "memcached":
        return [f"`-l {host}` in /etc/memcached.conf, then restart memcached"]
    if kind == "mongod":
        return [
            f"`net.bindIp: {host}` in /etc/mongod.conf (or --bind_ip {host}), then restart mongod"
        ]
    if kind == "elasticsearch":
        return [f"`network.host: {host}` in elasticsearch.yml, then restart it"]
    if kind == "publisher":
        return [
            f"publish it on {host}: `-p {h}:{port}:PORT_INSIDE` in `docker run` / `podman run` "
            "(`ports:` in compose), then recreate the container"
        ]
    if kind == "bindscope":
        return [f"--web.listen-address={h}:{port}"]
    return [f"make the program listen on {host}: look for its host, bind or listen setting"]


# --- the case and its findings ---


@dataclass(frozen=True)
class Finding:
    title: str
    lines: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()
    problem: bool = False


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

    @property
    def problem(self) -> bool:
        return any(f.problem for f in self.findings)

    @property
    def fixes(self) -> tuple[str, ...]:
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


def accepts(lst: Listener, address: str) -> bool:
    """Whether a socket accepts a connection to one of the host's addresses."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    sock = lst.socket
    if scope_of(sock.address) is Scope.WILDCARD:
        return ip.version in accepted_families(sock)
    bound = ipaddress.ip_address(sock.address)
    if isinstance(bound, ipaddress.IPv6Address) and bound.ipv4_mapped is not None:
        bound = bound.ipv4_mapped
    return bound == ip


def probe_word(p: ProbeResult) -> str:
    if p.success:
        return "ok"
    return {"ECONNREFUSED": "refused", "timeout": "timeout"}.get(p.error, p.error.lower())


def unexpected_failures(case: Case, v: Verdict) -> list[ProbeResult]:
    """Probes that failed on an address a listener of the service does accept."""
    tcp = [lst for lst in v.listeners if lst.socket.protocol is Protocol.TCP]
    return [p for p in v.probes if not p.success and any(accepts(lst, p.address) for lst in tcp)]


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
    lines, fixes, problem = [], [], False
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
            fixes.append(f"it listens on {names} but connecting there fails: {FIREWALL_CHECK}")
    return Finding(title, tuple(lines), tuple(fixes), problem)


def widen_host(expose: Exposure, addresses: tuple[HostAddress, ...]) -> str:
    """Where to bind so other hosts can connect without going wider than declared."""
    if expose is Exposure.PRIVATE and any(a.scope is Scope.PUBLIC for a in addresses):
        private = [a for a in addresses if a.scope is Scope.PRIVATE]
        if private:
            return private[0].address
    return "0.0.0.0"


def narrow_host(expose: Exposure, addresses: tuple[HostAddress, ...]) -> str:
    if expose is Exposure.PRIVATE:
        private = [a for a in addresses if a.scope is Scope.PRIVATE and a.family == 4]
        if private:
            return private[0].address
    return "127.0.0.1"


def _culprits_of(case: Case, v: Verdict) -> list[Culprit | None]:
    found = list(dict.fromkeys(case.culprit(lst) for lst in v.listeners))
    return found or [None]


def _meaning(case: Case, v: Verdict) -> tuple[list[str], list[str]]:
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
            f"start the service and check that it is configured for port "
            f"{spec.port} ({spec.protocol.value})"
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
            [] if read else [f"the listener is fine, the firewall is not: {FIREWALL_CHECK}"],
        )
    if st is Status.WRONG_PROCESS:
        names = ", ".join(dict.fromkeys(lst.process.name for lst in v.listeners))
        pattern = spec.process.pattern if spec.process else ""
        return (
            [
                f"It is reachable as declared, but held by {names}, not a process matching "
                f"/{pattern}/: clients talk to the wrong program."
            ],
            [f"stop {names} and start the intended service, or correct `process:` in the config"],
        )
    if st is Status.PROCESS_UNKNOWN:
        return (
            [
                "It is reachable as declared; its owner could not be read, so `process:` "
                "is not checked."
            ],
            ["run bindscope as root or with CAP_SYS_PTRACE"],
        )
    reach = {
        Exposure.LOOPBACK: "only this host",
        Exposure.PRIVATE: "hosts on its private networks",
        Exposure.PUBLIC: "any host that can route to it",
    }[v.exposure]
    lines = [f"A client can connect from {reach}: {declared.lower()} {spec.expose.value}."]
    if v.exposure > Exposure.LOOPBACK:
        lines.append(
            "Not seen from here: a firewall may still drop other hosts (the probe "
            "enters through lo): check with `nft list ruleset` / `iptables -S`."
        )
    db = [c for c in _culprits_of(case, v) if c and c.database]
    if db and not case.declared and v.exposure > Exposure.LOOPBACK:
        lines.append(
            f"{db[0].label} is usually for this host only: if so, declare it "
            "expose: loopback and bind it to 127.0.0.1."
        )
    return lines, []


def step_meaning(case: Case) -> Finding:
    lines, fixes, problem = [], [], False
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
    fixes: list[str] = []
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
                f"inside {where}: {fix}"
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
                f"inside {where}: start the app and make it listen on {wide} port "
                f"{p.target_port} ({p.protocol.value})"
            )
        elif p.probe is not None and not p.probe.success:
            problem = True
            fixes.append(f"it listens on {target} in {where}, the connect fails: {FIREWALL_CHECK}")
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
    fixes: list[str] = []
    problem = False
    seen: set[tuple[str, str]] = set()
    interfaces = tuple({a.interface for a in outside} - {"lo", ""})
    for lst in wide:
        v = _verdict_of(case, lst)
        expose = v.service.expose if v else Exposure.PRIVATE
        status = v.status if v else None
        proto = lst.socket.protocol.value
        for a in reachable_addresses(lst.socket, outside):
            if (proto, a.address) in seen:
                continue
            seen.add((proto, a.address))
            ifaces = (lst.socket.device,) if lst.socket.device else interfaces
            d = evaluate(ruleset, proto, a.family, a.address, case.port, interfaces=ifaces)
            rule = deciding_rule(d)
            head = f"{proto} {a.address}:"
            if d.verdict is Firewall.ACCEPT:
                if d.restricted:
                    lines.append(f"{head} only some hosts get in ({d.reason}): {rule}")
                else:
                    # for a loopback service the firewall is no suspect but a missing guard
                    verdict = (
                        "ruled out, as the seed did"
                        if expose > Exposure.LOOPBACK
                        else "nothing but the bind keeps them out"
                    )
                    lines.append(
                        f"{head} the firewall accepts new connections from other hosts on "
                        f"{a.address}: {verdict} ({rule})"
                    )
                if status is Status.OVEREXPOSED and expose is Exposure.LOOPBACK:
                    fixes.append(
                        "or keep other hosts out at the firewall as well: "
                        f"`{closing_command(d, proto, case.port)}`"
                    )
                    problem = True
            elif d.verdict is Firewall.DROP:
                lines.append(f"{head} the firewall drops other hosts: {rule}")
                opening = opening_command(d, proto, case.port)
                if status is Status.BLOCKED:
                    fixes.append(f"let other hosts in on {case.port}/{proto}: `{opening}`")
                    problem = True
                elif expose is Exposure.LOOPBACK:
                    lines.append(
                        "  protected by the firewall alone: bind it to loopback as well, "
                        "so it does not depend on this rule"
                    )
                else:
                    lines.append(
                        f"  other hosts get in on other addresses; to open this one: `{opening}`"
                    )
            else:
                lines.append(f"{head} undecided: {d.reason} ({rule}); {BY_HAND}")
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
    findings = [f for f in (step(case) for step in steps) if f is not None]
    fixes = tuple(dict.fromkeys(f for finding in findings for f in finding.fixes))
    if fixes:
        lines = fixes
    elif any(f.problem for f in findings):
        lines = ("see the findings above",)
    else:
        lines = ("nothing: it is reachable as expected",)
    final = Finding("What to change", lines, fixes)
    return Diagnosis(case.port, subject(case), (*findings, final))
