"""Where a program's listen address is set: the config file (from its command line or its
package's default path, following includes) and the line of the setting, read through the
process's own root so a file inside a container or a private mount is found."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bindscope.model import ProcessInfo

MAX_CONFIG = 1024 * 1024  # a config file larger than this is not read
MAX_FILES = 64  # includes followed per program, so a loop of includes ends

Reader = Callable[[str], "str | None"]  # path as the process sees it -> text, None if unreadable
Lister = Callable[[str], list[str]]  # a glob pattern as the process sees it -> its paths


@dataclass(frozen=True)
class Setting:
    """One line that sets where the program listens, or where such a line is to go."""

    file: str  # as the process sees it
    line: int  # 1-based; 0 when the setting is absent (the program's default applies)
    text: str  # the line as it is ("" when absent)
    value: str = ""  # the address part, for the fix to reason about
    section_line: int = 0  # an INI section header to add the setting under, when absent
    first: bool = False  # when absent, add it as the first line (sshd: never inside a Match)
    indent: str = ""  # the indentation a line added after `section_line` takes (a block's)
    directive: str = ""  # which of a program's several settings this is (dnsmasq's)
    missing: bool = False  # the file itself is absent (Debian ships no rabbitmq.conf)


@dataclass(frozen=True)
class Files:
    """Reading a process's files through /proc/PID/root (tests pass their own)."""

    read: Reader
    listing: Lister
    cwd: str = "/"

    @classmethod
    def of(cls, process: ProcessInfo, proc: str = "/proc") -> Files:
        root = f"{proc}/{process.pid}/root"
        try:
            cwd = os.readlink(f"{proc}/{process.pid}/cwd")
        except OSError:
            cwd = "/"

        def read(path: str) -> str | None:
            try:
                with open(root + path, encoding="utf-8", errors="replace") as f:
                    return f.read(MAX_CONFIG)
            except OSError:
                return None

        def listing(pattern: str) -> list[str]:
            return sorted(p[len(root) :] for p in glob.glob(root + pattern))

        return cls(read, listing, cwd)

    def absolute(self, path: str, base: str = "") -> str:
        return os.path.normpath(os.path.join(base or self.cwd, path))


def _words(process: ProcessInfo) -> list[str]:
    # nginx, sshd and others rewrite their title into one string: split it again
    if len(process.cmdline) == 1:
        return process.cmdline[0].split()
    return list(process.cmdline)


def option(words: list[str], *names: str) -> str:
    """The value of -c FILE, -cFILE, --conf=FILE or --conf FILE on a command line."""
    for i, w in enumerate(words):
        for name in names:
            if w == name and i + 1 < len(words):
                return words[i + 1]
            if name.startswith("--") and w.startswith(name + "="):
                return w[len(name) + 1 :]
            if not name.startswith("--") and len(name) == 2 and w.startswith(name) and w != name:
                return w[2:]
    return ""


# --- the file each program reads ---

DEFAULTS = {
    "redis": "/etc/redis/redis.conf",
    "nginx": "/etc/nginx/nginx.conf",
    "mysql": "/etc/mysql/my.cnf",
    "memcached": "/etc/memcached.conf",
    "mosquitto": "/etc/mosquitto/mosquitto.conf",
    "apache": "/etc/apache2/apache2.conf",
    "haproxy": "/etc/haproxy/haproxy.cfg",
    "sshd": "/etc/ssh/sshd_config",
    "rabbitmq": "/etc/rabbitmq/rabbitmq.conf",
    "epmd": "/etc/rabbitmq/rabbitmq-env.conf",
    "caddy": "/etc/caddy/Caddyfile",
    "dnsmasq": "/etc/dnsmasq.conf",
    "chrony": "/etc/chrony/chrony.conf",
}


