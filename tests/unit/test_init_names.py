"""`bindscope init` (pure): names that say the program and protocol, the expose that flags
what is usually a mistake, and the hints for servers bound to loopback."""

from __future__ import annotations

from bindscope.classify import exposure_of, host_address, scope_of
from bindscope.cli.init import plan, render
from bindscope.config.load import parse_config
from bindscope.diagnose.case import culprits_of
from bindscope.model import Listener, ProcessInfo, Protocol, Socket

HOSTS = (host_address("lo", "127.0.0.1", 4), host_address("eth0", "198.51.100.1", 4))
BEAM = (
    "/usr/lib/erlang/erts-13.1.5/bin/beam.smp",
    "-W",
    "w",
    "--",
    "-root",
    "/usr/lib/erlang",
    "-s",
    "rabbit",
    "boot",
)


def listener(
    address: str, port: int, pid: int | None, cmdline: tuple[str, ...], udp: bool = False
) -> Listener:
    sock = Socket(
        Protocol.UDP if udp else Protocol.TCP, address, port, 4, None, inode=port * 2 + udp
    )
    name = cmdline[0].rsplit("/", 1)[-1][:15] if pid else "unknown"
    return Listener(
        sock,
        ProcessInfo(pid=pid, name=name, cmdline=cmdline if pid else ()),
        scope_of(address),
        exposure_of(sock, HOSTS),
    )


LISTENERS = [
    listener("0.0.0.0", 4369, 10, ("/usr/bin/epmd", "-daemon")),
    listener("0.0.0.0", 5672, 11, BEAM),
    listener("0.0.0.0", 15672, 11, BEAM),
    listener("0.0.0.0", 25672, 11, BEAM),
    listener("0.0.0.0", 53, 12, ("/usr/sbin/dnsmasq", "-k")),
    listener("0.0.0.0", 53, 12, ("/usr/sbin/dnsmasq", "-k"), udp=True),
    listener("0.0.0.0", 5353, None, ()),
    listener("0.0.0.0", 5353, None, (), udp=True),
    listener("127.0.0.1", 80, 13, ("nginx: master process /usr/sbin/nginx",)),
    listener("0.0.0.0", 5432, 14, ("/usr/lib/postgresql/15/bin/postgres", "-D", "/d")),
]


def entries():
    found, _ = plan(LISTENERS, culprits_of(LISTENERS), expose_from_current=False)
    return {e.name: e for e in found}


def test_names_say_the_program_the_port_role_and_the_protocol_of_twins():
    assert sorted(entries()) == [
        "dnsmasq-tcp",
        "dnsmasq-udp",
        "epmd",
        "nginx",
        "port-5353-tcp",
        "port-5353-udp",
        "postgres",
        "rabbitmq-amqp",
        "rabbitmq-dist",
        "rabbitmq-management",
    ]


def test_what_is_usually_a_mistake_is_declared_loopback_and_said():
    e = entries()
    assert {n: e[n].expose.value for n in ("epmd", "rabbitmq-dist", "postgres")} == dict.fromkeys(
        ("epmd", "rabbitmq-dist", "postgres"), "loopback"
    )
    assert e["rabbitmq-amqp"].expose.value == "private"  # its clients are other hosts
    assert "for the cluster's own nodes" in e["epmd"].hint
    assert "for the cluster's own nodes" in e["rabbitmq-dist"].hint
    assert "PostgreSQL on every address is usually a mistake" in e["postgres"].hint
    assert e["nginx"].hint == "nginx: if other hosts should reach it, set private"


def test_the_written_config_is_valid():
    found, skipped = plan(LISTENERS, culprits_of(LISTENERS), expose_from_current=False)
    config = parse_config(render(found, skipped, expose_from_current=False), "init.yml")
    assert len(config.services) == len(LISTENERS)
