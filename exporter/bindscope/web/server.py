"""HTTP: the telemetry path, a landing page, health, readiness and reload endpoints.

This layer knows nothing of what is collected: it is handed callables. One event loop in
one thread serves every connection; requests are parsed by llhttp (through httptools),
Node.js's strict HTTP/1.1 parser. Every connection and request is bounded in number, size
and time, so no number of slow or hostile clients can hold a scrape back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import resource
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol
from urllib.parse import parse_qs

import httptools

log = logging.getLogger("bindscope.web")

MAX_BODY = 1 << 16
MAX_URL = 1 << 16
MAX_HEADER_BYTES = 1 << 16
MAX_HEADERS = 100
MAX_PIPELINED = 16  # complete requests queued behind the one being answered
ACCEPT_BURST = 64  # connections accepted per wake-up; well below FD_HEADROOM
# descriptors kept free for scans (netlink, /proc, probes) however many clients connect
FD_HEADROOM = 256
TEXT = "text/plain; charset=utf-8"
CONTENT_TYPES = {
    "text": "text/plain; version=0.0.4; charset=utf-8",
    "openmetrics": "application/openmetrics-text; version=1.0.0; charset=utf-8",
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TOKEN = re.compile(rb"[A-Z][A-Z-]* ")  # a method llhttp does not know, not garbage
KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}


class WebSecurity(TypingProtocol):
    def ssl_context(self) -> ssl.SSLContext | None: ...

    def check_cached(self, authorization_header: str | None) -> bool | None: ...

    def verify(self, authorization_header: str | None) -> bool: ...

    def headers(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Endpoints:
    # metrics(format, gzip, names) -> the exposition's parts, sent in order; format is a
    # key of CONTENT_TYPES, names the name[] filter (empty: everything)
    metrics: Callable[[str, bool, frozenset[str]], Sequence[bytes]]
    landing: Callable[[], str]
    ready: Callable[[], bool]
    reload: Callable[[], tuple[bool, str]]
    telemetry_path: str = "/metrics"
    enable_lifecycle: bool = False
    # api(path, query) -> (status, JSON body) for the paths of API_PATHS
    api: Callable[[str, dict[str, list[str]]], tuple[int, bytes]] | None = None


API_PATHS = ("/api/v1/services", "/api/v1/diagnose")


@dataclass(frozen=True)
class Limits:
    max_requests: int = 40  # answered at once; beyond, 503
    max_connections: int = 1024  # open at once; beyond, the longest-idle one is closed
    request_timeout: float = 10.0  # a request, headers and body, must arrive whole within it
    idle_timeout: float = 30.0  # a keep-alive connection may wait this long for its next request
    write_timeout: float = 30.0  # a response must be taken by the client within it
    # failed logins per client: a burst, then one per refill period
    auth_burst: int = 5
    auth_refill: float = 1.0
    bcrypt_queue: int = 8  # checks waiting or running at once; beyond, 429


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


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for host:port; "" is every interface, IPv4 and IPv6 alike."""
    family, address, dual = _resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def systemd_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed (LISTEN_FDS, from fd 3), as sd_listen_fds() reads."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        raise ListenAddressError("--web.systemd-socket: no sockets passed (LISTEN_PID is not ours)")
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    if count < 1:
        raise ListenAddressError("--web.systemd-socket: LISTEN_FDS names no socket")
    socks = [socket.socket(fileno=3 + i) for i in range(count)]
    for s in socks:
        if s.type != socket.SOCK_STREAM:
            raise ListenAddressError("--web.systemd-socket: a passed socket is not a TCP stream")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the processes a scan may start
    return socks


def endpoint(sock: socket.socket) -> tuple[str, int]:
    """The bound (address, port), as the listener inventory will see it."""
    host, port = sock.getsockname()[:2]
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


def connection_limit(wanted: int) -> int:
    """At most `wanted` connections, and never so many that scans run out of descriptors.

    The soft descriptor limit is raised to the hard one first, as Go programs do at start.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(1, min(wanted, soft - FD_HEADROOM))


def _q_values(header: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in header.split(","):
        name, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if name:
            out.setdefault(name.lower(), q)
    return out


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (`gzip;q=0` refuses it)."""
    q = _q_values(accept_encoding)
    return q.get("gzip", q.get("*", 0.0)) > 0


def exposition_format(accept: str) -> str:
    """OpenMetrics when the Accept header asks for it at least as much as for text."""
    q = _q_values(accept)
    om = q.get("application/openmetrics-text", 0.0)
    return "openmetrics" if om > 0 and om >= q.get("text/plain", 0.0) else "text"


