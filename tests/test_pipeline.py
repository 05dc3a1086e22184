"""End to end on the real components: exporter -> Prometheus (the shipped rules, `for`
shortened) -> Alertmanager -> a webhook in the test; the dashboards' queries on that data.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import REPO, Exporter, free_port, require_binary, wait_for

from mixin import FLEET_PATH, HOST_PATH
from mixin.dashboards import dashboard_queries
from mixin.rules import RulesConfig, render

# The job the shipped rules select (RulesConfig.selector): the rules run unmodified but
# for their `for`.
JOB = "bindscope"
SHORT_FOR = "2s"
# Every wait on the pipeline: scan 0.5s + scrape 1s + eval 1s + for 2s + group_wait 1s
# takes seconds; the bound only stops a broken pipeline from hanging the suite.
PIPELINE_TIMEOUT = 60.0
LOOPBACK_ONLY = "BindscopeServiceLoopbackOnly"
DASHBOARDS = {"fleet": REPO / FLEET_PATH, "host": REPO / HOST_PATH}


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _ready(url: str, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"{proc.args[0]} exited {proc.returncode}: {log.read_text()[-3000:]}")
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200
    return False


class Process:
    """A server binary in its own session, its output in a log file."""

    def __init__(self, args: list[str], log: Path, cwd: Path) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            args, stdout=self._out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )

    def wait_ready(self, url: str, what: str) -> None:
        wait_for(lambda: _ready(url, self.proc, self.log), 30, 0.1, what)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()


class Webhook:
    """Alertmanager's webhook receiver: collects every JSON payload posted to it."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with received._lock:
                    received.payloads.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def find(self, match: Callable[[dict[str, Any]], bool]) -> tuple[dict, dict] | None:
        """The first (payload, alert) received whose alert satisfies `match`."""
        with self._lock:
            payloads = list(self.payloads)
        for p in payloads:
            for a in p.get("alerts", []):
                if match(a):
                    return p, a
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@dataclass
class Stack:
    exporter: Exporter
    instance: str  # the scrape target, as Prometheus labels it
    web_port: int
    prometheus: str  # base URLs
    alertmanager: str
    webhook: Webhook

    def query(self, expr: str) -> dict[str, Any]:
        q = urllib.parse.urlencode({"query": expr})
        return _get_json(f"{self.prometheus}/api/v1/query?{q}")

    def series(self, expr: str) -> list[dict[str, Any]]:
        return self.query(expr)["data"]["result"]


def _exporter_config(web: int, admin: int, dns: int, gone: int) -> str:
    return yaml.safe_dump(
        {
            "scan_interval": "500ms",
            # Loopback only: the test must not connect to the host's other addresses.
            "probe": {"enabled": True, "timeout": "500ms", "addresses": ["127.0.0.1", "::1"]},
            "unexpected": {"report": True},
            "services": [
                {"name": "web", "port": web, "protocol": "tcp", "expose": "private"},
                {"name": "admin", "port": admin, "protocol": "tcp", "expose": "loopback"},
                {"name": "dns", "port": dns, "protocol": "udp", "expose": "loopback"},
                {"name": "gone", "port": gone, "protocol": "tcp", "expose": "private"},
            ],
        },
        sort_keys=False,
    )


def _short_rules() -> str:
    """The shipped rules with every alert's `for` shortened."""
    short = {f.name: SHORT_FOR for f in fields(RulesConfig) if f.name.endswith("_for")}
    return render(replace(RulesConfig(), **short))


