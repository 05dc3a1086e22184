"""Tests for published ports read from NAT rules and docker-proxy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bindscope.model import PublishedPort
from bindscope.netfilter.nat import (
    docker_proxy_ports,
    nat_from_nft,
    parse_iptables_nat,
    parse_nft_nat,
)
from bindscope.netfilter.read import read_netfilter

NAT = Path(__file__).parent / "fixtures" / "nat"


def pp(protocol, host, host_port, target, target_port, source="iptables"):
    return PublishedPort(protocol, host, host_port, target, target_port, source)


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        (
            "podman-netavark.iptables-save",
            [
                pp("tcp", "127.0.0.1", 18081, "203.0.113.3", 8080),
                pp("udp", "127.0.0.1", 18082, "203.0.113.3", 8081),
            ],
        ),
        (
            # podman run -p 127.0.0.1:27001:7001 -p 27101:7001 -p 127.0.0.1:27002:7002
            #   -p 27102:7002 -p 27003:7003 -p 27004:7004 -p 27005:7005 -p 27007:7007
            #   -p 27001:7001/udp -p 127.0.0.1:27002:7002/udp: consecutive ports share
            #   one rule, `--dport A:B -j DNAT --to-destination IP:X-Y/A`
            "podman-netavark-ranges.iptables-save",
            [
                pp("tcp", "127.0.0.1", 27001, "203.0.113.150", 7001),
                pp("tcp", "127.0.0.1", 27002, "203.0.113.150", 7002),
                pp("udp", "127.0.0.1", 27002, "203.0.113.150", 7002),
                pp("tcp", "0.0.0.0", 27003, "203.0.113.150", 7003),
                pp("tcp", "0.0.0.0", 27004, "203.0.113.150", 7004),
                pp("tcp", "0.0.0.0", 27005, "203.0.113.150", 7005),
                pp("tcp", "0.0.0.0", 27007, "203.0.113.150", 7007),
                pp("tcp", "0.0.0.0", 27101, "203.0.113.150", 7001),
                pp("tcp", "0.0.0.0", 27102, "203.0.113.150", 7002),
                pp("udp", "0.0.0.0", 27001, "203.0.113.150", 7001),
            ],
        ),
        (
            "docker.iptables-save",
            [
                pp("tcp", "0.0.0.0", 8080, "172.17.0.2", 5000),
                pp("tcp", "127.0.0.1", 8081, "172.17.0.3", 80),
                pp("udp", "0.0.0.0", 5353, "172.17.0.4", 53),
            ],
        ),
        (
            "docker.ip6tables-save",
            [
                pp("tcp", "::", 8080, "2001:db8:1::2", 5000),
                pp("tcp", "::1", 8081, "2001:db8:1::3", 80),
            ],
        ),
        (
            "kubernetes.iptables-save",
            [
                pp("tcp", "0.0.0.0", 30080, "10.244.0.5", 8080),
                pp("tcp", "0.0.0.0", 30080, "10.244.1.9", 8080),
                pp("tcp", "0.0.0.0", 8443, "10.244.0.7", 443),
                pp("udp", "198.51.100.10", 9000, "10.244.0.8", 9000),
            ],
        ),
    ],
    ids=[
        "podman netavark recorded: loopback tcp and udp",
        "podman netavark recorded: consecutive ports as shifted ranges",
        "docker: any address, loopback, udp; RETURN and negations ignored",
        "docker ipv6: bracketed targets, any is ::",
        "kubernetes: nodeport endpoints and hostports, cluster ips left out",
    ],
)
def test_parse_iptables_nat(fixture, expected):
    assert parse_iptables_nat((NAT / fixture).read_text()) == expected


RULE = "*nat\n:PREROUTING ACCEPT [0:0]\n:FWD - [0:0]\n-A PREROUTING -j FWD\n-A FWD {}\nCOMMIT\n"


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("-p tcp --dport 80 -j DNAT --to-destination 203.0.113.7", [("203.0.113.7", 80)]),
        ("-p tcp --dport 80 -j DNAT --to-destination [2001:db8::7]", [("2001:db8::7", 80)]),
        ("-p tcp --dport 80 -j DNAT --to-destination 203.0.113.7-203.0.113.9:80", []),
        ("-p tcp --dport 80 -j DNAT --to-destination 203.0.113.7:80-90", []),
        ("-p tcp --dport 1000:1002 -j DNAT --to-destination 203.0.113.7",
         [("203.0.113.7", 1000), ("203.0.113.7", 1001), ("203.0.113.7", 1002)]),
        ("-p tcp --dport 1:65535 -j DNAT --to-destination 203.0.113.7", []),
        ("-p tcp --dport 80:81 -j DNAT --to-destination 203.0.113.7:8080-8081/80",
         [("203.0.113.7", 8080), ("203.0.113.7", 8081)]),
        ("-p tcp --dport 80:81 -j DNAT --to-destination [2001:db8::7]:8080-8081/80",
         [("2001:db8::7", 8080), ("2001:db8::7", 8081)]),
        ("-p tcp -m multiport --dports 80,443 -j DNAT --to-destination 203.0.113.7",
         [("203.0.113.7", 80), ("203.0.113.7", 443)]),
        ("-d 203.0.113.0/24 -p tcp --dport 80 -j DNAT --to-destination 203.0.113.7:8080",
         [("203.0.113.7", 8080)]),
        ("-j DNAT --to-destination 203.0.113.7", []),
        ("-p tcp --dport 80 -j REDIRECT --to-ports 8080", []),
    ],
    ids=[
        "address alone keeps the port",
        "ipv6 address alone keeps the port",
        "address range has no single target",
        "port range has no single target",
        "host port range is read port by port",
        "a range of more than 4096 ports is left out",
        "shifted port range maps each port to its own",
        "shifted port range, ipv6",
        "multiport gives one per port",
        "a subnet destination is any address",
        "1:1 nat publishes no port",
        "redirect to the host itself is no container",
    ],
)  # fmt: skip
def test_parse_iptables_nat_targets(rule, expected):
    found = parse_iptables_nat(RULE.format(rule))
    assert [(p.target_address, p.target_port) for p in found] == expected
    assert all(p.host_address == "0.0.0.0" or ":" in p.host_address for p in found)


def test_parse_iptables_nat_reads_only_the_nat_table():
    text = (NAT / "docker.iptables-save").read_text().replace("*nat", "*filter")
    assert parse_iptables_nat(text) == []


def test_parse_nft_nat_native_shapes():
    found = parse_nft_nat((NAT / "native.nft.json").read_text())
    assert found == [
        # Docker's chain, both hooks reaching it once
        pp("tcp", "0.0.0.0", 8080, "172.17.0.2", 5000, "nft"),
        pp("tcp", "127.0.0.1", 8081, "172.17.0.3", 80, "nft"),
        # meta l4proto set x th dport set, the address alone keeps the port
        pp("tcp", "0.0.0.0", 53, "203.0.113.5", 53, "nft"),
        pp("tcp", "0.0.0.0", 5353, "203.0.113.5", 5353, "nft"),
        pp("udp", "0.0.0.0", 53, "203.0.113.5", 53, "nft"),
        pp("udp", "0.0.0.0", 5353, "203.0.113.5", 5353, "nft"),
        # netavark in an inet table: each jump reaches only its own port's dnat
        pp("tcp", "127.0.0.1", 18081, "203.0.113.2", 8080, "nft"),
        pp("tcp", "0.0.0.0", 18083, "203.0.113.2", 8443, "nft"),
        pp("tcp", "::1", 18084, "2001:db8::2", 8080, "nft"),
    ]  # ranges, the unreachable chain, postrouting and the filter table give nothing


def test_parse_nft_nat_cannot_see_iptables_nft_dnat_arguments():
    # Recorded: podman 4.3 (netavark 1.4) writes through iptables-nft, and nft 1.0.6's
    # JSON shows those DNAT targets as {"xt": {"name": "DNAT"}} without the destination.
    assert parse_nft_nat((NAT / "podman-netavark.nft.json").read_text()) == []


def _runner(outputs):
    """A subprocess.run stand-in: cmd[0] -> stdout text, an int exit code, or None
    for a missing binary; records the commands."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd[0])
        out = outputs.get(cmd[0])
        if out is None:
            raise FileNotFoundError(cmd[0])
        if isinstance(out, int):
            return subprocess.CompletedProcess(cmd, out, "", "Operation not permitted\n")
        return subprocess.CompletedProcess(cmd, 0, out, "")

    run.calls = calls
    return run


