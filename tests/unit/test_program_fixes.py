"""The bind fixes of sshd, Caddy, dnsmasq, chrony and RabbitMQ (pure): where each sets its
listen address in the package's own files (Debian's layout), and the edit that moves it, for
both families."""

from __future__ import annotations

import fnmatch

import pytest

from bindscope.diagnose.fixes import Fix, bind_change, sshd_value
from bindscope.diagnose.programs import Culprit, recognize
from bindscope.diagnose.settings import Files, caddy_ports, locate, sshd_port
from bindscope.model import ProcessInfo


def files(tree: dict[str, str]) -> Files:
    return Files(
        read=tree.get,
        listing=lambda pattern: sorted(p for p in tree if fnmatch.fnmatch(p, pattern)),
    )


def proc(*argv: str, name: str = "") -> ProcessInfo:
    return ProcessInfo(pid=7, name=name or argv[0].rsplit("/", 1)[-1], cmdline=argv)


def culprit(process: ProcessInfo, tree: dict[str, str], port: int) -> Culprit:
    c = recognize(process, None, port)
    assert c is not None
    return Culprit(c.kind, c.label, c.evidence, settings=locate(c.kind, process, port, files(tree)))


def config(fixes: list[Fix]) -> list[tuple[str, int, str, tuple[str, ...]]]:
    return [(f.file, f.line, f.setting, f.commands) for f in fixes]


# --- sshd ---

SSHD = proc("sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups", name="sshd")
CONF = "/etc/ssh/sshd_config"
# Debian's sshd_config, shortened: the Include first, the defaults commented out
DEBIAN_SSHD = (
    "Include /etc/ssh/sshd_config.d/*.conf\n"
    "\n"
    "#Port 22\n"
    "#AddressFamily any\n"
    "#ListenAddress 0.0.0.0\n"
    "#ListenAddress ::\n"
    "\n"
    "UsePAM yes\n"
)


@pytest.mark.parametrize(
    ("value", "port"),
    [("0.0.0.0", 22), ("0.0.0.0:2222", 2222), ("::", 22), ("::1", 22), ("2001:db8::1", 22),
     ("[::1]:2222", 2222), ("[::1]", 22), ("host.example:x", None)],
)  # fmt: skip
def test_a_bare_ipv6_listen_address_names_no_port(value: str, port: int | None):
    # sshd: IPv6 with a port goes in brackets; `::1` is an address, not `:` and port 1
    assert sshd_port(value, 22) == port


def test_sshd_finds_every_listen_address_past_commented_defaults_and_in_drop_ins():
    tree = {
        CONF: DEBIAN_SSHD.replace("#ListenAddress ::\n", "ListenAddress ::\n"),
        "/etc/ssh/sshd_config.d/local.conf": (
            "# ours\nListenAddress ::1\nListenAddress 0.0.0.0:2222\n"
        ),
    }
    found = locate("sshd", SSHD, 22, files(tree))
    assert [(s.file, s.line, s.value) for s in found] == [
        ("/etc/ssh/sshd_config.d/local.conf", 2, "::1"),
        (CONF, 6, "::"),
    ]


@pytest.mark.parametrize(
    ("value", "host", "moved"),
    [("0.0.0.0", "127.0.0.1", "127.0.0.1"), ("::", "127.0.0.1", "::1"),
     ("[::]:2222", "127.0.0.1", "[::1]:2222"), ("0.0.0.0:2222", "127.0.0.1", "127.0.0.1:2222"),
     ("127.0.0.1", "0.0.0.0", "0.0.0.0"), ("::1", "0.0.0.0", "::"),
     ("0.0.0.0", "10.0.0.5", "10.0.0.5")],
)  # fmt: skip
def test_an_sshd_address_moves_in_its_own_family_and_keeps_its_port(value, host, moved):
    assert sshd_value(value, host) == moved


def test_sshd_narrowed_from_both_families_listens_on_both_loopbacks():
    tree = {CONF: DEBIAN_SSHD.replace("#ListenAddress", "ListenAddress")}
    fixes = bind_change(culprit(SSHD, tree, 22), 22, "127.0.0.1")
    assert config(fixes) == [
        (CONF, 5, "ListenAddress 127.0.0.1", (f"sed -i '5s/.*/ListenAddress 127.0.0.1/' {CONF}",)),
        (CONF, 6, "ListenAddress ::1", (f"sed -i '6s/.*/ListenAddress ::1/' {CONF}",)),
    ]
    assert "listen on ::1" in fixes[1].summary


