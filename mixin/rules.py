"""Prometheus alerting and recording rules for bindscope, rendered as a rules file.

Every duration, threshold and selector is a field of RulesConfig; the defaults give the
shipped deploy/prometheus/bindscope.rules.yml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from bindscope.model import Exposure, PublishedStatus, Status

# Codes of the one-hot bindscope_service_status: the statuses' severity, worst last, so a
# state timeline can colour them and `max` over a fleet picks the worst.
STATUS_CODES: dict[str, int] = {
    s.value: s.severity for s in sorted(Status, key=lambda s: s.severity)
}
EXPOSURE_RANKS: dict[str, int] = {e.value: e.rank for e in Exposure}

# The host's own loopback addresses as the prober labels them (127.0.0.0/8, ::1 and the
# IPv4-mapped form); every other probed address is one another host could use.
LOOPBACK_ADDRESS_RE = r"127\\..*|::1|::ffff:127\\..*"

SERVICE_LABELS = "instance, job, service"
PUBLISHED_PORT_LABELS = "instance, job, container, protocol, host_port"


@dataclass(frozen=True)
class RulesConfig:
    """Knobs of the generated rules; the defaults are the shipped file."""

    # Label matchers selecting bindscope's scrape job, inside `{}` of every selector.
    selector: str = 'job="bindscope"'
    runbook_url: str = "https://github.com/bindscope/bindscope/blob/main/docs/runbook.md"
    loopback_only_for: str = "2m"
    overexposed_for: str = "1m"
    not_listening_for: str = "5m"
    wrong_process_for: str = "5m"
    process_unknown_for: str = "30m"
    unreachable_for: str = "5m"
    unreachable_from_peers_for: str = "5m"
    blocked_for: str = "5m"
    unexpected_listener_for: str = "10m"
    published_port_loopback_only_for: str = "2m"
    published_port_not_listening_for: str = "5m"
    scan_failing_for: str = "5m"
    config_reload_failed_for: str = "5m"
    exporter_down_for: str = "5m"
    # A scan older than this counts as failing: the scan thread may be stuck while the
    # last scan still reads as successful.
    scan_stale_seconds: int = 300


def sel(config_selector: str, *matchers: str) -> str:
    """A `{...}` selector: the job selector plus `matchers`."""
    return "{" + ", ".join(m for m in (config_selector, *matchers) if m) + "}"


def quote(value: str) -> str:
    """A PromQL string literal; `value` is already escaped as PromQL wants it."""
    return f'"{value}"'


def status_code_expr(selector: str) -> str:
    """One series per service whose value is the code of its current status."""
    terms = "\n  or ".join(
        f"(bindscope_service_status{sel(selector, 'status=' + quote(s))} == 1) * {code}"
        for s, code in STATUS_CODES.items()
    )
    return f"max without (status) (\n  {terms}\n)"


def exposure_rank_expr(metric: str, selector: str) -> str:
    """One series per service whose value ranks the exposure of the one-hot `metric`."""
    terms = "\n  or ".join(
        f"({metric}{sel(selector, 'exposure=' + quote(e))} == 1) * {rank}"
        for e, rank in EXPOSURE_RANKS.items()
    )
    return f"max without (exposure) (\n  {terms}\n)"


def with_service_info(expr: str, selector: str) -> str:
    """`expr` per service, given the declared port, protocol and expose as labels."""
    return (
        f"{expr}\n* on ({SERVICE_LABELS}) group_left (port, protocol, expose)\n"
        f"  bindscope_service_info{sel(selector)}"
    )


def service_status_alert(selector: str, status: Status) -> str:
    return with_service_info(
        f"(bindscope_service_status{sel(selector, 'status=' + quote(status.value))} == 1)",
        selector,
    )


def published_port_status_alert(selector: str, status: PublishedStatus) -> str:
    # One host port has a DNAT rule per family (IPv4 and IPv6 targets) but one target
    # port; topk keeps the join one-to-one even if rules disagree, because a
    # many-to-many error would silence the alert.
    info = f"bindscope_published_port_info{sel(selector)}"
    targets = f"max by ({PUBLISHED_PORT_LABELS}, target_port) ({info})"
    return (
        f"(bindscope_published_port_status{sel(selector, 'status=' + quote(status.value))} == 1)\n"
        f"* on ({PUBLISHED_PORT_LABELS}) group_left (target_port)\n"
        f"  topk by ({PUBLISHED_PORT_LABELS}) (1, {targets})"
    )


def unreachable_expr(selector: str) -> str:
    probes = sel(selector, "address!~" + quote(LOOPBACK_ADDRESS_RE))
    return (
        f"bindscope_service_info{sel(selector, 'expose!=' + quote('loopback'))}\n"
        f"and on ({SERVICE_LABELS}) (bindscope_service_listening{sel(selector)} == 1)\n"
        f"unless on ({SERVICE_LABELS})\n"
        f"  (bindscope_service_status{sel(selector, 'status=' + quote('loopback_only'))} == 1)\n"
        f"and on ({SERVICE_LABELS})\n"
        f"  (max by ({SERVICE_LABELS}) (bindscope_probe_success{probes}) == 0)"
    )


def peers_all_fail_expr(selector: str) -> str:
    """Per service of the watched host (its `instance` is the watchers' `peer` label), 0
    when every peer's connect to it fails; a service no peer probes has no series."""
    # aggregated before the relabel: two watchers' series differ only in `instance`;
    # label_join copies the label with no `$1`, which Grafana would take for a variable
    return (
        "label_join(\n"
        f"  max by (job, peer, service) (bindscope_peer_probe_success{sel(selector)}),\n"
        '  "instance", "", "peer"\n'
        ") == 0"
    )


def unreachable_from_peers_expr(selector: str) -> str:
    ok = f"bindscope_service_status{sel(selector, 'status=' + quote('ok'))} == 1"
    return (
        f"bindscope_service_info{sel(selector)}\n"
        f"and on ({SERVICE_LABELS}) ({ok})\n"
        f"and on ({SERVICE_LABELS}) (\n{peers_all_fail_expr(selector)}\n)"
    )


def zero_per_instance(selector: str) -> str:
    """0 for every running exporter: a fallback that keeps a count from vanishing."""
    return f"0 * group by (instance, job) (bindscope_build_info{sel(selector)})"


def recording_rules(c: RulesConfig) -> list[dict[str, Any]]:
    s = c.selector
    return [
        {
            "record": "job:bindscope_services:count_by_status",
            "expr": f"sum by (job, status) (bindscope_service_status{sel(s)})",
        },
        {
            "record": "instance:bindscope_services:count_by_status",
            "expr": f"sum by (instance, job, status) (bindscope_service_status{sel(s)})",
        },
        {
            "record": "instance_service:bindscope_service_status:code",
            "expr": status_code_expr(s),
        },
        {
            "record": "instance_service:bindscope_service_exposure:rank",
            "expr": exposure_rank_expr("bindscope_service_exposure", s),
        },
        {
            "record": "instance_service:bindscope_service_effective_exposure:rank",
            "expr": exposure_rank_expr("bindscope_service_effective_exposure", s),
        },
        {
            "record": "job:bindscope_listeners:count_by_exposure",
            "expr": f"sum by (job, exposure) (bindscope_listeners{sel(s)})",
        },
        {
            "record": "instance:bindscope_listeners:count_by_exposure",
            "expr": f"sum by (instance, job, exposure) (bindscope_listeners{sel(s)})",
        },
        {
            "record": "instance:bindscope_unexpected_listeners:count",
            "expr": (
                f"count by (instance, job) (bindscope_unexpected_listener_info{sel(s)})\n"
                f"or on (instance, job) {zero_per_instance(s)}"
            ),
        },
        {
            "record": "job:bindscope_published_ports:count_by_status",
            "expr": f"sum by (job, status) (bindscope_published_port_status{sel(s)})",
        },
    ]


def _alert(
    c: RulesConfig,
    name: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    description: str,
) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"{c.runbook_url}#{name.lower()}",
        },
    }


