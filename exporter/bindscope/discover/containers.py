"""Which container a process runs in, from its /proc/PID/cgroup, and the container's name
from the runtime's state on disk."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

PODMAN_STORAGE = (
    "/var/lib/containers/storage/overlay-containers/containers.json",
    "/var/lib/containers/storage/vfs-containers/containers.json",
)
DOCKER_ROOT = "/var/lib/docker/containers"


@dataclass(frozen=True)
class ContainerRef:
    runtime: str  # docker | podman | containerd | cri-o | cri | nspawn
    id: str  # 64 hex digits; the machine name for nspawn
    pod_uid: str = ""  # Kubernetes pod UID, with dashes
    name: str = ""  # known from the cgroup alone (nspawn), else looked up by ContainerNames


_HEX64 = r"([0-9a-f]{64})"
# One path component each; the systemd cgroup driver's unit names, then podman's
# cgroupfs one (/libpod_parent/libpod-ID, recorded). conmon's own scopes
# (libpod-conmon-ID, crio-conmon-ID) hold no container process and do not match.
_UNITS = (
    (re.compile(rf"^libpod-{_HEX64}(?:\.scope)?$"), "podman"),
    (re.compile(rf"^docker-{_HEX64}\.scope$"), "docker"),
    (re.compile(rf"^cri-containerd-{_HEX64}\.scope$"), "containerd"),
    (re.compile(rf"^crio-{_HEX64}(?:\.scope)?$"), "cri-o"),
)
_ID = re.compile(rf"^{_HEX64}$")
# Anything systemd-machined registers is machine-NAME.scope: nspawn, also libvirt-lxc.
_MACHINE = re.compile(r"^machine-(.+)\.scope$")
# cgroupfs: /kubepods/besteffort/pod<uid>/; systemd: kubepods-besteffort-pod<uid>.slice
# with the UID's dashes turned into underscores (a dash separates slice levels).
_POD = re.compile(r"^(?:kubepods(?:-[a-z]+)*-)?pod([0-9a-f_-]{36})(?:\.slice)?$")


def container_from_cgroup(text: str) -> ContainerRef | None:
    """The container named by a /proc/PID/cgroup (v1, v2 or hybrid), or None."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            ref = _from_path(parts[2])
            if ref is not None:
                return ref
    return None


def _from_path(path: str) -> ContainerRef | None:
    parts = [p for p in path.split("/") if p]
    pod_uid = ""
    for p in parts:
        m = _POD.match(p)
        if m:
            pod_uid = m.group(1).replace("_", "-")
    # The deepest match wins: a container nested in another is the process's own.
    for i in range(len(parts) - 1, -1, -1):
        p = parts[i]
        for pattern, runtime in _UNITS:
            m = pattern.match(p)
            if m:
                return ContainerRef(runtime, m.group(1), pod_uid)
        m = _ID.match(p)
        if m and i > 0:
            parent = parts[i - 1]
            if parent == "docker":
                return ContainerRef("docker", m.group(1), pod_uid)
            if _POD.match(parent):
                # cgroupfs driver under Kubernetes: the runtime is not in the path.
                return ContainerRef("cri", m.group(1), pod_uid)
        m = _MACHINE.match(p)
        if m and not p.startswith("machine-libpod"):
            name = _unescape(m.group(1))
            return ContainerRef("nspawn", name, pod_uid, name)
    return None


def _unescape(unit: str) -> str:
    # systemd escapes unit names as \xNN (a dash in a machine name becomes \x2d).
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), unit)


class ContainerNames:
    """Container names from the runtimes' state files, each re-read only when it changes.

    containers/storage's containers.json (Podman, CRI-O) maps ids to names; Docker keeps
    one config.v2.json per container ("Name": "/web"). Unreadable: the 12-digit id.
    """

    def __init__(
        self, podman_paths: Iterable[str] = PODMAN_STORAGE, docker_root: str = DOCKER_ROOT
    ) -> None:
        self._podman_paths = tuple(podman_paths)
        self._docker_root = docker_root
        self._cache: dict[str, tuple[tuple[int, int], Any]] = {}
        self._used: set[str] = set()

    def name(self, ref: ContainerRef) -> str:
        if ref.name:
            return ref.name
        for path in self._podman_paths:
            names = self._load(path, _storage_names)
            if names and ref.id in names:
                return names[ref.id]
        if ref.runtime in ("docker", "cri"):
            config = self._load(f"{self._docker_root}/{ref.id}/config.v2.json", json.loads)
            if isinstance(config, dict) and isinstance(config.get("Name"), str):
                return config["Name"].lstrip("/")
        return ref.id[:12]

    def prune(self) -> None:
        """Forget the files not asked for since the last prune (removed containers')."""
        self._cache = {p: v for p, v in self._cache.items() if p in self._used}
        self._used.clear()

    def _load(self, path: str, parse: Callable[[str], Any]) -> Any:
        self._used.add(path)
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._cache.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            with open(path) as f:
                value = parse(f.read())
        except (OSError, ValueError):
            self._cache.pop(path, None)
            return None
        self._cache[path] = (stamp, value)
        return value


def _storage_names(text: str) -> dict[str, str]:
    return {c["id"]: c["names"][0] for c in json.loads(text) if c.get("names")}
