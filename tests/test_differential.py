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
from pathlib import Path

import pytest
from conftest import require_binary, require_root
from netlab import PROBE_TIMEOUT, Bind, Lab, Tally, compare, config_for, probe_all

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
BINDS = (
    *(
        Bind(a, p, v6only=a == "::")
        for p in (22, 80, 443, 5432, 8080, 30080)
        for a in ("0.0.0.0", "::")
    ),
    Bind("::", 9090),  # dual stack: IPv4 too
    Bind("::", 3000),
    Bind("198.51.100.129", 8443),
    Bind("2001:db8::1", 8443),
)


class Harness:
    def __init__(self, tag: str, tmp: Path) -> None:
        self.lab = Lab(tag)
        self.tmp = tmp
        self.tally = Tally()
        self.lab.create()
        self.listener = self.lab.listen(BINDS)
        self.scanner = self.lab.start(self.lab.server, "scan")
        self.probers = [self.lab.start(c, "probe", str(PROBE_TIMEOUT)) for c in self.lab.clients]
        self.config = config_for(BINDS)

    def check(self, name: str, unknown_ok: set[int] | None) -> list[str]:
        """Scan, probe and compare the ruleset now loaded; the new disagreements."""
        before = len(self.tally.disagreements)
        metrics = self.scanner.ask({"config": self.config})["metrics"]  # type: ignore[index]
        answers = probe_all(self.probers, BINDS, self.tally)
        compare(name, BINDS, metrics, answers, self.tally, unknown_ok)
        return self.tally.disagreements[before:]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    require_root()
    require_binary("ip", "nft", "iptables-nft-restore", "unshare")
    h = None
    try:
        h = Harness("d", tmp_path_factory.mktemp("lab"))
        yield h
    finally:
        if h is not None:
            h.lab.delete()
            report(h.tally)


def report(tally: Tally) -> None:
    line = tally.line()
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
    p for p in CORPUS.iterdir() if p.suffix in (".nft", ".sh", ".ipt", ".legacy", ".ufw")
)


@pytest.mark.parametrize("entry", ENTRIES, ids=[p.name for p in ENTRIES])
def test_corpus_ruleset_verdicts_are_the_kernels(harness: Harness, entry: Path) -> None:
    if entry.suffix == ".ufw":
        require_binary("ufw")
    if entry.suffix == ".legacy":
        require_binary("iptables-legacy-restore")
    harness.lab.load(entry, harness.tmp)
    assert harness.check(entry.name, unknown_allowed(entry)) == []


def test_corpus_is_large_enough() -> None:
    assert len(ENTRIES) >= 40