def test_sshd_widened_from_one_family_gets_the_other_on_a_line_after():
    drop_in = "/etc/ssh/sshd_config.d/tunnels.conf"
    tree = {CONF: DEBIAN_SSHD, drop_in: "ListenAddress 127.0.0.1:2222 rdomain mgmt\nPort 2222\n"}
    (fix,) = bind_change(culprit(SSHD, tree, 2222), 2222, "0.0.0.0")
    assert (fix.file, fix.line, fix.setting) == (
        drop_in,
        1,
        "ListenAddress 0.0.0.0:2222 rdomain mgmt",
    )
    assert fix.commands == (
        f"sed -i '1s/.*/ListenAddress 0.0.0.0:2222 rdomain mgmt/' {drop_in}",
        f"sed -i '1a ListenAddress [::]:2222' {drop_in}",
    )


def test_sshd_with_no_listen_address_is_narrowed_to_both_loopbacks_ahead_of_any_match():
    tree = {CONF: "Port 22\nMatch User backup\n  ForceCommand true\n"}
    (fix,) = bind_change(culprit(SSHD, tree, 22), 22, "127.0.0.1")
    assert (fix.file, fix.line, fix.setting) == (CONF, 0, "ListenAddress 127.0.0.1")
    # GNU sed's `i` turns \n into a line break: two lines, in this order, on top
    assert fix.commands == (f"sed -i '1i ListenAddress 127.0.0.1\\nListenAddress ::1' {CONF}",)
    assert "`ListenAddress 127.0.0.1` and `ListenAddress ::1`" in fix.summary


def test_sshd_lines_that_would_bind_one_address_twice_are_commented_out():
    tree = {CONF: "ListenAddress 198.51.100.1\nListenAddress 203.0.113.7\n"}
    fixes = bind_change(culprit(SSHD, tree, 22), 22, "127.0.0.1")
    assert config(fixes) == [
        (CONF, 1, "ListenAddress 127.0.0.1", (f"sed -i '1s/.*/ListenAddress 127.0.0.1/' {CONF}",)),
        (CONF, 2, "#ListenAddress 203.0.113.7",
         (f"sed -i '2s/.*/#ListenAddress 203.0.113.7/' {CONF}",)),
    ]  # fmt: skip


# --- Caddy ---

CADDY = proc("/usr/bin/caddy", "run", "--environ", "--config", "/etc/caddy/Caddyfile")
CADDYFILE = "/etc/caddy/Caddyfile"


@pytest.mark.parametrize(
    ("address", "ports"),
    [(":8080", {8080}), ("http://:8080", {8080}), ("localhost:8080", {8080}),
     ("http://shop.example", {80}), ("https://shop.example/api/*", {443}),
     ("shop.example", {80, 443}), ("[::1]:9000", {9000}), (":{$PORT}", set())],
)  # fmt: skip
def test_a_caddy_site_address_is_served_on_its_ports(address: str, ports: set[int]):
    assert caddy_ports(address) == ports


CADDY_TREE = {
    CADDYFILE: (
        "{\n"  # 1: the global options block
        "\temail ops@shop.example\n"
        "}\n"
        "(common) {\n"  # 4: a snippet
        "\tbind 198.51.100.1\n"
        "}\n"
        ":80 {\n"  # 7
        "\troot * /usr/share/caddy\n"
        "\tfile_server\n"
        "}\n"
        "\n"
        "# status, for this host alone\n"
        ":8080, http://localhost:8080 {\n"  # 13
        "\thandle /api/* {\n"
        "\t\tbind 198.51.100.1\n"  # a route's: not the site's
        "\t}\n"
        '\trespond "ok #1"\n'
        "}\n"
        "http://metrics.shop.example:8080 {\n"  # 19
        "    bind 0.0.0.0 # everyone\n"  # 20
        "}\n"
    )
}


def test_caddy_finds_each_site_on_the_port_with_its_bind_or_where_one_goes():
    found = locate("caddy", CADDY, 8080, files(CADDY_TREE))
    assert [(s.line, s.section_line, s.indent, s.value) for s in found] == [
        (0, 13, "\t", ""),
        (20, 0, "", "0.0.0.0"),
    ]
    assert locate("caddy", CADDY, 443, files(CADDY_TREE)) == ()


