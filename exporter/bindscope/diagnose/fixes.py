"""The changes diagnose advises, as Fix records: a program's bind setting at its file and
line, the address to bind, and the firewall commands that open or close a port."""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from bindscope.diagnose.programs import DIST, Culprit, program_base
from bindscope.diagnose.settings import Setting
from bindscope.model import (
    Exposure,
    Firewall,
    HostAddress,
    Scope,
)
from bindscope.netfilter.ruleset import Decision, Ruleset

FixKind = Literal["config", "code", "command", "firewall"]


@dataclass(frozen=True)
class Fix:
    """One change to make: a setting in a file, a line of code, a command line to start
    with, or firewall commands. `commands`, run as given, make the change."""

    kind: FixKind
    summary: str
    file: str = ""
    line: int = 0  # 1-based; 0 when the setting is to be added
    setting: str = ""  # the line as it should read
    commands: tuple[str, ...] = ()


def advice(summary: str) -> Fix:
    """A change diagnose can describe but not write (start the service, check by hand)."""
    return Fix("command", summary)


# --- the firewall ---


def opening_command(decision: Decision, protocol: str, port: int, family: int = 4) -> str:
    """A command that lets other hosts in, for a DROP decision; "" otherwise."""
    if decision.verdict is not Firewall.DROP:
        return ""
    return " && ".join(_commands(decision, protocol, port, allow=True, family=family))


def closing_command(decision: Decision, protocol: str, port: int, family: int = 4) -> str:
    """A command that keeps other hosts out and loopback working, for an ACCEPT decision."""
    if decision.verdict is not Firewall.ACCEPT:
        return ""
    return " && ".join(_commands(decision, protocol, port, allow=False, family=family))


def _by_iptables(d: Decision) -> bool:
    # iptables-nft writes tables nft shows as plain `ip filter` with upper-case chains;
    # nft itself warns against editing those, so the fix goes through iptables
    return d.family in ("ip", "ip6") and d.table == "filter" and d.chain.isupper()


_FIREWALLD_SUFFIXES = ("_pre", "_log", "_deny", "_allow", "_post")


def _firewalld_where(chain: str) -> str | None:
    """The firewall-cmd option naming the zone or policy whose chain this is (firewalld
    names them filter_IN_ZONE[_allow...] and filter_IN_policy_POLICY[_allow...]; a name
    may hold `_` itself); "" for its own base chains (the default zone); None when the
    chain is not one of its input chains."""
    if not chain.startswith("filter_IN_"):
        return "" if chain.startswith("filter_INPUT") else None
    name = chain.removeprefix("filter_IN_")
    for suffix in _FIREWALLD_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name.removesuffix(suffix)
            break
    if name.startswith("policy_"):
        return " --policy=" + name.removeprefix("policy_")
    return " --zone=" + name


def _firewalld(d: Decision, protocol: str, port: int, allow: bool) -> tuple[str, ...]:
    """firewall-cmd for each zone (or policy) that decides: the runtime change first, so
    it holds at once without a --reload (which would drop every other runtime-only change,
    interfaces moved to a zone included), then the same in the permanent configuration."""
    if allow:
        # the zone that dropped it: one is enough to let hosts in
        where = [_firewalld_where(d.chain) or ""]
        change = f"--add-port={port}/{protocol}"
    else:
        # every zone it is accepted in (an interface or source each): closing one alone
        # would leave the others open
        chains = [c for _, table, c in d.accepted_in if table == "firewalld"] or [d.chain]
        where = list(dict.fromkeys(_firewalld_where(c) or "" for c in chains))
        # a rich rule of no family covers both; firewalld accepts lo before any zone
        change = f'--add-rich-rule=\'rule port port="{port}" protocol="{protocol}" drop\''
    return tuple(f"firewall-cmd{w} {change} && firewall-cmd --permanent{w} {change}" for w in where)


def _commands(d: Decision, protocol: str, port: int, allow: bool, family: int) -> tuple[str, ...]:
    if d.manager == "firewalld":
        return _firewalld(d, protocol, port, allow)
    cmd = _command(d, protocol, port, allow, family)
    return (cmd,) if cmd else ()


