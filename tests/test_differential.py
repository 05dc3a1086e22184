"""The kernel against the exporter: every ruleset of the corpus (and generated ones) is
loaded into a real server namespace, the exporter's Scanner scans it there, and clients
behind both of the server's links connect to every listener over IPv4 and IPv6. Each
firewall verdict, service status and effective exposure must be the kernel's answer;
`unknown` only where the entry's header says the ruleset cannot be decided statically.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from netlab import LINKS, PROBE_TIMEOUT, Bind, Lab, Tally, compare, config_for, probe_all
from support import require_binary, require_root

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
BINDS = (
    *(Bind(a, p, v6only=a == "::") for p in (22, 80, 443, 5432, 8080) for a in ("0.0.0.0", "::")),
    Bind("::", 9090),  # dual stack: IPv4 too
    Bind("::", 3000),
    Bind("198.51.100.129", 8443),
    Bind("2001:db8::1", 8443),
    # the node ports and the health check node port of the kube-proxy entry (IPv4 only,
    # as its rules are); probes run concurrently, so a few more ports cost little time
    *(Bind("0.0.0.0", p) for p in (3001, 3002, 3003, 30000)),
)


class Harness:
    def __init__(self, tag: str, tmp: Path, binds: tuple[Bind, ...]) -> None:
        self.lab = Lab(tag)
        self.tmp = tmp
        self.binds = binds
        self.tally = Tally()
        self.lab.create()
        self.listener = self.lab.listen(binds)
        self.scanner = self.lab.start(self.lab.server, "scan")
        self.probers = [self.lab.start(c, "probe", str(PROBE_TIMEOUT)) for c in self.lab.clients]
        self.config = config_for(binds)

    def check(self, name: str, unknown_ok: set[int] | None) -> list[str]:
        """Scan, probe and compare the ruleset now loaded; the new disagreements."""
        before = len(self.tally.disagreements)
        metrics = self.scanner.ask({"config": self.config})["metrics"]  # type: ignore[index]
        answers = probe_all(self.probers, self.binds, self.tally)
        compare(name, self.binds, metrics, answers, self.tally, unknown_ok)
        return self.tally.disagreements[before:]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    require_root()
    require_binary("ip", "nft", "iptables-nft-restore", "unshare", "conntrack")
    h = None
    try:
        h = Harness("d", tmp_path_factory.mktemp("lab"), BINDS)
        yield h
    finally:
        if h is not None:
            h.lab.delete()
            report(h.tally, "corpus")


def report(tally: Tally, what: str) -> None:
    line = f"{what} {tally.line()}"
    sys.stderr.write(f"\n{line}\n")
    out = os.environ.get("BINDSCOPE_DIFFERENTIAL_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def unknown_allowed(path: Path) -> set[int] | None:
    """The header's `# unknown: PORT[,PORT] why` lines; `*` for every port."""
    ports: set[int] = set()
    for line in path.read_text().splitlines():
        if line.startswith("# unknown:"):
            first = line.split(":", 1)[1].split()[0]
            if first == "*":
                return None
            ports |= {int(p) for p in first.split(",")}
    return ports


ENTRIES = sorted(
    p
    for p in CORPUS.iterdir()
    if p.suffix in (".nft", ".sh", ".ipt", ".legacy", ".ufw", ".firewalld")
)


@pytest.mark.parametrize("entry", ENTRIES, ids=[p.name for p in ENTRIES])
def test_corpus_ruleset_verdicts_are_the_kernels(harness: Harness, entry: Path) -> None:
    if entry.suffix == ".ufw":
        require_binary("ufw")
    if entry.suffix == ".firewalld":
        require_binary("firewalld", "firewall-cmd", "dbus-daemon")
    if entry.suffix == ".legacy":
        require_binary("iptables-legacy-restore")
    harness.lab.load(entry, harness.tmp)
    assert harness.check(entry.name, unknown_allowed(entry)) == []


