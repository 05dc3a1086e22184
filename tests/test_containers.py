"""Tests for container attribution from cgroups and container names, and one real podman
container followed through namespaces, cgroup, names and published ports."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import PODMAN_SUBNET, free_port, wait_for

from bindscope.discover.containers import ContainerNames, ContainerRef, container_from_cgroup
from bindscope.discover.namespaces import (
    addresses_in_namespace,
    enumerate_namespaces,
    in_namespace,
    parse_proc_net,
    read_proc_net,
)
from bindscope.netfilter.read import read_netfilter

FIXTURES = Path(__file__).parent / "fixtures"
CGROUP = FIXTURES / "cgroup"
STATE = FIXTURES / "containers"
RECORDED_ID = "1971b172692a0b782fc86b9a518c313591ff947c3d7486d39cfb76e7202c9144"
POD_UID = "1f2e3d4c-5b6a-4980-a1b2-c3d4e5f60718"


def _id(word: str) -> str:
    """The made-up container ids of the hand-written fixtures (see cgroup/README.md)."""
    return hashlib.sha256(word.encode()).hexdigest()


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("podman-cgroupfs-hybrid.txt", ContainerRef("podman", RECORDED_ID)),
        ("podman-conmon-cgroupfs-hybrid.txt", None),
        ("podman-systemd-v2.txt", ContainerRef("podman", _id("podman-systemd"))),
        ("podman-conmon-systemd-v2.txt", None),
        ("podman-rootless-v2.txt", ContainerRef("podman", _id("podman-rootless"))),
        ("podman-pod-v2.txt", ContainerRef("podman", _id("podman-pod"))),
        ("docker-systemd-v2.txt", ContainerRef("docker", _id("docker-systemd"))),
        ("docker-cgroupfs-v1.txt", ContainerRef("docker", _id("docker-cgroupfs"))),
        ("docker-in-docker-v2.txt", ContainerRef("docker", _id("dind-inner"))),
        ("k8s-containerd-systemd-v2.txt", ContainerRef("containerd", _id("containerd"), POD_UID)),
        ("k8s-crio-systemd-v1.txt", ContainerRef("cri-o", _id("crio"), POD_UID)),
        ("k8s-crio-conmon-v2.txt", None),
        ("k8s-cgroupfs-v1.txt", ContainerRef("cri", _id("cgroupfs-k8s"), POD_UID)),
        ("k8s-cri-dockerd-v2.txt", ContainerRef("docker", _id("cri-dockerd"), POD_UID)),
        ("nspawn-v2.txt", ContainerRef("nspawn", "web-01", name="web-01")),
        ("nspawn-v1.txt", ContainerRef("nspawn", "db", name="db")),
        ("host-service-v2.txt", None),
        ("host-session-hybrid.txt", None),
        ("host-sandbox-hybrid.txt", None),
    ],
    ids=[
        "podman cgroupfs hybrid (recorded)",
        "podman's conmon is no container (recorded)",
        "podman systemd scope",
        "podman systemd conmon scope is no container",
        "rootless podman with a container subgroup",
        "podman pod slice is not an nspawn machine",
        "docker systemd scope",
        "docker cgroupfs on every v1 line",
        "docker in docker: the inner container",
        "kubernetes containerd with pod uid underscores",
        "kubernetes cri-o guaranteed pod",
        "kubernetes cri-o conmon is no container",
        "kubernetes cgroupfs driver: runtime unknown",
        "kubernetes cri-dockerd",
        "nspawn machine with an escaped dash",
        "nspawn on v1 lines",
        "host service",
        "host session",
        "host process in this sandbox (recorded)",
    ],
)
def test_container_from_cgroup(fixture, expected):
    assert container_from_cgroup((CGROUP / fixture).read_text()) == expected


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        (ContainerRef("podman", RECORDED_ID), "bindscope-test-fx1"),
        (ContainerRef("docker", _id("docker-systemd")), "web"),
        (ContainerRef("cri", _id("docker-systemd"), POD_UID), "web"),
        (ContainerRef("containerd", _id("containerd"), POD_UID), _id("containerd")[:12]),
        (ContainerRef("docker", _id("docker-cgroupfs")), _id("docker-cgroupfs")[:12]),
        (ContainerRef("nspawn", "web-01", name="web-01"), "web-01"),
    ],
    ids=[
        "podman from containers.json (recorded)",
        "docker from config.v2.json without the slash",
        "kubernetes cgroupfs id found in docker's state",
        "containerd has no state we read: short id",
        "docker container without state: short id",
        "nspawn named by its cgroup",
    ],
)
def test_container_names(ref, name):
    names = ContainerNames([str(STATE / "podman" / "containers.json")], str(STATE / "docker"))
    assert names.name(ref) == name


def test_container_names_rereads_only_a_changed_file(tmp_path):
    state = tmp_path / "containers.json"
    shutil.copy(STATE / "podman" / "containers.json", state)
    names = ContainerNames([str(state)], str(tmp_path / "docker"))
    ref = ContainerRef("podman", RECORDED_ID)
    assert names.name(ref) == "bindscope-test-fx1"

    stamp = state.stat()
    renamed = state.read_text().replace('"bindscope-test-fx1"', '"renamed-container1"')
    state.write_text(renamed)
    os.utime(state, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert names.name(ref) == "bindscope-test-fx1"  # same mtime and size: the cache

    os.utime(state, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    assert names.name(ref) == "renamed-container1"


@pytest.mark.parametrize(
    "content",
    ["not json", json.dumps([{"id": RECORDED_ID, "names": []}]), None],
    ids=["malformed", "no names", "missing"],
)
def test_container_names_unreadable_state_gives_the_short_id(tmp_path, content):
    state = tmp_path / "containers.json"
    if content is not None:
        state.write_text(content)
    names = ContainerNames([str(state)], str(tmp_path))
    assert names.name(ContainerRef("podman", RECORDED_ID)) == RECORDED_ID[:12]


# ---- one real podman container (docs: /work/shared/notes/containers-in-tests.md) ----


@pytest.fixture
def loopback_app(podman):
    """python3's http.server bound to 127.0.0.1:8080 inside a container whose port 8080 is
    published on the host's 127.0.0.1: the Flask app.run() bug, inside a container."""
    port = free_port()
    ctr = podman.run(
        f"ctr-{uuid.uuid4().hex[:8]}",
        ["python3", "-m", "http.server", "--bind", "127.0.0.1", "8080"],
        (f"127.0.0.1:{port}:8080",),
    )
    try:
        wait_for(
            lambda: any(r[2:4] == ("127.0.0.1", 8080) for r in read_proc_net(ctr.pid)),
            20,
            0.1,
            "http.server listening in the container",
        )
        yield SimpleNamespace(name=ctr.name, id=ctr.id, pid=ctr.pid, ip=ctr.ip, port=port)
    finally:
        podman.remove(ctr.name)