def test_caddy_binds_both_loopbacks_and_edits_the_later_site_first():
    fixes = bind_change(culprit(CADDY, CADDY_TREE, 8080), 8080, "127.0.0.1")
    # a line added after line 13 would move line 20: 20 is edited first
    assert config(fixes) == [
        (CADDYFILE, 20, "    bind 127.0.0.1 ::1",
         (f"sed -i '20s/.*/    bind 127.0.0.1 ::1/' {CADDYFILE}",)),
        (CADDYFILE, 0, "\tbind 127.0.0.1 ::1",
         (f"sed -i '13a\\\tbind 127.0.0.1 ::1' {CADDYFILE}",)),
    ]  # fmt: skip
    assert "after line 13" in fixes[1].summary


def test_a_caddyfile_of_one_site_without_braces_gets_its_bind_after_the_addresses():
    tree = {CADDYFILE: "# one site\n:8080\nrespond ok\n"}
    (fix,) = bind_change(culprit(CADDY, tree, 8080), 8080, "127.0.0.1")
    assert fix.commands == (f"sed -i '2a bind 127.0.0.1 ::1' {CADDYFILE}",)


def test_a_caddy_site_on_one_line_is_not_edited_blindly():
    tree = {CADDYFILE: ":8080 { respond ok }\n"}
    (fix,) = bind_change(culprit(CADDY, tree, 8080), 8080, "127.0.0.1")
    assert (fix.file, fix.commands) == (CADDYFILE, ())


# --- dnsmasq ---

DNSMASQ = proc(
    "/usr/sbin/dnsmasq", "-x", "/run/dnsmasq/dnsmasq.pid", "-u", "dnsmasq",
    "-7", "/etc/dnsmasq.d,.dpkg-dist,.dpkg-old,.dpkg-new", "--local-service",
)  # fmt: skip
DNSMASQ_CONF = "/etc/dnsmasq.conf"
# Debian's dnsmasq.conf, shortened: every setting commented out
DEBIAN_DNSMASQ = "#interface=\n#listen-address=\n#bind-interfaces\n#conf-dir=/etc/dnsmasq.d\n"


def test_dnsmasq_listening_everywhere_gets_listen_address_and_bind_interfaces():
    tree = {DNSMASQ_CONF: DEBIAN_DNSMASQ, "/etc/dnsmasq.d/README": "# conf-dir\n"}
    (fix,) = bind_change(culprit(DNSMASQ, tree, 53), 53, "127.0.0.1")
    assert (fix.file, fix.line, fix.setting) == (DNSMASQ_CONF, 0, "listen-address=127.0.0.1,::1")
    # listen-address alone leaves dnsmasq on the wildcard, dropping other addresses' queries
    assert fix.commands == (
        f"sed -i '$a bind-interfaces' {DNSMASQ_CONF}",
        f"sed -i '$a listen-address=127.0.0.1,::1' {DNSMASQ_CONF}",
    )


def test_dnsmasq_settings_are_found_through_debians_conf_dir_and_conf_file():
    tree = {
        DNSMASQ_CONF: DEBIAN_DNSMASQ + "conf-file=/etc/dnsmasq.local\n",
        "/etc/dnsmasq.local": "bind-dynamic\n",
        "/etc/dnsmasq.d/lan.conf": "interface=eth0\nlisten-address=198.51.100.1\n",
        "/etc/dnsmasq.d/lan.conf.dpkg-old": "listen-address=0.0.0.0\n",  # skipped by -7
        "/etc/dnsmasq.d/.hidden": "listen-address=0.0.0.0\n",
    }
    found = locate("dnsmasq", DNSMASQ, 53, files(tree))
    assert [(s.file, s.line, s.directive, s.value) for s in found] == [
        ("/etc/dnsmasq.local", 1, "bind-dynamic", ""),
        ("/etc/dnsmasq.d/lan.conf", 1, "interface", "eth0"),
        ("/etc/dnsmasq.d/lan.conf", 2, "listen-address", "198.51.100.1"),
    ]
    (fix,) = bind_change(culprit(DNSMASQ, tree, 53), 53, "127.0.0.1")
    # bind-dynamic binds what it listens on already; the interface would add eth0's addresses
    assert fix.commands == (
        "sed -i '2s/.*/listen-address=127.0.0.1,::1/' /etc/dnsmasq.d/lan.conf",
        "sed -i '1s/.*/#interface=eth0/' /etc/dnsmasq.d/lan.conf",
    )