class _TokenBuckets:
    """Failed logins per client address: a burst, then one per refill period."""

    def __init__(self, burst: int, refill: float, clock: Callable[[], float]) -> None:
        self._burst, self._refill, self._clock = burst, refill, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def _tokens(self, client: str) -> float:
        tokens, at = self._buckets.get(client, (self._burst, 0.0))
        return min(self._burst, tokens + (self._clock() - at) / self._refill)

    def take(self, client: str) -> bool:
        """Spend a token before a check, so a client's concurrent tries count at once."""
        tokens = self._tokens(client)
        if tokens < 1:
            return False
        self._buckets[client] = (tokens - 1, self._clock())
        return True

    def refund(self, client: str) -> None:
        """A check that succeeded costs nothing."""
        self._buckets[client] = (min(self._burst, self._tokens(client) + 1), self._clock())
        if len(self._buckets) > 10_000:  # forget full buckets, which say nothing
            self._buckets = {
                c: v for c, v in self._buckets.items() if self._tokens(c) < self._burst
            }


@dataclass
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    keep_alive: bool
    http10: bool


@dataclass
class _Stats:
    in_flight: int = 0
    peak: int = 0  # most connections open at once since they were last all closed
    bcrypt_pending: int = 0
    conns: dict[_Connection, None] = field(default_factory=dict)


class HTTPServer:
    """Serves the listening sockets from one event loop in its own thread."""

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        endpoints: Endpoints,
        security: WebSecurity | None = None,
        limits: Limits = Limits(),
    ) -> None:
        self.sockets = list(sockets)
        self.endpoints = endpoints
        self.security = security
        self.limits = limits
        self.stats = _Stats()
        self.loop = asyncio.new_event_loop()
        # bcrypt is slow on purpose: one thread, so a flood of wrong passwords takes one
        # core at most; landing page and reload get their own, off the loop
        self.bcrypt = ThreadPoolExecutor(1, thread_name_prefix="bcrypt")
        self.slow = ThreadPoolExecutor(2, thread_name_prefix="http-slow")
        self.auth_limits = _TokenBuckets(limits.auth_burst, limits.auth_refill, time.monotonic)
        self.open_fds = 0  # accepted connections whose descriptor is not closed yet
        self._accept_on = False
        self._stopping = False
        self._connecting: set[asyncio.Task[None]] = set()  # the loop holds tasks weakly
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        # signals go to the main thread, which alone runs Python's handlers: a signal the
        # kernel hands to this thread would leave the main thread asleep
        signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
        asyncio.set_event_loop(self.loop)
        for sock in self.sockets:
            sock.setblocking(False)
        self._accepting(True)
        self._started.set()
        self.loop.run_forever()

    def _accepting(self, on: bool) -> None:
        if on == self._accept_on or (on and self._stopping):
            return
        self._accept_on = on
        for sock in self.sockets:
            if on:
                self.loop.add_reader(sock.fileno(), self._accept, sock)
            else:
                self.loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        """Accept a few connections, never more than the limit allows descriptors for.

        asyncio's own accept loop takes a whole backlog at once, before any connection is
        counted. At the limit the connection idle longest is closed first; as its
        descriptor is freed a moment later, accepting pauses when too many are still
        closing, or when every connection is being answered.
        """
        for _ in range(ACCEPT_BURST):
            full = len(self.stats.conns) >= self.limits.max_connections
            if (full and not self.make_room()) or (
                self.open_fds >= self.limits.max_connections + ACCEPT_BURST
            ):
                self._accepting(False)  # until a connection is closed
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors or buffers: wait for a close
                log.warning("accept failed, pausing", extra={"err": str(e)})
                self._accepting(False)
                self.loop.call_later(0.1, self._accepting, True)
                return
            self.open_fds += 1
            conn.setblocking(False)
            self._connecting.add(self.loop.create_task(self._connect(conn)))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: _Connection(self), conn)
        except OSError:  # reset before it was set up
            conn.close()
            self.closed()
        finally:
            self._connecting.discard(asyncio.current_task())  # type: ignore[arg-type]

    def closed(self) -> None:
        """A connection's descriptor is closed."""
        self.open_fds -= 1
        if not self._accept_on and self.open_fds < self.limits.max_connections + ACCEPT_BURST:
            self._accepting(True)  # _accept() pauses again if every connection is busy

    def stop(self) -> None:
        if self._thread is None:
            for sock in self.sockets:
                sock.close()
            return

        def close_all() -> None:
            self._stopping = True  # connections closed below must not resume accepting
            self._accepting(False)
            for sock in self.sockets:
                sock.close()
            for conn in list(self.stats.conns):
                conn.abort()
            self.loop.stop()

        self.loop.call_soon_threadsafe(close_all)
        self._thread.join(5)
        self.bcrypt.shutdown(wait=False, cancel_futures=True)
        self.slow.shutdown(wait=False, cancel_futures=True)

    def make_room(self) -> bool:
        """At the connection limit, close the connection idle longest; False: none is."""
        oldest = None
        for conn in self.stats.conns:  # in order of last activity, oldest first
            if not conn.busy:
                oldest = conn
                break
        if oldest is None:
            return False
        oldest.abort()
        return True