def test_a_connection_left_by_the_last_ruleset_does_not_decide_the_next(harness: Harness) -> None:
    """Rulesets must be checked one independent of another: a SYN that reuses the 4-tuple
    of a connection an earlier ruleset left established (its FIN dropped by a later one)
    is `ct state established` to conntrack, not new. Here the clients' source ports are
    narrowed to a hundred and an entry for each is left established to each IPv4
    address of port 22; loading the next ruleset must forget them, or its `ct state new`
    drop would let those SYNs in."""
    lab = harness.lab
    first, last = 40000, 40099
    try:
        for client, (_, _, _, c4, _) in zip(lab.clients, LINKS, strict=True):
            lab.exec(client, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={first} {last}")
            for server4 in ("198.51.100.1", "198.51.100.129"):
                for sport in range(first, last + 1):
                    lab.exec(
                        lab.server, "conntrack", "-I", "-p", "tcp", "-s", c4, "-d", server4,
                        "--sport", str(sport), "--dport", "22", "--state", "ESTABLISHED",
                        "--timeout", "300", "-u", "SEEN_REPLY,ASSURED",
                    )  # fmt: skip
        harness.lab.load_text(
            "table inet t {\n  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            "    ct state new tcp dport 22 drop\n  }\n}\n"
        )
        assert harness.check("left-established", set()) == []
    finally:
        for client in lab.clients:
            lab.exec(client, "sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 60999")


def test_corpus_is_large_enough() -> None:
    assert len(ENTRIES) >= 40


# --- generated rulesets ------------------------------------------------------------

GEN_BINDS = (
    *(Bind(a, p, v6only=a == "::") for p in (22, 80, 5432) for a in ("0.0.0.0", "::")),
    Bind("::", 9090),
    Bind("198.51.100.129", 8443),
)
GEN_PORTS = (22, 80, 5432, 8443, 9090)
GEN_LABS = 4  # rulesets checked at once, one lab each: a drop costs a whole probe timeout
GEN_EXAMPLES = int(os.environ.get("BINDSCOPE_GENERATED_EXAMPLES", "100"))
# CI draws the same rulesets every run; a seed set here explores others (by hand)
GEN_SEED = os.environ.get("BINDSCOPE_GENERATED_SEED")