def test_dnsmasq_conf_dir_of_only_some_extensions_and_its_own_config_file():
    process = proc("dnsmasq", "-k", "-C", "/srv/dns/main.conf")
    tree = {
        "/srv/dns/main.conf": "conf-dir=/srv/dns/d,*.conf\nlisten-address=127.0.0.1\n",
        "/srv/dns/d/a.conf": "listen-address=198.51.100.1\n",
        "/srv/dns/d/b.txt": "listen-address=0.0.0.0\n",
    }
    found = locate("dnsmasq", process, 53, files(tree))
    assert [(s.file, s.line) for s in found] == [
        ("/srv/dns/d/a.conf", 1),
        ("/srv/dns/main.conf", 2),
    ]
    (fix,) = bind_change(culprit(process, tree, 53), 53, "127.0.0.1")
    assert fix.commands == (
        "sed -i '1s/.*/listen-address=127.0.0.1,::1/' /srv/dns/d/a.conf",
        "sed -i '2s/.*/#listen-address=127.0.0.1/' /srv/dns/main.conf",
        "sed -i '$a bind-interfaces' /srv/dns/d/a.conf",
    )


def test_dnsmasq_widened_loses_what_limits_it():
    tree = {DNSMASQ_CONF: "listen-address=127.0.0.1\nbind-interfaces\ninterface=lo\n"}
    (fix,) = bind_change(culprit(DNSMASQ, tree, 53), 53, "0.0.0.0")
    assert (fix.line, fix.setting) == (1, "#listen-address=127.0.0.1")
    assert fix.commands == (
        f"sed -i '1s/.*/#listen-address=127.0.0.1/' {DNSMASQ_CONF}",
        f"sed -i '3s/.*/#interface=lo/' {DNSMASQ_CONF}",
    )


def test_dnsmasqs_dhcp_port_gets_no_dns_fix():
    # its DHCP socket is on the wildcard whatever listen-address says
    tree = {DNSMASQ_CONF: DEBIAN_DNSMASQ}
    (fix,) = bind_change(culprit(DNSMASQ, tree, 67), 67, "127.0.0.1")
    assert fix.kind == "command" and not fix.commands


# --- chrony ---

CHRONYD = proc("/usr/sbin/chronyd", "-F", "1")
CHRONY_CONF = "/etc/chrony/chrony.conf"
# Debian's chrony.conf, shortened
DEBIAN_CHRONY = (
    "confdir /etc/chrony/conf.d\n"
    "pool 2.debian.pool.ntp.org iburst\n"
    "sourcedir /etc/chrony/sources.d\n"
    "#bindcmdaddress 0.0.0.0\n"
)


def test_chrony_finds_the_command_ports_address_through_confdir_and_include():
    tree = {
        CHRONY_CONF: DEBIAN_CHRONY + "include /etc/chrony/local/*.conf\n",
        "/etc/chrony/conf.d/monitoring.conf": "bindcmdaddress\t0.0.0.0\ncmdallow 10.0.0.0/8\n",
        "/etc/chrony/conf.d/README": "bindcmdaddress 0.0.0.0\n",  # not *.conf
        "/etc/chrony/local/sock.conf": "bindcmdaddress /run/chrony/chronyd.sock\n",
    }
    found = locate("chrony", CHRONYD, 323, files(tree))
    assert [(s.file, s.line, s.directive) for s in found] == [
        ("/etc/chrony/conf.d/monitoring.conf", 1, "bindcmdaddress")
    ]
    (fix,) = bind_change(culprit(CHRONYD, tree, 323), 323, "127.0.0.1")
    assert fix.commands == (
        "sed -i '1s/.*/bindcmdaddress 127.0.0.1/' /etc/chrony/conf.d/monitoring.conf",
    )


def test_chrony_serving_ntp_everywhere_is_narrowed_to_both_loopbacks():
    tree = {CHRONY_CONF: DEBIAN_CHRONY + "allow\n"}
    (fix,) = bind_change(culprit(CHRONYD, tree, 123), 123, "127.0.0.1")
    # chronyd takes one bind address per family: one line each
    assert fix.commands == (
        f"sed -i '$a bindaddress 127.0.0.1' {CHRONY_CONF}",
        f"sed -i '$a bindaddress ::1' {CHRONY_CONF}",
    )


