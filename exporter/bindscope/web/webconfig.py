"""TLS and basic auth for the HTTP endpoint, from a Prometheus exporter-toolkit web config file.

The file is re-read when it (or a certificate, key or CA file it names) changes, so rotated
certificates and passwords take effect without a restart, as they do in exporter-toolkit.
Reloads run in a thread of their own, never on a request's path; a reload that would turn
TLS or basic auth off is refused unless the file says so in full.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import ssl
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import bcrypt
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

log = logging.getLogger("bindscope.web")

CLIENT_AUTH_TYPES: Mapping[str, ssl.VerifyMode] = MappingProxyType(
    {
        "NoClientCert": ssl.CERT_NONE,
        # Go asks for a certificate here but neither verifies nor uses it, and nothing in
        # bindscope reads a peer certificate, so not asking is the same policy.
        "RequestClientCert": ssl.CERT_NONE,
        "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
        "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    }
)
# Python's ssl module cannot demand a certificate without verifying it; refusing the file
# beats silently letting in clients the operator meant to keep out.
_UNVERIFIED_CLIENT_AUTH = ("RequireAnyClientCert", "RequireClientCert")

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = MappingProxyType(
    {
        "TLS10": ssl.TLSVersion.TLSv1,
        "TLS11": ssl.TLSVersion.TLSv1_1,
        "TLS12": ssl.TLSVersion.TLSv1_2,
        "TLS13": ssl.TLSVersion.TLSv1_3,
    }
)

# exporter-toolkit allows these headers only, with fixed values where the header has them.
ALLOWED_HEADERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "Strict-Transport-Security": (),
        "X-Content-Type-Options": ("nosniff",),
        "X-Frame-Options": ("deny", "sameorigin"),
        "X-XSS-Protection": (),
        "Content-Security-Policy": (),
    }
)

_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users")
_TLS_KEYS = (
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
)
_HTTP_KEYS = ("headers", "http2")
# exporter-toolkit keys bindscope does not implement: named so the user learns that, rather
# than being told of a typo. Ignoring any of them could weaken what the operator asked for.
_UNSUPPORTED = MappingProxyType(
    {
        "rate_limit": "not supported by bindscope",
        "cert": "inline certificates are not supported: use cert_file",
        "key": "inline keys are not supported: use key_file",
        "client_ca": "inline CAs are not supported: use client_ca_file",
        "cipher_suites": "not supported by bindscope (OpenSSL's defaults apply)",
        "curve_preferences": "not supported by bindscope (OpenSSL's defaults apply)",
        "client_allowed_sans": "not supported by bindscope",
    }
)

_BCRYPT_HASH = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# bcrypt reads 72 bytes of a password; htpasswd and Go hashed longer ones by truncating.
_BCRYPT_MAX_PASSWORD = 72
_AUTH_CACHE_SECONDS = 60.0
# Web configs are a few lines: anything bigger or deeper is a mistake or an attack, and
# PyYAML composes nested nodes recursively.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 16
_FAILED_CACHE = 4096  # failed credentials remembered per version, so a retry costs no bcrypt
_STR_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class WebConfigError(Exception):
    """A web config file the exporter cannot use; str() is the message for the user."""

    def __init__(
        self, file: str, field: str, message: str, line: int | None = None, col: int | None = None
    ) -> None:
        self.file, self.field, self.message, self.line, self.col = file, field, message, line, col
        where = file if line is None else f"{file}:{line}:{col}"
        super().__init__(": ".join(part for part in (where, field, message) if part))


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True


@dataclass(frozen=True)
class WebConfig:
    tls: TLSConfig | None
    users: Mapping[str, bytes]
    headers: Mapping[str, str]


_FileState = tuple[int, int, int, int] | None


def _file_state(path: str) -> _FileState:
    try:
        st = os.stat(path)
    except OSError:
        return None
    # The inode catches atomic renames (cert-manager, Kubernetes secret volumes), ctime
    # catches a rewrite that restored the old mtime.
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def load_web_config(path: str) -> WebConfig:
    """Read and check a web config file, including that its certificates and keys load."""
    return _load(path, {})[0]


def read_regular_file(path: str, limit: int = MAX_FILE_BYTES, encoding: str = "utf-8") -> str:
    """The text of a regular file of at most `limit` bytes; OSError or ValueError else.

    Opened without blocking, so a FIFO in its place is refused rather than waited on.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data.decode(encoding, errors="strict" if encoding == "utf-8" else "replace")