@pytest.mark.root
@pytest.mark.slow
def test_real_podman_container_followed_end_to_end(loopback_app):
    app = loopback_app
    assert ipaddress.ip_address(app.ip) in ipaddress.ip_network(PODMAN_SUBNET)

    state = read_netfilter()
    ports, errors = state.nat, state.nat_errors
    keys = {p.key for p in ports}
    assert ("tcp", "127.0.0.1", app.port, app.ip, 8080) in keys, (ports, errors)

    ref = container_from_cgroup(Path(f"/proc/{app.pid}/cgroup").read_text())
    assert ref == ContainerRef("podman", app.id)
    assert ContainerNames().name(ref) == app.name

    found, _ = enumerate_namespaces()
    inode = os.stat(f"/proc/{app.pid}/ns/net").st_ino
    ns = next(n for n in found if n.inode == inode)
    assert ns.kind == "container"
    assert ns.container == ref
    assert app.pid in ns.pids

    def listeners_inside() -> list:
        with open("/proc/thread-self/net/tcp") as f:
            return parse_proc_net(f.read(), "tcp", 4, 0x0A)

    inside = [r[2:4] for r in in_namespace(ns.path, listeners_inside)]
    assert inside == [("127.0.0.1", 8080)]
    assert ("eth0", app.ip, 4) in [a[:3] for a in addresses_in_namespace(ns.path)]


def test_container_names_forget_removed_containers(tmp_path):
    root = tmp_path / "docker"
    for cid, name in (("a" * 64, "/web"), ("b" * 64, "/db")):
        (root / cid).mkdir(parents=True)
        (root / cid / "config.v2.json").write_text(json.dumps({"Name": name}))
    names = ContainerNames(podman_paths=(), docker_root=str(root))
    assert names.name(ContainerRef("docker", "a" * 64)) == "web"
    assert names.name(ContainerRef("docker", "b" * 64)) == "db"
    names.prune()
    assert names.name(ContainerRef("docker", "a" * 64)) == "web"  # "b" is gone
    names.prune()
    assert list(names._cache) == [f"{root}/{'a' * 64}/config.v2.json"]
