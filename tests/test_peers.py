"""Peers without namespaces: the answer's shape, what is probed, bounded fetches of bad
peers, file_sd, the metric families, the JSON API, and the remote diagnose's join."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry
from support import free_port, wait_for
from test_webconfig import PKI, pki  # noqa: F401  (the throwaway CA and certificates)

from bindscope.collector.peers import PeerCollector
from bindscope.config.load import BasicAuth, Config, PeersConfig, TLSConfig
from bindscope.diagnose.remote import Attempt, HostView, Outcome, join
from bindscope.model import (
    Exposure,
    HostAddress,
    PeerError,
    PeerProbe,
    PeerRound,
    PeerState,
    Protocol,
    Scope,
    ServiceSpec,
    Snapshot,
    Status,
    Verdict,
)
from bindscope.peers.answer import InvalidAnswer, parse_services, probe_plan
from bindscope.peers.rounds import Rounds
from bindscope.peers.targets import TargetList, parse_file_sd
from bindscope.web.api import Api

ROUTED = {"198.51.100.1", "2001:db8::1"}  # what the fake routing table reaches


def services_doc(**overrides: object) -> dict:
    doc = {
        "version": 1,
        "timestamp": 1.0,
        "addresses": ["198.51.100.1", "2001:db8::1", "203.0.113.9", "127.0.0.1", "fe80::1"],
        "services": [
            {"name": "api", "port": 8080, "protocol": "tcp", "expose": "private", "status": "ok"},
            {"name": "www", "port": 443, "protocol": "tcp", "expose": "public", "status": "ok"},
            {"name": "db", "port": 5432, "protocol": "tcp", "expose": "loopback", "status": "ok"},
            {"name": "dns", "port": 53, "protocol": "udp", "expose": "public", "status": "ok"},
        ],
    }
    return doc | overrides


# --- the answer and the plan ---


def test_plan_is_declared_wide_tcp_on_routed_non_loopback_addresses():
    plan = probe_plan(parse_services(services_doc()), ROUTED.__contains__)
    assert sorted((s.name, s.port, a) for s, a in plan) == [
        ("api", 8080, "198.51.100.1"),
        ("api", 8080, "2001:db8::1"),
        ("www", 443, "198.51.100.1"),
        ("www", 443, "2001:db8::1"),
    ]


def test_plan_never_loopback_even_if_routed():
    answer = parse_services(services_doc(addresses=["127.0.0.1", "::1", "::ffff:127.0.0.1"]))
    assert probe_plan(answer, lambda a: True) == []


@pytest.mark.parametrize(
    "doc",
    [
        [],
        "x",
        {"version": 2, "addresses": [], "services": []},
        services_doc(addresses="198.51.100.1"),
        services_doc(addresses=["not an address"]),
        services_doc(addresses=["fe80::1%eth0"]),
        services_doc(addresses=["198.51.100.1"] * 65),
        services_doc(services=[{"name": "x", "port": 0, "protocol": "tcp", "expose": "private"}]),
        services_doc(services=[{"name": "x", "port": True, "protocol": "tcp", "expose": "public"}]),
        services_doc(services=[{"name": "", "port": 1, "protocol": "tcp", "expose": "public"}]),
        services_doc(services=[{"name": "x", "port": 1, "protocol": "sctp", "expose": "public"}]),
        services_doc(services=[{"name": "x", "port": 1, "protocol": "tcp", "expose": "public"}]),
        services_doc(services=[7]),
    ],
    ids=[
        "list",
        "string",
        "other version",
        "addresses not a list",
        "bad address",
        "zone",
        "too many addresses",
        "port 0",
        "port boolean",
        "empty name",
        "bad protocol",
        "no status",
        "service not an object",
    ],
)
def test_answer_outside_the_shape_is_invalid(doc: object):
    with pytest.raises(InvalidAnswer):
        parse_services(doc)


# --- bad peers: fetches are bounded and counted ---


class FakePeer:
    """A TCP server on loopback that answers each connection with `behave(conn)`."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.target = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._behave = behave
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 120  # bounded even if close() is never reached
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(5)
            conn.recv(4096)
            self._behave(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for c in self._conns:
            c.close()
        self.sock.close()


def http_answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _send(data: bytes) -> Callable[[socket.socket], None]:
    return lambda conn: conn.sendall(data)


def _hang(conn: socket.socket) -> None:
    time.sleep(3)


def _trickle(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for _ in range(30):  # a header byte every 0.1 s: each read is quick, the whole is not
        conn.sendall(b"X")
        time.sleep(0.1)


def _huge_chunked(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"[" * 65536
    for _ in range(40):
        conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))


BAD_PEERS = {
    "garbage": (_send(b"\x00\xffnot http at all\r\n\r\n"), PeerError.INVALID),
    "junk json": (_send(http_answer(b'{"version": 1, "services": 5}')), PeerError.INVALID),
    "not json": (_send(http_answer(b"<html>hello</html>")), PeerError.INVALID),
    "deep json": (_send(http_answer(b"[" * 100000)), PeerError.INVALID),
    "401": (_send(http_answer(b"{}", "401 Unauthorized")), PeerError.HTTP_STATUS),
    "huge by length": (
        _send(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n{"),
        PeerError.TOO_LARGE,
    ),
    "huge chunked": (_huge_chunked, PeerError.TOO_LARGE),
    "hangs": (_hang, PeerError.TIMEOUT),
    "trickles": (_trickle, PeerError.TIMEOUT),
}


@pytest.mark.parametrize(("behave", "reason"), BAD_PEERS.values(), ids=list(BAD_PEERS))
def test_bad_peer_is_counted_and_skipped_within_the_timeout(behave, reason: PeerError):
    peer = FakePeer(behave)
    good = FakePeer(_send(http_answer(json.dumps(services_doc()).encode())))
    try:
        rounds = Rounds(threading.Event(), routable=lambda a: False)
        config = PeersConfig(targets=(peer.target, good.target), interval=10, timeout=0.5)
        t0 = time.monotonic()
        r = rounds.run(config, deadline=time.monotonic() + 10)
        took = time.monotonic() - t0
    finally:
        peer.close()
        good.close()
    bad_state, good_state = r.peers
    assert (bad_state.up, bad_state.error) == (False, reason)
    assert (good_state.up, good_state.error) == (True, None)
    assert r.errors == {(peer.target, reason.value): 1}
    # bound: one fetch timeout (the probes route nowhere), plus slack for a loaded machine
    assert took < 0.5 + 2.0


def test_unreachable_peer_is_down():
    target = f"127.0.0.1:{free_port()}"
    r = Rounds(threading.Event()).run(
        PeersConfig(targets=(target,), timeout=0.5), time.monotonic() + 5
    )
    assert [(p.peer, p.up, p.error) for p in r.peers] == [(target, False, PeerError.UNREACHABLE)]


def test_round_deadline_bounds_many_hanging_peers():
    peers = [FakePeer(_hang) for _ in range(3)]
    try:
        rounds = Rounds(threading.Event(), routable=lambda a: False)
        config = PeersConfig(targets=tuple(p.target for p in peers), interval=0.4, timeout=0.4)
        t0 = time.monotonic()
        r = rounds.run(config, deadline=time.monotonic() + 0.4)
        took = time.monotonic() - t0
    finally:
        for p in peers:
            p.close()
    assert all(s.error is PeerError.TIMEOUT for s in r.peers)
    assert took < 0.4 + 2.0


def test_missing_password_file_is_counted_for_every_peer(tmp_path: Path):
    config = PeersConfig(
        targets=("198.51.100.1:9917",),
        basic_auth=BasicAuth("prom", str(tmp_path / "missing")),
    )
    r = Rounds(threading.Event()).run(config, time.monotonic() + 5)
    assert [(p.up, p.error) for p in r.peers] == [(False, PeerError.CREDENTIALS)]


# --- file_sd ---


def test_file_sd_reread_on_change_and_last_good_kept(tmp_path: Path):
    sd = tmp_path / "peers.json"
    sd.write_text(json.dumps([{"targets": ["198.51.100.1:9917"], "labels": {"a": "b"}}]))
    targets = TargetList()
    config = PeersConfig(targets=("198.51.100.2:9917",), file_sd=(str(sd),))
    assert targets.resolve(config) == (("198.51.100.2:9917", "198.51.100.1:9917"), [])
    sd.write_text(json.dumps([{"targets": ["198.51.100.3:9917", "198.51.100.2:9917"]}]))
    assert targets.resolve(config)[0] == ("198.51.100.2:9917", "198.51.100.3:9917")
    sd.write_text("[{targets: nope")
    got, errors = targets.resolve(config)
    assert got == ("198.51.100.2:9917", "198.51.100.3:9917")
    assert [path for path, _ in errors] == [str(sd)]


def test_file_sd_yaml_and_glob(tmp_path: Path):
    (tmp_path / "a.yml").write_text("- targets: ['[2001:db8::1]:9917']\n")
    (tmp_path / "b.yml").write_text("- targets: ['db-1.example:9917']\n")
    config = PeersConfig(file_sd=(str(tmp_path / "*.yml"),))
    assert TargetList().resolve(config) == (("[2001:db8::1]:9917", "db-1.example:9917"), [])


@pytest.mark.parametrize(
    "text",
    ['{"targets": []}', '[{"labels": {}}]', '[{"targets": ["no-port"]}]', '[{"targets": [1]}]'],
    ids=["not a list", "no targets", "no port", "not a string"],
)
def test_file_sd_rejects(text: str):
    with pytest.raises(ValueError):
        parse_file_sd(text, "peers.json")


# --- the metric families ---


def test_peer_families():
    r = PeerRound(
        timestamp=1.0,
        duration=0.25,
        peers=(
            PeerState(
                "198.51.100.1:9917",
                True,
                probes=(PeerProbe("api", 8080, "198.51.100.1", False, 1.0, "timeout"),),
            ),
            PeerState("198.51.100.9:9917", False, PeerError.TIMEOUT, "timed out"),
        ),
        errors={("198.51.100.9:9917", "timeout"): 3},
    )
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PeerCollector(lambda: r))
    get = reg.get_sample_value
    assert get("bindscope_peer_up", {"peer": "198.51.100.1:9917"}) == 1
    assert get("bindscope_peer_up", {"peer": "198.51.100.9:9917"}) == 0
    probe = {"peer": "198.51.100.1:9917", "service": "api", "address": "198.51.100.1"}
    assert get("bindscope_peer_probe_success", probe) == 0
    assert get("bindscope_peer_probe_duration_seconds", probe) == 1.0
    assert (
        get("bindscope_peer_errors_total", {"peer": "198.51.100.9:9917", "reason": "timeout"}) == 3
    )
    assert get("bindscope_peer_round_duration_seconds") == 0.25


# --- the JSON API ---


def _snapshot() -> Snapshot:
    web = ServiceSpec("web", 5000, Protocol.TCP, Exposure.PRIVATE)
    return Snapshot(
        timestamp=2.0,
        duration=0.01,
        success=True,
        verdicts=(Verdict(web, Status.NOT_LISTENING, Exposure.NONE),),
        listeners=(),
        unexpected=(),
        host_addresses=(
            HostAddress("127.0.0.1", "lo", 4, Scope.LOOPBACK),
            HostAddress("198.51.100.1", "eth0", 4, Scope.PRIVATE),
            HostAddress("fe80::1", "eth0", 6, Scope.LINK_LOCAL),
        ),
    )


def test_api_services_shape():
    api = Api(_snapshot, lambda: Config(services=(ServiceSpec("web", 5000),)))
    status, body = api("/api/v1/services", {})
    assert status == 200
    assert json.loads(body) == {
        "version": 1,
        "timestamp": 2.0,
        "addresses": ["198.51.100.1"],
        "services": [
            {
                "name": "web",
                "port": 5000,
                "protocol": "tcp",
                "expose": "private",
                "status": "not_listening",
                "exposure": "none",
                "effective_exposure": "none",
                "firewall": None,
            }
        ],
    }


def test_api_diagnose_carries_the_document_and_the_services():
    api = Api(_snapshot, lambda: Config(services=(ServiceSpec("web", 5000),)))
    status, body = api("/api/v1/diagnose", {"target": ["5000"]})
    doc = json.loads(body)
    assert status == 200
    assert (doc["version"], doc["target"], doc["result"]) == (1, "5000", "problem")
    assert [s["status"] for s in doc["services"]] == ["not_listening"]


@pytest.mark.parametrize(
    ("path", "query", "status"),
    [
        ("/api/v1/diagnose", {}, 400),
        ("/api/v1/diagnose", {"target": ["1", "2"]}, 400),
        ("/api/v1/diagnose", {"target": ["nope"]}, 400),
        ("/api/v1/other", {}, 404),
    ],
    ids=["no target", "two targets", "unknown service", "unknown endpoint"],
)
def test_api_errors(path: str, query: dict, status: int):
    code, body = Api(_snapshot, Config)(path, query)
    assert code == status
    assert json.loads(body)["error"]


def test_api_before_the_first_scan():
    assert Api(lambda: None, Config)("/api/v1/services", {})[0] == 503


# --- the remote diagnose's join ---


def _attempt(outcome: Outcome) -> Attempt:
    return Attempt("198.51.100.1", outcome, "", 0.01, "198.51.100.129")


JOINS = {
    "ok and ok": (Outcome.OK, HostView("ok", "accept", "ok", ()), False, "Reachable"),
    "refused, loopback only there": (
        Outcome.REFUSED,
        HostView("loopback_only", None, "problem", ({"kind": "code", "summary": "app.run"},)),
        True,
        "loopback only",
    ),
    "timed out, ok and accepted there": (
        Outcome.TIMED_OUT,
        HostView("ok", "accept", "ok", ()),
        True,
        "path between the hosts drops it",
    ),
    "timed out, host firewall drops": (
        Outcome.TIMED_OUT,
        HostView("blocked", "drop", "problem", ()),
        True,
        "own firewall drops it",
    ),
    "refused, nothing listens": (
        Outcome.REFUSED,
        HostView("not_listening", None, "problem", ()),
        True,
        "nothing listens",
    ),
    "timed out, no exporter": (Outcome.TIMED_OUT, None, True, "connect alone"),
}


@pytest.mark.parametrize(("outcome", "view", "problem", "title"), JOINS.values(), ids=list(JOINS))
def test_join(outcome: Outcome, view: HostView | None, problem: bool, title: str):
    v = join("198.51.100.1", 5000, [_attempt(outcome)], view)
    assert v.problem is problem
    assert title in v.title
    if view is not None and view.status == "loopback_only":
        assert v.fixes == view.fixes  # the host's own fix, e.g. app.run(host=...)
    if outcome is Outcome.TIMED_OUT and view is not None and view.firewall == "accept":
        assert [f["kind"] for f in v.fixes] == ["firewall"]
        assert "security group" in v.fixes[0]["summary"]


# --- the exporter: bad peers never disturb scans or scrapes ---


@pytest.fixture
def bad_peers() -> Iterator[list[FakePeer]]:
    peers = [FakePeer(_hang), FakePeer(_send(b"garbage\r\n\r\n")), FakePeer(_trickle)]
    yield peers
    for p in peers:
        p.close()


def test_exporter_scans_and_serves_while_peers_misbehave(exporter, bad_peers: list[FakePeer]):
    targets = ", ".join(f"'{p.target}'" for p in bad_peers)
    exp = exporter(
        "scan_interval: 200ms\nprobe: {addresses: [127.0.0.1]}\n"
        f"peers: {{targets: [{targets}], interval: 1s, timeout: 500ms}}\n"
    )
    first = exp.wait_metrics(
        lambda m: all(m.get("bindscope_peer_up", peer=p.target) == 0 for p in bad_peers),
        what="every bad peer down",
    )
    t0 = first.get("bindscope_last_scan_timestamp_seconds")
    later = exp.wait_metrics(
        lambda m: (m.get("bindscope_last_scan_timestamp_seconds") or 0) > t0 + 1,
        what="scans going on",
    )
    assert later.get("bindscope_scan_success") == 1
    reasons = {s.labels["reason"] for s in later.all("bindscope_peer_errors_total") if s.value > 0}
    assert reasons == {"timeout", "invalid"}
    assert wait_for(lambda: exp.get("/api/v1/services")[0] == 200, what="api")


def test_api_needs_the_web_configs_credentials(exporter, tmp_path: Path):
    password = "s3cret"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prom: {hashed}\n")
    exp = exporter(
        "scan_interval: 1s\nprobe: {enabled: false}\n",
        [f"--web.config.file={web}"],
        ready=False,
    )

    def get(path: str, auth: bool) -> int:
        req = urllib.request.Request(exp.url(path))
        if auth:
            token = base64.b64encode(f"prom:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    assert wait_for(lambda: get("/api/v1/services", True) == 200, what="api with credentials")
    assert get("/api/v1/services", False) == 401
    assert get("/api/v1/diagnose?target=22", False) == 401


def test_https_peer_with_ca_and_basic_auth(exporter, pki: PKI, tmp_path: Path):  # noqa: F811
    password = "s3cret"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(
        f"tls_server_config: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}}}\n"
        f"basic_auth_users:\n  prom: {hashed}\n"
    )
    exp = exporter(
        "scan_interval: 1s\nprobe: {enabled: false}\n", [f"--web.config.file={web}"], ready=False
    )
    (tmp_path / "pw").write_text(password + "\n")
    auth = BasicAuth("prom", str(tmp_path / "pw"))
    target = f"127.0.0.1:{exp.port}"

    def state(tls: TLSConfig, basic_auth: BasicAuth | None = auth) -> PeerState:
        config = PeersConfig(
            targets=(target,), scheme="https", tls_config=tls, basic_auth=basic_auth
        )
        rounds = Rounds(threading.Event(), routable=lambda a: False)
        return rounds.run(config, time.monotonic() + 5).peers[0]

    trusted = TLSConfig(ca_file=str(pki.ca))
    assert wait_for(lambda: state(trusted).up, what="the https peer answers")
    assert state(trusted, None).error is PeerError.HTTP_STATUS  # 401 without credentials
    assert state(TLSConfig(ca_file=str(pki.dir / "other-ca.pem"))).error is PeerError.TLS
    assert state(TLSConfig(insecure_skip_verify=True)).up