EMPTY_SAVE = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
PODMAN_NFT = (NAT / "podman-netavark.nft.json").read_text()
PODMAN_SAVE = (NAT / "podman-netavark.iptables-save").read_text()
NATIVE_NFT = (NAT / "native.nft.json").read_text()
PODMAN_PORTS = [
    pp("tcp", "127.0.0.1", 18081, "203.0.113.3", 8080),
    pp("udp", "127.0.0.1", 18082, "203.0.113.3", 8081),
]


@pytest.mark.parametrize(
    ("outputs", "ports", "calls", "errors"),
    [
        (
            {"nft": NATIVE_NFT, "iptables-save": PODMAN_SAVE},
            9, ["nft"], [],
        ),
        (
            {"nft": PODMAN_NFT, "iptables-nft-save": PODMAN_SAVE,
             "ip6tables-nft-save": EMPTY_SAVE},
            PODMAN_PORTS, ["nft", "iptables-nft-save", "ip6tables-nft-save"], [],
        ),
        (
            {"iptables-save": PODMAN_SAVE, "ip6tables-save": EMPTY_SAVE},
            PODMAN_PORTS, ["nft", "iptables-save", "ip6tables-save"], [],
        ),
        (
            {"nft": "not json", "iptables-save": PODMAN_SAVE},
            PODMAN_PORTS, ["nft", "iptables-save", "ip6tables-save"],
            ["nft -j list ruleset: not nft JSON output"],
        ),
        (
            {"nft": 1, "iptables-save": 4, "ip6tables-save": 4},
            [], ["nft", "iptables-save", "ip6tables-save"],
            ["nft -j list ruleset: exit 1: Operation not permitted",
             "iptables-save -t nat: exit 4: Operation not permitted",
             "ip6tables-save -t nat: exit 4: Operation not permitted"],
        ),
        (
            {},
            [], ["nft", "iptables-save", "ip6tables-save"],
            ["neither nft nor iptables-save could be run"],
        ),
        (
            {"iptables-save": '*nat\n-A PREROUTING -m comment --comment "cut\n',
             "ip6tables-save": EMPTY_SAVE},
            [], ["nft", "iptables-save", "ip6tables-save"],
            ["iptables-save -t nat: unreadable output"],
        ),
    ],
    ids=[
        "native nft rules alone: no iptables-save",
        "iptables-nft dnat hidden in nft json: iptables-nft-save fills in",
        "no nft binary: iptables-save alone, no error",
        "unreadable nft output: error and iptables-save",
        "no CAP_NET_ADMIN: every error kept",
        "no tool at all: one error",
        "unbalanced quote in iptables-save: error, no crash",
    ],
)  # fmt: skip
def test_read_published_ports(tmp_path, outputs, ports, calls, errors):
    run = _runner(outputs)
    state = read_netfilter(runner=run, proc=str(tmp_path), legacy=False)
    found, errs = list(state.nat), list(state.nat_errors)
    if isinstance(ports, int):
        assert len(found) == ports and {p.source for p in found} == {"nft"}
    else:
        assert found == ports
    assert run.calls == calls
    assert len(errs) == len(errors)
    assert all(e.startswith(x) for e, x in zip(errs, errors, strict=True))


