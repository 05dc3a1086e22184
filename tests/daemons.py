"""Real daemons from Debian for the tests, each run as the test's own process, never as the
system's service: in the server network namespace and a private mount namespace where its
package's config directory (/etc/redis, /etc/nginx, ...) is a copy under a temporary
directory, bind-mounted. So a fix names the package's real path, and applying it
(`nsenter` into the daemon's mount and network namespaces, where an admin's shell on that
host would be) edits only the copy."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import TOOL, TwoHosts, require_binary, run

REFUSED = "ConnectionRefusedError: [Errno 111] Connection refused"
TIMED_OUT = "TimeoutError: timed out"
START_DEADLINE = 60.0  # seconds for a daemon to accept on loopback; generous for CI
PG_BIN = "/usr/lib/postgresql/15/bin"
# a DNS query (id 0x6273, recursion desired) for localhost's A record
DNS_QUERY = bytes.fromhex("627301000001000000000000") + b"\x09localhost\x00\x00\x01\x00\x01"


@dataclass(frozen=True)
class Daemon:
    """How to set one daemon up wrong, start it, and what its fix must reach."""

    name: str
    port: int
    expose: str  # the declaration in bindscope's config
    binary: str
    mounts: tuple[str, ...]  # package directories replaced by copies under the temp dir
    setup: Callable[[Path], None]  # writes the copies and data, misconfigured
    command: Callable[[Path], str]  # the shell command that starts it in the foreground
    wrong: str  # the status before the fix
    file: str  # the file the fix must name, as the daemon sees it
    line: Callable[[Path], int]  # the line of the wrong setting in that file
    client_after: str  # what the client namespace gets after the fix: "ok" or REFUSED
    loopback: tuple[str, ...] = ("127.0.0.1",)  # loopback addresses that must accept
    # a request it answers over UDP too: the service is declared for UDP as well, and the
    # datagram is sent where the TCP connects go
    datagram: bytes = b""
    tcp: bool = True  # False: a UDP service alone, checked with the datagram alone
    fixes: int = 1  # config fixes: one per line that sets where it listens
    id: str = ""  # the test's id, where the binary's name alone repeats

    @property
    def test_id(self) -> str:
        return self.id or self.binary.rsplit("/")[-1]


def etc_upper(tmp: Path) -> Path:
    """Where a daemon's files that lie in /etc itself (not in a directory of their own that
    a bind mount could replace) are copied: the upper layer of an overlay on /etc."""
    (tmp / "etc-work").mkdir()
    upper = tmp / "etc-upper"
    upper.mkdir()
    return upper


def mount_etc_overlay(tmp: Path) -> str:
    """The shell command that lays etc_upper's copies over /etc, in the daemon's own mount
    namespace."""
    return (
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={tmp}/etc-upper,"
        f"workdir={tmp}/etc-work /etc"
    )


def _edit(path: Path, pattern: str, replacement: str) -> None:
    text = path.read_text()
    new, n = re.subn(pattern, replacement, text, flags=re.M)
    assert n, f"{pattern!r} not in {path}"
    path.write_text(new)


def _line_of(path: Path, pattern: str) -> int:
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(pattern, line):
            return n
    raise AssertionError(f"{pattern!r} not in {path}")


# --- redis: `bind * -::*` in Debian's own redis.conf, declared loopback ---


def redis_setup(tmp: Path) -> None:
    shutil.copytree("/etc/redis", tmp / "etc/redis", symlinks=True)
    conf = tmp / "etc/redis/redis.conf"
    _edit(conf, r"^bind .*$", "bind * -::*")  # the admin's change: "let the app servers in"
    # where the test keeps its state, in place of the service's directories
    _edit(conf, r"^daemonize .*$", "daemonize no")
    _edit(conf, r"^pidfile .*$", f"pidfile {tmp}/redis.pid")
    _edit(conf, r"^logfile .*$", 'logfile ""')
    _edit(conf, r"^dir .*$", f"dir {tmp}")


REDIS = Daemon(
    name="redis",
    port=6379,
    expose="loopback",
    binary="redis-server",
    mounts=("/etc/redis",),
    setup=redis_setup,
    command=lambda tmp: "redis-server /etc/redis/redis.conf",
    wrong="overexposed",
    file="/etc/redis/redis.conf",
    line=lambda tmp: _line_of(tmp / "etc/redis/redis.conf", r"^bind "),
    client_after=REFUSED,
    loopback=("127.0.0.1", "::1"),
)


# --- nginx: `listen 127.0.0.1:80` in a sites-enabled file, declared private ---

NGINX_CONF = """\
pid {tmp}/nginx.pid;
error_log stderr;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include /etc/nginx/sites-enabled/*;
}}
"""
NGINX_SITE = """\
server {{
    listen 127.0.0.1:80;
    root {tmp}/www;
}}
"""


def nginx_setup(tmp: Path) -> None:
    (tmp / "etc/nginx/sites-enabled").mkdir(parents=True)
    (tmp / "www").mkdir()
    (tmp / "www/index.html").write_text("hello\n")
    (tmp / "etc/nginx/nginx.conf").write_text(NGINX_CONF.format(tmp=tmp))
    (tmp / "etc/nginx/sites-enabled/shop").write_text(NGINX_SITE.format(tmp=tmp))


NGINX = Daemon(
    name="web",
    port=80,
    expose="private",
    binary="nginx",
    mounts=("/etc/nginx",),
    setup=nginx_setup,
    command=lambda tmp: "nginx -g 'daemon off;'",
    wrong="loopback_only",
    file="/etc/nginx/sites-enabled/shop",
    line=lambda tmp: 2,
    client_after="ok",
)


# --- PostgreSQL: listen_addresses = '*' in /etc/postgresql/15/main, declared loopback ---


def postgres_setup(tmp: Path) -> None:
    data = tmp / "data"
    data.mkdir(mode=0o700)
    shutil.chown(data, "postgres", "postgres")
    run("setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
        f"{PG_BIN}/initdb", "-D", str(data), "--auth=trust", timeout=120)  # fmt: skip
    conf = tmp / "etc/postgresql/15/main"
    conf.mkdir(parents=True)
    (conf / "postgresql.conf").write_text(
        f"data_directory = '{data}'\n"
        "port = 5432\n"
        "listen_addresses = '*'\t\t# what port to listen on, as the admin opened it\n"
        f"unix_socket_directories = '{tmp}/run'\n"
    )
    (tmp / "run").mkdir()
    shutil.chown(tmp / "run", "postgres", "postgres")
    shutil.chown(conf / "postgresql.conf", "postgres", "postgres")


POSTGRES = Daemon(
    name="db",
    port=5432,
    expose="loopback",
    binary=f"{PG_BIN}/postgres",
    mounts=("/etc/postgresql",),
    setup=postgres_setup,
    command=lambda tmp: (
        "exec setpriv --reuid=postgres --regid=postgres --init-groups "
        f"{PG_BIN}/postgres -D {tmp}/data "
        "-c config_file=/etc/postgresql/15/main/postgresql.conf"
    ),
    wrong="overexposed",
    file="/etc/postgresql/15/main/postgresql.conf",
    line=lambda tmp: 3,
    client_after=REFUSED,
    loopback=("127.0.0.1", "::1"),
)


# --- MariaDB: bind-address = 0.0.0.0 in Debian's 50-server.cnf, declared loopback ---


def mariadb_setup(tmp: Path) -> None:
    shutil.copytree("/etc/mysql", tmp / "etc/mysql", symlinks=True)
    # Debian's my.cnf is a link through /etc/alternatives: make it a file in the copy
    my = tmp / "etc/mysql/my.cnf"
    text = Path("/etc/mysql/mariadb.cnf").read_text()
    my.unlink()
    my.write_text(text)
    server = tmp / "etc/mysql/mariadb.conf.d/50-server.cnf"
    _edit(server, r"^#?bind-address\s*=.*$", "bind-address            = 0.0.0.0")
    _edit(server, r"^#?datadir\s*=.*$", f"datadir = {tmp}/mysql")
    run_dir = tmp / "run"  # its socket, pid and log: written as the mysql user
    _edit(server, r"^#?pid-file\s*=.*$", f"pid-file = {run_dir}/mysqld.pid")
    _edit(server, r"^\[mysqld\]$", f"[mysqld]\nsocket = {run_dir}/sock\nlog-error = {run_dir}/err")
    for d in (tmp / "mysql", run_dir):
        d.mkdir()
        shutil.chown(d, "mysql", "mysql")
    run("mariadb-install-db", "--user=mysql", f"--datadir={tmp}/mysql",
        "--auth-root-authentication-method=socket", "--skip-test-db", timeout=180)  # fmt: skip


MARIADB = Daemon(
    name="mariadb",
    port=3306,
    expose="loopback",
    binary="mariadbd",
    mounts=("/etc/mysql",),
    setup=mariadb_setup,
    command=lambda tmp: "exec mariadbd --user=mysql",
    wrong="overexposed",
    file="/etc/mysql/mariadb.conf.d/50-server.cnf",
    line=lambda tmp: _line_of(tmp / "etc/mysql/mariadb.conf.d/50-server.cnf", r"^bind-address"),
    client_after=REFUSED,
)

# --- memcached: `-l 0.0.0.0` in /etc/memcached.conf, started as Debian's unit does ---


def memcached_setup(tmp: Path) -> None:
    upper = etc_upper(tmp)
    conf = Path("/etc/memcached.conf").read_text()
    conf = re.sub(r"(?m)^-l .*$", "-l 0.0.0.0", conf)  # the admin's change
    # the pid file where the test keeps its state (the wrapper keeps it in the foreground)
    conf = re.sub(r"(?m)^-P .*$", f"-P {tmp}/memcached.pid", conf)
    (upper / "memcached.conf").write_text(conf)


MEMCACHED_CONF = "/etc/memcached.conf"
MEMCACHED = Daemon(
    name="cache",
    port=11211,
    expose="loopback",
    binary="memcached",
    mounts=(),
    setup=memcached_setup,
    # /etc itself is an overlay on the copy: the file lies in /etc, not in a directory
    # of its own that a bind mount could replace
    command=lambda tmp: (
        f"{mount_etc_overlay(tmp)} && "
        f"exec /usr/share/memcached/scripts/systemd-memcached-wrapper {MEMCACHED_CONF}"
    ),
    wrong="overexposed",
    file=MEMCACHED_CONF,
    line=lambda tmp: _line_of(tmp / "etc-upper/memcached.conf", r"^-l "),
    client_after=REFUSED,
    loopback=("127.0.0.1", "::1"),
)


# --- mosquitto: Debian's config, no listener (local only since 2.0), declared private ---


def mosquitto_setup(tmp: Path) -> None:
    shutil.copytree("/etc/mosquitto", tmp / "etc/mosquitto", symlinks=True)
    conf = tmp / "etc/mosquitto/mosquitto.conf"
    _edit(conf, r"^pid_file .*$", "")  # it writes one as its own user: none is needed
    _edit(conf, r"^persistence true$", "persistence false")
    _edit(conf, r"^log_dest file .*$", "log_dest stderr")


MOSQUITTO = Daemon(
    name="mqtt",
    port=1883,
    expose="private",
    binary="mosquitto",
    mounts=("/etc/mosquitto",),
    setup=mosquitto_setup,
    command=lambda tmp: "mosquitto -c /etc/mosquitto/mosquitto.conf",
    wrong="loopback_only",
    file="/etc/mosquitto/mosquitto.conf",
    line=lambda tmp: 0,  # no listener line: the fix adds one
    client_after="ok",
)

# --- HAProxy: a frontend bound to 127.0.0.1, declared private ---

HAPROXY_FRONTEND = """
frontend shop
    bind 127.0.0.1:8080
    http-request return status 200 content-type text/plain string ok
"""


def haproxy_setup(tmp: Path) -> None:
    shutil.copytree("/etc/haproxy", tmp / "etc/haproxy", symlinks=True)
    conf = tmp / "etc/haproxy/haproxy.cfg"
    # the parts that need the service's own directories and syslog
    for line in (r"^\s*log /dev/log.*$", r"^\s*chroot .*$", r"^\s*stats socket .*$"):
        _edit(conf, line, "")
    conf.write_text(conf.read_text() + HAPROXY_FRONTEND)


HAPROXY = Daemon(
    name="shop",
    port=8080,
    expose="private",
    binary="haproxy",
    mounts=("/etc/haproxy",),
    setup=haproxy_setup,
    # as Debian's unit runs it: master and worker, in the foreground
    command=lambda tmp: "haproxy -Ws -f /etc/haproxy/haproxy.cfg -db",
    wrong="loopback_only",
    file="/etc/haproxy/haproxy.cfg",
    line=lambda tmp: _line_of(tmp / "etc/haproxy/haproxy.cfg", r"^\s*bind 127"),
    client_after="ok",
)


# --- Apache: `Listen 127.0.0.1:80` in Debian's ports.conf, declared private ---


def apache_setup(tmp: Path) -> None:
    shutil.copytree("/etc/apache2", tmp / "etc/apache2", symlinks=True)
    _edit(tmp / "etc/apache2/ports.conf", r"^Listen 80$", "Listen 127.0.0.1:80")
    envvars = tmp / "etc/apache2/envvars"
    for name in ("PID_FILE", "RUN_DIR", "LOCK_DIR", "LOG_DIR"):
        where = f"{tmp}/apache2.pid" if name == "PID_FILE" else f"{tmp}/{name.lower()}"
        _edit(envvars, rf"^export APACHE_{name}=.*$", f"export APACHE_{name}={where}")
    for d in ("run_dir", "lock_dir", "log_dir"):
        (tmp / d).mkdir()


APACHE = Daemon(
    name="site",
    port=80,
    expose="private",
    binary="apache2",
    mounts=("/etc/apache2",),
    setup=apache_setup,
    command=lambda tmp: "apache2ctl -D FOREGROUND",
    wrong="loopback_only",
    file="/etc/apache2/ports.conf",
    line=lambda tmp: _line_of(tmp / "etc/apache2/ports.conf", r"^Listen 127"),
    client_after="ok",
)


# --- OpenSSH: Debian's two commented ListenAddress lines uncommented, declared loopback ---


def _sshd_copy(tmp: Path) -> Path:
    ssh = tmp / "etc/ssh"
    ssh.mkdir(parents=True)
    # the package's config, not the host's keys: the copy gets host keys of its own
    for name in ("sshd_config", "moduli"):
        shutil.copy2(f"/etc/ssh/{name}", ssh / name)
    shutil.copytree("/etc/ssh/sshd_config.d", ssh / "sshd_config.d", symlinks=True)
    run("ssh-keygen", "-A", "-f", str(tmp))  # writes tmp/etc/ssh/ssh_host_*_key
    return ssh


def sshd_setup(tmp: Path) -> None:
    conf = _sshd_copy(tmp) / "sshd_config"
    # "listen on both families, explicitly": the lines Debian ships commented out
    _edit(conf, r"^#ListenAddress 0\.0\.0\.0$", "ListenAddress 0.0.0.0")
    _edit(conf, r"^#ListenAddress ::$", "ListenAddress ::")


# its privilege separation directory (the unit's RuntimeDirectory) on a tmpfs of the private
# mount namespace, never the host's /run; by absolute path, as sshd re-executes itself
SSHD_COMMAND = "mount -t tmpfs tmpfs /run && mkdir -m 0755 /run/sshd && exec /usr/sbin/sshd -D -e"

SSHD = Daemon(
    name="ssh",
    port=22,
    expose="loopback",
    binary="sshd",
    mounts=("/etc/ssh",),
    setup=sshd_setup,
    command=lambda tmp: SSHD_COMMAND,
    wrong="overexposed",
    file="/etc/ssh/sshd_config",
    line=lambda tmp: _line_of(tmp / "etc/ssh/sshd_config", r"^ListenAddress "),
    client_after=REFUSED,
    loopback=("127.0.0.1", "::1"),
    fixes=2,
)


# --- OpenSSH: `ListenAddress 127.0.0.1` in a drop-in of sshd_config.d, declared private ---

SSHD_DROP_IN = "/etc/ssh/sshd_config.d/tunnels-only.conf"


def sshd_local_setup(tmp: Path) -> None:
    # once for tunnels alone; now the bastion on the private network must get in
    ssh = _sshd_copy(tmp)
    (tmp / SSHD_DROP_IN.lstrip("/")).write_text(
        "# ssh through tunnels only\nListenAddress 127.0.0.1\n"
    )
    assert (ssh / "sshd_config.d").is_dir()


SSHD_LOCAL = Daemon(
    name="ssh",
    port=22,
    expose="private",
    binary="sshd",
    mounts=("/etc/ssh",),
    setup=sshd_local_setup,
    command=lambda tmp: SSHD_COMMAND,
    wrong="loopback_only",
    file=SSHD_DROP_IN,
    line=lambda tmp: 2,
    client_after="ok",
    loopback=("127.0.0.1", "::1"),
    id="sshd-drop-in",
)


# --- Caddy: a `:8080` site added to Debian's Caddyfile, for this host alone ---

CADDY_SITE = """
# the shop's status page, for this host's monitoring alone
:8080 {
\trespond "ok"
}
"""


def caddy_setup(tmp: Path) -> None:
    shutil.copytree("/etc/caddy", tmp / "etc/caddy", symlinks=True)
    caddyfile = tmp / "etc/caddy/Caddyfile"
    caddyfile.write_text(caddyfile.read_text() + CADDY_SITE)
    for d in ("data", "config"):
        (tmp / d).mkdir()


CADDY = Daemon(
    name="status",
    port=8080,
    expose="loopback",
    binary="caddy",
    mounts=("/etc/caddy",),
    setup=caddy_setup,
    # as Debian's unit runs it; its storage (certificates, autosave) in the temp dir. Its
    # sites name ports alone: plain HTTP, no certificate is ever asked for
    command=lambda tmp: (
        f"exec env HOME={tmp} XDG_DATA_HOME={tmp}/data XDG_CONFIG_HOME={tmp}/config "
        "caddy run --environ --config /etc/caddy/Caddyfile"
    ),
    wrong="overexposed",
    file="/etc/caddy/Caddyfile",
    line=lambda tmp: 0,
    client_after=REFUSED,
    loopback=("127.0.0.1", "::1"),
)


# --- dnsmasq: Debian's dnsmasq.conf (DNS on every interface), a resolver for this host alone ---

DNSMASQ_CONF = "/etc/dnsmasq.conf"


def dnsmasq_setup(tmp: Path) -> None:
    # /etc/dnsmasq.conf lies in /etc itself: an overlay on /etc, as for memcached
    upper = etc_upper(tmp)
    shutil.copy2(DNSMASQ_CONF, upper / "dnsmasq.conf")


DNSMASQ = Daemon(
    name="dns",
    port=53,
    expose="loopback",
    binary="dnsmasq",
    mounts=(),
    setup=dnsmasq_setup,
    # the arguments of Debian's systemd-helper, in the foreground and with the pid file in
    # the temp dir; --no-resolv: no upstream servers, so no query leaves the namespace (and
    # /etc/resolv.conf is not read); no DHCP is configured
    command=lambda tmp: (
        f"{mount_etc_overlay(tmp)} && "
        f"exec dnsmasq --keep-in-foreground --log-facility=- --no-resolv "
        f"-x {tmp}/dnsmasq.pid -u dnsmasq -7 /etc/dnsmasq.d,.dpkg-dist,.dpkg-old,.dpkg-new "
        "--local-service"
    ),
    wrong="overexposed",
    file=DNSMASQ_CONF,
    line=lambda tmp: 0,
    client_after=REFUSED,
    loopback=("127.0.0.1", "::1"),
    datagram=DNS_QUERY,
)

# --- chrony: its command port opened to the monitoring network in conf.d, declared loopback ---

# chronyc's `tracking` request (protocol version 6, padded as chronyd wants it)
CHRONYC_TRACKING = bytes.fromhex("060100000021000074441115") + bytes(92)


# tests/run.sh unpacks chrony's package under CHRONY_ROOT rather than installing it: it
# conflicts with every other time daemon and would remove the host's own
CHRONY_ROOT = Path("/opt/bindscope-tests/chrony")
CHRONYD = shutil.which("chronyd") or str(CHRONY_ROOT / "usr/sbin/chronyd")


def chrony_setup(tmp: Path) -> None:
    # /etc/chrony may not exist on the host: an overlay on /etc holds the copy
    upper = etc_upper(tmp)
    etc = upper / "chrony"
    if shutil.which("chronyd"):
        shutil.copytree("/etc/chrony", etc, symlinks=True)
    else:  # as the package's postinst puts them in place (ucf)
        shutil.copytree(CHRONY_ROOT / "etc/chrony", etc, symlinks=True)
        for name in ("chrony.conf", "chrony.keys"):
            shutil.copy2(CHRONY_ROOT / "usr/share/chrony" / name, etc / name)
    conf = etc / "chrony.conf"
    # the test's: no time source (no traffic beyond the namespaces), its state in the temp
    # dir, and (beside -x) nothing that would touch the host's clock
    _edit(conf, r"^pool .*$", "")
    _edit(conf, r"^(driftfile|ntsdumpdir|logdir) .*$", rf"\1 {tmp}/chrony")
    _edit(conf, r"^(rtcsync|makestep .*)$", "")
    (tmp / "chrony").mkdir()
    # the admin's change, where Debian's confdir reads it: chronyc from the monitoring host
    (etc / "conf.d/monitoring.conf").write_text(
        "# chronyc from the monitoring host\nbindcmdaddress 0.0.0.0\ncmdallow 198.51.100.0/24\n"
    )


CHRONY = Daemon(
    name="chrony-cmd",
    port=323,
    expose="loopback",
    binary=CHRONYD,
    mounts=(),
    setup=chrony_setup,
    # as Debian's unit runs it (-F 1), in the foreground, never controlling the clock (-x),
    # as root (its package's _chrony user may not exist); its pid file and socket in
    # /run/chrony on a tmpfs of the private mount namespace
    command=lambda tmp: (
        f"{mount_etc_overlay(tmp)} && "
        f"mount -t tmpfs tmpfs /run && mkdir -m 0750 /run/chrony && "
        f"exec {CHRONYD} -d -x -F 1 -u root"
    ),
    wrong="overexposed",
    file="/etc/chrony/conf.d/monitoring.conf",
    line=lambda tmp: 2,
    client_after=REFUSED,
    loopback=("127.0.0.1", "::1"),
    datagram=CHRONYC_TRACKING,
    tcp=False,
)


# --- RabbitMQ: Debian's package as installed (no rabbitmq.conf: AMQP on every address) ---


def rabbitmq_setup(tmp: Path) -> None:
    shutil.copytree("/etc/rabbitmq", tmp / "etc/rabbitmq", symlinks=True)
    # its database, logs and Erlang cookie in the temp dir, written as its own user
    for d in ("home", "mnesia", "log"):
        (tmp / "rabbitmq" / d).mkdir(parents=True)
    for d in (tmp / "rabbitmq", *(tmp / "rabbitmq").iterdir()):
        shutil.chown(d, "rabbitmq", "rabbitmq")


RABBITMQ = Daemon(
    name="amqp",
    port=5672,
    expose="loopback",
    binary="/usr/lib/rabbitmq/bin/rabbitmq-server",
    mounts=("/etc/rabbitmq",),
    setup=rabbitmq_setup,
    # as Debian's units run them: epmd (its own unit) beside the node, each as its own user;
    # epmd in the foreground here, so it is in the daemon's process group and stops with it
    command=lambda tmp: (
        "{ setpriv --reuid=epmd --regid=epmd --init-groups epmd & } && "
        "exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "
        f"env HOME={tmp}/rabbitmq/home RABBITMQ_MNESIA_BASE={tmp}/rabbitmq/mnesia "
        f"RABBITMQ_LOG_BASE={tmp}/rabbitmq/log RABBITMQ_LOGS=- "
        "/usr/lib/rabbitmq/bin/rabbitmq-server"
    ),
    wrong="overexposed",
    file="/etc/rabbitmq/rabbitmq.conf",
    line=lambda tmp: 0,
    client_after=REFUSED,
    loopback=("127.0.0.1", "::1"),
    id="rabbitmq",
)


# --- epmd, started by the RabbitMQ node itself (no systemd socket), declared loopback ---

EPMD = Daemon(
    name="epmd",
    port=4369,
    expose="loopback",
    binary="epmd",
    mounts=("/etc/rabbitmq",),
    setup=rabbitmq_setup,
    # where no epmd.socket runs (a container), the node starts `epmd -daemon` in its own
    # environment, which rabbitmq-env.conf's ERL_EPMD_ADDRESS reaches
    command=lambda tmp: (
        "exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "
        f"env HOME={tmp}/rabbitmq/home RABBITMQ_MNESIA_BASE={tmp}/rabbitmq/mnesia "
        f"RABBITMQ_LOG_BASE={tmp}/rabbitmq/log RABBITMQ_LOGS=- "
        "/usr/lib/rabbitmq/bin/rabbitmq-server"
    ),
    wrong="overexposed",
    file="/etc/rabbitmq/rabbitmq-env.conf",
    line=lambda tmp: 0,
    client_after=REFUSED,
    loopback=("127.0.0.1", "::1"),
)


DAEMONS = [
    REDIS,
    NGINX,
    POSTGRES,
    MARIADB,
    MEMCACHED,
    MOSQUITTO,
    HAPROXY,
    APACHE,
    SSHD,
    SSHD_LOCAL,
    CADDY,
    DNSMASQ,
    CHRONY,
    RABBITMQ,
    EPMD,
]


class Running:
    """One daemon in the server namespace and its own mount namespace; always stopped."""

    def __init__(self, hosts: TwoHosts, daemon: Daemon, tmp: Path) -> None:
        self.hosts, self.daemon, self.tmp = hosts, daemon, tmp
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "daemon.log"

    def start(self) -> None:
        mounts = [
            f"mount --bind {shlex.quote(str(self.tmp) + m)} {shlex.quote(m)}"
            for m in self.daemon.mounts
        ]
        command = self.daemon.command(self.tmp)
        script = " && ".join([*mounts, command if "exec " in command else f"exec {command}"])
        with open(self.log, "ab") as log:
            # sh, unshare and ip netns exec all exec: the pid is the daemon's own
            self.proc = subprocess.Popen(
                [*self.hosts.prefix(self.hosts.server), "unshare", "--mount",
                 "--propagation", "private", "sh", "-c", script],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.wait_accepting()

    def wait_accepting(self) -> None:
        """Until it accepts on 127.0.0.1 (one bounded loop inside the namespace)."""
        d = self.daemon
        # a UDP daemon accepts when it answers its request
        attempt = (
            f"socket.create_connection(('127.0.0.1',{d.port}),1).close()"
            if d.tcp
            else "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(1);"
            f"s.connect(('127.0.0.1',{d.port}));s.send(bytes.fromhex({d.datagram.hex()!r}));"
            "s.recv(4096);s.close()"
        )
        code = (
            "import socket,sys,time\n"
            f"end=time.monotonic()+{START_DEADLINE}\n"
            "while time.monotonic()<end:\n"
            "    try:\n"
            f"        {attempt}\n"
            "        sys.exit(0)\n"
            "    except OSError:\n"
            "        time.sleep(0.1)\n"
            "sys.exit(1)\n"
        )
        r = run(*self.hosts.prefix(self.hosts.server), sys.executable, "-c", code,
                check=False, timeout=START_DEADLINE + 10)  # fmt: skip
        assert r.returncode == 0, f"{self.daemon.name} did not start: {self.log.read_text()}"

    def stop(self) -> None:
        if self.proc is None:
            return
        group = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        # until the whole group is gone: a master (apache2ctl's apache2) may outlive its
        # starter while its children finish, and still hold the port
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._alive(group):
            self.proc.poll()
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None
        self._stop_the_rest()

    def _stop_the_rest(self) -> None:
        """What left the group (epmd -daemon, which the Erlang node starts, is a session of
        its own) goes too: nothing else of the test runs in the server namespace now."""
        deadline = time.monotonic() + 30
        while pids := run("ip", "netns", "pids", self.hosts.server, check=False).stdout.split():
            late = time.monotonic() - deadline
            assert late < 30, f"still running in {self.hosts.server}: {pids}"
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL if late > 0 else signal.SIGTERM)
            time.sleep(0.1)

    @staticmethod
    def _alive(group: int) -> bool:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True

    def run_as_admin(self, command: str) -> subprocess.CompletedProcess:
        """A printed command, run where the admin's shell on that host would run it."""
        assert self.proc is not None
        return run("nsenter", "-t", str(self.proc.pid), "-m", "-n", "sh", "-c", command)

    def file(self, path: str) -> Path:
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root{path}")


@pytest.fixture(name="running")
def running_fixture(two_hosts: TwoHosts, shared_dir: Path, request) -> Iterator[Running]:
    workdir = shared_dir  # readable by the daemons' own users (tmp_path is root's alone)
    daemon: Daemon = request.param
    require_binary(daemon.binary, "unshare", "nsenter", "setpriv")
    daemon.setup(workdir)
    r = Running(two_hosts, daemon, workdir)
    services = ""
    if daemon.tcp:
        services += f"  - {{name: {daemon.name}, port: {daemon.port}, expose: {daemon.expose}}}\n"
    if daemon.datagram:
        services += (
            f"  - {{name: {daemon.name}-udp, port: {daemon.port}, protocol: udp, "
            f"expose: {daemon.expose}}}\n"
        )
    (workdir / "bindscope.yml").write_text("probe:\n  timeout: 500ms\nservices:\n" + services)
    try:
        r.start()
        yield r
    finally:
        r.stop()


def tool(r: Running, *args: str) -> tuple[int, str]:
    p = subprocess.run(
        [*r.hosts.prefix(r.hosts.server), *TOOL, *args, "--config.file",
         str(r.tmp / "bindscope.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, p.stdout


def status(r: Running) -> str:
    """The services' status: one word when they agree (a UDP twin's too), else each."""
    found = {s["status"] for s in json.loads(tool(r, "scan", "--json")[1])["services"]}
    return ",".join(sorted(found))


def diagnose(r: Running) -> dict:
    code, out = tool(r, "diagnose", str(r.daemon.port), "--json")
    doc = json.loads(out)
    assert (code == 1) == (doc["result"] == "problem"), out
    return doc


def _datagram(r: Running, ns: str, address: str) -> str:
    """The daemon's request over UDP from namespace `ns`: 'ok' when an answer comes."""
    family = "AF_INET6" if ":" in address else "AF_INET"
    code = (
        "import socket\n"
        f"s=socket.socket(socket.{family},socket.SOCK_DGRAM)\n"
        "s.settimeout(2)\n"
        f"s.connect(({address!r},{r.daemon.port}))\n"
        f"s.send(bytes.fromhex({r.daemon.datagram.hex()!r}))\n"
        "s.recv(4096)\n"
    )
    p = r.hosts.exec(ns, sys.executable, "-c", code, check=False)
    return "ok" if p.returncode == 0 else p.stderr.strip().splitlines()[-1]


def _connect(r: Running, ns: str, address: str) -> str:
    code = f"import socket;socket.create_connection(({address!r},{r.daemon.port}),2).close()"
    p = r.hosts.exec(ns, sys.executable, "-c", code, check=False)
    return "ok" if p.returncode == 0 else p.stderr.strip().splitlines()[-1]


def _reach(r: Running, ns: str, address: str) -> str:
    """What a client in `ns` gets on address:port: one word when TCP and UDP agree."""
    words = {}
    if r.daemon.tcp:
        words["tcp"] = _connect(r, ns, address)
    if r.daemon.datagram:
        words["udp"] = _datagram(r, ns, address)
    if len(set(words.values())) == 1:
        return next(iter(words.values()))
    return "; ".join(f"{proto}: {word}" for proto, word in words.items())


def loopback(r: Running, address: str) -> str:
    return _reach(r, r.hosts.server, address)


def clients(r: Running) -> dict[str, str]:
    return {a: _reach(r, r.hosts.client, a) for a in (TwoHosts.SERVER4, TwoHosts.SERVER6)}