def _too_deep(text: str) -> bool:
    """Whether the YAML nests deeper than MAX_DEPTH, from its tokens: the scanner does not
    recurse. It stops at the first level too deep, as its cost grows with the depth."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(
            token,
            yaml.BlockMappingStartToken
            | yaml.BlockSequenceStartToken
            | yaml.FlowMappingStartToken
            | yaml.FlowSequenceStartToken,
        ):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif isinstance(
            token, yaml.BlockEndToken | yaml.FlowMappingEndToken | yaml.FlowSequenceEndToken
        ):
            depth -= 1
    return False


class _Parser:
    """Walks yaml.compose() nodes so each error carries the line and column it is about."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, node: Node | None, field: str, message: str) -> WebConfigError:
        if node is None:
            return WebConfigError(self.path, field, message)
        mark = node.start_mark
        return WebConfigError(self.path, field, message, mark.line + 1, mark.column + 1)

    def mapping(
        self, node: Node | None, field: str, known: tuple[str, ...]
    ) -> dict[str, tuple[Node, Node]]:
        """key -> (key node, value node); null is an empty mapping, as in exporter-toolkit."""
        if node is None or _is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            raise self.error(node, field, "expected a mapping")
        out: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = self.string(key_node, field)
            sub = f"{field}.{key}" if field else key
            if key in out:
                raise self.error(key_node, sub, "duplicate key")
            if known and key not in known:
                if key in _UNSUPPORTED:
                    raise self.error(key_node, sub, _UNSUPPORTED[key])
                raise self.error(
                    key_node, sub, f"unknown key (expected one of: {', '.join(known)})"
                )
            out[key] = (key_node, value_node)
        return out

    def string(self, node: Node, field: str) -> str:
        if not isinstance(node, ScalarNode) or node.tag not in _STR_TAGS:
            raise self.error(node, field, "expected a string")
        return str(node.value)

    def boolean(self, node: Node, field: str) -> bool:
        if not isinstance(node, ScalarNode) or node.tag != "tag:yaml.org,2002:bool":
            raise self.error(node, field, "expected true or false")
        return node.value.lower() in ("true", "yes", "on")

    def choice(self, node: Node, field: str, choices: Mapping[str, object]) -> str:
        value = self.string(node, field)
        if value not in choices:
            raise self.error(node, field, f"{value!r} is not one of {', '.join(choices)}")
        return value


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _load(
    path: str, touched: dict[str, _FileState]
) -> tuple[WebConfig, ssl.SSLContext | None, frozenset[str]]:
    """Parse and check the file. Each file read is recorded in touched with its state before
    the read, even on failure, so a watcher knows what to watch for a change or a fix."""
    touched[path] = _file_state(path)
    try:
        text = read_regular_file(path)
    except (OSError, ValueError) as e:
        raise WebConfigError(path, "", f"cannot read: {_reason(e)}") from e
    try:
        if _too_deep(text):
            raise WebConfigError(path, "", f"nested deeper than {MAX_DEPTH} levels")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise WebConfigError(path, "", f"invalid YAML: {e.problem}", line, col) from e
    except yaml.YAMLError as e:
        raise WebConfigError(path, "", f"invalid YAML: {e}") from e

    p = _Parser(path)
    top = p.mapping(root, "", _TOP_KEYS)
    base = os.path.dirname(os.path.abspath(path))
    tls, context = (None, None)
    if "tls_server_config" in top:
        tls, context = _tls(p, top["tls_server_config"][1], base, touched)
    users = _users(p, top["basic_auth_users"][1]) if "basic_auth_users" in top else {}
    headers = _headers(p, top["http_server_config"][1]) if "http_server_config" in top else {}
    config = WebConfig(tls, MappingProxyType(users), MappingProxyType(headers))
    return config, context, _off_sections(root, top)


def _off_sections(root: Node | None, top: dict[str, tuple[Node, Node]]) -> frozenset[str]:
    """The sections the file turns off in so many words: `key: {}`, or a file `{}`. A
    missing key, a key with no value or an empty file may be a file caught half-written,
    so they do not count."""
    if root is None or _is_null(root):
        return frozenset()
    if isinstance(root, MappingNode) and not root.value and root.flow_style:
        return frozenset(key for key, _ in _SECTIONS)  # the whole file is `{}`
    return frozenset(
        key
        for key, (_, node) in top.items()
        if isinstance(node, MappingNode) and not node.value and node.flow_style
    )