def _prometheus_config(target: str, alertmanager: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["bindscope.rules.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }


def _alertmanager_config(webhook_url: str) -> dict[str, Any]:
    return {
        "route": {
            "receiver": "webhook",
            "group_by": ["alertname", "instance", "service"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "4h",
        },
        "receivers": [
            {"name": "webhook", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}
        ],
    }


def _tcp_listener(address: str, port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
    s.listen(8)
    return s


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_binary("prometheus", "prometheus-alertmanager", "promtool")
    tmp = tmp_path_factory.mktemp("pipeline")
    with contextlib.ExitStack() as cleanup:
        admin = cleanup.enter_context(_tcp_listener("127.0.0.1"))
        dns = cleanup.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        dns.bind(("127.0.0.1", 0))
        web_port, gone_port = free_port(), free_port()
        config = _exporter_config(web_port, admin.getsockname()[1], dns.getsockname()[1], gone_port)
        exporter = Exporter(tmp, config)
        cleanup.callback(exporter.stop)
        exporter.wait_ready()
        instance = f"127.0.0.1:{exporter.port}"

        webhook = Webhook()
        cleanup.callback(webhook.close)

        am_port = free_port()
        am_dir = tmp / "alertmanager"
        am_dir.mkdir()
        (am_dir / "alertmanager.yml").write_text(yaml.safe_dump(_alertmanager_config(webhook.url)))
        alertmanager = Process(
            [
                "prometheus-alertmanager",
                f"--config.file={am_dir / 'alertmanager.yml'}",
                f"--storage.path={am_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",  # no gossip: no peers, no extra port
            ],
            am_dir / "alertmanager.log",
            am_dir,
        )
        cleanup.callback(alertmanager.stop)

        prom_port = free_port()
        prom_dir = tmp / "prometheus"
        prom_dir.mkdir()
        (prom_dir / "bindscope.rules.yml").write_text(_short_rules())
        (prom_dir / "prometheus.yml").write_text(
            yaml.safe_dump(_prometheus_config(instance, f"127.0.0.1:{am_port}"))
        )
        prometheus = Process(
            [
                "prometheus",
                f"--config.file={prom_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            prom_dir / "prometheus.log",
            prom_dir,
        )
        cleanup.callback(prometheus.stop)

        alertmanager.wait_ready(f"http://127.0.0.1:{am_port}/-/ready", "alertmanager ready")
        prometheus.wait_ready(f"http://127.0.0.1:{prom_port}/-/ready", "prometheus ready")
        yield Stack(
            exporter=exporter,
            instance=instance,
            web_port=web_port,
            prometheus=f"http://127.0.0.1:{prom_port}",
            alertmanager=f"http://127.0.0.1:{am_port}",
            webhook=webhook,
        )


@pytest.fixture(scope="module")
def scraped(stack: Stack) -> Stack:
    """The stack once Prometheus holds a few scrapes of the exporter."""
    wait_for(
        lambda: stack.series(f'count_over_time(bindscope_service_status{{job="{JOB}"}}[1m]) >= 3'),
        PIPELINE_TIMEOUT,
        0.5,
        "three scrapes of the exporter in Prometheus",
    )
    return stack


def _is_loopback_only_alert(status: str, stack: Stack) -> Callable[[dict[str, Any]], bool]:
    def match(alert: dict[str, Any]) -> bool:
        labels = alert["labels"]
        return (
            alert["status"] == status
            and labels.get("alertname") == LOOPBACK_ONLY
            and labels.get("service") == "web"
            and labels.get("instance") == stack.instance
        )

    return match


def _wait_webhook(stack: Stack, status: str) -> tuple[dict, dict]:
    """The webhook's first `status` notification of web's LoopbackOnly; on timeout, says
    where the pipeline stopped: the exporter's verdict, Prometheus's alerts, the webhook."""
    try:
        return wait_for(
            lambda: stack.webhook.find(_is_loopback_only_alert(status, stack)),
            PIPELINE_TIMEOUT,
            0.2,
            f"{LOOPBACK_ONLY} {status} at the webhook",
        )
    except AssertionError as e:
        alerts = _get_json(f"{stack.prometheus}/api/v1/alerts")["data"]["alerts"]
        seen = [
            (a["status"], a["labels"].get("alertname"), a["labels"].get("service"))
            for p in stack.webhook.payloads
            for a in p["alerts"]
        ]
        raise AssertionError(
            f"{e}\nexporter: web is {stack.exporter.scrape().status('web')}\n"
            f"prometheus alerts: {[(a['labels']['alertname'], a['state']) for a in alerts]}\n"
            f"webhook received: {seen}"
        ) from e


def _excerpt(payload: dict[str, Any], alert: dict[str, Any]) -> str:
    keep = ("receiver", "status", "groupLabels")
    out = {k: payload[k] for k in keep} | {"alerts": [alert]}
    return json.dumps(out, indent=2, sort_keys=True)


def test_loopback_only_fires_and_resolves(scraped: Stack):
    stack = scraped
    with _tcp_listener("127.0.0.1", stack.web_port):
        payload, firing = _wait_webhook(stack, "firing")
    print(f"\nwebhook payload, firing:\n{_excerpt(payload, firing)}")
    labels = firing["labels"]
    assert labels["job"] == JOB
    assert labels["severity"] == "critical"
    assert (labels["port"], labels["protocol"], labels["expose"]) == (
        str(stack.web_port),
        "tcp",
        "private",
    )
    assert f"port {stack.web_port}" in firing["annotations"]["description"]
    assert firing["annotations"]["runbook_url"].endswith("#" + LOOPBACK_ONLY.lower())

    # The fix: the same port, now on every IPv4 address.
    with _tcp_listener("0.0.0.0", stack.web_port):
        # Judged fixed, not merely caught closed between the two binds.
        stack.exporter.wait_metrics(lambda m: m.status("web") == "ok", 10, "web ok")
        payload, resolved = _wait_webhook(stack, "resolved")
    print(f"\nwebhook payload, resolved:\n{_excerpt(payload, resolved)}")
    assert resolved["fingerprint"] == firing["fingerprint"]
    assert resolved["startsAt"] == firing["startsAt"]
    assert resolved["endsAt"] > resolved["startsAt"]


def test_exporter_scrape_passes_promtool(stack: Stack):
    code, body = stack.exporter.get("/metrics")
    assert code == 200
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_exporter(scraped: Stack):
    targets = _get_json(f"{scraped.prometheus}/api/v1/targets?state=active")["data"]
    ours = [t for t in targets["activeTargets"] if t["labels"].get("job") == JOB]
    assert [(t["labels"]["instance"], t["health"]) for t in ours] == [(scraped.instance, "up")], (
        ours
    )


def _panel_queries() -> list[tuple[str, int, str]]:
    """(dashboard, query index, id) of every panel query; a repeated title gets #n."""
    out = []
    for name, path in DASHBOARDS.items():
        queries = dashboard_queries(path, {"job": JOB, "instance": "x", "datasource": "x"})
        seen: Counter[str] = Counter()
        for i, (title, _) in enumerate(queries):
            seen[title] += 1
            suffix = f" #{seen[title]}" if seen[title] > 1 else ""
            out.append((name, i, f"{name}: {title}{suffix}"))
    return out


PANEL_QUERIES = _panel_queries()


@pytest.mark.parametrize(
    ("dashboard", "index"),
    [(d, i) for d, i, _ in PANEL_QUERIES],
    ids=[id_ for _, _, id_ in PANEL_QUERIES],
)
def test_dashboard_query_returns_series(scraped: Stack, dashboard: str, index: int):
    substitutions = {
        "job": JOB,
        "instance": scraped.instance,
        "datasource": "prometheus",
        "__rate_interval": "10s",
    }
    title, expr = dashboard_queries(DASHBOARDS[dashboard], substitutions)[index]
    q = urllib.parse.urlencode({"query": expr})
    try:
        answer = _get_json(f"{scraped.prometheus}/api/v1/query?{q}")
    except urllib.error.HTTPError as e:
        pytest.fail(f"{title}: {e.code} {e.read().decode()}\n{expr}")
    assert answer["status"] == "success", answer
    assert answer["data"]["result"], f"{title}: no series\n{expr}"
