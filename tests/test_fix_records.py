"""Fix records (pure): the file and line that set a program's listen address, found from
its command line or its package's default paths; the edit and its command; the firewall
commands for each family and tool; the document and the text rendered from it."""

from __future__ import annotations

import fnmatch
import subprocess
from pathlib import Path

import pytest
from support import load_ruleset

from bindscope.cli.output import Paint, render_diagnosis
from bindscope.diagnose.document import fix_document
from bindscope.diagnose.fixes import Fix, bind_change, firewall_fix
from bindscope.diagnose.programs import Culprit, recognize
from bindscope.diagnose.settings import Files, config_file, locate
from bindscope.model import Firewall, ProcessInfo
from bindscope.netfilter.evaluate import evaluate
from bindscope.netfilter.ruleset import Decision


def files(tree: dict[str, str], cwd: str = "/") -> Files:
    return Files(
        read=tree.get,
        listing=lambda pattern: sorted(p for p in tree if fnmatch.fnmatch(p, pattern)),
        cwd=cwd,
    )


def proc(*argv: str, name: str = "") -> ProcessInfo:
    return ProcessInfo(pid=7, name=name or argv[0].rsplit("/", 1)[-1], cmdline=argv)


NGINX_TREE = {
    "/etc/nginx/nginx.conf": "http {\n    include /etc/nginx/sites-enabled/*;\n}\n",
    "/etc/nginx/sites-enabled/default": "server {\n    listen 8080;\n}\n",
    "/etc/nginx/sites-enabled/shop": (
        "server {\n    listen 127.0.0.1:80 default_server;\n    listen [::1]:80;\n}\n"
    ),
}
MYSQL_TREE = {
    "/etc/mysql/my.cnf": "[client-server]\n!includedir /etc/mysql/mariadb.conf.d/\n",
    "/etc/mysql/mariadb.conf.d/50-server.cnf": (
        "[server]\n\n[mysqld]\nuser = mysql\nbind-address            = 127.0.0.1\n"
    ),
    "/etc/mysql/mariadb.conf.d/60-local.cnf": "[mysqld]\nbind-address = 0.0.0.0\n",
}


