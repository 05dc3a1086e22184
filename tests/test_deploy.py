"""Tests for the deploy files: systemd units, Containerfile and Kubernetes manifests."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy/systemd/bindscope-exporter.service"
SOCKET = ROOT / "deploy/systemd/bindscope-exporter.socket"
SOCKET_DROPIN = ROOT / "deploy/systemd/bindscope-exporter.service.d/socket-activation.conf"
EXAMPLE_CONFIG = ROOT / "deploy/systemd/bindscope.yml"
CONTAINERFILE = ROOT / "Containerfile"
KUBE = ROOT / "deploy/kubernetes"
IN_CI = os.environ.get("CI") == "true"

# What process attribution needs, measured (docs/security.md): listing /proc/PID/fd takes
# CAP_DAC_READ_SEARCH, readlink of /proc/PID/fd/N takes CAP_SYS_PTRACE too.
ATTRIBUTION_CAPS = {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
# Hardening that would hide what the exporter reads (other users' processes, /proc/net) or
# confine its capabilities to a user namespace of its own.
FORBIDDEN_HARDENING = {"ProtectProc": "invisible", "ProcSubset": "pid", "PrivateUsers": "yes"}


def _missing_tool(tool: str, how: str) -> None:
    if IN_CI:
        pytest.fail(f"{tool} is missing in CI: {how}")
    pytest.skip(f"{tool} not installed ({how})")


def _unit() -> configparser.ConfigParser:
    # strict=False: systemd allows repeated keys (SystemCallFilter=, ExecStart=).
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def _unit_values(key: str) -> list[str]:
    """Every value of a [Service] key, in order, as systemd would see repeated lines."""
    values = []
    for line in UNIT.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key and not line.lstrip().startswith("#"):
            values.append(value.strip())
    return values


UNIT_KEYS = [
    ("User", "bindscope"),
    ("ExecStart", "/usr/local/bin/bindscope-exporter --config.file=/etc/bindscope/bindscope.yml"),
    ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ("Restart", "on-failure"),
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_NETLINK AF_UNIX"),
]


@pytest.mark.parametrize(("key", "value"), UNIT_KEYS, ids=[k for k, _ in UNIT_KEYS])
def test_unit_key(key: str, value: str) -> None:
    assert _unit()["Service"][key] == value


@pytest.mark.parametrize("key", ["CapabilityBoundingSet", "AmbientCapabilities"])
def test_unit_grants_only_attribution_capabilities(key: str) -> None:
    values = _unit_values(key)
    assert len(values) == 1, f"{key} set {len(values)} times"
    assert set(values[0].split()) == ATTRIBUTION_CAPS


@pytest.mark.parametrize(
    ("key", "value"), FORBIDDEN_HARDENING.items(), ids=list(FORBIDDEN_HARDENING)
)
def test_unit_does_not_hide_proc(key: str, value: str) -> None:
    # These would hide the other users' processes and /proc/net that the exporter reads.
    assert value not in _unit_values(key)


def test_unit_shows_how_to_grant_namespace_and_firewall_capabilities() -> None:
    commented = [
        line for line in UNIT.read_text().splitlines() if line.startswith("#AmbientCapabilities=")
    ]
    assert commented and {"CAP_SYS_ADMIN", "CAP_NET_ADMIN"} <= set(commented[0][21:].split())


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        _missing_tool("systemd-analyze", "apt-get install -y systemd")
    return str(tool)


def _unit_copy(tmp_path: Path) -> Path:
    """The units (service, socket, socket drop-in) in `tmp_path`, ExecStart pointing at an
    executable that exists here: verify checks it. Returns the service's copy."""
    exe = Path(sys.executable).parent / "bindscope-exporter"
    for source in (UNIT, SOCKET, SOCKET_DROPIN):
        copy = tmp_path / source.relative_to(UNIT.parent)
        copy.parent.mkdir(exist_ok=True)
        copy.write_text(
            source.read_text().replace(
                "/usr/local/bin/bindscope-exporter", str(exe if exe.exists() else sys.executable)
            )
        )
    return tmp_path / UNIT.name


_NO_SYSTEMD = re.compile(r"not been booted with systemd|Failed to connect to bus|No such file.*bus")