def _tls(
    p: _Parser, node: Node, base: str, touched: dict[str, _FileState]
) -> tuple[TLSConfig | None, ssl.SSLContext | None]:
    field = "tls_server_config"
    m = p.mapping(node, field, _TLS_KEYS)
    if not m:
        return None, None  # an empty section leaves TLS off, as in exporter-toolkit

    def file_of(key: str) -> str:
        if key not in m:
            raise p.error(node, f"{field}.{key}", "required when TLS is configured")
        value = p.string(m[key][1], f"{field}.{key}")
        if not value:
            raise p.error(m[key][1], f"{field}.{key}", "must not be empty")
        # Relative paths are relative to the web config file, as in exporter-toolkit.
        return os.path.join(base, value)

    cert_file, key_file = file_of("cert_file"), file_of("key_file")
    auth = "NoClientCert"
    if "client_auth_type" in m:
        auth_node = m["client_auth_type"][1]
        auth = p.string(auth_node, f"{field}.client_auth_type")
        if auth in _UNVERIFIED_CLIENT_AUTH:
            raise p.error(
                auth_node,
                f"{field}.client_auth_type",
                f"{auth} is not supported: a client certificate is only checked against "
                "client_ca_file; use RequireAndVerifyClientCert",
            )
        auth = p.choice(auth_node, f"{field}.client_auth_type", CLIENT_AUTH_TYPES)
    ca_file = file_of("client_ca_file") if "client_ca_file" in m else None
    if ca_file is None and CLIENT_AUTH_TYPES[auth] != ssl.CERT_NONE:
        raise p.error(node, f"{field}.client_ca_file", f"required with client_auth_type {auth}")
    if ca_file is not None and auth == "NoClientCert":
        raise p.error(
            m["client_ca_file"][1],
            f"{field}.client_ca_file",
            "set, but client_auth_type is NoClientCert: set client_auth_type to "
            "RequireAndVerifyClientCert",
        )
    versions = {"min_version": "TLS12", "max_version": "TLS13"}
    for key in versions:
        if key in m:
            versions[key] = p.choice(m[key][1], f"{field}.{key}", TLS_VERSIONS)
    if TLS_VERSIONS[versions["min_version"]] > TLS_VERSIONS[versions["max_version"]]:
        raise p.error(
            m["min_version"][1],
            f"{field}.min_version",
            f"{versions['min_version']} is above max_version {versions['max_version']}",
        )
    prefer = True
    if "prefer_server_cipher_suites" in m:
        prefer = p.boolean(
            m["prefer_server_cipher_suites"][1], f"{field}.prefer_server_cipher_suites"
        )
    tls = TLSConfig(
        cert_file, key_file, auth, ca_file, **versions, prefer_server_cipher_suites=prefer
    )

    def read(key: str, file: str) -> str:
        touched[file] = _file_state(file)
        try:
            return read_regular_file(file, encoding="ascii")
        except (OSError, ValueError) as e:
            raise p.error(m[key][1], f"{field}.{key}", f"cannot read {file}: {_reason(e)}") from e

    if "-----BEGIN CERTIFICATE-----" not in read("cert_file", cert_file):
        raise p.error(m["cert_file"][1], f"{field}.cert_file", f"no PEM certificate in {cert_file}")
    key_text = read("key_file", key_file)
    if "PRIVATE KEY-----" not in key_text:
        raise p.error(m["key_file"][1], f"{field}.key_file", f"no PEM private key in {key_file}")
    if "ENCRYPTED" in key_text:
        raise p.error(m["key_file"][1], f"{field}.key_file", "encrypted keys are not supported")
    if ca_file is not None and "-----BEGIN CERTIFICATE-----" not in read("client_ca_file", ca_file):
        raise p.error(
            m["client_ca_file"][1], f"{field}.client_ca_file", f"no PEM certificate in {ca_file}"
        )
    try:
        context = _ssl_context(tls)
    except ssl.SSLError as e:
        raise p.error(node, field, f"certificate, key or CA does not load: {_reason(e)}") from e
    return tls, context


def _ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.maximum_version = TLS_VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(tls.cert_file, tls.key_file)
    context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
    if tls.client_ca_file is not None and context.verify_mode != ssl.CERT_NONE:
        context.load_verify_locations(cafile=tls.client_ca_file)
    return context