@pytest.mark.parametrize(
    ("kind", "process", "tree", "port", "found"),
    [
        (
            "nginx",
            proc("nginx: master process /usr/sbin/nginx -g daemon off;", name="nginx"),
            NGINX_TREE,
            80,
            [("/etc/nginx/sites-enabled/shop", 2), ("/etc/nginx/sites-enabled/shop", 3)],
        ),
        (
            "nginx",
            proc("nginx: master process nginx -c /srv/n.conf", name="nginx"),
            {"/srv/n.conf": "events {}\nhttp { server { listen 9000; } }\n"},
            9000,
            [("/srv/n.conf", 2)],
        ),
        (
            "redis",
            proc("/usr/bin/redis-server", "*:6379"),
            {"/etc/redis/redis.conf": "# bind 1.2.3.4\nport 6379\nbind * -::*\n"},
            6379,
            [("/etc/redis/redis.conf", 3)],
        ),
        (
            "redis",
            proc("redis-server", "conf/r.conf"),
            {"/srv/conf/r.conf": "port 7000\n"},
            7000,
            [("/srv/conf/r.conf", 0)],
        ),
        (
            "postgres",
            proc(
                "/usr/lib/postgresql/15/bin/postgres",
                "-D",
                "/var/lib/postgresql/15/main",
                "-c",
                "config_file=/etc/postgresql/15/main/postgresql.conf",
            ),
            {
                "/etc/postgresql/15/main/postgresql.conf": (
                    "port = 5432\nlisten_addresses = '*'  # opened\ninclude_dir = 'conf.d'\n"
                ),
                "/etc/postgresql/15/main/conf.d/10-local.conf": "work_mem = 4MB\n",
            },
            5432,
            [("/etc/postgresql/15/main/postgresql.conf", 2)],
        ),
        (
            "postgres",
            proc("postgres", "-D", "/data"),
            {
                "/data/postgresql.conf": "listen_addresses = 'localhost'\n",
                "/data/postgresql.auto.conf": "# ALTER SYSTEM\nlisten_addresses = '*'\n",
            },
            5432,
            [("/data/postgresql.auto.conf", 2)],
        ),
        (
            "mysql",
            proc("/usr/sbin/mariadbd"),
            MYSQL_TREE,
            3306,
            [("/etc/mysql/mariadb.conf.d/60-local.cnf", 2)],
        ),
        (
            "mysql",
            proc("mysqld", "--defaults-file=/srv/my.cnf"),
            {"/srv/my.cnf": "[client]\nport=3306\n[mysqld]\nport=3306\n"},
            3306,
            [("/srv/my.cnf", 0)],  # absent: goes after the [mysqld] header (line 3)
        ),
        (
            "memcached",
            proc("/usr/bin/memcached", "-m", "64", "-p", "11211", "-l", "0.0.0.0"),
            {"/etc/memcached.conf": "-m 64\n-p 11211\n-l 0.0.0.0\n"},
            11211,
            [("/etc/memcached.conf", 3)],
        ),
        (
            "apache",
            proc("/usr/sbin/apache2", "-k", "start"),
            {
                "/etc/apache2/apache2.conf": "Include ports.conf\n",
                "/etc/apache2/ports.conf": "Listen 80\n<IfModule ssl_module>\n Listen 443\n",
            },
            443,
            [("/etc/apache2/ports.conf", 3)],
        ),
        (
            "haproxy",
            proc("/usr/sbin/haproxy", "-Ws", "-f", "/etc/haproxy/haproxy.cfg"),
            {"/etc/haproxy/haproxy.cfg": "frontend web\n    bind 127.0.0.1:8080\n"},
            8080,
            [("/etc/haproxy/haproxy.cfg", 2)],
        ),
        (
            "sshd",
            proc("sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups", name="sshd"),
            {
                "/etc/ssh/sshd_config": "Include /etc/ssh/sshd_config.d/*.conf\nPort 22\n",
                "/etc/ssh/sshd_config.d/local.conf": "ListenAddress 0.0.0.0\n",
            },
            22,
            [("/etc/ssh/sshd_config.d/local.conf", 1)],
        ),
        (
            "mosquitto",
            proc("/usr/sbin/mosquitto", "-c", "/etc/mosquitto/mosquitto.conf"),
            {"/etc/mosquitto/mosquitto.conf": "listener 1883 127.0.0.1\n"},
            1883,
            [("/etc/mosquitto/mosquitto.conf", 1)],
        ),
        (
            "epmd",
            proc("/usr/bin/epmd", "-daemon"),
            {"/etc/rabbitmq/rabbitmq-env.conf": "NODENAME=rabbit\n"},
            4369,
            [("/etc/rabbitmq/rabbitmq-env.conf", 0)],
        ),
    ],
    ids=[
        "nginx-default-config-includes-sites",
        "nginx-dash-c",
        "redis-package-default",
        "redis-relative-path-from-cwd",
        "postgres-config-file-from-command-line",
        "postgres-alter-system-wins",
        "mariadb-last-include-wins",
        "mysql-defaults-file-without-bind",
        "memcached-debian-conf",
        "apache-ports-conf",
        "haproxy-bind",
        "sshd-include",
        "mosquitto-listener",
        "epmd-env-file",
    ],
)
def test_the_setting_is_found_in_its_file(kind, process, tree, port, found):
    settings = locate(kind, process, port, files(tree, cwd="/srv"))
    assert [(s.file, s.line) for s in settings] == found


def test_nothing_is_found_where_nothing_is_readable():
    assert locate("redis", proc("redis-server"), 6379, files({})) == ()
    assert config_file("java", proc("java", "-jar", "app.jar"), files({})) == ""


def _culprit(kind: str, process: ProcessInfo, tree: dict[str, str], port: int) -> Culprit:
    c = recognize(process, None, port)
    assert c is not None and c.kind == kind
    return Culprit(c.kind, c.label, c.evidence, settings=locate(kind, process, port, files(tree)))


def test_nginx_widened_keeps_its_options_and_adds_ipv6_only_where_it_has_none():
    tree = {"/etc/nginx/nginx.conf": "server {\n    listen 127.0.0.1:80 default_server;\n}\n"}
    c = _culprit("nginx", proc("nginx: master process nginx", name="nginx"), tree, 80)
    (fix,) = bind_change(c, 80, "0.0.0.0")
    assert (fix.kind, fix.file, fix.line) == ("config", "/etc/nginx/nginx.conf", 2)
    assert fix.setting == "    listen 80 default_server; listen [::]:80;"
    assert fix.commands == (
        "sed -i '2s/.*/    listen 80 default_server; listen [::]:80;/' /etc/nginx/nginx.conf",
    )
    both = bind_change(
        _culprit("nginx", proc("nginx", name="nginx"), NGINX_TREE, 80), 80, "0.0.0.0"
    )
    assert [f.setting.strip() for f in both] == ["listen 80 default_server;", "listen [::]:80;"]


def test_an_absent_setting_is_added_where_it_belongs():
    tree = {"/srv/my.cnf": "[client]\nport=3306\n[mysqld]\nport=3306\n"}
    c = _culprit("mysql", proc("mysqld", "--defaults-file=/srv/my.cnf"), tree, 3306)
    (fix,) = bind_change(c, 3306, "127.0.0.1")
    assert fix.commands == ("sed -i '3a bind-address = 127.0.0.1' /srv/my.cnf",)