@pytest.mark.parametrize(
    "units",
    [[UNIT.name], [SOCKET.name, UNIT.name]],
    ids=["service", "socket_with_socket_activation_dropin"],
)
def test_units_pass_systemd_analyze_verify(tmp_path: Path, units: list[str]) -> None:
    tool = _systemd_analyze()
    # verify reads the drop-in beside the copied service, so the second case checks the
    # socket-activated service as systemd would load it.
    _unit_copy(tmp_path)
    if len(units) == 1:
        (tmp_path / SOCKET_DROPIN.relative_to(UNIT.parent)).unlink()
    result = subprocess.run(
        [tool, "verify", *(str(tmp_path / u) for u in units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    if _NO_SYSTEMD.search(output):
        # Installed but unusable without a running systemd: not a fault of the unit.
        pytest.skip(f"systemd-analyze cannot run here: {output.splitlines()[0]}")
    # verify reports unknown keys and bad values as warnings with exit code 0.
    assert (result.returncode, output) == (0, "")


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_socket_listens_where_the_exporter_would() -> None:
    socket_unit = _ini(SOCKET)["Socket"]
    # the exporter's default --web.listen-address is :9917, every interface, both families
    assert socket_unit["ListenStream"] == "9917"
    assert socket_unit["BindIPv6Only"] == "both"
    assert socket_unit["Accept"] == "no"
    assert _ini(SOCKET)["Install"]["WantedBy"] == "sockets.target"


def test_socket_activation_dropin_takes_the_socket() -> None:
    # systemd starts the service named like the socket; the drop-in makes it use the socket
    assert SOCKET_DROPIN.parent.name == UNIT.name + ".d"
    assert SOCKET.stem == UNIT.stem
    lines = [ln for ln in SOCKET_DROPIN.read_text().splitlines() if ln.startswith("ExecStart=")]
    assert lines[0] == "ExecStart=", "the empty ExecStart= resets the unit's own"
    (service_exec,) = _unit_values("ExecStart")
    assert lines[1:] == [f"ExecStart={service_exec} --web.systemd-socket"]
    dropin = _ini(SOCKET_DROPIN)["Unit"]
    assert (dropin["Requires"], dropin["After"]) == (SOCKET.name, SOCKET.name)


def test_unit_exposure_level_is_ok(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(_unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze predates --offline (systemd < 250)")
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    # systemd's scale: 0 best, 10 worst; below 3 reads "OK".
    assert float(found.group(1)) < 3.0, result.stdout


def _containerfile_lines() -> list[str]:
    """Instructions with their continuation lines joined, comments left out."""
    joined, pending = [], ""
    for line in CONTAINERFILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.strip().removesuffix("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            joined.append(pending.strip())
            pending = ""
    return joined


def test_containerfile_structure() -> None:
    lines = _containerfile_lines()
    instructions = [line.split()[0] for line in lines]
    # the base is a build argument, so the image also builds from a local base
    assert lines[0] == "ARG BASE=docker.io/library/debian:bookworm-slim"
    assert instructions[1] == "FROM" and lines[1] == "FROM ${BASE}"
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert len(user) == 1 and user[0].split(":")[0] not in ("0", "root")
    assert instructions.index("USER") > max(i for i, x in enumerate(instructions) if x == "RUN")
    assert json.loads(next(line for line in lines if line.startswith("ENTRYPOINT "))[11:]) == [
        "bindscope-exporter"
    ]
    assert "EXPOSE 9917" in lines


def test_containerfile_installs_the_firewall_tools_before_the_code() -> None:
    # Without nft and iptables-save every firewall verdict is "unknown"; installed before
    # the code is copied, so the apt layer stays cached while the code changes.
    lines = _containerfile_lines()
    (apt,) = [i for i, line in enumerate(lines) if "apt-get install" in line]
    assert {"nftables", "iptables", "python3", "python3-venv"} <= set(lines[apt].split())
    assert apt < min(i for i, line in enumerate(lines) if line.startswith("COPY "))
    assert any("/opt/bindscope/bin/pip install /src" in line for line in lines)


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d is not None]


def _all_documents() -> list[dict[str, Any]]:
    return [d for path in sorted(KUBE.glob("*.yaml")) for d in _documents(path.name)]


def _daemonset() -> dict[str, Any]:
    (ds,) = _documents("daemonset.yaml")
    return ds


def _container() -> dict[str, Any]:
    (container,) = _daemonset()["spec"]["template"]["spec"]["containers"]
    return container


EXPECTED_KINDS = {
    "namespace.yaml": "Namespace",
    "serviceaccount.yaml": "ServiceAccount",
    "configmap.yaml": "ConfigMap",
    "daemonset.yaml": "DaemonSet",
    "service.yaml": "Service",
    "podmonitor.yaml": "PodMonitor",
    "kustomization.yaml": "Kustomization",
}


@pytest.mark.parametrize(("name", "kind"), EXPECTED_KINDS.items(), ids=list(EXPECTED_KINDS))
def test_manifest_kind(name: str, kind: str) -> None:
    (document,) = _documents(name)
    assert document["kind"] == kind
    assert document["apiVersion"]
    if kind not in ("Namespace", "Kustomization"):
        assert document["metadata"]["namespace"] == "bindscope"
        assert document["metadata"]["name"]


def test_kustomization_lists_existing_files() -> None:
    (kustomization,) = _documents("kustomization.yaml")
    resources = kustomization["resources"]
    assert all((KUBE / r).is_file() for r in resources)
    # The PodMonitor needs the Prometheus Operator's CRDs, so it stays opt-in.
    assert set(EXPECTED_KINDS) - set(resources) == {"kustomization.yaml", "podmonitor.yaml"}


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _missing_tool("kubectl", "needed for `kubectl kustomize`")
    result = subprocess.run(
        [str(kubectl), "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout))
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Service", "ServiceAccount"]


def test_daemonset_uses_the_host_namespaces_and_runs_everywhere() -> None:
    ds = _daemonset()
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= (
        ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert (spec["hostNetwork"], spec["hostPID"]) == (True, True)
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["automountServiceAccountToken"] is False


def test_daemonset_security_context() -> None:
    context = _container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context.get("privileged", False) is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert set(context["capabilities"]["add"]) == {
        "SYS_PTRACE",
        "DAC_READ_SEARCH",
        "SETUID",
        "SETGID",
    }


def _setpriv_flags() -> dict[str, str]:
    command = _container()["command"]
    assert command[0] == "setpriv"
    end = command.index("--")
    assert command[end + 1] == "bindscope-exporter"
    return dict(flag.split("=", 1) for flag in command[1:end] if "=" in flag)


def test_daemonset_drops_to_non_root_with_attribution_capabilities_only() -> None:
    # Kubernetes sets no ambient capabilities for a non-root user, so the container starts
    # as uid 0 and setpriv drops to the image's user keeping only what attribution needs.
    flags = _setpriv_flags()
    assert "--clear-groups" in _container()["command"]
    assert int(flags["--reuid"]) != 0 and int(flags["--regid"]) != 0
    for key in ("--inh-caps", "--ambient-caps"):
        assert flags[key] == "-all,+sys_ptrace,+dac_read_search"
    # SETUID/SETGID serve only the switch: they must not be kept.
    kept = {c[1:].upper() for c in flags["--ambient-caps"].split(",") if c.startswith("+")}
    assert {"CAP_" + c for c in kept} == ATTRIBUTION_CAPS


def test_daemonset_image_user_matches_setpriv_user() -> None:
    user = next(
        line.split()[1]
        for line in CONTAINERFILE.read_text().splitlines()
        if line.startswith("USER ")
    )
    flags = _setpriv_flags()
    assert user == f"{flags['--reuid']}:{flags['--regid']}"


def test_daemonset_probes_resources_and_port() -> None:
    container = _container()
    assert container["ports"] == [{"name": "metrics", "containerPort": 9917, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "metrics"}
    assert container["resources"] == {
        "requests": {"cpu": "10m", "memory": "32Mi"},
        "limits": {"cpu": "100m", "memory": "64Mi"},
    }
    annotations = _daemonset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9917",
        "prometheus.io/path": "/metrics",
    }


def test_daemonset_mounts_the_configmap_at_the_config_path() -> None:
    container = _container()
    config_flag = "--config.file=/etc/bindscope/bindscope.yml"
    assert config_flag in container["args"]
    (mount,) = container["volumeMounts"]
    # A directory mount, not subPath: subPath mounts never see ConfigMap updates.
    assert mount == {"name": "config", "mountPath": "/etc/bindscope", "readOnly": True}
    (volume,) = _daemonset()["spec"]["template"]["spec"]["volumes"]
    (configmap,) = _documents("configmap.yaml")
    assert volume == {"name": "config", "configMap": {"name": configmap["metadata"]["name"]}}
    assert set(configmap["data"]) == {"bindscope.yml"}


def test_service_and_podmonitor_select_the_daemonset() -> None:
    labels = _daemonset()["spec"]["template"]["metadata"]["labels"]
    (service,) = _documents("service.yaml")
    (podmonitor,) = _documents("podmonitor.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert podmonitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert podmonitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_every_manifest_names_the_same_namespace() -> None:
    namespaces = {
        d["metadata"].get("namespace", d["metadata"]["name"])
        for d in _all_documents()
        if d["kind"] != "Kustomization"
    }
    assert namespaces == {"bindscope"}


EXAMPLE_CONFIGS = {
    "systemd_example": lambda: EXAMPLE_CONFIG.read_text(),
    "configmap": lambda: _documents("configmap.yaml")[0]["data"]["bindscope.yml"],
}


@pytest.mark.parametrize("name", list(EXAMPLE_CONFIGS))
def test_example_configs_load(name: str) -> None:
    from bindscope.config.load import parse_config

    config = parse_config(EXAMPLE_CONFIGS[name](), "bindscope.yml")
    assert config.services


@pytest.mark.parametrize("name", list(EXAMPLE_CONFIGS))
def test_example_configs_match_the_schema(name: str) -> None:
    import jsonschema

    schema = json.loads((ROOT / "exporter/bindscope/config/schema.json").read_text())
    jsonschema.validate(yaml.safe_load(EXAMPLE_CONFIGS[name]()), schema)
