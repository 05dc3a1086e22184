"""The firewall evaluator against rulesets recorded from nft and iptables (fixtures/firewall)."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from support import load_ruleset, private_firewalld, require_binary, require_root, run

from bindscope.diagnose.fixes import closing_command, opening_command
from bindscope.model import Firewall
from bindscope.netfilter.evaluate import evaluate
from bindscope.netfilter.nft import parse_nft_json
from bindscope.netfilter.read import generation_id, read_ruleset
from bindscope.netfilter.ruleset import Decision

FIX = Path(__file__).parent / "fixtures" / "firewall"
ACCEPT, DROP, UNKNOWN = Firewall.ACCEPT, Firewall.DROP, Firewall.UNKNOWN
H4, H6 = "198.51.100.1", "2001:db8::1"
# the interfaces the recorded rulesets name: the host they were written for has them
IFACES = ("docker0", "eth0", "eth1")


load = load_ruleset


# fixture, protocol, family, daddr, port, verdict, restricted, text in rule or reason
CASES = [
    ("empty", "tcp", 4, H4, 5000, ACCEPT, False, "no filter"),
    ("inet_drop", "tcp", 4, H4, 5000, DROP, False, "policy drop"),
    ("inet_drop", "tcp", 4, H4, 22, ACCEPT, False, 'tcp dport 22 counter accept comment "ssh"'),
    ("inet_drop", "tcp", 4, H4, 443, ACCEPT, False, "tcp dport { 80, 443 } accept"),
    ("inet_drop", "tcp", 4, H4, 8443, ACCEPT, False, "tcp dport @web_ports accept"),
    ("inet_drop", "udp", 4, H4, 5010, ACCEPT, False, "udp dport 5000-5010 accept"),
    ("inet_drop", "tcp", 4, H4, 5005, DROP, False, "policy drop"),
    ("inet_drop", "tcp", 4, H4, 9009, ACCEPT, False, "tcp dport 9000-9009 accept"),
    ("inet_drop", "tcp", 4, H4, 9100, DROP, False, "tcp dport 9100 reject"),
    ("inet_drop", "udp", 4, H4, 5353, ACCEPT, False, "ip protocol udp udp dport 5353"),
    ("inet_drop", "udp", 6, H6, 5353, DROP, False, "policy drop"),
    ("inet_drop", "tcp", 4, H4, 7777, DROP, False, "policy drop"),
    ("inet_drop", "tcp", 4, H4, 6000, ACCEPT, False, "tcp dport 6000 accept"),
    ("inet_drop", "tcp", 4, H4, 6002, DROP, False, "tcp dport 6002 drop"),
    ("inet_drop", "udp", 4, H4, 6001, DROP, False, "policy drop"),
    ("inet_drop", "tcp", 4, H4, 6001, ACCEPT, False, "tcp dport 6001 accept"),
    ("inet_drop", "tcp", 4, H4, 5432, ACCEPT, True, "ip saddr @trusted4 accept"),
    ("inet_drop", "tcp", 6, H6, 5432, ACCEPT, True, "ip6 saddr 2001:db8::/64 accept"),
    ("inet_drop", "tcp", 4, H4, 7200, ACCEPT, False, "vmap { 7200 : accept, 7201 : drop }"),
    ("inet_drop", "tcp", 4, H4, 7201, DROP, False, "vmap { 7200 : accept, 7201 : drop }"),
    ("inet_drop", "tcp", 4, "198.51.100.10", 8000, ACCEPT, False, "ip daddr 198.51.100.10"),
    ("inet_drop", "tcp", 4, H4, 8000, DROP, False, "policy drop"),
    ("inet_drop", "tcp", 6, "2001:db8::10", 8000, ACCEPT, False, "ip6 daddr 2001:db8::10"),
    ("inet_drop", "tcp", 4, H4, 8001, ACCEPT, False, "ct state new tcp dport 8001 accept"),
    ("inet_drop", "tcp", 4, H4, 2999, ACCEPT, False, "tcp dport != 1-1024 tcp dport < 3000"),
    ("inet_drop", "tcp", 4, H4, 1024, DROP, False, "policy drop"),
    ("priorities", "tcp", 4, H4, 5000, DROP, False, "tcp dport 5000 drop"),
    ("priorities", "tcp", 6, H6, 5000, ACCEPT, False, "tcp dport 5000 accept"),
    ("priorities", "tcp", 4, H4, 5001, DROP, False, "tcp dport 5001 drop"),
    ("priorities", "tcp", 4, H4, 5002, ACCEPT, False, "policy accept"),
    ("priorities", "tcp", 6, H6, 5002, DROP, False, "tcp dport 5002 drop"),
    ("unknown", "tcp", 4, H4, 9100, UNKNOWN, False, "meta mark 1: not modelled"),
    ("unknown", "tcp", 4, H4, 9200, UNKNOWN, False, "meta mark 1: not modelled"),
    ("unknown", "tcp", 4, H4, 9300, UNKNOWN, False, "limit rate 10/second: not modelled"),
    ("unknown", "tcp", 4, H4, 9400, UNKNOWN, False, "ip saddr . tcp dport"),
    ("unknown", "tcp", 4, H4, 9500, UNKNOWN, False, "meta cpu 0: not modelled"),
    ("unknown", "tcp", 4, H4, 9600, DROP, False, "policy drop"),
    ("unknown", "tcp", 4, H4, 22, ACCEPT, False, "tcp dport 22 accept"),
    ("unknown", "udp", 6, H6, 80, UNKNOWN, False, "meta mark 2: not modelled"),
    ("unknown", "tcp", 6, H6, 80, ACCEPT, True, "meta mark 2: not modelled"),
    ("prerouting", "tcp", 4, H4, 23, DROP, False, "tcp dport 23 drop"),
    ("prerouting", "tcp", 4, H4, 25, DROP, False, "tcp dport 25 drop"),
    ("prerouting", "tcp", 4, H4, 22, ACCEPT, False, "policy accept"),
    ("prerouting", "udp", 4, H4, 53, UNKNOWN, False, "notrack"),
    ("prerouting", "tcp", 4, H4, 8080, ACCEPT, True, "dnat"),
    ("firewalld", "tcp", 4, H4, 5000, ACCEPT, False, "tcp dport 5000 accept"),
    ("firewalld", "tcp", 6, H6, 22, ACCEPT, False, "tcp dport 22 accept"),
    ("firewalld", "tcp", 4, H4, 5432, ACCEPT, True, "ip saddr 198.51.100.0/25 tcp dport 5432"),
    ("firewalld", "tcp", 4, H4, 8080, ACCEPT, True, "other sources or interfaces are dropped"),
    # dhcpv6-client's rule is for fe80::/64 only: on eth0 (public) 546 is rejected
    ("firewalld", "udp", 6, H6, 546, ACCEPT, True, "other sources or interfaces are dropped"),
    ("iptables_nft", "tcp", 4, H4, 8010, ACCEPT, False, "--dports 80,443,8000:8010 -j ACCEPT"),
    ("iptables_nft", "tcp", 4, H4, 5000, ACCEPT, False, "-A SERVICES -p tcp -m tcp --dport 5000"),
    ("iptables_nft", "udp", 4, H4, 5353, DROP, False, "policy drop"),
    ("iptables_nft", "tcp", 4, H4, 5432, ACCEPT, True, "-s 10.0.0.0/8"),
    ("iptables_nft", "tcp", 4, H4, 6000, DROP, False, "-j REJECT --reject-with tcp-reset"),
    ("iptables_nft", "tcp", 4, H4, 2222, UNKNOWN, False, "iptables extension recent"),
    ("iptables_nft", "tcp", 4, H4, 3999, ACCEPT, False, "--dport 3000:3999 -j ACCEPT"),
    ("iptables_nft", "tcp", 6, H6, 5000, ACCEPT, True, "! -i eth0"),
    ("iptables_nft", "tcp", 6, H6, 80, DROP, False, "policy drop"),
    ("ufw", "tcp", 4, H4, 5000, ACCEPT, False, "-A ufw-user-input -p tcp -m tcp --dport 5000"),
    ("ufw", "tcp", 4, H4, 9999, DROP, False, "policy drop"),
    ("ufw", "tcp", 4, H4, 8080, DROP, False, "--dport 8080 -j DROP"),
    ("ufw", "tcp", 4, H4, 5432, ACCEPT, True, "-s 10.0.0.0/8"),
    ("ufw", "tcp", 4, H4, 2200, UNKNOWN, False, "iptables extension recent"),
    ("ufw", "udp", 6, H6, 5353, DROP, False, "policy drop"),
    ("legacy", "tcp", 4, H4, 5000, ACCEPT, False, "-A SERVICES -p tcp -m tcp --dport 5000"),
    ("legacy", "tcp", 4, H4, 5433, ACCEPT, True, "--dport 5433 -j ACCEPT"),
    ("legacy", "tcp", 6, H6, 5000, DROP, False, "--dport 5000 -j DROP"),
    ("legacy", "udp", 6, "2001:db8::10", 53, DROP, False, "-d 2001:db8::10/128"),
    ("legacy", "udp", 6, H6, 53, ACCEPT, False, "policy accept"),
]
IDS = [f"{c[0]}-{c[1]}{c[2]}-{c[4]}-{c[5].value}{'-restricted' if c[6] else ''}" for c in CASES]


@pytest.mark.parametrize(
    ("name", "proto", "family", "daddr", "port", "verdict", "restricted", "text"), CASES, ids=IDS
)
def test_evaluate(name, proto, family, daddr, port, verdict, restricted, text):
    d = evaluate(load(name), proto, family, daddr, port, interfaces=IFACES)
    assert (d.verdict, d.restricted) == (verdict, restricted), d
    assert text in d.rule + " | " + d.reason, d
    if verdict is UNKNOWN:
        assert d.reason


@pytest.mark.parametrize(
    ("name", "port", "verdict"),
    [
        ("inet_drop", 7777, ACCEPT),
        ("inet_drop", 5000, ACCEPT),
        ("ufw", 9999, ACCEPT),
        ("priorities", 5000, DROP),
    ],
    ids=["iif-lo-rule", "lo-accept", "ufw-lo-accept", "drop-not-about-lo"],
)
def test_from_loopback(name, port, verdict):
    assert evaluate(load(name), "tcp", 4, H4, port, from_loopback=True).verdict is verdict


def test_decision_names_table_chain_and_handle():
    d = evaluate(load("inet_drop"), "tcp", 4, H4, 6002)
    assert (d.family, d.table, d.chain, d.backend) == ("inet", "filter", "services", "nft")
    assert isinstance(d.handle, int)


def test_unreadable_ruleset_is_unknown():
    d = evaluate(None, "tcp", 4, H4, 22)
    assert d.verdict is UNKNOWN and d.reason


@pytest.mark.parametrize(
    "text",
    ["", "{}", "not json", '{"nftables": 3}'],
    ids=["empty", "no-key", "garbage", "wrong-type"],
)
def test_parse_rejects_what_is_not_nft_json(text):
    with pytest.raises(ValueError):
        parse_nft_json(text)


class FakeRunner:
    """Answers commands from a table; records what was run."""

    def __init__(self, answers: dict[str, tuple[int, str, str] | Exception]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, cmd, **kw):
        self.calls.append(cmd)
        tool = next(c for c in cmd if not c.startswith(("nsenter", "--")))
        answer = self.answers[tool]
        if isinstance(answer, Exception):
            raise answer
        rc, out, err = answer
        return subprocess.CompletedProcess(cmd, rc, out, err)


def test_read_takes_iptables_nft_tables_from_iptables_save():
    runner = FakeRunner(
        {
            "nft": (0, (FIX / "ufw.json").read_text(), ""),
            "iptables-nft-save": (0, (FIX / "ufw.save4").read_text(), ""),
            "ip6tables-nft-save": (0, (FIX / "ufw.save6").read_text(), ""),
        }
    )
    rs, err = read_ruleset("/run/netns/x", runner=runner, legacy=False)
    assert err == ""
    assert runner.calls[0] == [
        "nsenter",
        "--net=/run/netns/x",
        "--",
        "nft",
        "-j",
        "list",
        "ruleset",
    ]
    d = evaluate(rs, "tcp", 4, H4, 5000)
    assert (d.verdict, d.backend, d.manager) == (ACCEPT, "iptables-nft", "ufw")


def test_read_adds_legacy_tables():
    runner = FakeRunner(
        {
            "nft": (0, (FIX / "empty.json").read_text(), ""),
            "iptables-legacy-save": (0, (FIX / "legacy.save4").read_text(), ""),
            "ip6tables-legacy-save": (0, (FIX / "legacy.save6").read_text(), ""),
        }
    )
    rs, err = read_ruleset(runner=runner, legacy=True)
    assert err == ""
    d = evaluate(rs, "tcp", 4, H4, 9999)
    assert (d.verdict, d.backend, d.rule) == (DROP, "iptables-legacy", "policy drop")


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (
            (1, "", "netlink: Error: cache initialization failed: Operation not permitted\n"),
            "nft -j list ruleset: exit 1: netlink: Error: cache initialization failed: "
            "Operation not permitted",
        ),
        (FileNotFoundError(2, "No such file", "nft"), "nft: not installed"),
        (subprocess.TimeoutExpired("nft", 5.0), "nft -j list ruleset: no answer in 5.0s"),
        ((0, "garbage", ""), "not nft JSON output"),
    ],
    ids=["no-cap-net-admin", "not-installed", "timeout", "bad-output"],
)
def test_read_failure_is_an_error_string(answer, error):
    rs, err = read_ruleset(runner=FakeRunner({"nft": answer}), legacy=False)
    assert rs is None
    assert error in err


@pytest.mark.parametrize(
    ("name", "proto", "port", "opening", "closing"),
    [
        ("ufw", "tcp", 9999, "ufw allow 9999/tcp", ""),
        ("ufw", "tcp", 5000, "", "ufw insert 1 deny 5000/tcp"),
        (
            "firewalld",
            "tcp",
            5000,
            "",
            " && ".join(
                f"firewall-cmd{p} --zone={z} --add-rich-rule='rule port "
                'port="5000" protocol="tcp" drop\''
                for z in ("public", "trusted")  # eth0 and eth1: closed in both zones
                for p in ("", " --permanent")
            ),
        ),
        (
            "inet_drop",
            "udp",
            5353,
            "",
            "nft insert rule inet filter input iifname != lo udp dport 5353 drop",
        ),
        ("inet_drop", "tcp", 5000, "nft insert rule inet filter input tcp dport 5000 accept", ""),
        ("legacy", "tcp", 9999, "iptables -I INPUT -p tcp --dport 9999 -j ACCEPT", ""),
        ("unknown", "tcp", 9100, "", ""),
    ],
    ids=[
        "ufw-open",
        "ufw-close",
        "firewalld-close",
        "nft-close",
        "nft-open",
        "iptables-open",
        "unknown-nothing",
    ],
)
def test_commands(name, proto, port, opening, closing):
    d = evaluate(load(name), proto, 4, H4, port, interfaces=IFACES)
    assert opening_command(d, proto, port) == opening
    assert closing_command(d, proto, port) == closing


@pytest.mark.parametrize(
    ("decision", "command"),
    [
        (Decision(DROP, rule="policy drop"), "iptables -I INPUT -p udp --dport 53 -j ACCEPT"),
        (
            Decision(DROP, "firewalld", "filter_INPUT", family="inet", manager="firewalld"),
            "firewall-cmd --add-port=53/udp && firewall-cmd --permanent --add-port=53/udp",
        ),
    ],
    ids=["no-table", "firewalld-default-zone"],
)
def test_opening_without_a_rule_to_point_at(decision, command):
    # firewalld's fixture accepts everything on its trusted eth1, so it never drops.
    assert opening_command(decision, "udp", 53) == command


@pytest.mark.root
def test_real_ruleset_matches_a_real_connection(two_hosts):
    """Read a namespace's rules with nft and check the verdicts against real connects.

    Nothing listens: an accepted SYN is answered by a reset ("refused"), a dropped one
    times out.
    """
    require_root()
    require_binary("nft", "nsenter")
    two_hosts.exec(two_hosts.server, "nft", "-f", str(FIX / "src" / "inet_drop.nft"))
    rs, err = read_ruleset(f"/run/netns/{two_hosts.server}", legacy=False)
    assert err == "" and rs is not None
    for port, verdict, outcome in ((22, ACCEPT, "refused"), (5000, DROP, "timed out")):
        assert evaluate(rs, "tcp", 4, two_hosts.SERVER4, port).verdict is verdict
        assert outcome in two_hosts.connect(two_hosts.SERVER4, port, timeout=1.0)


@pytest.mark.root
def test_generation_id_answers_without_a_subprocess():
    require_root()
    first = generation_id()
    assert isinstance(first, int)
    assert generation_id() >= first  # each committed change moves it forward


@pytest.mark.parametrize(
    ("decision", "command"),
    [
        (
            Decision(DROP, table="filter", chain="INPUT", family="ip", backend="nft"),
            "iptables -I INPUT -p tcp --dport 7000 -j ACCEPT",
        ),
        (
            Decision(DROP, table="filter", chain="INPUT", family="ip6", backend="nft"),
            "ip6tables -I INPUT -p tcp --dport 7000 -j ACCEPT",
        ),
        (
            Decision(DROP, table="e2e", chain="input", family="inet", backend="nft"),
            "nft insert rule inet e2e input tcp dport 7000 accept",
        ),
    ],
    ids=["iptables-nft table", "ip6tables-nft table", "native nft table"],
)
def test_opening_command_uses_the_tool_that_wrote_the_table(decision, command):
    assert opening_command(decision, "tcp", 7000) == command


def test_a_named_namespace_without_legacy_tools_keeps_the_nft_ruleset():
    """Whether legacy tables exist cannot be told for /run/netns paths, so the legacy tools
    are asked; where they are not installed, nothing wrote legacy tables."""
    runner = FakeRunner(
        {
            "nft": (0, (FIX / "inet_drop.json").read_text(), ""),
            "iptables-legacy-save": FileNotFoundError(2, "No such file", "iptables-legacy-save"),
            "ip6tables-legacy-save": FileNotFoundError(2, "No such file", "ip6tables-legacy-save"),
        }
    )
    rs, err = read_ruleset("/run/netns/x", runner=runner)
    assert err == ""
    assert rs is not None and rs.chains


def _host_firewalld_state() -> tuple:
    """What a firewalld on the host would leave: its table in the host's ruleset, changes
    under /etc/firewalld, its runtime directory and log file."""
    tables = run("nft", "list", "tables").stdout
    etc = Path("/etc/firewalld")
    digest = hashlib.sha256()
    for f in sorted(etc.rglob("*")) if etc.exists() else ():
        digest.update(str(f).encode() + (f.read_bytes() if f.is_file() else b""))
    return (
        "firewalld" in tables,
        digest.hexdigest(),
        Path("/run/firewalld").exists(),
        Path("/var/log/firewalld").exists(),
    )


@pytest.mark.root
def test_a_private_firewalld_filters_its_namespace_only(two_hosts):
    require_root()
    require_binary("nft")
    before = _host_firewalld_state()
    with private_firewalld(two_hosts.server) as fw:
        fw.cmd("--permanent", "--add-port=5000/tcp")  # written to its copy, not the host's
        fw.cmd("--reload")
        fw.cmd("--add-masquerade")  # sets ip_forward: the namespace's own sysctl
        inside = two_hosts.exec(two_hosts.server, "nft", "list", "table", "inet", "firewalld")
        assert "tcp dport 5000 accept" in inside.stdout
        assert 'port="5000"' in (fw.dir / "etc-firewalld/zones/public.xml").read_text()
        assert _host_firewalld_state() == before
        private = fw.dir
    assert not private.exists()
    assert "firewalld" not in two_hosts.exec(two_hosts.server, "nft", "list", "tables").stdout
    assert run("ip", "netns", "pids", two_hosts.server).stdout.split() == []
    assert _host_firewalld_state() == before


FIREWALLD_RECORDED = [
    Path(__file__).parent / "fixtures" / "corpus" / "firewalld-public-trusted.nft",
    FIX / "src" / "firewalld.nft",
]


@pytest.mark.root
@pytest.mark.parametrize("path", FIREWALLD_RECORDED, ids=lambda p: p.parent.name + "/" + p.name)
def test_recorded_firewalld_rulesets_are_what_firewalld_writes(path: Path):
    """Each `# $ firewall-cmd ...` line of the header, run against a private firewalld in a
    bare namespace, leaves exactly the recorded body in `nft list ruleset`.
    BINDSCOPE_UPDATE_GOLDEN=1 records the body again (then run record.sh for the JSON)."""
    require_root()
    require_binary("ip", "nft")
    lines = path.read_text().splitlines(keepends=True)
    header = [line for line in lines if line.startswith("#")]
    assert lines[: len(header)] == header, "the header comes first, the recorded text after"
    commands = [
        shlex.split(line.removeprefix("# $ firewall-cmd "))
        for line in header
        if line.startswith("# $ firewall-cmd ")
    ]
    assert commands
    ns = f"bss-{os.getpid()}-rec"
    run("ip", "netns", "add", ns)
    try:
        with private_firewalld(ns) as fw:
            for args in commands:
                fw.cmd(*args)
            got = run("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout
    finally:
        run("ip", "netns", "del", ns, check=False)
    if os.environ.get("BINDSCOPE_UPDATE_GOLDEN"):
        path.write_text("".join(header) + got)
    assert path.read_text().removeprefix("".join(header)) == got


@pytest.mark.parametrize(
    ("iface", "verdict", "chain", "rule"),
    [
        ("eth0", DROP, "filter_IN_public", "reject with icmpx admin-prohibited"),
        ("eth1", ACCEPT, "filter_IN_trusted", "accept"),
        ("eth9", DROP, "filter_IN_public", "reject with icmpx admin-prohibited"),  # default zone
    ],
)
def test_firewalld_the_input_interfaces_zone_decides(iface, verdict, chain, rule):
    d = evaluate(load("firewalld"), "tcp", 4, H4, 8080, interfaces=(iface,))
    assert (d.verdict, d.chain, d.rule, d.restricted) == (verdict, chain, rule, False), d
