"""Tests for the exporter-toolkit web config: loading, reloading, basic auth and a TLS server."""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import EXPORTER, free_port, wait_for

from bindscope.web.webconfig import (
    TLSConfig,
    WebConfigError,
    WebConfigWatcher,
    load_web_config,
    parse_basic_auth,
)

# Cost 4 is bcrypt's minimum: the tests check behaviour, not bcrypt's slowness.
PASSWORD = b"s3cret:with:colons"
HASH = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def _server_cert(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, dest: Path) -> None:
    key = _key()
    _write(dest, _cert("bindscope test server", key, ca, ca_key, server=True), key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("bindscope test CA", ca_key, None, ca_key, ca=True)
    _write(d / "ca.pem", ca, None)
    _server_cert(ca, ca_key, d / "server.pem")
    client_key = _key()
    _write(d / "client.pem", _cert("scraper", client_key, ca, ca_key), client_key)
    # A second CA signs certificates no one trusts, and the rotated server certificate.
    other_key = _key()
    other = _cert("other CA", other_key, None, other_key, ca=True)
    _write(d / "other-ca.pem", other, None)
    _server_cert(other, other_key, d / "other-server.pem")
    return PKI(
        d, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key"
    )


def _web_config(tmp_path: Path, text: str, name: str = "web.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _replace(path: Path | str, data: bytes) -> None:
    """Write as rotation tools do: a new file renamed over the old one."""
    tmp = f"{path}.new"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)


def _basic(user: str, password: bytes) -> str:
    return "Basic " + base64.b64encode(user.encode() + b":" + password).decode()


def test_empty_file_is_plain_http_without_auth(tmp_path: Path) -> None:
    config = load_web_config(_web_config(tmp_path, ""))
    assert (config.tls, dict(config.users), dict(config.headers)) == (None, {}, {})


def test_full_file_loads(tmp_path: Path, pki: PKI) -> None:
    path = _web_config(
        tmp_path,
        f"""
tls_server_config:
  cert_file: {pki.server_cert}
  key_file: {pki.server_key}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki.ca}
  min_version: TLS13
  max_version: TLS13
http_server_config:
  http2: false
  headers:
    X-Frame-Options: deny
    Strict-Transport-Security: max-age=31536000
    X-XSS-Protection: ""
basic_auth_users:
  prometheus: {HASH}
""",
    )
    config = load_web_config(path)
    assert config.tls == TLSConfig(
        str(pki.server_cert),
        str(pki.server_key),
        "RequireAndVerifyClientCert",
        str(pki.ca),
        "TLS13",
        "TLS13",
    )
    assert dict(config.users) == {"prometheus": HASH.encode()}
    # A blank header value means unset, as in exporter-toolkit.
    assert dict(config.headers) == {
        "X-Frame-Options": "deny",
        "Strict-Transport-Security": "max-age=31536000",
    }


def test_relative_paths_are_relative_to_the_file(tmp_path: Path, pki: PKI) -> None:
    path = _web_config(
        pki.dir, "tls_server_config: {cert_file: server.pem, key_file: server.key}\n", "rel.yml"
    )
    config = load_web_config(path)
    assert config.tls is not None and config.tls.cert_file == str(pki.server_cert)


LOAD_ERRORS = [
    (
        "missing_cert_file",
        "tls_server_config:\n  cert_file: missing.pem\n  key_file: {key}\n",
        "web.yml:2:14: tls_server_config.cert_file: cannot read {dir}/missing.pem: "
        "No such file or directory",
    ),
    (
        "cert_file_is_a_key",
        "tls_server_config:\n  cert_file: {key}\n  key_file: {key}\n",
        "web.yml:2:14: tls_server_config.cert_file: no PEM certificate in {key}",
    ),
    (
        "key_of_another_cert",
        "tls_server_config:\n  cert_file: {other_cert}\n  key_file: {key}\n",
        "web.yml:2:3: tls_server_config: certificate, key or CA does not load: KEY_VALUES_MISMATCH",
    ),
    (
        "key_file_missing",
        "tls_server_config:\n  cert_file: {cert}\n",
        "web.yml:2:3: tls_server_config.key_file: required when TLS is configured",
    ),
    (
        "bad_hash",
        "basic_auth_users:\n  alice: password\n",
        "web.yml:2:10: basic_auth_users.alice: not a bcrypt hash "
        "(expected $2a$, $2b$ or $2y$, cost 04-31)",
    ),
    (
        "truncated_hash",
        "basic_auth_users:\n  alice: '{hash_truncated}'\n",
        "web.yml:2:10: basic_auth_users.alice: not a bcrypt hash "
        "(expected $2a$, $2b$ or $2y$, cost 04-31)",
    ),
    (
        "hash_not_a_string",
        "basic_auth_users:\n  alice: [1]\n",
        "web.yml:2:10: basic_auth_users.alice: expected a string",
    ),
    (
        "unknown_top_key",
        "basic_auth_user:\n  alice: x\n",
        "web.yml:1:1: basic_auth_user: unknown key (expected one of: tls_server_config, "
        "http_server_config, basic_auth_users)",
    ),
    (
        "unknown_tls_key",
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_versoin: TLS13\n",
        "web.yml:4:3: tls_server_config.min_versoin: unknown key (expected one of: cert_file, "
        "key_file, client_auth_type, client_ca_file, min_version, max_version, "
        "prefer_server_cipher_suites)",
    ),
    (
        "unsupported_toolkit_key",
        "rate_limit:\n  interval: 1s\n",
        "web.yml:1:1: rate_limit: not supported by bindscope",
    ),
    (
        "bad_client_auth_type",
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  client_auth_type: VerifyAlways\n",
        "web.yml:4:21: tls_server_config.client_auth_type: 'VerifyAlways' is not one of "
        "NoClientCert, RequestClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert",
    ),
    (
        "unverified_client_auth_type",
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  client_auth_type: RequireAnyClientCert\n",
        "web.yml:4:21: tls_server_config.client_auth_type: RequireAnyClientCert is not "
        "supported: a client certificate is only checked against client_ca_file; use "
        "RequireAndVerifyClientCert",
    ),
    (
        "verify_without_ca",
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  client_auth_type: RequireAndVerifyClientCert\n",
        "web.yml:2:3: tls_server_config.client_ca_file: required with client_auth_type "
        "RequireAndVerifyClientCert",
    ),
    (
        "ca_without_client_auth",
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: {ca}\n",
        "web.yml:4:19: tls_server_config.client_ca_file: set, but client_auth_type is "
        "NoClientCert: set client_auth_type to RequireAndVerifyClientCert",
    ),
    (
        "bad_tls_version",
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS14\n",
        "web.yml:4:16: tls_server_config.min_version: 'TLS14' is not one of "
        "TLS10, TLS11, TLS12, TLS13",
    ),
    (
        "min_above_max",
        "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        "  min_version: TLS13\n  max_version: TLS12\n",
        "web.yml:4:16: tls_server_config.min_version: TLS13 is above max_version TLS12",
    ),
    (
        "header_not_allowed",
        "http_server_config:\n  headers:\n    Server: bindscope\n",
        "web.yml:3:5: http_server_config.headers.Server: cannot be set (allowed: "
        "Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, "
        "X-XSS-Protection, Content-Security-Policy)",
    ),
    (
        "header_bad_value",
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        "web.yml:3:22: http_server_config.headers.X-Frame-Options: 'allow' is not one of "
        "deny, sameorigin",
    ),
    (
        "duplicate_user",
        "basic_auth_users:\n  alice: '{hash}'\n  alice: '{hash}'\n",
        "web.yml:3:3: basic_auth_users.alice: duplicate key",
    ),
    (
        "not_a_mapping",
        "- tls_server_config\n",
        "web.yml:1:1: expected a mapping",
    ),
    (
        "bad_yaml",
        "basic_auth_users: [alice\n",
        "web.yml:2:1: invalid YAML: expected ',' or ']', but got '<stream end>'",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [case[1:] for case in LOAD_ERRORS],
    ids=[case[0] for case in LOAD_ERRORS],
)
def test_load_errors(tmp_path: Path, pki: PKI, text: str, message: str) -> None:
    values = {
        "cert": pki.server_cert,
        "key": pki.server_key,
        "ca": pki.ca,
        "other_cert": pki.dir / "other-server.pem",
        "dir": tmp_path,
        "hash": HASH,
        "hash_truncated": HASH[:-1],
    }
    path = _web_config(tmp_path, text.format(**values))
    with pytest.raises(WebConfigError) as e:
        load_web_config(path)
    assert str(e.value) == f"{tmp_path}/{message.format(**values)}"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError) as e:
        load_web_config(str(tmp_path / "absent.yml"))
    assert str(e.value) == f"{tmp_path}/absent.yml: cannot read: No such file or directory"


AUTH_HEADERS = [
    ("right", _basic("prometheus", PASSWORD), True),
    ("scheme_case_insensitive", "basic " + _basic("prometheus", PASSWORD)[6:], True),
    ("wrong_password", _basic("prometheus", b"guess"), False),
    ("empty_password", _basic("prometheus", b""), False),
    ("unknown_user", _basic("root", PASSWORD), False),
    ("missing", None, False),
    ("empty", "", False),
    ("bearer", "Bearer abc", False),
    ("not_base64", "Basic !!!", False),
    ("no_colon", "Basic " + base64.b64encode(b"prometheus").decode(), False),
    ("user_not_utf8", "Basic " + base64.b64encode(b"\xff:x").decode(), False),
    ("scheme_only", "Basic", False),
]


@pytest.mark.parametrize(
    ("header", "allowed"),
    [case[1:] for case in AUTH_HEADERS],
    ids=[case[0] for case in AUTH_HEADERS],
)
def test_authorize(tmp_path: Path, header: str | None, allowed: bool) -> None:
    watcher = WebConfigWatcher(
        _web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    )
    assert watcher.authorize(header) is allowed


def test_authorize_without_users_allows_all(tmp_path: Path) -> None:
    assert WebConfigWatcher(None).authorize(None)
    assert WebConfigWatcher(_web_config(tmp_path, "{}\n")).authorize(None)


def test_parse_basic_auth_keeps_colons_in_password() -> None:
    assert parse_basic_auth(_basic("u", b"a:b:c")) == ("u", b"a:b:c")


def test_successful_auth_is_cached_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    watcher = WebConfigWatcher(
        _web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{HASH}'\n"),
        cache_seconds=60,
        clock=lambda: now[0],
    )
    calls: list[bytes] = []
    real_checkpw = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    header = _basic("prometheus", PASSWORD)
    assert [watcher.authorize(header) for _ in range(5)] == [True] * 5
    assert len(calls) == 1
    # A wrong password is never answered from the cache.
    assert not watcher.authorize(_basic("prometheus", b"nope"))
    assert len(calls) == 2
    now[0] += 61
    assert watcher.authorize(header)
    assert len(calls) == 3
    version = watcher._version
    assert version is not None
    cached = repr(version.auth_cache)
    assert PASSWORD.decode() not in cached and "s3cret" not in cached


def test_unknown_user_costs_a_bcrypt_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    watcher = WebConfigWatcher(
        _web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    )
    calls: list[bytes] = []
    monkeypatch.setattr(bcrypt, "checkpw", lambda p, h: calls.append(h) or False)
    assert not watcher.authorize(_basic("nobody", PASSWORD))
    # Checked against a dummy hash of the same cost, so the answer takes as long.
    assert len(calls) == 1 and calls[0] != HASH.encode() and calls[0][:7] == HASH.encode()[:7]


def test_watcher_picks_up_a_changed_password(tmp_path: Path) -> None:
    path = _web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    watcher = WebConfigWatcher(path)
    assert watcher.authorize(_basic("prometheus", PASSWORD))
    new_hash = bcrypt.hashpw(b"rotated", bcrypt.gensalt(4)).decode()
    _replace(path, f"basic_auth_users:\n  prometheus: '{new_hash}'\n".encode())
    watcher.refresh()
    assert not watcher.authorize(_basic("prometheus", PASSWORD))
    assert watcher.authorize(_basic("prometheus", b"rotated"))
    assert watcher.errors == 0


def test_watcher_keeps_last_good_config_and_counts_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    watcher = WebConfigWatcher(path)
    good = watcher.current()
    _replace(path, b"basic_auth_users:\n  prometheus: plaintext\n")
    with caplog.at_level(logging.ERROR, logger="bindscope.web"):
        for _ in range(3):
            watcher.refresh()
            assert watcher.current() == good
    assert watcher.errors == 1
    assert len(caplog.records) == 1
    assert "basic_auth_users.prometheus: not a bcrypt hash" in caplog.records[0].getMessage()
    assert watcher.authorize(_basic("prometheus", PASSWORD))
    _replace(path, b"{}\n")
    watcher.refresh()
    assert watcher.current() is not None and not watcher.current().users
    assert (watcher.errors, watcher.last_error) == (1, None)


def test_watcher_retries_when_a_missing_cert_appears(tmp_path: Path, pki: PKI) -> None:
    path = _web_config(tmp_path, "{}\n")
    watcher = WebConfigWatcher(path)
    cert, key = tmp_path / "late.pem", tmp_path / "late.key"
    _replace(path, f"tls_server_config: {{cert_file: {cert}, key_file: {key}}}\n".encode())
    for _ in range(2):
        watcher.refresh()
        assert watcher.ssl_context() is None and watcher.errors == 1
    key.write_bytes(pki.server_key.read_bytes())
    cert.write_bytes(pki.server_cert.read_bytes())
    watcher.refresh()
    assert watcher.ssl_context() is not None
    assert watcher.errors == 1


def test_ssl_context_built_once_per_version(tmp_path: Path, pki: PKI) -> None:
    path = _web_config(
        tmp_path,
        f"tls_server_config: {{cert_file: {pki.server_cert}, key_file: {pki.server_key}}}\n",
    )
    watcher = WebConfigWatcher(path)
    first = watcher.ssl_context()
    assert first is not None and watcher.ssl_context() is first


def test_no_path_means_plain_http() -> None:
    watcher = WebConfigWatcher(None)
    assert (watcher.current(), watcher.ssl_context(), watcher.headers(), watcher.errors) == (
        None,
        None,
        {},
        0,
    )


def test_watcher_refuses_a_broken_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match="unknown key"):
        WebConfigWatcher(_web_config(tmp_path, "tls_config: {}\n"))


