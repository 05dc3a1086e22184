"""One bounded GET of a peer's JSON API: a size limit, a timeout, and an abort at a deadline.

Socket timeouts bound each read, not a peer that trickles a byte at a time; so the round
that started a request may abort it, which shuts its socket down and wakes the reading
thread at once (shutdown() on a duplicate of the fd acts on the socket itself and leaves
the reading thread's objects alone).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from bindscope import __version__
from bindscope.config.load import BasicAuth, TLSConfig
from bindscope.model import PeerError

MAX_ANSWER = 1 << 20  # bytes; /api/v1/services for a thousand services is ~150 KiB
MAX_PASSWORD_FILE = 4096


class FetchError(Exception):
    def __init__(self, reason: PeerError, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Client:
    """How to reach every peer: scheme, TLS and credentials, read once per round."""

    timeout: float
    ssl_context: ssl.SSLContext | None = None  # None: plain http
    server_name: str | None = None
    authorization: str | None = None  # the Authorization header value
    max_bytes: int = MAX_ANSWER


def client_for(scheme: str, timeout: float, tls: TLSConfig, auth: BasicAuth | None) -> Client:
    """The client for this round; the files are read now, so rotated ones apply at once."""
    ctx = None
    if scheme == "https":
        try:
            ctx = ssl.create_default_context(cafile=tls.ca_file)
            if tls.cert_file and tls.key_file:
                ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as e:
            raise FetchError(PeerError.CREDENTIALS, f"TLS files: {e}") from None
        if tls.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    authorization = None
    if auth is not None:
        authorization = basic_authorization(auth.username, read_password(auth.password_file))
    return Client(timeout, ctx, tls.server_name, authorization)


def read_password(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PASSWORD_FILE + 1)
    except OSError as e:
        raise FetchError(PeerError.CREDENTIALS, f"password_file {path}: {e.strerror}") from None
    if len(data) > MAX_PASSWORD_FILE:
        raise FetchError(PeerError.CREDENTIALS, f"password_file {path} is too large")
    # as Prometheus does: the file's trailing newline is not part of the password
    return data.decode("utf-8", "replace").strip()


def basic_authorization(username: str, password: str) -> str:
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


class Request:
    """A GET that run() performs in a worker thread and abort() may cut short."""

    def __init__(self, host: str, port: int, path: str, client: Client) -> None:
        self.host, self.port, self.path, self.client = host, port, path, client
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = False

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                try:
                    with socket.socket(fileno=os.dup(self._sock.fileno())) as dup:
                        dup.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed or never connected: nothing to wake

    def run(self) -> Any:
        """The parsed JSON answer; FetchError says why there is none."""
        try:
            return self._get()
        except Exception as e:
            # an aborted request fails however the cut shows (reset, EOF, half a JSON)
            if self._aborted:
                raise FetchError(PeerError.TIMEOUT, "no whole answer before the deadline") from None
            raise (e if isinstance(e, FetchError) else _classify(e)) from None
        finally:
            with self._lock:
                self._sock = None

    def _get(self) -> Any:
        c = self.client
        conn = http.client.HTTPConnection(self.host, self.port, timeout=c.timeout)
        try:
            conn.connect()
            with self._lock:
                if self._aborted:
                    raise FetchError(PeerError.TIMEOUT, "deadline passed while connecting")
                self._sock = conn.sock
            if c.ssl_context is not None:
                conn.sock = c.ssl_context.wrap_socket(
                    conn.sock, server_hostname=c.server_name or self.host
                )
            headers = {"Accept": "application/json", "User-Agent": f"bindscope/{__version__}"}
            if c.authorization:
                headers["Authorization"] = c.authorization
            conn.request("GET", self.path, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise FetchError(PeerError.HTTP_STATUS, f"HTTP {resp.status} {resp.reason}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > c.max_bytes:
                raise FetchError(PeerError.TOO_LARGE, f"{length} bytes, at most {c.max_bytes}")
            body = resp.read(c.max_bytes + 1)
            if len(body) > c.max_bytes:
                raise FetchError(PeerError.TOO_LARGE, f"more than {c.max_bytes} bytes")
        finally:
            conn.close()
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise FetchError(PeerError.INVALID, f"not JSON: {str(e)[:80]}") from None


def _classify(e: Exception) -> FetchError:
    if isinstance(e, TimeoutError):
        return FetchError(PeerError.TIMEOUT, "timed out")
    if isinstance(e, ssl.SSLError | ssl.CertificateError):
        return FetchError(PeerError.TLS, str(e)[:120])
    if isinstance(e, http.client.HTTPException):
        return FetchError(PeerError.INVALID, f"not HTTP: {type(e).__name__}")
    if isinstance(e, OSError):
        return FetchError(PeerError.UNREACHABLE, e.strerror or type(e).__name__)
    return FetchError(PeerError.INVALID, type(e).__name__)