def config_file(kind: str, process: ProcessInfo, files: Files) -> str:
    """The main config file the process reads: from its command line, else its package's."""
    words = _words(process)
    named = ""
    if kind == "redis":
        named = next((w for w in words[1:] if w.endswith(".conf")), "")
    elif kind in ("nginx", "mosquitto", "caddy"):
        named = option(words, "-c", "--config")
    elif kind == "postgres":
        named = option(words, "config_file") or _pg_config(words)
    elif kind == "mysql":
        named = option(words, "--defaults-file")
    elif kind == "dnsmasq":
        named = option(words, "-C", "--conf-file")
    elif kind in ("apache", "haproxy", "sshd", "chrony"):
        named = option(words, "-f")
        if kind == "apache" and not named and files.read("/etc/httpd/conf/httpd.conf"):
            named = "/etc/httpd/conf/httpd.conf"
    if named:
        return files.absolute(named)
    return DEFAULTS.get(kind, "")


def _pg_config(words: list[str]) -> str:
    for i, w in enumerate(words):
        if w == "-c" and i + 1 < len(words) and words[i + 1].startswith("config_file="):
            return words[i + 1].split("=", 1)[1]
    data = option(words, "-D")
    return os.path.join(data, "postgresql.conf") if data else ""


# --- finding the setting ---


def _lines(files: Files, path: str) -> list[str] | None:
    text = files.read(path)
    return None if text is None else text.splitlines()


def _uncomment(line: str) -> str:
    return line.split("#", 1)[0].strip()


def _included(files: Files, pattern: str, base: str) -> list[str]:
    pattern = pattern.strip("'\"")
    if not pattern:
        return []
    full = files.absolute(pattern, base)
    if os.path.isabs(pattern) and not any(c in pattern for c in "*?["):
        return [full]
    return files.listing(full) if any(c in full for c in "*?[") else [full]


def walk(
    files: Files, first: str, include: re.Pattern[str] | None, base: str = ""
) -> Iterator[tuple[str, int, str]]:
    """(file, line number, line) of a config and of what it includes, in reading order."""
    seen: set[str] = set()

    def visit(path: str) -> Iterator[tuple[str, int, str]]:
        if path in seen or len(seen) >= MAX_FILES:
            return
        seen.add(path)
        lines = _lines(files, path)
        if lines is None:
            return
        for n, line in enumerate(lines, 1):
            yield path, n, line
            m = include.match(_uncomment(line)) if include else None
            if m:
                for target in m.group(1).split():
                    for p in _included(files, target.rstrip(";"), base or os.path.dirname(path)):
                        yield from visit(p)

    yield from visit(first)


def _last(found: list[Setting], fallback: Setting | None = None) -> tuple[Setting, ...]:
    if found:
        return (found[-1],)
    return (fallback,) if fallback else ()


