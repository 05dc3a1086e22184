"""Discovery on real sockets: netlink and psutil agree, v6only is read, owners are found."""

import os
import socket
import subprocess
import sys

import pytest

from bindscope.discover import netlink, psutil_backend
from bindscope.discover.processes import InodeResolver
from bindscope.model import HOST_NETNS, ErrorSource, Protocol


def find(sockets, protocol, address, port):
    return [
        s for s in sockets if s.protocol is protocol and s.address == address and s.port == port
    ]


@pytest.fixture
def opened(listen):
    """One socket of every kind discovery must see."""
    return {
        "tcp4": listen("127.0.0.1"),
        "tcp4_any": listen("0.0.0.0"),
        "tcp6_dual": listen("::", v6only=False),
        "tcp6_only": listen("::", v6only=True),
        "tcp6_lo": listen("::1"),
        "udp4": listen("127.0.0.1", udp=True),
        "udp6": listen("::", udp=True, v6only=True),
    }


def port(s):
    return s.getsockname()[1]


def test_netlink_sees_every_kind_with_v6only(opened):
    found = netlink.list_sockets()
    expect = [
        ("tcp4", Protocol.TCP, "127.0.0.1", None),
        ("tcp4_any", Protocol.TCP, "0.0.0.0", None),
        ("tcp6_dual", Protocol.TCP, "::", False),
        ("tcp6_only", Protocol.TCP, "::", True),
        # the kernel sets v6only itself when a socket binds a specific IPv6 address
        ("tcp6_lo", Protocol.TCP, "::1", True),
        ("udp4", Protocol.UDP, "127.0.0.1", None),
        ("udp6", Protocol.UDP, "::", True),
    ]
    for key, protocol, address, v6only in expect:
        s = opened[key]
        got = find(found, protocol, address, port(s))
        assert len(got) == 1, (key, got)
        assert got[0].v6only is v6only, key
        assert got[0].inode == os.fstat(s.fileno()).st_ino, key
        assert got[0].family == (6 if ":" in address else 4)


def test_netlink_ignores_established_connections(listen):
    server = listen("127.0.0.1")
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        ports = {s.port for s in netlink.list_sockets()}
        assert port(server) in ports
        assert client.getsockname()[1] not in ports  # the client's ephemeral port
    finally:
        client.close()
        accepted.close()


def test_netlink_and_psutil_agree(opened):
    def key_set(sockets):
        return {(s.protocol, s.address, s.port) for s in sockets}

    mine = {port(s) for s in opened.values()}
    via_netlink = {k for k in key_set(netlink.list_sockets()) if k[2] in mine}
    via_psutil = {k for k in key_set(psutil_backend.list_sockets()[0]) if k[2] in mine}
    assert via_netlink == via_psutil
    assert len(via_netlink) == len(opened)


def test_resolver_finds_own_process_and_caches(opened):
    wanted = {os.fstat(s.fileno()).st_ino for s in opened.values()}
    resolver = InodeResolver()
    first = resolver.resolve(wanted)
    assert set(first.owners) == wanted
    assert {p.pid for p in first.owners.values()} == {os.getpid()}
    second = resolver.resolve(wanted)  # served from the cache, confirmed by readlink
    assert second.owners == first.owners
    assert not second.errors


def test_resolver_forgets_closed_sockets(listen):
    a, b = listen("127.0.0.1"), listen("127.0.0.1")
    ia, ib = os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino
    resolver = InodeResolver()
    assert set(resolver.resolve({ia, ib}).owners) == {ia, ib}
    b.close()
    assert set(resolver.resolve({ia}).owners) == {ia}
    assert set(resolver._where) == {ia}


def test_resolver_counts_unreadable_fd_tables(tmp_path):
    """A fake /proc where one process hides its fds: the socket stays unattributed."""
    for pid, fds in (("100", {"3": "socket:[111]"}), ("200", None)):
        d = tmp_path / pid
        (d / "fd").mkdir(parents=True)
        (d / "comm").write_text("app\n")
        (d / "cmdline").write_bytes(b"app\0--flag\0")
        for fd, target in (fds or {}).items():
            os.symlink(target, d / "fd" / fd)
        if fds is None:
            (d / "fd").chmod(0)
    resolver = InodeResolver(proc=str(tmp_path))
    result = resolver.resolve({111, 222})
    assert result.owners[111].name == "app"
    assert result.owners[111].cmdline == ("app", "--flag")
    if os.geteuid() != 0:  # root reads a 000 directory anyway
        assert result.errors[ErrorSource.PROCESS_ATTRIBUTION] == 1
    assert 222 not in result.owners