def _rulesets() -> st.SearchStrategy[str]:
    """nft rulesets from a grammar of what the evaluator decides exactly: ports and port
    sets, interface names, sets and verdict maps, families, ct state, daddr intervals,
    jump/goto/return, reject, several base chains at input/prerouting, netdev ingress.
    Source addresses are left out: two clients cannot stand for every source."""
    port = st.sampled_from(GEN_PORTS)
    ports = st.lists(port, min_size=1, max_size=3, unique=True).map(
        lambda ps: str(ps[0]) if len(ps) == 1 else "{ " + ", ".join(map(str, ps)) + " }"
    )
    iface = st.sampled_from(['"eth0"', '"eth1"', '{ "eth0", "eth1" }', "@ifs", '"eth*"'])
    match = st.one_of(
        ports.map(lambda p: f"tcp dport {p}"),
        ports.map(lambda p: f"tcp dport != {p}"),
        ports.map(lambda p: f"meta l4proto tcp th dport {p}"),
        st.sampled_from(["udp dport 22", "tcp dport 1000-6000", "tcp dport < 1024"]),
        iface.map(lambda i: f"iifname {i}"),
        iface.map(lambda i: f"iifname != {i}"),
        st.sampled_from(["meta nfproto ipv4", "meta nfproto ipv6", "ip protocol tcp"]),
        st.sampled_from(
            [
                "ip daddr 198.51.100.128/25",
                "ip6 daddr 2001:db8::/64",
                "ip daddr { 198.51.100.1, 198.51.100.200-198.51.100.255 }",
                "ip daddr . tcp dport { 198.51.100.1 . 22, 198.51.100.129 . 80 }",
            ]
        ),
        st.sampled_from(["ct state new", "ct state established,related", "ct state != new"]),
    )
    verdict = st.sampled_from(["accept", "drop", "reject", "counter", "jump sub", "goto sub"])
    vmap = st.sampled_from(
        [
            'iifname vmap { "lo" : accept, "eth1" : jump sub }',
            'iifname vmap { "eth0" : drop, "eth1" : accept }',
            "tcp dport vmap { 22 : accept, 80 : drop, 5432 : jump sub }",
            "meta nfproto vmap { ipv4 : jump sub, ipv6 : drop }",
        ]
    )
    rule = st.one_of(
        st.tuples(st.lists(match, max_size=3), verdict).map(lambda t: " ".join([*t[0], t[1]])),
        vmap,
    )
    sub_rule = st.tuples(st.lists(match, max_size=2), st.sampled_from(["accept", "drop", "return"]))
    policy = st.sampled_from(["accept", "drop"])

    def table(name: str, hook: str, prio: int, pol: str, rules: list[str], sub: list) -> str:
        sub_text = "\n".join(" ".join([*m, v]) for m, v in sub)
        body = "\n".join(rules)
        return (
            f"table inet {name} {{\n"
            '  set ifs { type ifname; elements = { "eth1" } }\n'
            f"  chain sub {{\n{sub_text}\n  }}\n"
            f"  chain base {{\n    type filter hook {hook} priority {prio}; policy {pol};\n"
            f"{body}\n  }}\n}}\n"
        )

    main = st.builds(
        table,
        st.just("t1"),
        st.just("input"),
        st.just(0),
        policy,
        st.lists(rule, max_size=5),
        st.lists(sub_rule, max_size=3),
    )
    extra = st.builds(
        table,
        st.just("t2"),
        st.sampled_from(["input", "prerouting"]),
        st.sampled_from([-10, 10]),
        policy,
        st.lists(rule, max_size=3),
        st.lists(sub_rule, max_size=2),
    )
    ingress = st.sampled_from(["eth0", "eth1"]).flatmap(
        lambda dev: st.builds(
            lambda pol, rules: (
                f"table netdev t3 {{\n  chain in {{\n    type filter hook ingress device "
                f'"{dev}" priority 0; policy {pol};\n' + "\n".join(rules) + "\n  }\n}\n"
            ),
            policy,
            st.lists(ports.map(lambda p: f"tcp dport {p} drop"), max_size=2),
        )
    )
    return st.builds(
        lambda m, e, i: m + (e or "") + (i or ""),
        main,
        st.one_of(st.none(), extra),
        st.one_of(st.none(), st.none(), ingress),
    )


@pytest.fixture(scope="module")
def gen_labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Harness]]:
    require_root()
    require_binary("ip", "nft", "conntrack")
    labs: list[Harness] = []
    try:
        for i in range(GEN_LABS):
            labs.append(Harness(f"g{i}", tmp_path_factory.mktemp(f"gen{i}"), GEN_BINDS))
        yield labs
    finally:
        for h in labs:
            h.lab.delete()
        if labs:
            total = Tally()
            for h in labs:
                total.rulesets += h.tally.rulesets
                total.probes += h.tally.probes
                total.checks += h.tally.checks
                total.agree += h.tally.agree
                total.unknown += h.tally.unknown
                total.disagreements += h.tally.disagreements
            report(total, "generated")


@settings(
    max_examples=GEN_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same rulesets on every run: CI stays deterministic
    suppress_health_check=list(HealthCheck),
    database=None,
    # no shrinking: each step costs real connects; the failing batch is printed whole
    phases=(Phase.explicit, Phase.generate),
)
@(seed(int(GEN_SEED)) if GEN_SEED else lambda f: f)
@given(batch=st.lists(_rulesets(), min_size=GEN_LABS, max_size=GEN_LABS))
def test_generated_ruleset_verdicts_are_the_kernels(
    gen_labs: list[Harness], batch: list[str]
) -> None:
    def one(h: Harness, text: str) -> list[str]:
        try:
            h.lab.load_text(text)
        except RuntimeError as e:
            if "Error:" not in str(e):
                raise
            return []  # nft refuses it (say, tcp and udp in one rule): no ruleset to test
        return h.check("generated", set())

    with ThreadPoolExecutor(GEN_LABS) as pool:
        found = list(pool.map(one, gen_labs, batch))
    bad = {text: d for text, d in zip(batch, found, strict=True) if d}
    # printed with the falsifying example: load the text with `nft -f` to replay it
    assert bad == {}