# A real server wired as WebConfigWatcher's docstring says exporter/web.py wires it.


Serve = Callable[[WebConfigWatcher], int]


class _Handler(BaseHTTPRequestHandler):
    timeout = 10
    watcher: WebConfigWatcher

    def handle(self) -> None:
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                return
        super().handle()

    def do_GET(self) -> None:
        extra = self.watcher.headers()
        if self.watcher.authorize(self.headers.get("Authorization")):
            status, body = 200, b"ok\n"
        else:
            status, body = 401, b"Unauthorized\n"
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="bindscope"')
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    watcher: WebConfigWatcher

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        context = self.watcher.ssl_context()
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers: list[tuple[_Server, threading.Thread]] = []

    def start(watcher: WebConfigWatcher) -> int:
        handler = type("Handler", (_Handler,), {"watcher": watcher})
        server = _Server(("127.0.0.1", 0), handler)
        server.watcher = watcher
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        servers.append((server, thread))
        return server.server_address[1]

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _client_context(pki: PKI, *, cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def _get(
    port: int, context: ssl.SSLContext | None, auth: str | None = None, host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=5)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=5, context=context)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": auth} if auth else {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _tls_file(tmp_path: Path, pki: PKI, extra: str = "") -> str:
    return _web_config(
        tmp_path,
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        + extra,
    )