def test_resolver_survives_a_vanished_process(tmp_path):
    d = tmp_path / "300"
    (d / "fd").mkdir(parents=True)
    os.symlink("socket:[333]", d / "fd" / "4")  # no comm: exited between the two reads
    result = InodeResolver(proc=str(tmp_path)).resolve({333})
    assert result.owners == {}
    assert result.errors[ErrorSource.PROC_VANISHED] == 1


def test_resolver_names_the_service_not_systemd_for_socket_activation(tmp_path):
    """pid 1 passed its socket to a service: both hold it, the service is the owner."""
    for pid, comm in (("1", "systemd"), ("200", "sshd")):
        d = tmp_path / pid
        (d / "fd").mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes(comm.encode() + b"\0")
        os.symlink("socket:[444]", d / "fd" / "3")
    resolver = InodeResolver(proc=str(tmp_path))
    assert resolver.resolve({444}).owners[444].name == "sshd"
    assert resolver.resolve({444}).owners[444].name == "sshd"  # and from the cache
    os.unlink(tmp_path / "200" / "fd" / "3")  # the service closed it: systemd still holds it
    assert resolver.resolve({444}).owners[444].name == "systemd"


def test_a_socket_systemd_held_alone_moves_to_the_service_it_starts(tmp_path):
    """Remembered as pid 1's, the socket must not stay systemd's once a service started
    since holds it too (its one-readlink check of pid 1 keeps passing)."""

    def process(pid: str, comm: str) -> None:
        d = tmp_path / pid
        (d / "fd").mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes(comm.encode() + b"\0")
        os.symlink("socket:[444]", d / "fd" / "3")

    process("1", "systemd")
    resolver = InodeResolver(proc=str(tmp_path))
    assert resolver.resolve({444}).owners[444].name == "systemd"
    process("200", "sshd")  # the first connection started the service
    assert resolver.resolve({444}).owners[444].name == "sshd"
    assert resolver.resolve({444}).owners[444].name == "sshd"


def test_netlink_memo_forgets_namespaces_no_longer_seen(listen):
    listen("127.0.0.1")
    memo = netlink.Memo()
    netlink.list_sockets(netns="gone-ns", memo=memo)
    assert "gone-ns" in memo
    memo.forget([HOST_NETNS])
    assert "gone-ns" not in memo


def test_netlink_memo_returns_the_same_tuple_until_something_changes(listen):
    memo = netlink.Memo()
    # other programs on this host may open or close sockets meanwhile: two consecutive
    # dumps that found the same are enough
    for _ in range(20):
        first = netlink.list_sockets(memo=memo)
        if netlink.list_sockets(memo=memo) is first:
            break
    else:
        pytest.fail("no two consecutive dumps returned the same tuple")
    port = listen("127.0.0.1").getsockname()[1]
    second = netlink.list_sockets(memo=memo)
    assert second is not first and port in {s.port for s in second}
    assert set(second) == set(netlink.list_sockets())  # as parsed without a memo


_HOLDER = r"""
import os, socket, sys
held = [socket.socket() for _ in range(2)]
for s in held:
    s.bind(("127.0.0.1", 0))
    s.listen(1)
print(" ".join(str(os.fstat(s.fileno()).st_ino) for s in held), flush=True)
sys.stdin.readline()
held.pop().close()
print("closed", flush=True)
sys.stdin.readline()
"""


def test_resolver_confirms_a_process_at_once_and_sees_it_close_a_socket():
    """Two sockets of one process: found, confirmed again, and the closed one is let go."""
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        kept, closed = (int(i) for i in child.stdout.readline().split())
        resolver = InodeResolver()
        first = resolver.resolve({kept, closed})
        assert {first.owners[i].pid for i in (kept, closed)} == {child.pid}
        assert resolver.resolve({kept, closed}).owners is first.owners  # nothing changed
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "closed"
        later = resolver.resolve({kept, closed})
        assert later.owners[kept].pid == child.pid and closed not in later.owners
    finally:
        child.kill()
        child.wait()
