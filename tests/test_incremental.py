"""An incremental scan says exactly what a full scan says, after any sequence of changes.

Real sockets, processes, rules, addresses and namespaces, all inside a test network
namespace (198.51.100.0/24, 2001:db8::/32 on a veth pair) and a pid namespace, where
incremental_run.py changes one thing at a time at random and compares the long-lived
Scanner with a fresh one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import require_binary, require_root, run

HERE = Path(__file__).parent
SEEDS = tuple(range(1, 11))
STEPS = 60


@pytest.fixture
def netns():
    require_root()
    require_binary("ip", "nft", "unshare")
    name = f"bss-{os.getpid()}-inc"  # the shape conftest removes after a killed run
    run("ip", "netns", "add", name)
    try:
        for cmd in (
            "ip link set lo up",
            "ip link add bsi0 type veth peer name bsi1",
            # no address may appear by itself between two scans of a step: no link-local
            # addresses, no duplicate address detection
            "sysctl -qw net.ipv6.conf.all.accept_dad=0",
            "ip link set bsi0 addrgenmode none",
            "ip link set bsi1 addrgenmode none",
            "ip addr add 198.51.100.7/24 dev bsi0",
            "ip addr add 2001:db8::7/64 dev bsi0 nodad",
            "ip link set bsi1 up",
            "ip link set bsi0 up",
        ):
            run("ip", "netns", "exec", name, *cmd.split())
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


@pytest.mark.parametrize("seed", SEEDS)
def test_incremental_scans_equal_full_scans(netns, seed):
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    args = (str(seed), str(STEPS))
    # a pid namespace, and an empty /run/netns, of its own: the scanners see the
    # namespaces of this run's processes alone, and when it ends every one of them ends
    isolated = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "sh", "-c"]
    isolated.append('mount -t tmpfs tmpfs /run/netns && exec "$0" "$@"')
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            *isolated,
            sys.executable,
            str(HERE / "incremental_run.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"seed {seed}: {summary['steps']} steps, {summary['changed']} changed the exposition, "
        f"{len(summary['mismatches'])} mismatches"
    )
    assert summary["steps"] == STEPS
    assert summary["changed"] >= STEPS // 4  # the changes reached the verdicts
    for m in summary["mismatches"]:
        ops = "\n  ".join(m["ops"])
        pytest.fail(f"seed {seed}, step {m['step']}: {m['differ']} differ after:\n  {ops}")
