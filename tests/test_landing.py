"""The landing page: per service with a problem, the findings and fixes of diagnose, beside
the listeners, unexpected listeners and firewall verdicts; on a hand-built scan, and in
Debian's headless Chromium against the real exporter in a test namespace."""

from __future__ import annotations

import json
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from daemons import (  # noqa: F401  (the fixtures are used by name)
    REDIS,
    Running,
    diagnose,
    running_fixture,
)
from support import TwoHosts, require_binary, run

from bindscope.classify import exposure_of, host_address, scope_of
from bindscope.model import (
    Exposure,
    Firewall,
    Listener,
    ProcessInfo,
    Protocol,
    ServiceSpec,
    Snapshot,
    Socket,
    Status,
    Verdict,
)
from bindscope.web.landing import render_landing

HOSTS = (
    host_address("lo", "127.0.0.1", 4),
    host_address("eth0", "198.51.100.1", 4),
)


class Page(HTMLParser):
    """The text of the elements the test reads: commands, section ids, table rows."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.commands: list[str] = []
        self.sections: list[str] = []
        self.cells: list[str] = []
        self._in: str = ""
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "pre" and a.get("class") == "command":
            self._in = "command"
            self.commands.append("")
        elif tag == "section" and a.get("id"):
            self.sections.append(a["id"] or "")
        elif tag == "td":
            self._in = "td"
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("pre", "td"):
            self._in = ""

    def handle_data(self, data: str) -> None:
        if self._in == "command":
            self.commands[-1] += data
        elif self._in == "td":
            self.cells[-1] += data


def _listener(address: str, port: int, name: str, cmdline: tuple[str, ...], **kw) -> Listener:
    sock = Socket(Protocol.TCP, address, port, 4, None, inode=port)
    return Listener(
        sock,
        ProcessInfo(pid=port, name=name, cmdline=cmdline),
        scope_of(address),
        exposure_of(sock, HOSTS),
        **kw,
    )


def test_a_problem_service_shows_its_findings_and_fixes_and_the_tables():
    web = _listener("127.0.0.1", 8000, "python3", ("python3", "-m", "http.server", "8000"))
    stray = _listener("0.0.0.0", 4444, "nc<b>", ("nc", "-l", "4444"), firewall=Firewall.ACCEPT)
    snap = Snapshot(
        timestamp=time.time(),
        duration=0.01,
        success=True,
        verdicts=(
            Verdict(
                ServiceSpec("web", 8000, expose=Exposure.PRIVATE),
                Status.LOOPBACK_ONLY,
                Exposure.LOOPBACK,
                (web,),
            ),
        ),
        listeners=(web, stray),
        unexpected=(stray,),
        host_addresses=HOSTS,
    )
    text = render_landing(snap, "/metrics", ruleset=lambda: (None, "not read in this test"))
    page = Page(text)
    assert page.sections == ["diagnosis-web"]
    assert "`python3 -m http.server --bind 0.0.0.0 8000`" in text
    assert "Unexpected listeners (1)" in text
    assert "nc&lt;b&gt;[4444]" in text  # a process name is text, never markup
    assert "accept" in page.cells  # the firewall verdict beside the listener


def test_nothing_scanned_yet():
    assert "Last scan: not yet." in render_landing(None, "/metrics")


# --- in a real browser ---

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
EXPORTER_PORT = 9917
CONFIG = """\
scan_interval: 500ms
probe: {timeout: 500ms}
services:
  - {name: redis, port: 6379, expose: loopback}
"""


def chromium(hosts: TwoHosts, profile: Path, *args: str) -> str:
    r = run(
        *hosts.prefix(hosts.server),
        "chromium",
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        *args,
        timeout=90,
    )
    return r.stdout


def fetch_in_server(hosts: TwoHosts, url: str) -> str:
    code = (
        "import urllib.request,sys\n"
        f"sys.stdout.write(urllib.request.urlopen({url!r},timeout=2).read().decode())"
    )
    r = run(*hosts.prefix(hosts.server), sys.executable, "-c", code, check=False)
    return r.stdout if r.returncode == 0 else ""


@pytest.mark.root
@pytest.mark.timeout(240)
@pytest.mark.parametrize("running", [REDIS], ids=["redis"], indirect=True)
def test_chromium_shows_the_diagnosis_of_an_overexposed_redis(
    running: Running, exporter, tmp_path: Path
):
    require_binary("chromium")
    hosts = running.hosts
    exp = exporter(
        CONFIG,
        ready=False,
        prefix=hosts.prefix(hosts.server),
        listen=f"127.0.0.1:{EXPORTER_PORT}",
        port=EXPORTER_PORT,
    )
    url = f"http://127.0.0.1:{EXPORTER_PORT}/"
    deadline = time.monotonic() + 30
    html = ""
    while time.monotonic() < deadline and "diagnosis-redis" not in html:
        assert exp.proc.poll() is None, exp.log()
        html = fetch_in_server(hosts, url)
        time.sleep(0.2)
    assert "diagnosis-redis" in html, html or exp.log()

    profile = tmp_path / "chromium-profile"
    dom = Page(chromium(hosts, profile, "--dump-dom", url))
    shot = tmp_path / "landing.png"
    chromium(hosts, profile, "--window-size=1400,2600", f"--screenshot={shot}", url)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

    # the page's fixes are the tool's, command for command
    doc = diagnose(running)
    printed = [c for fix in doc["fixes"] for c in fix.get("commands", ())]
    assert printed and dom.commands == printed, (dom.commands, json.dumps(doc, indent=2))
    line = REDIS.line(running.tmp)
    assert f"sed -i '{line}s/.*/bind 127.0.0.1 -::1/' /etc/redis/redis.conf" in dom.commands
    assert any("iifname != lo tcp dport 6379 drop" in c for c in dom.commands)
    assert dom.sections == ["diagnosis-redis"]
    assert running.proc is not None
    assert {"0.0.0.0", "::", "6379", f"redis-server[{running.proc.pid}]"} <= set(dom.cells)
