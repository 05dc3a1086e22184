"""Real daemons from Debian, misconfigured as admins do, in the test's server namespace
(daemons.py): every fix `bindscope diagnose --json` prints is applied exactly as printed,
the daemon is restarted, and the status, loopback clients and the client namespace (IPv4
and IPv6) are checked against the expectation."""

from __future__ import annotations

import json

import pytest
from daemons import (  # noqa: F401  (the fixtures are used by name)
    DAEMONS,
    REDIS,
    REFUSED,
    TIMED_OUT,
    Running,
    clients,
    diagnose,
    loopback,
    running_fixture,
    status,
)
from support import TwoHosts, require_binary

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@pytest.mark.parametrize("running", DAEMONS, ids=[d.test_id for d in DAEMONS], indirect=True)
def test_the_printed_fix_applied_as_printed_makes_it_ok(running: Running):
    r, d = running, running.daemon
    assert status(r) == d.wrong
    doc = diagnose(r)
    print(f"server$ bindscope diagnose {d.port} --json\n{json.dumps(doc, indent=2)}")
    config = [f for f in doc["fixes"] if f["kind"] == "config"]
    assert len(config) == d.fixes, doc["fixes"]
    assert (config[0]["file"], config[0].get("line", 0)) == (d.file, d.line(r.tmp)), config
    # every line that sets it is changed: each fix, in order, as printed
    for fix in config:
        for command in fix["commands"]:
            r.run_as_admin(command)
    for fix in config:
        lines = r.file(fix["file"]).read_text().splitlines()
        # the named line now reads as the setting says; an absent setting was added
        if "line" in fix:
            assert lines[fix["line"] - 1] == fix["setting"], fix
        else:
            assert fix["setting"] in lines, fix

    r.stop()
    r.start()
    assert status(r) == "ok"
    assert {a: loopback(r, a) for a in d.loopback} == dict.fromkeys(d.loopback, "ok")
    assert clients(r) == dict.fromkeys((TwoHosts.SERVER4, TwoHosts.SERVER6), d.client_after)
    after = diagnose(r)
    assert (after["result"], after["fixes"]) == ("ok", [])


# --- the firewall fix, on the host's own kind of firewall ---


def nft_table(r: Running) -> None:
    r.hosts.exec(r.hosts.server, "nft",
                 "add table inet filter; "
                 "add chain inet filter input { type filter hook input priority 0; policy accept; }"
                 )  # fmt: skip


def iptables_nft(r: Running) -> None:
    # what `iptables -A` leaves: an ip filter table with upper-case chains, IPv4 only
    r.hosts.exec(r.hosts.server, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22",
                 "-j", "ACCEPT")  # fmt: skip


def no_firewall(r: Running) -> None:
    pass


FIREWALLS = [nft_table, iptables_nft, no_firewall]


@pytest.mark.parametrize("running", [REDIS], ids=["redis"], indirect=True)
@pytest.mark.parametrize("firewall", FIREWALLS, ids=["nft-table", "iptables-nft", "none"])
def test_the_firewall_fix_keeps_loopback_and_closes_both_families(running: Running, firewall):
    r = running
    require_binary("nft", "iptables", "ip6tables")
    firewall(r)
    assert status(r) == "overexposed"
    doc = diagnose(r)
    fixes = [f for f in doc["fixes"] if f["kind"] == "firewall"]
    assert len(fixes) == 1, doc["fixes"]
    print(f"server$ bindscope diagnose 6379 --json  # firewall fix\n{json.dumps(fixes, indent=2)}")
    for command in fixes[0]["commands"]:
        r.run_as_admin(command)

    assert status(r) == "ok"
    assert {a: loopback(r, a) for a in ("127.0.0.1", "::1")} == {"127.0.0.1": "ok", "::1": "ok"}
    assert clients(r) == {TwoHosts.SERVER4: TIMED_OUT, TwoHosts.SERVER6: TIMED_OUT}
    after = diagnose(r)
    # protected by the firewall alone: said, but not offered again
    assert after["result"] == "ok", after
    assert not [f for f in after["fixes"] if f["kind"] == "firewall"]
    said = [line for f in after["findings"] for line in f["lines"]]
    assert any("protected by the firewall alone" in line for line in said), said