def test_read_published_ports_reads_legacy_iptables_too(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "ip_tables_names").write_text("filter\nnat\n")
    run = _runner(
        {"nft": NATIVE_NFT, "iptables-legacy-save": PODMAN_SAVE, "ip6tables-legacy-save": ""}
    )
    state = read_netfilter(runner=run, proc=str(tmp_path))
    found, errs = state.nat, state.nat_errors
    assert run.calls == ["nft", "iptables-legacy-save", "ip6tables-legacy-save"]
    assert [p for p in found if p.source == "iptables"] == PODMAN_PORTS
    assert errs == ()


# Docker's and kube-proxy's own rules (tests/fixtures/corpus, their sources in the
# headers), as iptables-nft-save and nft print them once loaded: record-real.sh.
REAL = {
    "docker-28-published": [pp("tcp", "0.0.0.0", 8080, "203.0.113.130", 80)],
    # `-d 127.0.0.1/32` on the DNAT: published on loopback only
    "docker-29-published-loopback": [pp("tcp", "127.0.0.1", 8080, "203.0.113.130", 80)],
    # the node ports through KUBE-EXT, KUBE-SVC (statistic, recent) and KUBE-SEP chains;
    # cluster, external and load balancer IPs publish nothing on the host's addresses
    "kube-proxy-overall": [
        pp("tcp", "0.0.0.0", 3001, "203.0.113.194", 80),
        pp("tcp", "0.0.0.0", 3003, "203.0.113.195", 80),
        pp("tcp", "0.0.0.0", 3002, "203.0.113.195", 80),
    ],
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_parse_iptables_nat_real_rules(name):
    text = (NAT / f"{name}.iptables-save").read_text()
    assert parse_iptables_nat(text) == REAL[name]


@pytest.mark.parametrize("name", sorted(REAL))
def test_read_published_ports_real_rules_through_iptables_nft_save(tmp_path, name):
    # iptables-nft writes Docker's and kube-proxy's DNAT as an xt target whose
    # destination nft's JSON leaves out: the reader must take it from iptables-nft-save.
    doc = (NAT / f"{name}.nft.json").read_text()
    assert nat_from_nft(json.loads(doc)["nftables"]) == ([], True)
    run = _runner(
        {
            "nft": doc,
            "iptables-nft-save": (NAT / f"{name}.iptables-save").read_text(),
            "ip6tables-nft-save": EMPTY_SAVE,
        }
    )
    state = read_netfilter(runner=run, proc=str(tmp_path), legacy=False)
    assert list(state.nat) == REAL[name]
    assert state.nat_errors == ()
    assert run.calls == ["nft", "iptables-nft-save", "ip6tables-nft-save"]


def _process(proc: Path, pid: int, comm: str, argv: list[str]) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_docker_proxy_ports(tmp_path):
    proxy = "/usr/bin/docker-proxy"
    _process(
        tmp_path,
        10,
        "docker-proxy",
        [
            proxy,
            "-proto",
            "tcp",
            "-host-ip",
            "0.0.0.0",
            "-host-port",
            "8080",
            "-container-ip",
            "172.17.0.2",
            "-container-port",
            "5000",
        ],
    )
    _process(
        tmp_path,
        11,
        "docker-proxy",
        [
            proxy,
            "--proto=udp",
            "--host-ip=::",
            "--host-port=5353",
            "--container-ip=172.17.0.4",
            "--container-port=53",
            "-use-listen-fd",
        ],
    )
    _process(tmp_path, 12, "docker-proxy", [proxy, "-proto", "tcp", "-host-port", "x"])
    _process(tmp_path, 13, "python3", ["python3", "-proto", "tcp"])
    found = sorted(docker_proxy_ports(str(tmp_path)), key=lambda p: p.host_port)
    assert found == [
        pp("udp", "::", 5353, "172.17.0.4", 53, "docker-proxy"),
        pp("tcp", "0.0.0.0", 8080, "172.17.0.2", 5000, "docker-proxy"),
    ]  # fmt: skip


def test_docker_proxy_duplicates_of_nat_rules_are_dropped(tmp_path):
    _process(tmp_path, 10, "docker-proxy", [
        "docker-proxy", "-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", "18081",
        "-container-ip", "203.0.113.3", "-container-port", "8080",
    ])  # fmt: skip
    run = _runner({"nft": PODMAN_NFT, "iptables-nft-save": PODMAN_SAVE, "ip6tables-nft-save": ""})
    found = read_netfilter(runner=run, proc=str(tmp_path), legacy=False).nat
    assert list(found) == PODMAN_PORTS