_ON = "{{ $labels.service }} on {{ $labels.instance }}"
_PORT = "{{ $labels.protocol }} port {{ $labels.port }}"


def alerting_rules(c: RulesConfig) -> list[dict[str, Any]]:
    s = c.selector
    return [
        _alert(
            c,
            "BindscopeServiceLoopbackOnly",
            service_status_alert(s, Status.LOOPBACK_ONLY),
            c.loopback_only_for,
            "critical",
            "A service listens on loopback only; other hosts cannot connect.",
            f"{_ON} listens on {_PORT} on loopback only, but is declared "
            "{{ $labels.expose }}: every client on another host is refused. Bind it to "
            "0.0.0.0 or the host's address (app.run(host='0.0.0.0'), gunicorn -b "
            "0.0.0.0:{{ $labels.port }}, uvicorn --host 0.0.0.0) and restart it.",
        ),
        _alert(
            c,
            "BindscopeServiceOverexposed",
            service_status_alert(s, Status.OVEREXPOSED),
            c.overexposed_for,
            "critical",
            "A service is reachable more widely than declared.",
            f"{_ON} listens on {_PORT} beyond its declared exposure "
            "{{ $labels.expose }}. Bind it to 127.0.0.1 or a private address (redis "
            "`bind 127.0.0.1`, postgres listen_addresses, mysql bind-address) or firewall "
            "the port now.",
        ),
        _alert(
            c,
            "BindscopeServiceNotListening",
            service_status_alert(s, Status.NOT_LISTENING),
            c.not_listening_for,
            "warning",
            "A declared service is not listening.",
            f"Nothing listens on {_PORT} for {_ON}. Check that the service runs "
            "(systemctl status, its logs) and that it uses the declared port.",
        ),
        _alert(
            c,
            "BindscopeServiceWrongProcess",
            service_status_alert(s, Status.WRONG_PROCESS),
            c.wrong_process_for,
            "warning",
            "A declared service's port is held by another process.",
            f"{_PORT} of {_ON} is held by a process the config does not name. Find it "
            "with `ss -ltnp 'sport = :{{ $labels.port }}'`, stop it or fix the config's "
            "process pattern.",
        ),
        _alert(
            c,
            "BindscopeServiceProcessUnknown",
            service_status_alert(s, Status.PROCESS_UNKNOWN),
            c.process_unknown_for,
            "info",
            "A service's owning process cannot be read, so its process is not checked.",
            f"{_ON} listens on {_PORT} as declared, but bindscope cannot read which "
            "process owns the socket. Grant the exporter CAP_SYS_PTRACE or drop "
            "`process:` from the service's declaration.",
        ),
        _alert(
            c,
            "BindscopeServiceUnreachable",
            unreachable_expr(s),
            c.unreachable_for,
            "critical",
            "A service listens, but no connection to the host's addresses succeeds.",
            f"{_ON} listens on {_PORT}, but every TCP connect from the host to its own "
            "non-loopback addresses fails. Check the address it binds "
            "(`ss -ltn 'sport = :{{ $labels.port }}'`) and whether it accepts connections.",
        ),
        _alert(
            c,
            "BindscopeServiceUnreachableFromPeers",
            unreachable_from_peers_expr(s),
            c.unreachable_from_peers_for,
            "critical",
            "A service its host judges ok cannot be reached from the peers watching it.",
            f"{_ON} is judged ok by its own host on {_PORT}, and its firewall lets other "
            "hosts in, but every TCP connect from the bindscope peers watching it fails: "
            "something between the hosts drops it. Check the cloud security group or network "
            "ACL, router ACLs and hypervisor filters for port {{ $labels.port }}, then run "
            "`bindscope diagnose HOST:{{ $labels.port }}` from a peer.",
        ),
        _alert(
            c,
            "BindscopeServiceBlocked",
            service_status_alert(s, Status.BLOCKED),
            c.blocked_for,
            "critical",
            "A service listens, but the firewall drops other hosts.",
            f"{_ON} listens on {_PORT} wide enough for its declared exposure "
            "{{ $labels.expose }}, but the firewall drops new connections from other hosts "
            "on every non-loopback address. Check `nft list ruleset` or `iptables -S` and allow "
            "the port.",
        ),
        _alert(
            c,
            "BindscopeUnexpectedListener",
            f"bindscope_unexpected_listener_info{sel(s)} == 1",
            c.unexpected_listener_for,
            "warning",
            "An undeclared listener is reachable beyond loopback.",
            "{{ $labels.process }} listens on {{ $labels.address }} {{ $labels.protocol }} "
            "port {{ $labels.port }} ({{ $labels.exposure }}, netns {{ $labels.netns }}) "
            "on {{ $labels.instance }} and no service declares it. Declare it, add it to "
            "unexpected.ignore, or bind it to 127.0.0.1.",
        ),
        _alert(
            c,
            "BindscopePublishedPortLoopbackOnly",
            published_port_status_alert(s, PublishedStatus.LOOPBACK_ONLY),
            c.published_port_loopback_only_for,
            "critical",
            "A published container port leads to an app listening on loopback only.",
            "Host {{ $labels.protocol }} port {{ $labels.host_port }} on "
            "{{ $labels.instance }} forwards to port {{ $labels.target_port }} of container "
            "{{ $labels.container }}, where the app "
            "listens on loopback only: clients get connection reset. Make the app bind "
            "0.0.0.0 inside the container (flask run --host=0.0.0.0, gunicorn -b "
            "0.0.0.0:{{ $labels.target_port }}).",
        ),
        _alert(
            c,
            "BindscopePublishedPortNotListening",
            published_port_status_alert(s, PublishedStatus.NOT_LISTENING),
            c.published_port_not_listening_for,
            "warning",
            "A published container port leads nowhere.",
            "Host {{ $labels.protocol }} port {{ $labels.host_port }} on "
            "{{ $labels.instance }} forwards to port {{ $labels.target_port }} of container "
            "{{ $labels.container }}, where nothing "
            "listens. Check the app runs in the container and uses port "
            "{{ $labels.target_port }}, or fix the -p mapping.",
        ),
        _alert(
            c,
            "BindscopeScanFailing",
            f"bindscope_scan_success{sel(s)} == 0\n"
            f"or on (instance, job)\n"
            f"  time() - bindscope_last_scan_timestamp_seconds{sel(s)} "
            f"> {c.scan_stale_seconds}",
            c.scan_failing_for,
            "warning",
            "bindscope's scans fail or have stopped.",
            "The exporter on {{ $labels.instance }} has no successful recent scan, so "
            "its service verdicts are stale. Read its log and "
            "bindscope_scan_errors_total.",
        ),
        _alert(
            c,
            "BindscopeConfigReloadFailed",
            f"bindscope_config_last_reload_successful{sel(s)} == 0",
            c.config_reload_failed_for,
            "warning",
            "bindscope's configuration failed to load; the last good one is in use.",
            "The exporter on {{ $labels.instance }} rejected its configuration file and "
            "runs on the last good one. Run `bindscope check-config` on the file.",
        ),
        _alert(
            c,
            "BindscopeExporterDown",
            f"up{sel(s)} == 0",
            c.exporter_down_for,
            "warning",
            "bindscope cannot be scraped; its host's listeners are not checked.",
            "Prometheus cannot scrape bindscope on {{ $labels.instance }}, so no "
            "bindscope alert can fire for that host. Check the exporter's service and "
            "that its port is reachable from Prometheus.",
        ),
    ]


def groups(c: RulesConfig) -> dict[str, Any]:
    return {
        "groups": [
            {"name": "bindscope.rules", "rules": recording_rules(c)},
            {"name": "bindscope.alerts", "rules": alerting_rules(c)},
        ]
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line PromQL reads as written only in block style.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = "# Generated by `python -m mixin` from mixin/rules.py; do not edit by hand.\n"


def render(c: RulesConfig) -> str:
    return HEADER + yaml.dump(groups(c), Dumper=_Dumper, sort_keys=False, width=1000)