def _users(p: _Parser, node: Node) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for name, (_, value_node) in p.mapping(node, "basic_auth_users", ()).items():
        field = f"basic_auth_users.{name}"
        hashed = p.string(value_node, field).encode()
        # The hash itself stays out of the message: it is a secret in exporter-toolkit.
        if not _BCRYPT_HASH.fullmatch(hashed):
            raise p.error(
                value_node, field, "not a bcrypt hash (expected $2a$, $2b$ or $2y$, cost 04-31)"
            )
        users[name] = hashed
    return users


def _headers(p: _Parser, node: Node) -> dict[str, str]:
    http = p.mapping(node, "http_server_config", _HTTP_KEYS)
    if "http2" in http:
        # The server speaks HTTP/1.1 only; http2 is accepted so toolkit files load unchanged.
        p.boolean(http["http2"][1], "http_server_config.http2")
    if "headers" not in http:
        return {}
    headers: dict[str, str] = {}
    for name, (key_node, value_node) in p.mapping(
        http["headers"][1], "http_server_config.headers", ()
    ).items():
        field = f"http_server_config.headers.{name}"
        if name not in ALLOWED_HEADERS:
            raise p.error(key_node, field, f"cannot be set (allowed: {', '.join(ALLOWED_HEADERS)})")
        value = p.string(value_node, field)
        allowed = ALLOWED_HEADERS[name]
        if allowed and value not in allowed:
            raise p.error(value_node, field, f"{value!r} is not one of {', '.join(allowed)}")
        if value:  # blank means unset in exporter-toolkit
            headers[name] = value
    return headers


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def parse_basic_auth(header: str | None) -> tuple[str, bytes] | None:
    """(user, password) from an Authorization header, or None if it is not valid Basic auth."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
        user, sep, password = decoded.partition(b":")
        if not sep:
            return None
        return user.decode("utf-8"), password
    except ValueError:  # bad base64, non-ASCII bytes, bad UTF-8
        return None


@dataclass(frozen=True)
class _Version:
    """One loaded config with everything derived from it, swapped as a whole."""

    config: WebConfig
    context: ssl.SSLContext | None
    files: tuple[str, ...]
    dummy_hash: bytes
    cache_key: bytes
    # user -> (HMAC of the accepted password under cache_key, expiry): never the password.
    auth_cache: dict[str, tuple[bytes, float]]
    # HMACs of credentials that failed, oldest first: a retry is refused without bcrypt.
    failed: dict[bytes, None]


_SECTIONS = (("tls_server_config", "TLS"), ("basic_auth_users", "basic auth"))


class WebConfigWatcher:
    """The web config as it is now: TLS context, users and headers for each request.

    The server wraps each accepted connection with `ssl_context()` (the context current
    at accept time), and every request passes `check_cached()` (on the event loop) and,
    when that cannot tell, `verify()` (bcrypt, in a thread), and sends `headers()`. None of
    them reads a file: `refresh()` does, from the thread `start()` runs, or from a test.
    `path=None` means plain HTTP and no auth. A file broken at start raises
    WebConfigError (the exporter exits 2); one broken later is logged once, counted in
    `errors` once per change (bindscope_web_config_reload_errors_total), and the last
    good config stays in force. So does it when a change would turn TLS or basic auth
    off, unless the file says `tls_server_config: {}` or `basic_auth_users: {}`.
    """

    def __init__(
        self,
        path: str | None,
        *,
        cache_seconds: float = _AUTH_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.errors = 0
        self.last_error: str | None = None
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._reload_lock = threading.Lock()
        # bcrypt is slow on purpose: one at a time, so a flood of wrong passwords takes one
        # core, not all (exporter-toolkit serialises it the same way).
        self._bcrypt_lock = threading.Lock()
        self._version: _Version | None = None
        self._stop = threading.Event()
        # The files whose change triggers a reload (the last good config's and those a
        # failed attempt read, so a fix to either is noticed), and their states when read.
        self._seen: dict[str, _FileState] = {}
        if path is not None:
            touched: dict[str, _FileState] = {}
            self._version = self._build(path, touched)[0]
            self._seen = touched

    def _build(self, path: str, touched: dict[str, _FileState]) -> tuple[_Version, frozenset[str]]:
        config, context, off = _load(path, touched)
        costs = [int(h.split(b"$")[2]) for h in config.users.values()]
        # Unknown users are checked against this, at the users' cost, so timing does not
        # tell which user names exist.
        dummy = bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(max(costs))) if costs else b""
        version = _Version(config, context, tuple(touched), dummy, os.urandom(32), {}, {})
        return version, off

    def _changed(self) -> bool:
        return any(_file_state(f) != state for f, state in self._seen.items())

    def start(self, interval: float = 1.0) -> None:
        """Watch the files from a thread of its own: a slow or hostile file (huge, a FIFO,
        an expensive bcrypt cost) then delays no connection."""
        if self.path is None:
            return

        def watch() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except Exception:  # a bug in one reload must not stop every later one
                    log.exception("web config reload failed")

        threading.Thread(target=watch, name="web-config", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        """Reload if a file changed; on any error keep the config in force and count it."""
        if self.path is None or not self._changed():
            return
        with self._reload_lock:
            if not self._changed():
                return
            good = self._version
            assert good is not None
            touched: dict[str, _FileState] = {}
            try:
                new, off = self._build(self.path, touched)
                _check_downgrade(self.path, good.config, new.config, off)
            except WebConfigError as e:
                self._seen = {f: _file_state(f) for f in good.files} | touched
                self.errors += 1
                if str(e) != self.last_error:
                    log.error("web config not reloaded, keeping the last good one: %s", e)
                self.last_error = str(e)
                return
            self._version, self._seen, self.last_error = new, touched, None
            log.info("web config reloaded from %s", self.path)

    def current(self) -> WebConfig | None:
        """The config in force; None when serving plain HTTP without auth."""
        return self._version.config if self._version else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the config in force, built once per version; None: plain HTTP."""
        return self._version.context if self._version else None

    def headers(self) -> dict[str, str]:
        """Extra response headers of the config in force (http_server_config.headers)."""
        return dict(self._version.config.headers) if self._version else {}

    def authorize(self, authorization_header: str | None) -> bool:
        """True if the request may proceed: no users configured, or valid Basic credentials."""
        cached = self.check_cached(authorization_header)
        return cached if cached is not None else self.verify(authorization_header)

    def check_cached(self, authorization_header: str | None) -> bool | None:
        """The answer when it needs no bcrypt check: no users, malformed or remembered
        credentials; None when only verify() can tell."""
        asked = self._asked(authorization_header)
        if isinstance(asked, bool):
            return asked
        version, user, _, digest = asked
        if digest in version.failed:
            return False
        cached = version.auth_cache.get(user)
        if cached and cached[1] > self._clock() and hmac.compare_digest(cached[0], digest):
            return True
        return None

    def _asked(self, header: str | None) -> bool | tuple[_Version, str, bytes, bytes]:
        """True with no users, False for malformed credentials; else what to check them
        by: the config in force, the user, the password and its keyed digest."""
        version = self._version
        if version is None or not version.config.users:
            return True
        credentials = parse_basic_auth(header)
        if credentials is None:
            return False
        user, password = credentials
        return version, user, password, _digest(version, user, password)

    def verify(self, authorization_header: str | None) -> bool:
        """The bcrypt check, remembered either way; slow on purpose, so not on the loop."""
        asked = self._asked(authorization_header)
        if isinstance(asked, bool):
            return asked
        version, user, password, digest = asked
        stored = version.config.users.get(user)
        with self._bcrypt_lock:
            try:
                matches = bcrypt.checkpw(
                    password[:_BCRYPT_MAX_PASSWORD], stored or version.dummy_hash
                )
            except ValueError:
                matches = False
        if stored is None or not matches:
            version.failed[digest] = None
            if len(version.failed) > _FAILED_CACHE:
                del version.failed[next(iter(version.failed))]
            return False
        version.auth_cache[user] = (digest, self._clock() + self._cache_seconds)
        return True


def _digest(version: _Version, user: str, password: bytes) -> bytes:
    message = user.encode() + b"\0" + password[:_BCRYPT_MAX_PASSWORD]
    return hmac.new(version.cache_key, message, hashlib.sha256).digest()


def _check_downgrade(path: str, old: WebConfig, new: WebConfig, off: frozenset[str]) -> None:
    """Refuse a change that turns TLS or basic auth off unless the file says so in full:
    a file emptied or caught half-written must not open the endpoint to anyone."""
    for key, what in _SECTIONS:
        was_on = bool(old.tls) if key == "tls_server_config" else bool(old.users)
        now_on = bool(new.tls) if key == "tls_server_config" else bool(new.users)
        if was_on and not now_on and key not in off:
            raise WebConfigError(
                path,
                key,
                f"would turn {what} off; the file may be half-written. To turn it off, "
                f"write `{key}: {{}}`",
            )