def test_https_with_the_ca_works_and_plain_http_fails(
    serve: Serve, tmp_path: Path, pki: PKI
) -> None:
    port = serve(WebConfigWatcher(_tls_file(tmp_path, pki)))
    assert _get(port, _client_context(pki))[0] == 200
    assert _get(port, _client_context(pki), host="localhost")[0] == 200
    with pytest.raises((http.client.HTTPException, OSError)):
        _get(port, None)
    # A client that trusts another CA refuses the server.
    with pytest.raises(ssl.SSLCertVerificationError):
        _get(port, ssl.create_default_context(cafile=str(pki.dir / "other-ca.pem")))


def test_client_cert_required(serve: Serve, tmp_path: Path, pki: PKI) -> None:
    extra = f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n"
    port = serve(WebConfigWatcher(_tls_file(tmp_path, pki, extra)))
    assert _get(port, _client_context(pki, cert=True))[0] == 200
    with pytest.raises((ssl.SSLError, http.client.HTTPException, OSError)):
        _get(port, _client_context(pki))


def test_basic_auth_over_tls(serve: Serve, tmp_path: Path, pki: PKI) -> None:
    extra = (
        f"basic_auth_users:\n  prometheus: '{HASH}'\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
    )
    port = serve(WebConfigWatcher(_tls_file(tmp_path, pki, extra)))
    status, headers, _ = _get(port, _client_context(pki), _basic("prometheus", b"wrong"))
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Basic realm="bindscope"'
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert _get(port, _client_context(pki))[0] == 401
    assert _get(port, _client_context(pki), _basic("prometheus", PASSWORD))[0] == 200


