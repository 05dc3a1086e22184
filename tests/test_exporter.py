"""bindscope-exporter as a user runs it: a subprocess, real sockets, scrapes over HTTP."""

import concurrent.futures
import gzip
import logging
import signal
import subprocess
import urllib.request

import pytest
from support import EXPORTER, Metrics, free_port, require_binary, wait_for

# Probes go to loopback only: tests never send traffic to the host's other addresses.
PROBE_LOOPBACK = """\
scan_interval: 500ms
probe:
  timeout: 500ms
  addresses: [127.0.0.1, "::1"]
"""


@pytest.fixture
def services(listen):
    """One real socket for each status the exporter must tell apart."""
    socks = {
        "web": listen("127.0.0.1"),
        "dual": listen("::", v6only=False),
        "v6only": listen("::", v6only=True),
        "dns": listen("127.0.0.1", udp=True),
        "db": listen("0.0.0.0"),
        "owned": listen("0.0.0.0"),
    }
    ports = {k: s.getsockname()[1] for k, s in socks.items()}
    ports["gone"] = free_port()
    return ports


def config_for(ports):
    return (
        PROBE_LOOPBACK
        + f"""\
services:
  - {{name: web, port: {ports["web"]}, expose: private}}
  - {{name: dual, port: {ports["dual"]}, expose: private}}
  - {{name: v6only, port: {ports["v6only"]}, expose: private}}
  - {{name: dns, port: {ports["dns"]}, protocol: udp, expose: loopback}}
  - {{name: db, port: {ports["db"]}, expose: loopback}}
  - {{name: gone, port: {ports["gone"]}, expose: private}}
  - {{name: owned, port: {ports["owned"]}, expose: public, process: '^nginx$'}}
"""
    )


def test_statuses_and_exposures_of_real_sockets(exporter, services):
    exp = exporter(config_for(services))
    m = exp.scrape()
    assert {s: m.status(s) for s in ("web", "dual", "v6only", "dns", "db", "gone", "owned")} == {
        "web": "loopback_only",
        "dual": "ok",
        "v6only": "ok",
        "dns": "ok",
        "db": "overexposed",
        "gone": "not_listening",
        "owned": "wrong_process",
    }
    assert m.exposure("web") == "loopback"
    assert m.exposure("gone") == "none"
    assert m.exposure("dns") == "loopback"
    assert m.get("bindscope_service_listening", service="gone") == 0
    assert m.get("bindscope_service_listening", service="web") == 1
    assert (
        m.get(
            "bindscope_service_info",
            service="dns",
            protocol="udp",
            port=str(services["dns"]),
            expose="loopback",
        )
        == 1
    )
    # telnet, on loopback: 127.0.0.1 answers, ::1 refuses
    assert m.get("bindscope_probe_success", service="web", address="127.0.0.1") == 1
    assert m.get("bindscope_probe_success", service="web", address="::1") == 0
    assert m.get("bindscope_probe_success", service="dual", address="127.0.0.1") == 1
    assert m.get("bindscope_probe_success", service="v6only", address="127.0.0.1") == 0
    assert m.get("bindscope_probe_success", service="v6only", address="::1") == 1
    assert m.all("bindscope_probe_success", service="dns") == []  # UDP is not probed
    listener = m.all("bindscope_listener_info", port=str(services["web"]))
    assert [s.labels["service"] for s in listener] == ["web"]
    assert listener[0].labels["scope"] == "loopback"
    with open("/proc/self/comm") as f:  # the test process holds the sockets
        assert listener[0].labels["process"] == f.read().strip()
    assert m.get("bindscope_unexpected_listener_info", port=str(services["db"])) is None
    assert m.get("bindscope_scan_success") == 1
    assert m.get("bindscope_config_last_reload_successful") == 1
    assert m.get("bindscope_build_info", discovery="netlink") == 1
    assert m.get("process_resident_memory_bytes") is not None


def test_own_listener_is_labelled_and_never_unexpected(exporter):
    port = free_port()
    exp = exporter(
        PROBE_LOOPBACK, listen=f"0.0.0.0:{port}", port=port, base=f"http://127.0.0.1:{port}"
    )
    m = exp.scrape()
    own = m.all("bindscope_listener_info", port=str(port))
    assert [(s.labels["service"], s.labels["address"]) for s in own] == [("bindscope", "0.0.0.0")]
    assert m.all("bindscope_unexpected_listener_info", port=str(port)) == []


def test_undeclared_wide_listener_is_unexpected(exporter, listen):
    stray = listen("0.0.0.0").getsockname()[1]
    hidden = listen("0.0.0.0").getsockname()[1]
    local = listen("127.0.0.1").getsockname()[1]
    exp = exporter(PROBE_LOOPBACK + f"unexpected:\n  ignore:\n    - {{port: {hidden}}}\n")
    m = exp.scrape()
    assert m.get("bindscope_unexpected_listener_info", port=str(stray), protocol="tcp") == 1
    assert m.get("bindscope_unexpected_listener_info", port=str(hidden)) is None
    assert m.get("bindscope_unexpected_listener_info", port=str(local)) is None