class _Connection(asyncio.Protocol):
    """One client connection: parse, bound, answer, one request at a time."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.parser = httptools.HttpRequestParser(self)
        self.queue: list[_Request] = []
        self.busy = False  # a request is being answered
        self.counted = False  # and counts against --web.max-requests
        self.closing = False
        self.released = False  # its descriptor is closed and counted so
        self.timer: asyncio.TimerHandle | None = None
        self.drained: asyncio.Future[None] | None = None
        # the task answering now: the loop holds tasks weakly
        self.task: asyncio.Future[None] | None = None
        self._reset_request()

    # --- connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        stats = self.server.stats
        if len(stats.conns) >= self.limits.max_connections and not self.server.make_room():
            self.closing = True
            transport.abort()  # every connection is mid-answer: this one is refused
            return
        stats.conns[self] = None
        stats.peak = max(stats.peak, len(stats.conns))
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # headers and the exposition's parts go out as separate writes: without this,
            # Nagle holds the last small one until the client's delayed ACK (up to 40 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # resume only when all is sent: "sent" is when a request stops being in flight
        transport.set_write_buffer_limits(high=0)
        self._arm(self.limits.request_timeout)
        ctx = self.server.security.ssl_context() if self.server.security else None
        if ctx is not None:
            self.task = asyncio.ensure_future(self._start_tls(ctx))

    async def _start_tls(self, ctx: ssl.SSLContext) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            # the context current at accept time: a rotated certificate applies at once
            tls = await loop.start_tls(
                self.transport,
                self,
                ctx,
                server_side=True,
                ssl_handshake_timeout=self.limits.request_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            # start_tls() closed the socket, and connection_lost() will not be called
            self.abort()
            self._release()
            return
        if tls is None or self.closing:
            return
        self.transport = tls
        tls.set_write_buffer_limits(high=0)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        self._release()

    def _release(self) -> None:
        if not self.released:
            self.released = True
            self.server.closed()

    def eof_received(self) -> bool:
        if self.in_request and not self.busy:
            self._fail(400, "Request cut short")
        elif self.busy or self.queue:
            self.closing_after = True  # answer what was asked, then close
        else:
            self._close()
        return True  # the write side stays open for the answer

    def abort(self) -> None:
        self._forget()
        if self.transport is not None:
            self.transport.abort()

    def _forget(self) -> None:
        """Leave the server's books at once, so a closed connection counts no more."""
        stats = self.server.stats
        if stats.conns.pop(self, 0) is None and not stats.conns and stats.peak > 256:
            stats.peak = 0
            _release_memory()
        self._done()
        self.closing = True
        self._disarm()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = asyncio.get_event_loop().call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.in_request and not self.busy:
            # a request that trickles in past its deadline is answered, then dropped
            self._fail(408, "Request did not arrive in time")
        else:
            self.abort()

    def _touch(self) -> None:
        # activity order: make_room() closes the longest-idle connection first
        conns = self.server.stats.conns
        if self in conns:
            del conns[self]
            conns[self] = None

    # --- parsing (httptools callbacks)

    def _reset_request(self) -> None:
        self.in_request = False
        self.request_started = 0.0
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_bytes = 0
        self.body_bytes = 0
        self.error: tuple[int, str] | None = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # an Upgrade request is answered as a plain one; nothing after it is read
            self.closing_after = True
        except httptools.HttpParserError as e:
            if self.error is None:
                message = str(e)
                if "invalid method" in message.lower() and _TOKEN.match(data):
                    self.error = (501, "Method not implemented")
                elif "invalid http version" in message.lower():
                    self.error = (505, "HTTP version not supported")
                else:
                    self.error = (400, message)
            self._fail(*self.error)
            return
        if self.error is not None:
            self._fail(*self.error)
            return
        self._next()

    closing_after = False

    def on_message_begin(self) -> None:
        if not self.in_request:
            self.in_request = True
            self.request_started = asyncio.get_event_loop().time()
            self._touch()
            if not self.busy:
                # the whole request, however slowly it trickles, must arrive in time
                self._arm(self.limits.request_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            self._refuse(414, "Request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > MAX_HEADER_BYTES or len(self.headers) >= MAX_HEADERS:
            self._refuse(431, "Request headers too large")
        key = name.decode("latin-1").lower()
        if key == "content-length" and key in self.headers:
            self._refuse(400, "Duplicate Content-Length")
        text = value.decode("latin-1")
        # repeated headers join as one list, as RFC 9110 allows
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        if "transfer-encoding" in self.headers and "content-length" in self.headers:
            self._refuse(400, "Transfer-Encoding with Content-Length")
        length = self.headers.get("content-length", "0")
        if length.isdigit() and int(length) > MAX_BODY:
            self._refuse(413, "Request body too large")

    def on_body(self, body: bytes) -> None:
        # bodies are read to their end and dropped: never parsed as a request
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY:
            self._refuse(413, "Request body too large")

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        version = self.parser.get_http_version()
        request = _Request(
            method,
            self.url.decode("latin-1"),
            self.headers,
            self.parser.should_keep_alive(),
            version == "1.0",
        )
        self._reset_request()
        self.queue.append(request)
        if len(self.queue) > MAX_PIPELINED:
            self._refuse(400, "Too many pipelined requests")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _refuse(self, status: int, message: str) -> None:
        self.error = (status, message)
        # an exception inside a callback stops llhttp at once: nothing more is parsed
        raise httptools.HttpParserCallbackError(message)

    # --- answering

    def _next(self) -> None:
        if self.busy or self.closing:
            return
        if not self.queue:
            if self.closing_after:
                self._close()
                return
            if self.transport is not None:
                self.transport.resume_reading()
            if self.in_request:
                left = self.request_started + self.limits.request_timeout
                self._arm(max(0.0, left - asyncio.get_event_loop().time()))
            else:
                self._arm(self.limits.idle_timeout)
            return
        request = self.queue.pop(0)
        self.busy = True
        self._disarm()
        self.task = asyncio.ensure_future(self._answer(request))

    def _admit(self) -> bool:
        """Count this request in flight, if the limit allows one more."""
        stats = self.server.stats
        if stats.in_flight >= self.limits.max_requests:
            return False
        stats.in_flight += 1
        self.counted = True
        return True

    def _done(self) -> None:
        self.busy = False
        if self.counted:
            self.counted = False
            self.server.stats.in_flight -= 1

    async def _answer(self, request: _Request) -> None:
        try:
            await self._route(request)
        except Exception:
            log.exception("request failed", extra={"path": request.target})
            if self.busy and not self.closing:
                await self._send(request, 500, b"Internal server error\n", TEXT, close=True)

    async def _route(self, request: _Request) -> None:
        method = request.method
        if method not in KNOWN_METHODS:
            await self._send(request, 501, b"Method not implemented\n", TEXT, close=True)
            return
        # authenticated first: answers to unauthenticated requests cost nothing to hold,
        # and bcrypt checks have their own bound, so neither takes a scrape's place
        if not await self._authorized(request):
            return
        if not self._admit():
            await self._send(
                request, 503, b"Too many requests in flight\n", TEXT, {"Retry-After": "1"}
            )
            return
        path, _, query = request.target.partition("?")
        ep = self.server.endpoints
        allow = {
            ep.telemetry_path: "GET, HEAD",
            "/": "GET, HEAD",
            "/-/healthy": "GET, HEAD",
            "/-/ready": "GET, HEAD",
            "/-/reload": "POST",
            **({p: "GET, HEAD" for p in API_PATHS} if ep.api is not None else {}),
        }
        if path not in allow:
            await self._send(request, 404, b"Not found\n", TEXT)
            return
        if method not in allow[path].split(", "):
            await self._send(request, 405, b"Method not allowed\n", TEXT, {"Allow": allow[path]})
            return
        loop = asyncio.get_running_loop()
        h = request.headers
        if path == ep.telemetry_path:
            fmt = exposition_format(h.get("accept", ""))
            compressed = accepts_gzip(h.get("accept-encoding", ""))
            names = frozenset(parse_qs(query).get("name[]", ()))
            if names:  # filtering and compressing a part costs more than sending it
                parts = await loop.run_in_executor(
                    self.server.slow, ep.metrics, fmt, compressed, names
                )
            else:
                parts = ep.metrics(fmt, compressed, names)
            extra = {"Content-Encoding": "gzip"} if compressed else {}
            await self._send(request, 200, parts, CONTENT_TYPES[fmt], extra)
        elif path == "/":
            page = await loop.run_in_executor(self.server.slow, ep.landing)
            await self._send(request, 200, page.encode(), "text/html; charset=utf-8")
        elif path in API_PATHS and ep.api is not None:
            # a diagnosis reads process files and the packet filter: off the loop; the
            # length bounds the fields parsed, no real query comes close
            code, body = await loop.run_in_executor(
                self.server.slow, ep.api, path, parse_qs(query[:2048])
            )
            await self._send(request, code, body, "application/json")
        elif path == "/-/healthy":
            await self._send(request, 200, b"Healthy.\n", TEXT)
        elif path == "/-/ready":
            if ep.ready():
                await self._send(request, 200, b"Ready.\n", TEXT)
            else:
                body = b"Not ready: the first scan has not completed.\n"
                await self._send(request, 503, body, TEXT)
        elif not ep.enable_lifecycle:
            await self._send(request, 403, b"Lifecycle API is not enabled.\n", TEXT)
        else:
            ok, message = await loop.run_in_executor(self.server.slow, ep.reload)
            await self._send(request, 200 if ok else 500, (message + "\n").encode(), TEXT)

    async def _authorized(self, request: _Request) -> bool:
        sec = self.server.security
        if sec is None:
            return True
        header = request.headers.get("authorization")
        allowed = sec.check_cached(header)
        if allowed is None:
            server = self.server
            # a client that keeps failing waits for its budget; the checks of every
            # client together are bounded, so a scrape with valid credentials is never
            # queued behind more than a few
            if server.stats.bcrypt_pending >= self.limits.bcrypt_queue or not (
                server.auth_limits.take(self.client)
            ):
                await self._send(
                    request, 429, b"Too many failed logins\n", TEXT, {"Retry-After": "1"}
                )
                return False
            server.stats.bcrypt_pending += 1
            try:
                loop = asyncio.get_running_loop()
                allowed = await loop.run_in_executor(server.bcrypt, sec.verify, header)
            finally:
                server.stats.bcrypt_pending -= 1
            if allowed:
                server.auth_limits.refund(self.client)
        if allowed:
            return True
        await self._send(
            request, 401, b"Unauthorized\n", TEXT, {"WWW-Authenticate": 'Basic realm="bindscope"'}
        )
        return False

    def _headers_of(
        self, status: int, length: int, content_type: str, extra: dict[str, str], close: bool
    ) -> bytes:
        sec = self.server.security
        headers = (sec.headers() if sec is not None else {}) | extra
        lines = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
            f"Date: {_http_date()}",
            "Server: bindscope",
            f"Content-Type: {content_type}",
            f"Content-Length: {length}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send(
        self,
        request: _Request | None,
        status: int,
        body: bytes | Sequence[bytes],
        content_type: str,
        extra: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        transport = self.transport
        if transport is None or self.closing or transport.is_closing():
            return
        parts = (body,) if isinstance(body, bytes) else body
        if request is not None:
            close = close or not request.keep_alive or self.closing_after
        head = self._headers_of(
            status, sum(len(p) for p in parts), content_type, extra or {}, close
        )
        if request is not None and request.method == "HEAD":
            parts = ()
        # one write each: a part the kernel takes whole is never copied (writelines joins)
        transport.write(head)
        for part in parts:
            transport.write(part)
        if transport.get_write_buffer_size():
            self._arm(self.limits.write_timeout)
            self.drained = asyncio.get_running_loop().create_future()
            await self.drained
            self.drained = None
        if self.closing:
            return
        self._touch()
        self._done()
        if close:
            self._close()
        else:
            self._next()

    def _fail(self, status: int, message: str) -> None:
        """Answer a request that cannot be served, then close: the stream is not trusted."""
        self.queue.clear()
        if self.busy:
            # the answer in progress goes out first; nothing after it is read
            self.closing_after = True
            return
        self.closing_after = True
        self.busy = True
        self.task = asyncio.ensure_future(
            self._send(None, status, (message + "\n").encode(), TEXT, close=True)
        )

    def _close(self) -> None:
        self.closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)


def _release_memory() -> None:
    """Hand the heap freed by a crowd of connections back to the system: glibc keeps it
    otherwise, and the exporter's RSS would stay at its peak after an attack."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)))
    return _date_cache[1]


# handled by the main thread only: a signal the kernel hands to another thread leaves the
# main thread asleep, and Python runs the handler only when that one wakes up
MAIN_THREAD_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