def _command(d: Decision, protocol: str, port: int, allow: bool, family: int) -> str:
    if d.manager == "ufw":
        if allow:
            return f"ufw allow {port}/{protocol}"
        # ufw's own rules accept lo before any user rule; ahead of an explicit allow
        where = "insert 1 " if d.chain.startswith(("ufw-user-", "ufw6-user-")) else ""
        return f"ufw {where}deny {port}/{protocol}"
    target = "ACCEPT" if allow else "DROP"
    lo = "" if allow else "! -i lo "
    # no table to point at: iptables' INPUT, as before nft existed (closing goes through
    # firewall_fix, which picks the tool the host's other rules are written with)
    if d.backend.startswith("iptables") or _by_iptables(d) or (not d.table and allow):
        tool = "ip6tables" if d.family == "ip6" or family == 6 else "iptables"
        chain = d.chain if _by_iptables(d) else "INPUT"
        return f"{tool} -I {chain} {lo}-p {protocol} --dport {port} -j {target}"
    if not d.table:
        return ""
    keep_lo = "" if allow else "iifname != lo "
    return (
        f"nft insert rule {d.family} {d.table} {d.chain} {keep_lo}{protocol} dport {port} "
        f"{target.lower()}"
    )


def _nft_new_chain(families: Sequence[int], protocol: str, port: int) -> tuple[str, ...]:
    """A table and input chain where the host has none for these families (nft add is a
    no-op for what exists); its drop is final whatever other tables accept."""
    fam = "inet" if len(set(families)) > 1 else ("ip6" if families[0] == 6 else "ip")
    return (
        f"nft add table {fam} filter",
        f"nft 'add chain {fam} filter input {{ type filter hook input priority filter; }}'",
        f"nft insert rule {fam} filter input iifname != lo {protocol} dport {port} drop",
    )


def _tool(ruleset: Ruleset | None) -> str:
    """The tool the host's filter is written with: iptables or nft."""
    chains = ruleset.chains if ruleset else ()
    if any(c.backend.startswith("iptables") for c in chains) or any(
        c.family in ("ip", "ip6") and c.table == "filter" and c.name.isupper() for c in chains
    ):
        return "iptables"
    return "nft"


def firewall_fix(
    decisions: Sequence[tuple[int, Decision]],
    ruleset: Ruleset | None,
    protocol: str,
    port: int,
    allow: bool,
) -> Fix | None:
    """The commands that open (allow) or close a port for every address family the socket
    takes, given the filter's decision for each family; None when none is needed."""
    commands: list[str] = []
    unfiltered: list[int] = []  # families with no input chain to put the rule in
    wanted = Firewall.DROP if allow else Firewall.ACCEPT
    for family, d in decisions:
        if d.verdict is not wanted:
            continue
        cmds = list(_commands(d, protocol, port, allow, family))
        if not cmds and not allow and _tool(ruleset) == "iptables":
            tool = "ip6tables" if family == 6 else "iptables"
            cmds = [f"{tool} -I INPUT ! -i lo -p {protocol} --dport {port} -j DROP"]
        if cmds:
            commands += cmds
        elif not allow:
            unfiltered.append(family)
    if unfiltered:
        commands += _nft_new_chain(unfiltered, protocol, port)
    commands = list(dict.fromkeys(commands))
    if not commands:
        return None
    families = " and ".join(
        dict.fromkeys("IPv4" if f == 4 else "IPv6" for f, d in decisions if d.verdict is wanted)
    )
    if allow:
        summary = f"let other hosts in on {port}/{protocol} ({families})"
    else:
        summary = (
            f"keep other hosts out of {port}/{protocol} at the firewall ({families}; "
            f"loopback keeps working){_lasting(commands[0])}"
        )
    return Fix("firewall", summary, commands=tuple(commands))


def _lasting(command: str) -> str:
    """How the rule outlives a reboot, where the command alone does not make it last."""
    if command.startswith("nft "):
        return ": it lasts until reboot; keep it in /etc/nftables.conf"
    if command.startswith(("iptables ", "ip6tables ")):
        return ": it lasts until reboot; keep it with `netfilter-persistent save`"
    return ""


# --- the program's own setting ---


def _sed_line(file: str, line: int, text: str) -> str:
    """A sed command that sets line `line` of `file` to `text` (0: appends it)."""
    body = text.replace("\\", "\\\\").replace("/", "\\/").replace("&", "\\&")
    script = f"{line}s/.*/{body}/" if line else f"$a {text}"
    return f"sed -i {shlex.quote(script)} {shlex.quote(file)}"