def test_promtool_check_metrics_on_a_real_scrape(exporter, services):
    require_binary("promtool")
    exp = exporter(config_for(services))
    text = exp.scrape().text
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_reload_keeps_last_good_config(exporter, listen):
    port = listen("127.0.0.1").getsockname()[1]
    exp = exporter(
        PROBE_LOOPBACK + f"services:\n  - {{name: web, port: {port}, expose: private}}\n"
    )
    assert exp.scrape().status("web") == "loopback_only"
    exp.config_path.write_text(PROBE_LOOPBACK + "services:\n  - {name: web, port: 70000}\n")
    exp.proc.send_signal(signal.SIGHUP)
    m = exp.wait_metrics(
        lambda m: m.get("bindscope_config_last_reload_successful") == 0, what="reload failure seen"
    )
    assert m.status("web") == "loopback_only"  # the last good config still judges
    wait_for(
        lambda: "services[0].port: 70000 is not a port" in exp.log(), 5, what="reload error logged"
    )
    assert f"{exp.config_path}:6:23:" in exp.log()
    exp.config_path.write_text(
        PROBE_LOOPBACK + f"services:\n  - {{name: api, port: {port}, expose: loopback}}\n"
    )
    exp.proc.send_signal(signal.SIGHUP)
    m = exp.wait_metrics(lambda m: m.status("api") == "ok", what="new config applied")
    assert m.get("bindscope_config_last_reload_successful") == 1
    assert m.status("web") is None


def test_lifecycle_reload_endpoint(exporter, tmp_path):
    plain = exporter(PROBE_LOOPBACK)
    req = urllib.request.Request(plain.url("/-/reload"), method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 403
    exp = exporter(PROBE_LOOPBACK, ["--web.enable-lifecycle"])
    exp.config_path.write_text("scan_interval: soon\n")
    req = urllib.request.Request(exp.url("/-/reload"), method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 500
    assert "scan_interval" in e.value.read().decode()
    exp.config_path.write_text(PROBE_LOOPBACK)
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_promptly_with_code_0(exporter, sig):
    exp = exporter(PROBE_LOOPBACK)
    exp.proc.send_signal(sig)
    assert exp.proc.wait(5) == 0  # the bound: it stops within 5 s, however busy the host
    assert "Traceback" not in exp.log()


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        (["--no-such-flag"], None, "unrecognized arguments: --no-such-flag"),
        (["--log.level=loud"], None, "--log.level: invalid choice: 'loud'"),
        (["--web.listen-address=nowhere"], None, "is not HOST:PORT"),
        (
            [],
            "services:\n  - {name: web, port: 70000, expose: private}\n",
            "bindscope.yml:2:23: services[0].port: 70000 is not a port (1-65535)",
        ),
        (
            ["--config.file=/nonexistent/b.yml"],
            None,
            "/nonexistent/b.yml:0:0: cannot read: No such file or directory",
        ),
    ],
    ids=["unknown flag", "bad log level", "bad listen address", "bad config", "missing config"],
)
def test_bad_start_is_one_line_and_exit_2(tmp_path, args, config, message):
    cmd = [*EXPORTER, f"--web.listen-address=127.0.0.1:{free_port()}"]
    if config is not None:
        (tmp_path / "bindscope.yml").write_text(config)
        cmd.append("--config.file=bindscope.yml")
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_endpoints(exporter, listen):
    port = listen("127.0.0.1").getsockname()[1]
    exp = exporter(
        PROBE_LOOPBACK + f"services:\n  - {{name: flaskapp, port: {port}, expose: private}}\n",
        ["--web.telemetry-path=/m"],
    )
    assert exp.get("/-/healthy") == (200, "Healthy.\n")
    assert exp.get("/-/ready")[0] == 200
    code, page = exp.get("/")
    assert code == 200 and "flaskapp" in page and "loopback_only" in page and 'href="/m"' in page
    assert exp.get("/metrics")[0] == 404
    assert exp.get("/m")[0] == 200
    req = urllib.request.Request(exp.url("/m"), headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert b"bindscope_service_status" in gzip.decompress(r.read())


def test_concurrent_scrapes_are_all_served(exporter, services):
    exp = exporter(config_for(services))

    def scrape(_):
        m = Metrics(exp.get("/metrics")[1])
        return m.status("web")

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        got = list(pool.map(scrape, range(100)))
    assert got == ["loopback_only"] * 100


def test_embedded_default_runs_with_no_arguments_but_the_port(exporter, listen):
    stray = listen("0.0.0.0").getsockname()[1]
    exp = exporter(None)
    m = exp.scrape()
    assert m.all("bindscope_service_info") == []
    assert m.get("bindscope_unexpected_listener_info", port=str(stray)) == 1
    assert m.get("bindscope_listener_info", port=str(stray), service="") == 1


def test_psutil_backend_judges_the_same(exporter, services):
    exp = exporter(config_for(services), ["--discovery.backend=psutil"])
    m = exp.scrape()
    assert m.get("bindscope_build_info", discovery="psutil") == 1
    # psutil cannot tell v6only: the v6only socket counts as dual-stack, so its
    # exposure may only be wider, never narrower; every other verdict is the same
    assert {s: m.status(s) for s in ("web", "dual", "dns", "db", "gone", "owned")} == {
        "web": "loopback_only",
        "dual": "ok",
        "dns": "ok",
        "db": "overexposed",
        "gone": "not_listening",
        "owned": "wrong_process",
    }


def test_falls_back_to_psutil_when_netlink_is_missing(monkeypatch, listen, caplog):
    from bindscope.config.load import default_config
    from bindscope.discover import netlink
    from bindscope.scan import Scanner

    def unavailable(*_args, **_kw):
        raise netlink.NetlinkUnavailable("netlink sock_diag unavailable: test")

    monkeypatch.setattr(netlink, "list_sockets", unavailable)
    # logs.setup() (run by an in-process CLI test) stops propagation to caplog's handler
    monkeypatch.setattr(logging.getLogger("bindscope"), "propagate", True)
    port = listen("127.0.0.1").getsockname()[1]
    scanner = Scanner(namespaces=False, firewall=False, published=False)
    with caplog.at_level("WARNING", logger="bindscope"):
        snap = scanner.scan(default_config())
    assert snap.backend == scanner.backend == "psutil"
    assert any(lst.socket.port == port for lst in snap.listeners)
    assert "using psutil" in caplog.text
