"""HTTP: the telemetry path, a landing page, health, readiness and reload endpoints.

This layer knows nothing of what is collected: it is handed callables. Each connection
gets its own thread, so scrapes run in parallel, and a per-connection timeout drops
half-open clients.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol as TypingProtocol

from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("bindscope.web")

CONNECTION_TIMEOUT = 10.0  # seconds a client may take to send a request
MAX_BODY = 1 << 16


class WebSecurity(TypingProtocol):
    def ssl_context(self) -> ssl.SSLContext | None: ...

    def authorize(self, authorization_header: str | None) -> bool: ...

    def headers(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Endpoints:
    # metrics(gzip) -> the exposition's parts, sent in order (gzip members when asked)
    metrics: Callable[[bool], Sequence[bytes]]
    landing: Callable[[], str]
    ready: Callable[[], bool]
    reload: Callable[[], tuple[bool, str]]
    telemetry_path: str = "/metrics"
    enable_lifecycle: bool = False
    # api(path, query) -> (status, JSON body) for paths under /api/v1/
    api: Callable[[str, dict[str, list[str]]], tuple[int, bytes]] | None = None


class ListenAddressError(ValueError):
    pass


def parse_listen_address(text: str) -> tuple[str, int]:
    """`:9917`, `0.0.0.0:9917`, `[::1]:9917`, `localhost:9917` -> (host, port); "" = all."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenAddressError(f"--web.listen-address: {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenAddressError(
            f"--web.listen-address: {text!r}: write IPv6 addresses in brackets, [::1]:9917"
        )
    return host, int(port_text)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not delay shutdown
    request_queue_size = 128

    def __init__(
        self, host: str, port: int, endpoints: Endpoints, security: WebSecurity | None = None
    ) -> None:
        self.endpoints = endpoints
        self.security = security
        family, address, dual = _resolve(host, port)
        self.address_family = family
        self._dual = dual
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        if self._dual:
            # ":9917" means every interface, IPv4 and IPv6 alike
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = self.socket.accept()
        conn.settimeout(CONNECTION_TIMEOUT)
        # headers and the exposition's parts go out as separate writes: without this,
        # Nagle holds the last small one until the client's delayed ACK (up to 40 ms)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = self.security.ssl_context() if self.security is not None else None
        if ctx is not None:
            # the handshake runs in the connection's thread, not in the accept loop;
            # the context is the current one, so a rotated certificate applies at once
            conn = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("connection error", extra={"client": str(client_address)}, exc_info=True)

    @property
    def endpoint(self) -> tuple[str, int]:
        """The bound (address, port), as the listener inventory will see it."""
        host, port = self.server_address[:2]
        return str(host), int(port)


def _resolve(host: str, port: int) -> tuple[int, tuple, bool]:
    if host == "":
        if socket.has_ipv6:
            try:
                socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
                return socket.AF_INET6, ("::", port), True
            except OSError:
                pass
        return socket.AF_INET, ("0.0.0.0", port), False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ListenAddressError(f"--web.listen-address: cannot resolve {host!r}: {e}") from e
    family, _t, _p, _n, sockaddr = infos[0]
    return family, sockaddr[:2] if family == socket.AF_INET else sockaddr, False


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (`gzip;q=0` refuses it)."""
    for part in accept_encoding.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().removeprefix("q=").strip() if params.strip().startswith("q=") else ""
            try:
                return not q or float(q) > 0
            except ValueError:
                return False
    return False


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "bindscope"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("request", extra={"client": self.client_address[0], "line": format % args})

    def _authorized(self) -> bool:
        sec = self.server.security
        if sec is None or sec.authorize(self.headers.get("Authorization")):
            return True
        self._send(
            401,
            b"Unauthorized\n",
            "text/plain; charset=utf-8",
            {"WWW-Authenticate": 'Basic realm="bindscope"'},
        )
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        path, _, query = self.path.partition("?")
        ep = self.server.endpoints
        if path.startswith("/api/v1/") and ep.api is not None:
            # the length bounds the fields parsed; no real query comes close
            code, body = ep.api(path, urllib.parse.parse_qs(query[:2048]))
            self._send(code, body, "application/json")
        elif path == ep.telemetry_path:
            compressed = accepts_gzip(self.headers.get("Accept-Encoding", ""))
            parts = ep.metrics(compressed)
            extra = {"Content-Encoding": "gzip"} if compressed else {}
            self._send(200, parts, CONTENT_TYPE_LATEST, extra)
        elif path == "/":
            self._send(200, ep.landing().encode(), "text/html; charset=utf-8")
        elif path == "/-/healthy":
            self._send(200, b"Healthy.\n", "text/plain; charset=utf-8")
        elif path == "/-/ready":
            if ep.ready():
                self._send(200, b"Ready.\n", "text/plain; charset=utf-8")
            else:
                self._send(
                    503,
                    b"Not ready: the first scan has not completed.\n",
                    "text/plain; charset=utf-8",
                )
        else:
            self._send(404, b"Not found\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        if not self._authorized():
            return
        text = self.headers.get("Content-Length") or "0"
        if not text.isdigit():  # also refuses a negative length, which reads to EOF
            self.close_connection = True
            self._send(400, b"Bad Content-Length\n", "text/plain; charset=utf-8")
            return
        length = int(text)
        if length > MAX_BODY:
            self.close_connection = True  # the unread body must not pass for a request
            self._send(413, b"Request body too large\n", "text/plain; charset=utf-8")
            return
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        ep = self.server.endpoints
        if path == "/-/reload":
            if not ep.enable_lifecycle:
                self._send(403, b"Lifecycle API is not enabled.\n", "text/plain; charset=utf-8")
                return
            ok, message = ep.reload()
            self._send(200 if ok else 500, (message + "\n").encode(), "text/plain; charset=utf-8")
        else:
            self._send(
                405 if path in ("/", ep.telemetry_path) else 404,
                b"Method not allowed\n",
                "text/plain; charset=utf-8",
            )

    def _send(
        self,
        code: int,
        body: bytes | Sequence[bytes],
        content_type: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        parts = (body,) if isinstance(body, bytes) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(len(p) for p in parts)))
        headers = self.server.security.headers() if self.server.security else {}
        for k, v in (headers | (extra or {})).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            for part in parts:
                self.wfile.write(part)


# handled by the main thread only: a signal the kernel hands to another thread leaves the
# main thread asleep, and Python runs the handler only when that one wakes up
MAIN_THREAD_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def _serve_forever(srv: Server) -> None:
    # connection threads are started from this one and inherit the mask
    signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    srv.serve_forever(poll_interval=0.2)


def serve(servers: list[Server]) -> list[threading.Thread]:
    threads = []
    for srv in servers:
        t = threading.Thread(
            target=_serve_forever,
            args=(srv,),
            name=f"http-{srv.endpoint[1]}",
            daemon=True,
        )
        t.start()
        threads.append(t)
    return threads