def redis(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    """`bind` in redis.conf; the last one counts."""
    found = [
        Setting(p, n, line, _uncomment(line).split(None, 1)[1] if " " in line.strip() else "")
        for p, n, line in walk(files, path, re.compile(r"^include\s+(\S+)"))
        if re.match(r"^bind\s", _uncomment(line) + " ")
    ]
    return _last(found, Setting(path, 0, "") if files.read(path) is not None else None)


def postgres(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    """`listen_addresses` in postgresql.conf, its conf.d, and postgresql.auto.conf (ALTER
    SYSTEM), which PostgreSQL reads last."""
    include = re.compile(r"^include(?:_dir|_if_exists)?\s*=?\s*'?([^'\s]+)'?")
    found: list[Setting] = []
    lines = _lines(files, path)
    if lines is None:
        return ()
    order: list[str] = [path]
    for line in lines:
        m = include.match(_uncomment(line))
        if m:
            target = files.absolute(m.group(1), os.path.dirname(path))
            conf = files.listing(os.path.join(target, "*.conf"))
            order += conf if conf else [target]
    for p in order:
        for n, line in enumerate(_lines(files, p) or [], 1):
            m = re.match(r"^listen_addresses\s*=\s*'([^']*)'", _uncomment(line))
            if m:
                found.append(Setting(p, n, line, m.group(1)))
    return _last(found, Setting(path, 0, ""))


def auto_conf(files: Files, data_dir: str) -> tuple[Setting, ...]:
    """ALTER SYSTEM's file overrides postgresql.conf."""
    path = os.path.join(data_dir, "postgresql.auto.conf")
    found = [
        Setting(path, n, line, m.group(1))
        for n, line in enumerate(_lines(files, path) or [], 1)
        if (m := re.match(r"^listen_addresses\s*=\s*'([^']*)'", _uncomment(line)))
    ]
    return _last(found)


_MYSQL_SECTIONS = {"mysqld", "server", "mariadb", "mariadbd"}


def mysql(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    """`bind-address` under [mysqld] (or [server], [mariadb]) in my.cnf and what it
    includes (!include, !includedir); the last one counts."""
    found: list[Setting] = []
    section, header = "", Setting(path, 0, "")
    seen: set[str] = set()

    def visit(p: str) -> None:
        nonlocal section, header
        if p in seen or len(seen) >= MAX_FILES:
            return
        seen.add(p)
        for n, line in enumerate(_lines(files, p) or [], 1):
            text = _uncomment(line)
            directive, _, target = text.partition(" ")
            target = target.strip()
            if directive == "!includedir" and target:
                for q in files.listing(os.path.join(target, "*.cnf")):
                    visit(q)
            elif directive == "!include" and target:
                visit(files.absolute(target, os.path.dirname(p)))
            elif text.startswith("["):
                section = text.strip("[]").strip().lower()
                if section in ("mysqld", "mariadb"):
                    header = Setting(p, 0, "", section_line=n)
            elif section in _MYSQL_SECTIONS or section.startswith(("mysqld-", "mariadb-")):
                m = re.match(r"^bind[-_]address\s*=\s*(\S+)", text)
                if m:
                    found.append(Setting(p, n, line, m.group(1)))

    visit(path)
    return _last(found, header if header.section_line else None)


def _nginx_port(value: str) -> int | None:
    """The port of an nginx `listen` value (address:port, port, [v6]:port, address)."""
    if value.startswith("unix:"):
        return None
    tail = value.rsplit("]", 1)[-1]
    if tail.startswith(":"):
        return int(tail[1:]) if tail[1:].isdigit() else None
    if value.isdigit():
        return int(value)
    if ":" in value and not value.startswith("["):
        p = value.rsplit(":", 1)[1]
        return int(p) if p.isdigit() else None
    return 80


def nginx(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    """Every `listen` directive for the port, in nginx.conf and what it includes."""
    found = []
    for p, n, line in walk(files, path, re.compile(r"^include\s+([^;]+);")):
        for m in re.finditer(r"(?:^|[;{\s])listen\s+([^;\s]+)[^;]*;", _uncomment(line)):
            if _nginx_port(m.group(1)) == port:
                found.append(Setting(p, n, line, m.group(1)))
    return tuple(found)


def _directives(
    files: Files,
    path: str,
    include: re.Pattern[str] | None,
    directive: re.Pattern[str],
    port: int,
    port_of: Callable[[str], int | None],
) -> tuple[Setting, ...]:
    found = []
    for p, n, line in walk(files, path, include):
        m = directive.match(_uncomment(line))
        if m and port_of(m.group(1)) == port:
            found.append(Setting(p, n, line, m.group(1)))
    return tuple(found)


def _host_port(value: str, default: int | None = None) -> int | None:
    tail = value.rsplit("]", 1)[-1].rsplit(":", 1)
    if len(tail) == 2 and tail[1].isdigit():
        return int(tail[1])
    return int(value) if value.isdigit() else default


def apache(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    return _directives(
        files,
        path,
        re.compile(r"^Include(?:Optional)?\s+(\S+)", re.I),
        re.compile(r"^Listen\s+(\S+)", re.I),
        port,
        _host_port,
    )


def haproxy(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    return _directives(
        files,
        path,
        None,
        re.compile(r"^bind\s+([^\s,]+)"),
        port,
        _host_port,
    )


def mosquitto(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    found = _directives(
        files,
        path,
        re.compile(r"^include_dir\s+(\S+/?)$"),
        re.compile(r"^listener\s+(\d+(?:\s+\S+)?)"),
        port,
        lambda v: int(v.split()[0]),
    )
    return found or ((Setting(path, 0, ""),) if files.read(path) is not None else ())


def sshd_port(value: str, default: int) -> int | None:
    """The port of a ListenAddress value: `host:port` or `[v6]:port`; a bare IPv6 address
    (`::`, `::1`: more than one colon, no brackets) names none, so sshd's Port applies."""
    if value.startswith("["):
        tail = value.rsplit("]", 1)[-1]
        if not tail:
            return default
        return int(tail[1:]) if tail.startswith(":") and tail[1:].isdigit() else None
    if value.count(":") == 1:
        port = value.split(":", 1)[1]
        return int(port) if port.isdigit() else None
    return default


def sshd(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    """Every `ListenAddress` for the port in sshd_config and its `Include`s: they add up."""
    found = _directives(
        files,
        path,
        re.compile(r"^Include\s+(.+)$", re.I),
        re.compile(r"^ListenAddress\s+(\S+)", re.I),
        port,
        lambda v: sshd_port(v, port),
    )
    return found or ((Setting(path, 0, "", first=True),) if files.read(path) is not None else ())


_CADDY_COMMENT = re.compile(r"(?:^|\s)#.*$")  # a comment starts a token, not inside one


def caddy_ports(address: str) -> set[int]:
    """The ports a Caddyfile site address is served on: `:8080`, `http://host:8080`,
    `http://host` (80), `https://host` (443), `host` (443, and 80 for its redirect)."""
    scheme, _, rest = address.rpartition("://")
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):
        port = rest.partition("]")[2].removeprefix(":")
    else:
        port = rest.rpartition(":")[2] if ":" in rest else ""
    if port:
        return {int(port)} if port.isdigit() else set()  # a placeholder: not known here
    return {80} if scheme == "http" else {443} if scheme == "https" else {80, 443}


def caddy(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    """For each site block of the Caddyfile served on the port: its `bind` line, or where
    one goes (after the line of its addresses; `bind` is the site's, never a route's)."""
    lines = _lines(files, path)
    if lines is None:
        return ()
    found: list[Setting] = []
    depth = 0
    started = False  # a site seen: a `{` alone is no longer the global options block
    single = False  # no braces: the file is one site, its addresses on the first line
    site = 0  # the line of the addresses of the site being read, when it serves the port
    bind: Setting | None = None
    indent = "\t"

    def done() -> None:
        nonlocal site, bind
        if site:
            found.append(bind or Setting(path, 0, "", section_line=site, indent=indent))
        site, bind = 0, None

    for n, line in enumerate(lines, 1):
        text = _CADDY_COMMENT.sub("", line).strip()
        if not text:
            continue
        head = text.removesuffix("{").strip()
        if depth == 0 and not single and ((text == "{" and not started) or head.startswith("(")):
            pass  # the global options block, or a snippet: no site of its own
        elif depth == 0 and not single:
            # a site block's addresses, or (no brace on the first site) the only site's
            started, single = True, "{" not in text
            addresses = text.split("{", 1)[0].replace(",", " ").split()
            ports = {p for a in addresses for p in caddy_ports(a)}
            site, bind, indent = (n if port in ports else 0), None, "" if single else "\t"
        elif site and depth == (0 if single else 1):
            indent = _indent(line) or indent
            if re.match(r"^bind(\s|$)", text):
                bind = Setting(path, n, line, text[4:].strip())
        depth += text.count("{") - text.count("}")
        if depth == 0 and not single:
            if site == n:
                site = 0  # a site on one line (`:80 { respond ok }`): no line to add after
            done()
    done()
    return tuple(found)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


_DNSMASQ = re.compile(
    r"^(listen-address|interface|bind-interfaces|bind-dynamic|conf-file|conf-dir)\s*(?:=\s*(.*))?$"
)


def _dnsmasq_dir(files: Files, value: str) -> list[str]:
    """The files of `conf-dir=DIR[,.ext-to-skip...|,*.ext-to-take...]`, in dnsmasq's order
    (sorted; never a dotfile, a backup~ or an #autosave#)."""
    directory, *suffixes = [v.strip() for v in value.split(",")]
    take = [x[1:] for x in suffixes if x.startswith("*")]
    skip = [x for x in suffixes if not x.startswith("*")]
    found = []
    for p in files.listing(os.path.join(files.absolute(directory), "*")):
        name = os.path.basename(p)
        if name.startswith((".", "#")) or name.endswith("~"):
            continue
        if (take and not name.endswith(tuple(take))) or (skip and name.endswith(tuple(skip))):
            continue
        found.append(p)
    return found


def dnsmasq(files: Files, path: str, process: ProcessInfo) -> tuple[Setting, ...]:
    """`listen-address=`, `interface=` and `bind-interfaces`/`bind-dynamic` in dnsmasq.conf,
    the `conf-file=`s and `conf-dir=`s it names, and the conf-dir of its command line (-7,
    Debian's `-7 /etc/dnsmasq.d,.dpkg-dist,...`); with no listen-address, where one goes."""
    if files.read(path) is None:
        return ()
    found: list[Setting] = []
    seen: set[str] = set()

    def visit(p: str) -> None:
        if p in seen or len(seen) >= MAX_FILES:
            return
        seen.add(p)
        for n, line in enumerate(_lines(files, p) or [], 1):
            m = _DNSMASQ.match(_uncomment(line))
            if not m:
                continue
            name, value = m.group(1), (m.group(2) or "").strip()
            if name == "conf-file" and value:
                visit(files.absolute(value, os.path.dirname(p)))
            elif name == "conf-dir" and value:
                for q in _dnsmasq_dir(files, value):
                    visit(q)
            elif name != "conf-file" and name != "conf-dir":
                found.append(Setting(p, n, line, value, directive=name))

    visit(path)
    words = _words(process)
    for i, w in enumerate(words):
        if w in ("-7", "--conf-dir") and i + 1 < len(words):
            for q in _dnsmasq_dir(files, words[i + 1]):
                visit(q)
        elif w.startswith("--conf-dir="):
            for q in _dnsmasq_dir(files, w.split("=", 1)[1]):
                visit(q)
    if not any(s.directive == "listen-address" for s in found):
        found.append(Setting(path, 0, "", directive="listen-address"))
    return tuple(found)


def memcached(files: Files, path: str, process: ProcessInfo) -> tuple[Setting, ...]:
    """`-l` in /etc/memcached.conf, when that file gave the running command line its `-l`."""
    running = option(_words(process), "-l", "--listen")
    for n, line in enumerate(_lines(files, path) or [], 1):
        m = re.match(r"^(?:-l|--listen)[\s=]+(\S+)", _uncomment(line))
        if m and (not running or m.group(1) == running):
            return (Setting(path, n, line, m.group(1)),)
    return ()


def rabbitmq(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    """`listeners.tcp.NAME = [ADDRESS:]PORT` lines for the port in rabbitmq.conf; with
    none, where one goes: the file, which Debian's package does not ship (the default,
    every address of both families, applies then)."""
    text = files.read(path)
    found = [
        Setting(path, n, line, m.group(2), directive=m.group(1))
        for n, line in enumerate((text or "").splitlines(), 1)
        if (m := re.match(r"^listeners\.tcp\.(\w+)\s*=\s*(\S+)", _uncomment(line)))
        and _host_port(m.group(2)) == port
    ]
    return tuple(found) or (Setting(path, 0, "", missing=text is None),)


def epmd(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    found = [
        Setting(path, n, line, m.group(1))
        for n, line in enumerate(_lines(files, path) or [], 1)
        if (m := re.match(r"^(?:export\s+)?ERL_EPMD_ADDRESS=(\S*)", _uncomment(line)))
    ]
    return _last(found, Setting(path, 0, ""))


_CHRONY_PORTS = {"port": 123, "cmdport": 323, "ntsport": 4460}


def chrony(files: Files, path: str, port: int) -> tuple[Setting, ...]:
    """`bindcmdaddress` for the command port, `bindaddress` for the NTP port (and NTS-KE's),
    in chrony.conf, its `include`s and the `*.conf` of its `confdir`s; with none, where
    one goes. A port chronyd does not serve (by its `port`/`cmdport`/`ntsport`): ()."""
    read: list[tuple[str, int, str, str, str]] = []  # file, line, text, directive, value
    seen: set[str] = set()

    def visit(p: str) -> None:
        if p in seen or len(seen) >= MAX_FILES:
            return
        seen.add(p)
        for n, line in enumerate(_lines(files, p) or [], 1):
            name, value = ([*_uncomment(line).split(None, 1), "", ""])[:2]
            value = value.strip()
            if name == "include" and value:
                targets = [value]
            elif name == "confdir" and value:
                targets = [os.path.join(d, "*.conf") for d in value.split()]
            else:
                read.append((p, n, line, name, value))
                continue
            for pattern in targets:
                for q in files.listing(files.absolute(pattern, os.path.dirname(p))):
                    visit(q)

    if files.read(path) is None:
        return ()
    visit(path)
    ports = dict(_CHRONY_PORTS)
    for *_, name, value in read:
        if name in ports and value.isdigit():
            ports[name] = int(value)
    if port == ports["cmdport"]:
        directive = "bindcmdaddress"
    elif port in (ports["port"], ports["ntsport"]):
        directive = "bindaddress"
    else:
        return ()
    found = [
        Setting(p, n, line, value, directive=directive)
        for p, n, line, name, value in read
        # a path is the command socket's, not an address
        if name == directive and value and not value.startswith("/")
    ]
    return tuple(found) or (Setting(path, 0, "", directive=directive),)


_FINDERS: dict[str, Callable[[Files, str, int], tuple[Setting, ...]]] = {
    "redis": redis,
    "nginx": nginx,
    "mysql": mysql,
    "apache": apache,
    "haproxy": haproxy,
    "mosquitto": mosquitto,
    "sshd": sshd,
    "rabbitmq": rabbitmq,
    "epmd": epmd,
    "caddy": caddy,
    "chrony": chrony,
}


def master(process: ProcessInfo, proc: str = "/proc") -> ProcessInfo:
    """nginx's worker holds the socket too; its master's command line names the config."""
    if not any("worker process" in a for a in process.cmdline):
        return process
    try:
        with open(f"{proc}/{process.pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"{proc}/{ppid}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except (OSError, ValueError, IndexError):
        return process
    return ProcessInfo(pid=ppid, name=process.name, cmdline=argv)


def locate(kind: str, process: ProcessInfo, port: int, files: Files) -> tuple[Setting, ...]:
    """The lines that set where this program listens on `port`, or () when not known."""
    path = config_file(kind, process, files)
    if kind == "postgres":
        data = option(_words(process), "-D")
        over = auto_conf(files, files.absolute(data)) if data else ()
        return over or (postgres(files, path, port) if path else ())
    if kind == "memcached":
        return memcached(files, path, process)
    if kind == "dnsmasq":
        return dnsmasq(files, path, process)
    finder = _FINDERS.get(kind)
    if finder is None or not path:
        return ()
    return finder(files, path, port)
