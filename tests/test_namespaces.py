"""Tests for network namespace discovery, entering one, and the /proc/PID/net fallback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bindscope.discover.namespaces import (
    Memberships,
    addresses_in_namespace,
    enumerate_namespaces,
    in_namespace,
    parse_proc_net,
    read_proc_net,
)
from bindscope.discover.netlink import list_sockets

FIXTURES = Path(__file__).parent / "fixtures"
PROC_NET = FIXTURES / "containers" / "proc_net"
PODMAN_CGROUP = FIXTURES / "cgroup" / "podman-cgroupfs-hybrid.txt"
PODMAN_ID = "1971b172692a0b782fc86b9a518c313591ff947c3d7486d39cfb76e7202c9144"


def _require(ok: bool, reason: str) -> None:
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run this: {reason}")
        pytest.skip(reason)


@pytest.mark.parametrize(
    ("table", "protocol", "family", "state", "expected"),
    [
        (
            "tcp",
            "tcp",
            4,
            0x0A,
            [("tcp", 4, "127.0.0.1", 8080, 14821, 0), ("tcp", 4, "198.51.100.1", 5432, 14822, 0)],
        ),
        (
            "tcp6",
            "tcp",
            6,
            0x0A,
            [
                ("tcp", 6, "::ffff:127.0.0.1", 6379, 14825, 0),
                ("tcp", 6, "2001:db8::1", 22, 14826, 0),
                ("tcp", 6, "::1", 8443, 14823, 0),
                ("tcp", 6, "::", 9090, 14824, 0),
            ],
        ),
        ("udp", "udp", 4, 0x07, [("udp", 4, "0.0.0.0", 5353, 14829, 0)]),
        ("udp6", "udp", 6, 0x07, [("udp", 6, "2001:db8::1", 53, 14830, 0)]),
    ],
    ids=[
        "tcp4 listeners without the established pair",
        "tcp6 listeners with a v4-mapped address",
        "udp4 bound without the connected socket",
        "udp6 bound",
    ],
)
def test_parse_proc_net(table, protocol, family, state, expected):
    text = (PROC_NET / table).read_text()
    assert parse_proc_net(text, protocol, family, state) == expected


def test_parse_proc_net_skips_udp_port_zero_and_keeps_uid():
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        "timeout inode ref pointer drops\n"
        " 100: 0100007F:0000 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000"
        "        0 501 2 0000000000000000 0\n"
        " 101: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000"
        "        0 502 2 0000000000000000 0\n"
    )
    assert parse_proc_net(text, "udp", 4, 0x07) == [("udp", 4, "127.0.0.1", 53, 502, 1000)]


def _fake_proc(root: Path, pid: int, tables: tuple[str, ...]) -> Path:
    net = root / str(pid) / "net"
    net.mkdir(parents=True)
    for t in tables:
        shutil.copy(PROC_NET / t, net / t)
    return root


def test_read_proc_net_reads_all_four_tables(tmp_path):
    proc = _fake_proc(tmp_path, 42, ("tcp", "tcp6", "udp", "udp6"))
    rows = read_proc_net(42, proc=str(proc))
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("tcp", 4, 8080), ("tcp", 4, 5432),
        ("tcp", 6, 6379), ("tcp", 6, 22), ("tcp", 6, 8443), ("tcp", 6, 9090),
        ("udp", 4, 5353), ("udp", 6, 53),
    ]  # fmt: skip


def test_read_proc_net_without_ipv6_tables(tmp_path):
    proc = _fake_proc(tmp_path, 42, ("tcp", "udp"))
    assert {r[1] for r in read_proc_net(42, proc=str(proc))} == {4}


def test_read_proc_net_of_a_gone_process_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_proc_net(42, proc=str(tmp_path))


def test_read_proc_net_of_this_process_finds_its_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port, inode = s.getsockname()[1], os.fstat(s.fileno()).st_ino
        rows = read_proc_net(os.getpid())
    assert ("tcp", 4, "127.0.0.1", port, inode, os.getuid()) in rows


def test_enumerate_namespaces_on_a_fake_proc(tmp_path):
    """Members grouped by inode, containers attributed from cgroup, stale names skipped."""
    proc, run = tmp_path / "proc", tmp_path / "netns"
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "self" / "ns" / "net").symlink_to("/proc/self/ns/net")
    host = os.stat("/proc/self/ns/net").st_ino
    for pid, target, cgroup in (
        (100, f"net:[{host}]", "0::/system.slice/ssh.service\n"),
        (200, "net:[4026532001]", "0::/\n"),
        (300, "net:[4026532002]", PODMAN_CGROUP.read_text()),
        (301, "net:[4026532002]", "0::/libpod_parent/conmon\n"),
    ):
        (proc / str(pid) / "ns").mkdir(parents=True)
        (proc / str(pid) / "ns" / "net").symlink_to(target)
        (proc / str(pid) / "cgroup").write_text(cgroup)
    (proc / "400").mkdir()  # exited between listing and stat: silently gone
    (proc / "stat").write_text("")
    run.mkdir()
    (run / "stale").write_text("")  # `ip netns add` whose bind mount is gone

    found, errors = enumerate_namespaces(proc=str(proc), run_netns=str(run))

    by_kind = {ns.kind: ns for ns in found}
    assert found[0].kind == "host"
    assert set(by_kind) == {"host", "other", "container"}
    assert by_kind["host"].inode == host and by_kind["host"].pids == (100,)
    assert by_kind["host"].label == "host"
    assert by_kind["other"].label == "netns:4026532001"
    assert by_kind["other"].path == f"{proc}/200/ns/net"
    assert by_kind["container"].pids == (300, 301)
    assert by_kind["container"].container.id == PODMAN_ID
    assert errors == []


def test_enumerate_namespaces_finds_this_process_in_host():
    found, _ = enumerate_namespaces()
    assert found[0].kind == "host"
    assert found[0].inode == os.stat("/proc/self/ns/net").st_ino
    assert os.getpid() in found[0].pids


@pytest.fixture
def named_netns():
    """A named network namespace with lo up, deleted even when the test fails."""
    _require(os.geteuid() == 0, "needs root to create network namespaces")
    _require(shutil.which("ip") is not None, "needs iproute2's ip")
    name = f"bindscope-test-ns-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.root
def test_enumerate_namespaces_lists_a_named_namespace(named_netns):
    found, _ = enumerate_namespaces()
    ns = next(ns for ns in found if ns.label == named_netns)
    assert ns.kind == "named"
    assert ns.path == f"/run/netns/{named_netns}"
    assert ns.pids == ()
    assert ns.inode == os.stat(ns.path).st_ino


@pytest.mark.root
def test_in_namespace_moves_only_its_thread(named_netns):
    path = f"/run/netns/{named_netns}"
    before = os.stat("/proc/thread-self/ns/net").st_ino
    inside = in_namespace(path, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert inside == os.stat(path).st_ino != before
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


@pytest.mark.root
def test_sockets_opened_inside_stay_in_the_namespace(named_netns):
    path = f"/run/netns/{named_netns}"

    def listener() -> socket.socket:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        return s

    with (
        in_namespace(path, listener) as s,
        in_namespace(path, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)) as nl,
    ):
        port, inode = s.getsockname()[1], os.fstat(s.fileno()).st_ino
        inside = list_sockets(nl, netns=named_netns)
        host = list_sockets()
    assert [(x.address, x.port, x.inode) for x in inside] == [("127.0.0.1", port, inode)]
    assert inode not in {x.inode for x in host}


@pytest.mark.root
def test_addresses_in_namespace_are_the_namespaces_own(named_netns):
    assert sorted(a[:3] for a in addresses_in_namespace(f"/run/netns/{named_netns}")) == [
        ("lo", "127.0.0.1", 4),
        ("lo", "::1", 6),
    ]


@pytest.mark.parametrize(
    ("path", "fn", "error"),
    [
        ("/nonexistent/netns", lambda: None, FileNotFoundError),
        ("/proc/self/ns/net", lambda: 1 / 0, ZeroDivisionError),
        ("/dev/null", lambda: None, OSError),
    ],
    ids=["a gone namespace", "fn's own error", "a file that is no namespace"],
)
def test_in_namespace_raises(path, fn, error):
    _require(os.geteuid() == 0, "setns needs CAP_SYS_ADMIN")
    with pytest.raises(error):
        in_namespace(path, fn)


@pytest.mark.root
def test_in_namespace_without_cap_sys_admin_is_eperm(named_netns):
    _require(shutil.which("setpriv") is not None, "needs util-linux's setpriv")
    code = (
        "import errno\n"
        "from bindscope.discover.namespaces import in_namespace\n"
        "try:\n"
        f"    in_namespace('/run/netns/{named_netns}', lambda: None)\n"
        "except OSError as e:\n"
        "    raise SystemExit(0 if e.errno == errno.EPERM else e.errno)\n"
        "raise SystemExit(99)\n"
    )
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_memberships_read_new_pids_each_scan_and_all_pids_on_refresh(tmp_path):
    """A fake /proc: a known pid is not read again until the refresh is due."""
    now = [0.0]
    memo = Memberships(clock=lambda: now[0])
    (tmp_path / "self" / "ns").mkdir(parents=True)
    (tmp_path / "self" / "ns" / "net").write_text("")
    for pid, ns in (("10", "net:[111]"), ("11", "net:[222]")):
        (tmp_path / pid / "ns").mkdir(parents=True)
        os.symlink(ns, tmp_path / pid / "ns" / "net")
        (tmp_path / pid / "cgroup").write_text("0::/user.slice\n")

    def inodes():
        found, _ = enumerate_namespaces(str(tmp_path), str(tmp_path / "none"), memo)
        return sorted(ns.inode for ns in found[1:])

    assert inodes() == [111, 222]
    os.unlink(tmp_path / "11" / "ns" / "net")  # pid 11 moved to another namespace
    os.symlink("net:[333]", tmp_path / "11" / "ns" / "net")
    assert inodes() == [111, 222]  # remembered: not read again yet
    now[0] += Memberships.REFRESH
    assert inodes() == [111, 333]  # the refresh reads every pid
    shutil.rmtree(tmp_path / "10")  # exited: forgotten
    assert inodes() == [333]
    assert set(memo.inode_of) == {11}