def _sed_after(file: str, line: int, text: str) -> str:
    # `a\` keeps the text's indentation (plain `a` drops leading blanks)
    how = "a\\" if text[:1].isspace() else "a "
    return f"sed -i {shlex.quote(f'{line}{how}{text}')} {shlex.quote(file)}"


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _edit(s: Setting, new: str, summary: str, restart: str) -> Fix:
    """A config fix at a located setting: replace its line, or add it where it belongs."""
    if s.line:
        text = _indent(s.text) + new
        where = f"{s.file} line {s.line}"
        cmd = _sed_line(s.file, s.line, text)
    elif s.section_line:
        text, where = s.indent + new, f"{s.file}, after line {s.section_line}"
        cmd = _sed_after(s.file, s.section_line, text)
    elif s.first:
        text, where = new, f"{s.file}, as its first line"
        cmd = f"sed -i {shlex.quote(f'1i {new}')} {shlex.quote(s.file)}"
    else:
        text, where = new, f"{s.file} (not set there now: the default applies)"
        cmd = _sed_line(s.file, 0, new)
    return Fix(
        "config",
        f"{summary}: `{new}` in {where}, then {restart}",
        file=s.file,
        line=s.line,
        setting=text,
        commands=(cmd,),
    )


def _wide(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def _redis(c: Culprit, port: int, host: str) -> list[Fix]:
    # `-` before an address: redis starts even where that address does not exist
    value = "* -::*" if _wide(host) else ("127.0.0.1 -::1" if host == "127.0.0.1" else host)
    summary = "make Redis listen on " + value.replace(" -", " and ")
    restart = "restart redis (keep protected-mode and requirepass)"
    if c.settings:
        return [_edit(c.settings[0], f"bind {value}", summary, restart)]
    return [Fix("config", f"`bind {value}` in redis.conf, then {restart}", setting=f"bind {value}")]


def _postgres(c: Culprit, port: int, host: str) -> list[Fix]:
    # both loopbacks by address: "localhost" is only what /etc/hosts says (often IPv4 only);
    # PostgreSQL starts on whichever of them it can bind
    value = "*" if _wide(host) else ("127.0.0.1,::1" if host == "127.0.0.1" else host)
    new = f"listen_addresses = '{value}'"
    restart = "restart PostgreSQL" + (
        "" if host == "127.0.0.1" else " (and allow the clients in pg_hba.conf)"
    )
    if c.settings:
        s = c.settings[0]
        if s.file.endswith("postgresql.auto.conf"):
            cmd = f"psql -c \"ALTER SYSTEM SET listen_addresses = '{value}'\""
            return [
                Fix(
                    "config",
                    f"ALTER SYSTEM set it in {s.file} line {s.line}: `{cmd}`, then {restart}",
                    file=s.file,
                    line=s.line,
                    setting=new,
                    commands=(cmd,),
                )
            ]
        return [_edit(s, new, "make PostgreSQL listen on " + value, restart)]
    return [Fix("config", f"`{new}` in postgresql.conf, then {restart}", setting=new)]


def _mysql(c: Culprit, port: int, host: str) -> list[Fix]:
    value = "::" if _wide(host) else host
    new = f"bind-address = {value}"
    if c.settings:
        return [_edit(c.settings[0], new, f"make it listen on {value}", "restart it")]
    return [
        Fix(
            "config",
            f"`{new}` under [mysqld] (my.cnf, or /etc/mysql/mariadb.conf.d/50-server.cnf), "
            "then restart it",
            setting=new,
        )
    ]


def _nginx_value(value: str, host: str, port: int) -> str:
    """The listen value in the same address family as `value`, moved to `host`."""
    six = value.startswith("[")
    if _wide(host):
        return f"[::]:{port}" if six else str(port)
    if host == "127.0.0.1":
        return f"[::1]:{port}" if six else f"127.0.0.1:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _nginx(c: Culprit, port: int, host: str) -> list[Fix]:
    fixes = []
    six = any(s.value.startswith("[") for s in c.settings)
    for s in c.settings:
        old = re.search(r"listen\s+" + re.escape(s.value) + r"([^;]*);", s.text)
        if old is None:
            continue
        options = old.group(1)
        new = f"listen {_nginx_value(s.value, host, port)}{options};"
        if _wide(host) and not six and not s.value.startswith("["):
            # other hosts reach it over IPv6 too, as over IPv4
            new += f" listen [::]:{port}{options.replace(' default_server', '')};"
        if s.text.strip() != old.group(0):
            # other directives share the line: say what to change, edit nothing blindly
            fixes.append(
                Fix(
                    "config",
                    f"in {s.file} line {s.line}: change `{old.group(0)}` to `{new}`, "
                    "then `nginx -t` and reload nginx",
                    file=s.file,
                    line=s.line,
                    setting=new,
                )
            )
            continue
        where = "every address" if _wide(host) else host
        fixes.append(_edit(s, new, f"make nginx listen on {where}", "`nginx -t` and reload nginx"))
    if fixes:
        return fixes
    return [
        Fix(
            "config",
            f"`listen {_nginx_value('', host, port)};` in the server block (under "
            "/etc/nginx/sites-enabled/), then `nginx -t` and reload nginx",
        )
    ]


def _directive(
    c: Culprit, name: str, value: str, label: str, restart: str, fallback_file: str, host: str
) -> list[Fix]:
    new = f"{name} {value}"
    where = "every address" if _wide(host) else host
    if c.settings:
        return [_edit(s, new, f"make {label} listen on {where}", restart) for s in c.settings]
    return [Fix("config", f"`{new}` in {fallback_file}, then {restart}", setting=new)]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _program_fixes(c: Culprit, port: int, host: str) -> list[Fix] | None:
    kind = c.kind
    h = _hostport(host, port)
    if kind == "redis":
        return _redis(c, port, host)
    if kind == "postgres":
        return _postgres(c, port, host)
    if kind == "mysql":
        return _mysql(c, port, host)
    if kind == "nginx":
        return _nginx(c, port, host)
    if kind == "memcached":
        value = "127.0.0.1,::1" if host == "127.0.0.1" else host
        if c.settings:
            return [
                _edit(
                    c.settings[0],
                    f"-l {value}",
                    "make memcached listen on " + value,
                    "restart memcached",
                )
            ]
        return [
            Fix(
                "command",
                f"start memcached with `-l {value}` (`-l` in /etc/memcached.conf for the "
                "Debian service), then restart memcached",
                setting=f"-l {value}",
            )
        ]
    if kind == "apache":
        value = str(port) if _wide(host) else h
        return _directive(
            c,
            "Listen",
            value,
            "Apache",
            "`apachectl configtest` and restart Apache",
            "/etc/apache2/ports.conf",
            host,
        )
    if kind == "haproxy":
        value = f":::{port} v4v6" if _wide(host) else h
        return _directive(
            c,
            "bind",
            value,
            "HAProxy",
            "reload HAProxy",
            "the frontend of /etc/haproxy/haproxy.cfg",
            host,
        )
    if kind == "mosquitto":
        value = str(port) if _wide(host) else f"{port} {host}"
        return _directive(
            c,
            "listener",
            value,
            "Mosquitto",
            "restart mosquitto (a listener "
            "beyond loopback needs allow_anonymous or a password_file)",
            "/etc/mosquitto/conf.d/",
            host,
        )
    if kind == "sshd":
        return _sshd(c, port, host)
    if kind == "epmd":
        value = "127.0.0.1,::1" if host == "127.0.0.1" else host
        if c.settings:
            return [
                _edit(
                    c.settings[0],
                    f"ERL_EPMD_ADDRESS={value}",
                    "make epmd listen on " + value,
                    "stop epmd and restart RabbitMQ",
                )
            ]
        return [
            Fix(
                "config",
                f"`ERL_EPMD_ADDRESS={value}` in the environment of epmd and "
                "RabbitMQ (/etc/rabbitmq/rabbitmq-env.conf), then restart both",
                setting=f"ERL_EPMD_ADDRESS={value}",
            )
        ]
    if kind == "rabbitmq":
        if c.evidence == DIST:
            new = f"distribution.listener.interface = {host}"
            return [
                Fix(
                    "config",
                    f"`{new}` in /etc/rabbitmq/rabbitmq.conf, then restart RabbitMQ",
                    file="/etc/rabbitmq/rabbitmq.conf",
                    setting=new,
                )
            ]
        return _rabbitmq(c, port, host)
    if kind == "caddy":
        return _caddy(c, port, host)
    if kind == "dnsmasq":
        return _dnsmasq(c, port, host)
    if kind == "chrony":
        return _chrony(c, port, host)
    if kind == "java":
        return [
            Fix(
                "command",
                f"the server's address setting: Spring Boot `server.address={host}`"
                f" (application.properties or -Dserver.address={host}), Tomcat `address="
                f'"{host}"` on the Connector in server.xml, Jetty `jetty.http.host={host}`;'
                " then restart it",
            )
        ]
    return None


# --- sshd: ListenAddress lines add up; sshd's IPv6 sockets are always v6only ---

SSHD_RESTART = "`sshd -t` and restart ssh"


def _sshd_split(value: str) -> tuple[str, str]:
    """A ListenAddress value's address and port ("" when it names none)."""
    if value.startswith("["):
        address, _, rest = value[1:].partition("]")
        return address, rest.removeprefix(":")
    if value.count(":") == 1:
        address, port = value.split(":")
        return address, port
    return value, ""


def _sshd_join(address: str, port: str) -> str:
    if not port:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def in_family(address: str, host: str) -> str:
    """`address` moved to `host`; to loopback or to every address in its own family
    (`::` -> `::1`), so each family's clients keep working."""
    six = ":" in address
    if host == "127.0.0.1":
        return "::1" if six else "127.0.0.1"
    if _wide(host):
        return "::" if six else "0.0.0.0"
    return host


def sshd_value(value: str, host: str) -> str:
    """A ListenAddress value moved to `host` in its own family, keeping its port."""
    address, port = _sshd_split(value)
    return _sshd_join(in_family(address, host), port)


def _sshd(c: Culprit, port: int, host: str) -> list[Fix]:
    where = "every address" if _wide(host) else host
    located = [s for s in c.settings if s.line]
    if not located:
        # none: sshd listens on every address of both families; narrowed, on both loopbacks
        values = ["127.0.0.1", "::1"] if host == "127.0.0.1" else [host]
        if not c.settings:
            return [
                Fix(
                    "config",
                    f"`ListenAddress {values[0]}` in /etc/ssh/sshd_config, then {SSHD_RESTART}",
                    setting=f"ListenAddress {values[0]}",
                )
            ]
        s = c.settings[0]
        lines = [f"ListenAddress {v}" for v in values]
        fix = _edit(s, lines[0], f"make sshd listen on {' and '.join(values)}", SSHD_RESTART)
        if len(lines) == 1:
            return [fix]
        said = " and ".join(f"`{line}`" for line in lines)
        script = ("1i " if s.first else "$a ") + "\\n".join(lines)
        return [
            dataclasses.replace(
                fix,
                summary=fix.summary.replace(f"`{lines[0]}`", said, 1),
                commands=(f"sed -i {shlex.quote(script)} {shlex.quote(s.file)}",),
            )
        ]
    fixes: list[Fix] = []
    seen: set[str] = set()
    for s in located:
        value = sshd_value(s.value, host)
        rest = re.sub(r"^\s*ListenAddress\s+\S+", "", s.text.split("#", 1)[0], flags=re.I).rstrip()
        if value in seen:
            # a second line for the same address: sshd would fail to bind it again
            old = s.text.strip()
            fixes.append(
                Fix(
                    "config",
                    f"comment out `{old}` in {s.file} line {s.line}: another line makes "
                    f"sshd listen on {value} already",
                    file=s.file,
                    line=s.line,
                    setting=_indent(s.text) + "#" + old,
                    commands=(_sed_line(s.file, s.line, _indent(s.text) + "#" + old),),
                )
            )
            continue
        seen.add(value)
        on = where if _wide(host) else _sshd_split(value)[0]
        fixes.append(
            _edit(s, f"ListenAddress {value}{rest}", f"make sshd listen on {on}", SSHD_RESTART)
        )
    sixes = {":" in _sshd_split(s.value)[0] for s in located}
    if _wide(host) and len(sixes) == 1:
        # every address of the other family too (on its port), on a line after the last one
        last = located[-1]
        extra = "ListenAddress " + _sshd_join("0.0.0.0" if True in sixes else "::",
                                              _sshd_split(last.value)[1])  # fmt: skip
        i = next(n for n, f in enumerate(fixes) if (f.file, f.line) == (last.file, last.line))
        f = fixes[i]
        fixes[i] = dataclasses.replace(
            f,
            summary=f.summary.replace(", then ", f" and `{extra}` after it, then ", 1),
            commands=(*f.commands, _sed_after(last.file, last.line, _indent(last.text) + extra)),
        )
    return fixes


# --- Caddy: `bind` in each site block served on the port ---


def _caddy(c: Culprit, port: int, host: str) -> list[Fix]:
    # Caddy (Go) listens on 0.0.0.0 with an IPv6 socket that takes IPv4 too
    value = "127.0.0.1 ::1" if host == "127.0.0.1" else host
    where = "every address" if _wide(host) else value.replace(" ", " and ")
    if not c.settings:
        return [
            Fix(
                "config",
                f"`bind {value}` in the site block of /etc/caddy/Caddyfile "
                "(or the global option `default_bind`), then reload caddy",
                file="/etc/caddy/Caddyfile",
                setting=f"bind {value}",
            )
        ]
    # a line added after a site's addresses moves the lines below it: the later sites first
    ordered = sorted(c.settings, key=lambda s: (s.file, s.line or s.section_line), reverse=True)
    return [
        _edit(
            s,
            f"bind {value}",
            f"make Caddy's site on port {port} listen on {where}",
            f"`caddy validate --config {s.file}` and reload caddy",
        )
        for s in ordered
    ]


# --- dnsmasq: listen-address= alone still binds the wildcard; bind-interfaces binds them ---

DNSMASQ_RESTART = "restart dnsmasq"
_DNSMASQ_NOT_DNS = {67, 68, 69, 547}  # DHCP, TFTP, DHCPv6: always on the wildcard


def _commented(s: Setting) -> str:
    return _indent(s.text) + "#" + s.text.strip()


def _dnsmasq(c: Culprit, port: int, host: str) -> list[Fix] | None:
    if port in _DNSMASQ_NOT_DNS:
        return None
    of = {d: [s for s in c.settings if s.directive == d and s.line] for d in
          ("listen-address", "interface", "bind-interfaces", "bind-dynamic")}  # fmt: skip
    listens, interfaces = of["listen-address"], of["interface"]
    conf = next((s.file for s in c.settings if s.directive == "listen-address"), "")
    if not conf:
        return [
            Fix(
                "config",
                "`listen-address=127.0.0.1,::1` and `bind-interfaces` in /etc/dnsmasq.conf, "
                f"then {DNSMASQ_RESTART}",
                setting="listen-address=127.0.0.1,::1",
            )
        ]
    if _wide(host):
        # every interface: what limits it goes (bind-interfaces then binds them all)
        limits = listens + interfaces
        if not limits:
            return [
                advice(
                    "dnsmasq's files set no listen-address= or interface=: look at its "
                    "command line (-a, -i; DNSMASQ_INTERFACE in /etc/default/dnsmasq)"
                )
            ]
        said = ", ".join(f"`{s.text.strip()}` ({s.file} line {s.line})" for s in limits)
        first = limits[0]
        return [
            Fix(
                "config",
                f"let dnsmasq listen on every interface: comment out {said}, "
                f"then {DNSMASQ_RESTART}",
                file=first.file,
                line=first.line,
                setting=_commented(first),
                commands=tuple(_sed_line(s.file, s.line, _commented(s)) for s in limits),
            )
        ]
    value = "127.0.0.1,::1" if host == "127.0.0.1" else ",".join((host, "127.0.0.1", "::1"))
    new = f"listen-address={value}"
    commands: list[str] = []
    parts: list[str] = []
    if listens:
        first = listens[0]
        setting, line, file = _indent(first.text) + new, first.line, first.file
        commands.append(_sed_line(file, line, setting))
        parts.append(f"`{new}` in {file} line {line}")
    else:
        setting, line, file = new, 0, conf
        parts.append(f"`{new}` in {file} (not set there now)")
    # the rest would add addresses again, an interface= its own addresses
    for s in listens[1:] + [i for i in interfaces if i.value != "lo"]:
        commands.append(_sed_line(s.file, s.line, _commented(s)))
        parts.append(f"comment out `{s.text.strip()}` ({s.file} line {s.line})")
    if not of["bind-interfaces"] and not of["bind-dynamic"]:
        # added first, so that an absent listen-address ends the file as `setting` says
        commands.insert(len(commands) if listens else 0, _sed_line(conf, 0, "bind-interfaces"))
        parts.append(
            "`bind-interfaces` (without it dnsmasq binds every address and only drops "
            "the queries to the others)"
        )
    if not listens:
        commands.append(_sed_line(conf, 0, new))
    return [
        Fix(
            "config",
            f"make dnsmasq listen on {value.replace(',', ' and ')} alone: "
            f"{', '.join(parts)}, then {DNSMASQ_RESTART}",
            file=file,
            line=line,
            setting=setting,
            commands=tuple(commands),
        )
    ]


# --- chrony: one bind address per family, each family's socket apart (v6only) ---


def _chrony(c: Culprit, port: int, host: str) -> list[Fix] | None:
    if not c.settings:
        return None
    name = c.settings[0].directive
    who = "command port" if name == "bindcmdaddress" else "NTP port"
    allow = "cmdallow" if name == "bindcmdaddress" else "allow"
    restart = "restart chrony" + ("" if host == "127.0.0.1" else f" (and `{allow}` the clients)")
    located = [s for s in c.settings if s.line]
    if not located:
        if host != "127.0.0.1" or name == "bindcmdaddress":
            return None  # the default is every address (NTP) or loopback (commands) already
        s = c.settings[0]
        lines = [f"{name} 127.0.0.1", f"{name} ::1"]
        return [
            Fix(
                "config",
                f"make chrony's {who} listen on 127.0.0.1 and ::1: `{lines[0]}` and "
                f"`{lines[1]}` in {s.file} (not set there now), then {restart}",
                file=s.file,
                setting=lines[1],
                commands=tuple(_sed_line(s.file, 0, line) for line in lines),
            )
        ]
    fixes = [
        _edit(s, f"{name} {in_family(s.value, host)}", f"make chrony's {who} listen on "
              f"{'every address' if _wide(host) else in_family(s.value, host)}", restart)
        for s in located
    ]  # fmt: skip
    sixes = {":" in s.value for s in located}
    if _wide(host) and name == "bindcmdaddress" and len(sixes) == 1:
        # the other family's command socket stays on its loopback unless told otherwise
        last = located[-1]
        extra = f"{name} {'0.0.0.0' if True in sixes else '::'}"
        f = fixes[-1]
        fixes[-1] = dataclasses.replace(
            f,
            summary=f.summary.replace(", then ", f" and `{extra}` after it, then ", 1),
            commands=(*f.commands, _sed_after(last.file, last.line, _indent(last.text) + extra)),
        )
    return fixes


# --- RabbitMQ: listeners.tcp.NAME lines; a port alone is every address of both families ---

RABBITMQ_RESTART = "restart RabbitMQ"


def _rabbit_value(address: str, port: int) -> str:
    # RabbitMQ's own form: the last colon parts the port (`::1:5672`)
    return f"{address}:{port}" if address else str(port)


def _append(file: str, lines: list[str], missing: bool) -> tuple[str, ...]:
    """Commands that add lines at the end of a file, or write it when it is missing."""
    if missing:
        return (f"printf '%s\\n' {' '.join(shlex.quote(line) for line in lines)} >> "
                f"{shlex.quote(file)}",)  # fmt: skip
    return tuple(_sed_line(file, 0, line) for line in lines)


def _rabbitmq(c: Culprit, port: int, host: str) -> list[Fix]:
    conf = "/etc/rabbitmq/rabbitmq.conf"
    # both loopbacks by address; every address is the port alone (both families)
    wide = "" if _wide(host) else host
    targets = ["127.0.0.1", "::1"] if host == "127.0.0.1" else [wide]
    values = [_rabbit_value(t, port) for t in targets]
    where = " and ".join(t or "every address" for t in targets)
    located = [s for s in c.settings if s.line]
    if not located:
        s = c.settings[0] if c.settings else Setting(conf, 0, "")
        lines = [f"listeners.tcp.{n} = {v}" for n, v in enumerate(values, 1)]
        said = " and ".join(f"`{line}`" for line in lines)
        how = "a file of its own (there is none now)" if s.missing else "it (not set there now)"
        return [
            Fix(
                "config",
                f"make RabbitMQ listen on {where}: {said} in {s.file}, {how}, then "
                f"{RABBITMQ_RESTART}",
                file=s.file,
                setting=lines[-1],
                commands=_append(s.file, lines, s.missing) if c.settings else (),
            )
        ]
    fixes = []
    for s, value in zip(located, values, strict=False):
        fixes.append(
            _edit(s, f"listeners.tcp.{s.directive} = {value}", f"make RabbitMQ listen on "
                  f"{where}", RABBITMQ_RESTART)
        )  # fmt: skip
    for s in located[len(values) :]:
        # a further listener would still listen where it did
        old = s.text.strip()
        fixes.append(
            Fix(
                "config",
                f"comment out `{old}` in {s.file} line {s.line}, then {RABBITMQ_RESTART}",
                file=s.file,
                line=s.line,
                setting=_indent(s.text) + "#" + old,
                commands=(_sed_line(s.file, s.line, _indent(s.text) + "#" + old),),
            )
        )
    if len(values) > len(located):
        # the other loopback on a line of its own, under a name no listener has yet
        last = located[-1]
        names = {s.directive for s in located}
        name = next(str(n) for n in range(1, len(names) + 2) if str(n) not in names)
        extra = f"listeners.tcp.{name} = {values[-1]}"
        f = fixes[len(located) - 1]
        fixes[len(located) - 1] = dataclasses.replace(
            f,
            summary=f.summary.replace(", then ", f" and `{extra}` after it, then ", 1),
            commands=(*f.commands, _sed_after(last.file, last.line, _indent(last.text) + extra)),
        )
    return fixes


def bind_change(culprit: Culprit | None, port: int, host: str) -> list[Fix]:
    """The concrete change that makes this program listen on `host` (an address)."""
    h = _hostport(host, port)
    kind = culprit.kind if culprit else ""
    if culprit is not None:
        found = _program_fixes(culprit, port, host)
        if found is not None:
            return found
    if kind == "flask":
        assert culprit is not None
        module = program_base(culprit.script).removesuffix(".py") or "app"
        fixes = []
        new = f'{culprit.var}.run(host="{host}", port={port})'
        if culprit.line:
            fixes.append(
                Fix(
                    "code",
                    f"in {culprit.script} line {culprit.line}: change `{culprit.call}` to `{new}`",
                    file=culprit.script,
                    line=culprit.line,
                    setting=new,
                )
            )
        else:
            fixes.append(Fix("code", f'call `app.run(host="{host}", port={port})`'))
        fixes.append(
            Fix(
                "command",
                f"or, better outside development, serve it with gunicorn: "
                f"`gunicorn -b {h} {module}:{culprit.var}` (or uWSGI: "
                f"`uwsgi --http {h} --module {module}:{culprit.var}`)",
            )
        )
        return fixes
    if kind == "flask-cli":
        return [
            Fix(
                "command", f"`flask run --host={host} --port={port}` (or set FLASK_RUN_HOST={host})"
            ),
            Fix("command", f"or serve it with gunicorn: `gunicorn -b {h} module:app`"),
        ]
    if kind == "django":
        return [
            Fix(
                "command",
                f"`python manage.py runserver {h}`, and add the host's name to "
                "ALLOWED_HOSTS in settings.py",
            ),
            Fix("command", f"or serve it with gunicorn: `gunicorn -b {h} project.wsgi`"),
        ]
    if kind == "gunicorn":
        assert culprit is not None
        return [
            Fix(
                "command",
                f"`gunicorn -b {h} {culprit.app or 'module:app'}` "
                f'(or bind = "{h}" in gunicorn.conf.py)',
            )
        ]
    if kind == "uvicorn":
        assert culprit is not None
        if culprit.line:
            new = f'uvicorn.run(app, host="{host}", port={port})'
            return [
                Fix(
                    "code",
                    f'in {culprit.script} line {culprit.line}: pass host="{host}" to '
                    f"uvicorn.run(): `{new}`",
                    file=culprit.script,
                    line=culprit.line,
                    setting=new,
                )
            ]
        return [
            Fix("command", f"`uvicorn {culprit.app or 'module:app'} --host {host} --port {port}`")
        ]
    if kind == "jupyter":
        return [
            Fix(
                "command",
                f"`jupyter lab --ip={host} --port={port}` (or c.ServerApp.ip = '{host}'); "
                "keep its token or password: it runs code for whoever connects",
            )
        ]
    if kind == "http.server":
        return [Fix("command", f"`python3 -m http.server --bind {host} {port}`")]
    if kind == "node":
        return [
            Fix(
                "code",
                f'`server.listen({port}, "{host}")` instead of "localhost" or "127.0.0.1" '
                '(since Node 17 "localhost" may mean ::1 only), or set the host your '
                "framework reads (HOST=" + host + ")",
            )
        ]
    if kind == "next":
        return [
            Fix(
                "command", f"`next start -H {host} -p {port}` (`next dev -H {host}` in development)"
            )
        ]
    if kind == "vite":
        return [
            Fix("command", f"`vite --host {host} --port {port}` (or server.host in vite.config)")
        ]
    if kind == "mongod":
        return [
            Fix(
                "config",
                f"`net.bindIp: {host}` in /etc/mongod.conf (or --bind_ip {host}), "
                "then restart mongod",
                file="/etc/mongod.conf",
                setting=f"net.bindIp: {host}",
            )
        ]
    if kind == "elasticsearch":
        return [
            Fix(
                "config",
                f"`network.host: {host}` in elasticsearch.yml, then restart it",
                setting=f"network.host: {host}",
            )
        ]
    if kind == "publisher":
        return [
            Fix(
                "command",
                f"publish it on {host}: `-p {h}:PORT_INSIDE` in `docker run` / `podman run` "
                "(`ports:` in compose), then recreate the container",
            )
        ]
    if kind == "bindscope":
        return [Fix("command", f"--web.listen-address={h}")]
    return [
        Fix(
            "command",
            f"make the program listen on {host}: look for its host, bind or listen setting",
        )
    ]


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