def test_a_line_shared_with_other_directives_is_named_not_edited():
    tree = {"/etc/nginx/nginx.conf": "server { listen 127.0.0.1:80; root /srv; }\n"}
    c = _culprit("nginx", proc("nginx", name="nginx"), tree, 80)
    (fix,) = bind_change(c, 80, "0.0.0.0")
    assert (fix.file, fix.line, fix.commands) == ("/etc/nginx/nginx.conf", 1, ())
    assert "change `listen 127.0.0.1:80;` to `listen 80; listen [::]:80;`" in fix.summary


def test_a_sed_command_edits_a_real_file_as_printed(tmp_path: Path):
    conf = tmp_path / "odd & name.conf"
    conf.write_text("port 1\nbind 0.0.0.0\n")
    tree = {str(conf): conf.read_text()}
    c = _culprit("redis", proc("redis-server", str(conf)), tree, 6379)
    (fix,) = bind_change(c, 6379, "127.0.0.1")
    for command in fix.commands:
        subprocess.run(command, shell=True, check=True)
    assert conf.read_text().splitlines()[fix.line - 1] == fix.setting == "bind 127.0.0.1 -::1"


H4, H6 = "198.51.100.1", "2001:db8::1"


def decisions(name: str, port: int) -> list[tuple[int, Decision]]:
    rs = load_ruleset(name)
    return [(4, evaluate(rs, "tcp", 4, H4, port)), (6, evaluate(rs, "tcp", 6, H6, port))]


@pytest.mark.parametrize(
    ("fixture", "port", "commands"),
    [
        (
            "empty",
            6379,
            (
                "nft add table inet filter",
                "nft 'add chain inet filter input { type filter hook input priority filter; }'",
                "nft insert rule inet filter input iifname != lo tcp dport 6379 drop",
            ),
        ),
        ("ufw", 5000, ("ufw insert 1 deny 5000/tcp",)),
        (
            "iptables_nft",
            22,
            (
                "iptables -I INPUT ! -i lo -p tcp --dport 22 -j DROP",
                "ip6tables -I INPUT ! -i lo -p tcp --dport 22 -j DROP",
            ),
        ),
    ],
    ids=["no-filter-gets-one-inet-table", "ufw-covers-both-families", "iptables-nft-both-tools"],
)
def test_the_closing_fix_keeps_loopback_and_covers_both_families(fixture, port, commands):
    fix = firewall_fix(decisions(fixture, port), load_ruleset(fixture), "tcp", port, allow=False)
    assert fix is not None
    assert fix.commands == commands
    # ufw accepts lo ahead of every user rule; every other rule says so itself
    assert all("!= lo" in c or "! -i lo" in c for c in commands if "dport" in c)


def test_no_closing_fix_once_every_family_is_dropped():
    dropped = [(4, Decision(Firewall.DROP, "filter", "input", family="inet"))] * 2
    assert firewall_fix(dropped, None, "tcp", 6379, allow=False) is None


def test_only_the_family_still_open_is_closed():
    d = [
        (4, Decision(Firewall.DROP, "filter", "INPUT", family="ip", backend="nft")),
        (6, Decision(Firewall.ACCEPT, "filter", "INPUT", family="ip6", backend="nft")),
    ]
    fix = firewall_fix(d, None, "tcp", 4369, allow=False)
    assert fix is not None and "(IPv6;" in fix.summary
    assert fix.commands == ("ip6tables -I INPUT ! -i lo -p tcp --dport 4369 -j DROP",)


def test_the_document_keeps_only_known_fields_and_the_text_shows_each_command():
    fix = Fix("config", "make it so", file="/etc/x.conf", line=3, setting="a b", commands=("c",))
    assert fix_document(Fix("command", "start it")) == {"kind": "command", "summary": "start it"}
    doc = {
        "subject": "service db",
        "result": "problem",
        "statuses": ["overexposed"],
        "findings": [
            {"step": "meaning", "title": "What?", "lines": ["db: overexposed"], "problem": True},
            {"step": "fixes", "title": "What to change", "lines": ["make it so"], "problem": False},
        ],
        "fixes": [fix_document(fix)],
    }
    assert fix_document(fix)["line"] == 3
    assert render_diagnosis(doc, Paint(False)) == [
        "bindscope diagnose: service db",
        "",
        "1. What?",
        "   db: overexposed",
        "",
        "2. What to change",
        "   - make it so",
        "     $ c",
        "",
        "Result: PROBLEM (overexposed)",
    ]