def test_rotated_cert_is_served_without_restart(serve: Serve, tmp_path: Path, pki: PKI) -> None:
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    watcher = WebConfigWatcher(
        _web_config(tmp_path, f"tls_server_config: {{cert_file: {cert}, key_file: {key}}}\n")
    )
    port = serve(watcher)
    other_ca = ssl.create_default_context(cafile=str(pki.dir / "other-ca.pem"))
    assert _get(port, _client_context(pki))[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        _get(port, other_ca)
    # Key first, then cert: between the two the pair does not match, and the old one stays.
    _replace(key, (pki.dir / "other-server.key").read_bytes())
    watcher.refresh()
    assert _get(port, _client_context(pki))[0] == 200
    _replace(cert, (pki.dir / "other-server.pem").read_bytes())
    watcher.refresh()
    assert _get(port, other_ca)[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        _get(port, _client_context(pki))
    assert watcher.errors == 1


def test_security_doc_example_loads(tmp_path: Path, pki: PKI) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs/security.md").read_text()
    found = re.search(r"`/etc/bindscope/web.yml`:\n\n```yaml\n(.*?)```", doc, re.S)
    assert found, "docs/security.md lost its web config example"
    (tmp_path / "tls").mkdir()
    for name, source in [("server.crt", pki.server_cert), ("server.key", pki.server_key)]:
        (tmp_path / "tls" / name).write_bytes(source.read_bytes())
    (tmp_path / "tls/ca.crt").write_bytes(pki.ca.read_bytes())
    config = load_web_config(_web_config(tmp_path, found.group(1)))
    assert config.tls is not None and config.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert set(config.users) == {"prometheus"}


def test_the_real_exporter_serves_https_with_basic_auth(tmp_path: Path, pki: PKI, exporter) -> None:
    """bindscope-exporter --web.config.file: HTTPS with the CA and the right password only."""
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web = _web_config(
        tmp_path,
        f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
        f"basic_auth_users:\n  prometheus: {hashed}\n",
    )
    exp = exporter("probe: {addresses: [127.0.0.1]}\n", [f"--web.config.file={web}"], ready=False)
    ctx = ssl.create_default_context(cafile=str(pki.ca))

    def get(path: str, auth: str | None) -> tuple[int, str, str]:
        conn = http.client.HTTPSConnection("127.0.0.1", exp.port, context=ctx, timeout=5)
        try:
            conn.request("GET", path, headers={"Authorization": auth} if auth else {})
            r = conn.getresponse()
            return r.status, r.getheader("WWW-Authenticate") or "", r.read().decode()
        finally:
            conn.close()

    def ready() -> bool:
        assert exp.proc.poll() is None, exp.log()
        try:
            return get("/-/ready", _basic("prometheus", b"s3cret"))[0] == 200
        except OSError:
            return False

    wait_for(ready, 20, what="exporter ready over HTTPS")
    code, _, body = get("/metrics", _basic("prometheus", b"s3cret"))
    assert code == 200 and "bindscope_scan_success 1.0" in body
    assert "bindscope_web_config_reload_errors_total 0.0" in body
    assert get("/metrics", _basic("prometheus", b"wrong"))[:2] == (401, 'Basic realm="bindscope"')
    assert get("/metrics", None)[0] == 401
    # plain HTTP to the TLS port gets no exposition
    with socket.create_connection(("127.0.0.1", exp.port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        try:
            answer = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert b"bindscope_" not in answer
    assert "s3cret" not in exp.log()


def test_exporter_refuses_a_broken_web_config_at_start(tmp_path: Path) -> None:
    web = _web_config(tmp_path, "tls_server_config:\n  cert_file: /nonexistent.pem\n")
    r = subprocess.run(
        [*EXPORTER, f"--web.listen-address=127.0.0.1:{free_port()}", f"--web.config.file={web}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert web in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
