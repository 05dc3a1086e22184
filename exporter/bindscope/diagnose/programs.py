"""Which program holds a port, from its command line (and a Python app's main script):
the Culprit that diagnose explains and init names services after."""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass

from bindscope.diagnose.settings import Setting
from bindscope.model import (
    ProcessInfo,
)

MAX_SOURCE = 256 * 1024  # a main script larger than this is not read for app.run()


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
    settings: tuple[Setting, ...] = ()  # where its listen address is set (settings.locate)

    @property
    def database(self) -> bool:
        return self.kind in _DATABASES

    @property
    def web_server(self) -> bool:
        return self.kind in WEB_SERVERS

    @property
    def erlang_internal(self) -> bool:
        """epmd and the Erlang distribution port: for a cluster's nodes, never clients."""
        return self.kind == "epmd" or (self.kind == "rabbitmq" and self.evidence == DIST)


_DATABASES = {"redis", "mysql", "postgres", "memcached", "mongod", "elasticsearch"}
WEB_SERVERS = {"nginx", "apache", "haproxy", "caddy", "java"}
DIST = "Erlang distribution port (inter-node)"
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
    "nginx": "nginx",
    "apache": "Apache httpd",
    "haproxy": "HAProxy",
    "caddy": "Caddy",
    "java": "Java server",
    "mosquitto": "Mosquitto MQTT broker",
    "rabbitmq": "RabbitMQ",
    "epmd": "Erlang port mapper (epmd)",
    "sshd": "OpenSSH server",
    "dnsmasq": "dnsmasq",
    "chrony": "chrony",
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
    "nginx": "nginx",
    "apache2": "apache",
    "httpd": "apache",
    "haproxy": "haproxy",
    "caddy": "caddy",
    "mosquitto": "mosquitto",
    "epmd": "epmd",
    "sshd": "sshd",
    "dnsmasq": "dnsmasq",
    "chronyd": "chrony",
}
# RabbitMQ's ports beside AMQP's: the distribution port is AMQP's + 20000 by default
_RABBIT_PORTS = {5672: "AMQP", 5671: "AMQP over TLS", 15672: "management UI", 25672: DIST}
# what a well-known port is for, in the name of one of a program's several: "rabbitmq-amqp"
ROLES = {
    22: "ssh",
    53: "dns",
    67: "dhcp",
    80: "http",
    123: "ntp",
    323: "ntp-control",
    443: "https",
    1883: "mqtt",
    4369: "epmd",
    5671: "amqps",
    5672: "amqp",
    8883: "mqtts",
    15672: "management",
    25672: "dist",
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


def program_base(path: str) -> str:
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
    argv0 = program_base(process.cmdline[0]) if process.cmdline else ""
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
    names = {process.name, program_base(argv[0]), argv[0].split(":", 1)[0]}
    for name in names:
        kind = _BY_NAME.get(name.split(":", 1)[0])
        if kind:
            return Culprit(kind, _LABELS[kind], f"process name {name.split(':', 1)[0]}")
    joined = " ".join(argv)
    if "org.elasticsearch" in joined:
        return Culprit("elasticsearch", _LABELS["elasticsearch"], "java main class")
    if process.name.startswith("beam") and "rabbit" in joined:
        what = _RABBIT_PORTS.get(port, "listener")
        return Culprit("rabbitmq", _LABELS["rabbitmq"], what)
    if process.name == "java" or program_base(argv[0]) == "java":
        return Culprit("java", _LABELS["java"], "process name java")
    if any(n.startswith("gunicorn") for n in names):
        return Culprit("gunicorn", _LABELS["gunicorn"], "process name", app=_app_argument(argv[1:]))
    if process.name in ("node", "nodejs", "npm", "npx") or program_base(argv[0]) in (
        "node",
        "nodejs",
    ):
        return _node(argv)
    if _is_python(process):
        return _python(argv, source, port)
    kind = _PY_TOOLS.get(program_base(argv[0]))
    if kind:
        return _python((process.name, *argv), source, port)
    return None


def _node(argv: tuple[str, ...]) -> Culprit:
    for a in argv[1:]:
        base = program_base(a)
        for tool in ("next", "vite"):
            if base == tool or f"/{tool}/" in a or f"node_modules/.bin/{tool}" in a:
                return Culprit(tool, _LABELS[tool], f"command line runs {tool}")
    return Culprit("node", _LABELS["node"], "process name node")


def _python(argv: tuple[str, ...], source: Source | None, port: int) -> Culprit | None:
    entry = python_entry(argv)
    if entry is None:
        return None
    how, name, rest = entry
    tool = program_base(name)
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


def _run_calls(source: str, lines: list[str]) -> list[tuple[int, str, str]]:
    """(line, line text, object name) of each `X.run(...)` call in the code: those that
    name no host first, then in the order of the file.

    Parsed, so a call written in a docstring or a string is not taken for the real one;
    a script that does not parse (another Python's syntax) is read line by line.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        found = []
        for n, text in enumerate(lines, 1):
            m = _RUN_CALL_RE.match(text)
            if m:
                found.append((n, text, m.group(1)))
        return found
    calls = [
        # a call that names no host binds 127.0.0.1: the one to point at comes first
        (bool(node.args) or any(k.arg == "host" for k in node.keywords), node.lineno,
         lines[node.lineno - 1], node.func.value.id)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "run"
        and isinstance(node.func.value, ast.Name)
    ]  # fmt: skip
    return [(n, text, var) for _, n, text, var in sorted(calls)]


def _from_source(script: str, source: str) -> Culprit | None:
    lines = source.splitlines()
    if _FLASK_IMPORT_RE.search(source):
        calls = _run_calls(source, lines)
        if calls:
            n, text, var = calls[0]
            return Culprit(
                "flask",
                _LABELS["flask"],
                f"{script} imports flask",
                script=script,
                line=n,
                call=text.strip(),
                var=var,
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