def test_chrony_command_port_widened_gets_the_other_family_and_a_word_on_cmdallow():
    tree = {CHRONY_CONF: "cmdport 3230\nbindcmdaddress 127.0.0.1\n"}
    assert locate("chrony", CHRONYD, 323, files(tree)) == ()  # not its command port here
    (fix,) = bind_change(culprit(CHRONYD, tree, 3230), 3230, "0.0.0.0")
    assert fix.commands == (
        f"sed -i '2s/.*/bindcmdaddress 0.0.0.0/' {CHRONY_CONF}",
        f"sed -i '2a bindcmdaddress ::' {CHRONY_CONF}",
    )
    assert "`cmdallow` the clients" in fix.summary


# --- RabbitMQ ---

BEAM = proc("/usr/lib/erlang/erts-13.1.5/bin/beam.smp", "-W", "w", "--", "-root",
            "/usr/lib/erlang", "-progname", "erl", "--", "-noinput", "-s", "rabbit", "boot",
            name="beam.smp")  # fmt: skip
RABBIT_CONF = "/etc/rabbitmq/rabbitmq.conf"


def test_rabbitmq_without_its_config_file_gets_one_with_both_loopbacks():
    # Debian's package ships rabbitmq-env.conf alone: sed has no file to edit
    tree = {"/etc/rabbitmq/rabbitmq-env.conf": "#NODE_IP_ADDRESS=127.0.0.1\n"}
    (fix,) = bind_change(culprit(BEAM, tree, 5672), 5672, "127.0.0.1")
    assert (fix.file, fix.line, fix.setting) == (RABBIT_CONF, 0, "listeners.tcp.2 = ::1:5672")
    assert fix.commands == (
        "printf '%s\\n' 'listeners.tcp.1 = 127.0.0.1:5672' 'listeners.tcp.2 = ::1:5672' "
        f">> {RABBIT_CONF}",
    )


def test_rabbitmq_narrowed_keeps_its_listeners_names_and_adds_the_other_loopback():
    tree = {RABBIT_CONF: "loopback_users.guest = true\nlisteners.tcp.default = 0.0.0.0:5672\n"}
    (fix,) = bind_change(culprit(BEAM, tree, 5672), 5672, "127.0.0.1")
    assert (fix.line, fix.setting) == (2, "listeners.tcp.default = 127.0.0.1:5672")
    assert fix.commands == (
        f"sed -i '2s/.*/listeners.tcp.default = 127.0.0.1:5672/' {RABBIT_CONF}",
        f"sed -i '2a listeners.tcp.1 = ::1:5672' {RABBIT_CONF}",
    )


def test_rabbitmq_listeners_beyond_the_loopbacks_are_commented_out():
    tree = {RABBIT_CONF: "listeners.tcp.a = 198.51.100.1:5672\nlisteners.tcp.b = :::5672\n"
                         "listeners.tcp.c = 5672\nlisteners.tcp.tls = 5671\n"}  # fmt: skip
    fixes = bind_change(culprit(BEAM, tree, 5672), 5672, "127.0.0.1")
    assert config(fixes) == [
        (RABBIT_CONF, 1, "listeners.tcp.a = 127.0.0.1:5672",
         (f"sed -i '1s/.*/listeners.tcp.a = 127.0.0.1:5672/' {RABBIT_CONF}",)),
        (RABBIT_CONF, 2, "listeners.tcp.b = ::1:5672",
         (f"sed -i '2s/.*/listeners.tcp.b = ::1:5672/' {RABBIT_CONF}",)),
        (RABBIT_CONF, 3, "#listeners.tcp.c = 5672",
         (f"sed -i '3s/.*/#listeners.tcp.c = 5672/' {RABBIT_CONF}",)),
    ]  # fmt: skip


def test_rabbitmq_widened_listens_on_its_port_alone():
    # a port without an address: every address of both families
    tree = {RABBIT_CONF: "listeners.tcp.default = 127.0.0.1:5672\n"}
    (fix,) = bind_change(culprit(BEAM, tree, 5672), 5672, "0.0.0.0")
    assert fix.commands == (f"sed -i '1s/.*/listeners.tcp.default = 5672/' {RABBIT_CONF}",)
