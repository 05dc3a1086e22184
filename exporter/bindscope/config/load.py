"""The YAML config: parsed into frozen dataclasses, every mistake reported with file:line:col.

The file is composed into YAML nodes (not Python objects) so each value keeps its position.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from bindscope.model import HOST_NETNS, Exposure, Listener, Protocol, ServiceSpec

_T = TypeVar("_T")

DEFAULT_SOURCE = "<embedded default>"
# Prometheus' duration grammar: units in descending order, each at most once.
_DURATION_RE = re.compile(
    r"(?:([0-9]+)y)?(?:([0-9]+)w)?(?:([0-9]+)d)?(?:([0-9]+)h)?"
    r"(?:([0-9]+)m)?(?:([0-9]+)s)?(?:([0-9]+)ms)?"
)
_DURATION_UNITS_MS = (365 * 86_400_000, 7 * 86_400_000, 86_400_000, 3_600_000, 60_000, 1000, 1)
_MAX_DURATION_MS = 2**63 - 1  # Prometheus stores durations as int64 milliseconds
# Label-safe and readable in Grafana; "bindscope" is the exporter's own listener.
SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}")
RESERVED_SERVICE_NAME = "bindscope"
# A netns is an `ip netns` name (a file under /run/netns), "host" or "netns:INODE".
_NETNS_RE = re.compile(r"[^/\s]+")
_ZONE_RE = re.compile(r"[^%/\s]+")  # an interface name or index
# Far beyond any useful value, and far below what a thread can sleep (threading.TIMEOUT_MAX).
MAX_SCAN_INTERVAL = 86_400.0
MAX_PROBE_TIMEOUT = 60.0
# A peer is a bindscope exporter: an IP address or a DNS name, and a port.
_HOSTNAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?")
MAX_PEERS = 1000  # targets from the config and every file_sd file together

_YAML_TAG = "tag:yaml.org,2002:"
_TAG_NAMES = {
    "str": "string",
    "int": "integer",
    "float": "float",
    "bool": "boolean",
    "timestamp": "timestamp",
    "binary": "binary",
}
# YAML 1.2's booleans; YAML 1.1 also reads yes/no/on/off as booleans, a classic trap.
_BOOLEANS = {
    "true": True,
    "True": True,
    "TRUE": True,
    "false": False,
    "False": False,
    "FALSE": False,
}


@dataclass(frozen=True)
class ProbeConfig:
    enabled: bool = True
    timeout: float = 1.0
    addresses: tuple[str, ...] | None = None  # None: every address of the host ("auto")


@dataclass(frozen=True)
class IgnoreRule:
    """An undeclared listener not to report; every field given must match."""

    port: int | None = None
    protocol: Protocol | None = None
    address: str | None = None  # normalized, without zone
    process: re.Pattern[str] | None = None
    netns: str | None = None
    container: re.Pattern[str] | None = None

    def matches(self, listener: Listener) -> bool:
        s = listener.socket
        if self.port is not None and s.port != self.port:
            return False
        if self.protocol is not None and s.protocol is not self.protocol:
            return False
        if self.address is not None and _normalize_address(s.address) != self.address:
            return False
        if self.netns is not None and s.netns != self.netns:
            return False
        # An unattributed socket is reported rather than hidden by a name it may not have.
        if self.process is not None and not (
            listener.process.known and self.process.search(listener.process.name)
        ):
            return False
        # A container rule never matches the host, even with a pattern that matches "".
        return self.container is None or bool(s.container and self.container.search(s.container))


@dataclass(frozen=True)
class UnexpectedConfig:
    report: bool = True
    ignore: tuple[IgnoreRule, ...] = ()


@dataclass(frozen=True)
class TLSConfig:
    """How this host checks a peer's certificate and proves its own (exporter-toolkit names)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password_file: str  # read at each round, so a rotated password applies at once


@dataclass(frozen=True)
class PeersConfig:
    """Other bindscope exporters this host fetches and probes."""

    targets: tuple[str, ...] = ()  # host:port, as Prometheus names the instance
    file_sd: tuple[str, ...] = ()  # Prometheus file_sd files (a * in the file name globs)
    interval: float = 60.0
    timeout: float = 1.0
    scheme: str = "http"
    tls_config: TLSConfig = TLSConfig()
    basic_auth: BasicAuth | None = None


@dataclass(frozen=True)
class Config:
    scan_interval: float = 15.0
    probe: ProbeConfig = ProbeConfig()
    unexpected: UnexpectedConfig = UnexpectedConfig()
    services: tuple[ServiceSpec, ...] = ()
    peers: PeersConfig | None = None  # None: no peers watched
    source: str = DEFAULT_SOURCE


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int  # 1-based; 0 when the file could not be read
    column: int
    path: str  # services[2].port; empty for the whole file
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.column}: {where}{self.message}"


class ConfigError(Exception):
    """A config that cannot be used; str() is the message for the user, one issue a line."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(i) for i in self.issues)


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration (500ms, 15s, 1h30m); must be greater than zero."""
    # The length bound keeps int() far from its digit limit; no real duration comes close.
    m = _DURATION_RE.fullmatch(text) if len(text) <= 64 else None
    if not text or m is None:
        raise ValueError(f"{_quote(text)} is not a duration (like 500ms, 15s, 1m)")
    ms = sum(int(g) * unit for g, unit in zip(m.groups(), _DURATION_UNITS_MS, strict=True) if g)
    if ms == 0:
        raise ValueError(f"{_quote(text)} is not a duration greater than zero")
    if ms > _MAX_DURATION_MS:
        raise ValueError(f"{_quote(text)} is too long a duration")
    return ms / 1000


def parse_config(text: str, filename: str) -> Config:
    """The config in `text`; raises ConfigError listing every issue found."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = e.problem or e.context or "malformed document"
        if e.context and problem.startswith("but "):
            # The composer splits one sentence: "expected a single document", "but found ...".
            problem = f"{e.context}, {problem}"
        raise ConfigError([ConfigIssue(filename, line, col, "", f"invalid YAML: {problem}")]) from e
    except yaml.reader.ReaderError as e:
        line, col = _line_col(text, e.position)
        code = e.character if isinstance(e.character, int) else ord(e.character)
        msg = f"invalid YAML: unacceptable character #x{code:04x}: {e.reason}"
        raise ConfigError([ConfigIssue(filename, line, col, "", msg)]) from e
    except yaml.YAMLError as e:
        raise ConfigError([ConfigIssue(filename, 1, 1, "", f"invalid YAML: {e}")]) from e
    except RecursionError as e:
        msg = "invalid YAML: nested too deeply"
        raise ConfigError([ConfigIssue(filename, 1, 1, "", msg)]) from e
    if root is None or _is_null(root):
        # No document, or only comments: the embedded default, as if no file were given.
        return dataclasses.replace(default_config(), source=filename)
    walker = _Walker(filename)
    config = walker.config(root)
    if walker.issues:
        raise ConfigError(sorted(walker.issues, key=lambda i: (i.line, i.column)))
    return dataclasses.replace(config, source=filename)


def load_config(path: str | os.PathLike[str]) -> Config:
    """The config in the file at `path`; raises ConfigError when unreadable or invalid."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError([ConfigIssue(name, 0, 0, "", f"cannot read: {reason}")]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([ConfigIssue(name, 0, 0, "", f"cannot read: {e}")]) from e
    return parse_config(text, name)


@functools.cache
def default_config() -> Config:
    """The config shipped as package data, used when no file is given."""
    text = resources.files("bindscope.config").joinpath("default.yml").read_text(encoding="utf-8")
    return parse_config(text, DEFAULT_SOURCE)


def _normalize_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _shorten(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def _quote(text: str) -> str:
    return json.dumps(_shorten(text), ensure_ascii=False)


def _line_col(text: str, index: int) -> tuple[int, int]:
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _YAML_TAG + "null"


def _scalar_kind(node: Node) -> str | None:
    """str, int, bool, ... for a scalar of a standard YAML type; None otherwise."""
    if isinstance(node, ScalarNode) and node.tag.startswith(_YAML_TAG):
        return node.tag[len(_YAML_TAG) :]
    return None


def _describe(node: Node) -> str:
    """The node as an error message names it: `string "80"`, `a list`."""
    if isinstance(node, MappingNode):
        return "a mapping" if node.tag == _YAML_TAG + "map" else f"a mapping tagged {node.tag}"
    if isinstance(node, SequenceNode):
        return "a list" if node.tag == _YAML_TAG + "seq" else f"a list tagged {node.tag}"
    kind = _scalar_kind(node)
    if kind == "null":
        return "null"
    if kind == "str":
        return f"string {_quote(node.value)}"
    if kind in _TAG_NAMES:
        return f"{_TAG_NAMES[kind]} {_shorten(node.value)}"
    return f"a value tagged {node.tag}"


class _Invalid(Exception):
    """One value is wrong; carries the message, the walker adds where."""


@dataclass(frozen=True)
class _Field:
    parse: Callable[[Node], Any] | None  # None: a section the walker descends into itself
    required: bool = False


_SECTION = _Field(None)


class _Walker:
    """Walks the node tree once, collecting issues instead of stopping at the first."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.issues: list[ConfigIssue] = []

    def issue(self, node: Node, path: str, message: str) -> None:
        mark = node.start_mark
        self.issues.append(
            ConfigIssue(self.filename, mark.line + 1, mark.column + 1, path, message)
        )

    def value(self, node: Node, path: str, parse: Callable[[Node], _T]) -> _T | None:
        try:
            return parse(node)
        except _Invalid as e:
            self.issue(node, path, str(e))
            return None

    def mapping(
        self, node: Node, path: str, fields: dict[str, _Field]
    ) -> dict[str, tuple[Node, Any]] | None:
        """Each known key's value node and parsed value (None when invalid or absent)."""
        if not (isinstance(node, MappingNode) and node.tag == _YAML_TAG + "map"):
            self.issue(node, path, f"expected a mapping, got {_describe(node)}")
            return None
        seen: dict[str, Node] = {}
        out: dict[str, tuple[Node, Any]] = {}
        expected = ", ".join(sorted(fields))
        merged = False
        for key, value in node.value:
            if _scalar_kind(key) == "merge":
                self.issue(key, path, "merge keys (<<) are not supported")
                merged = True
                continue
            if not isinstance(key, ScalarNode):
                self.issue(key, path, f"keys must be strings, got {_describe(key)}")
                continue
            sub = f"{path}.{key.value}" if path else key.value
            if key.value in seen:
                first = seen[key.value].start_mark.line + 1
                self.issue(key, sub, f"duplicate key (first at line {first})")
                continue
            seen[key.value] = key
            field = fields.get(key.value) if _scalar_kind(key) == "str" else None
            if field is None:
                self.issue(key, sub, f"unknown key (expected one of: {expected})")
                continue
            parsed = self.value(value, sub, field.parse) if field.parse else None
            out[key.value] = (value, parsed)
        for name, field in fields.items():
            # Keys that a merge would have brought are not missing: the merge is the mistake.
            if field.required and name not in seen and not merged:
                self.issue(node, path, f'missing required key "{name}"')
        return out

    def sequence(self, node: Node, path: str, item: Callable[[Node, str], _T | None]) -> list[_T]:
        """The valid items; an invalid one has been reported and is left out."""
        if not (isinstance(node, SequenceNode) and node.tag == _YAML_TAG + "seq"):
            self.issue(node, path, f"expected a list, got {_describe(node)}")
            return []
        items = (item(child, f"{path}[{i}]") for i, child in enumerate(node.value))
        return [x for x in items if x is not None]

    # --- the document ---

    def config(self, root: Node) -> Config:
        fields = {
            "scan_interval": _Field(_duration_field(MAX_SCAN_INTERVAL, "1d")),
            "probe": _SECTION,
            "unexpected": _SECTION,
            "services": _SECTION,
            "peers": _SECTION,
        }
        if not isinstance(root, MappingNode):
            self.issue(root, "", f"expected a mapping at the top level, got {_describe(root)}")
            return Config()
        got = self.mapping(root, "", fields) or {}
        config = Config()
        if (v := got.get("scan_interval")) and v[1] is not None:
            config = dataclasses.replace(config, scan_interval=v[1])
        if "probe" in got and not _is_null(got["probe"][0]):
            config = dataclasses.replace(config, probe=self.probe(got["probe"][0]))
        if "unexpected" in got and not _is_null(got["unexpected"][0]):
            config = dataclasses.replace(config, unexpected=self.unexpected(got["unexpected"][0]))
        if "services" in got and not _is_null(got["services"][0]):
            config = dataclasses.replace(config, services=self.services(got["services"][0]))
        if "peers" in got and not _is_null(got["peers"][0]):
            config = dataclasses.replace(config, peers=self.peers(got["peers"][0]))
        return config

    def peers(self, node: Node) -> PeersConfig | None:
        fields = {
            "targets": _SECTION,
            "file_sd": _SECTION,
            "interval": _Field(_duration_field(MAX_SCAN_INTERVAL, "1d")),
            "timeout": _Field(_duration_field(MAX_PROBE_TIMEOUT, "1m")),
            "scheme": _Field(lambda n: _choice(n, ["http", "https"])),
            "tls_config": _SECTION,
            "basic_auth": _SECTION,
        }
        before = len(self.issues)
        got = self.mapping(node, "peers", fields)
        if got is None:
            return None
        kwargs: dict[str, Any] = {
            k: v for k, (_, v) in got.items() if v is not None and fields[k].parse is not None
        }
        if "targets" in got:
            kwargs["targets"] = self.peer_targets(got["targets"][0])
        if "file_sd" in got:
            kwargs["file_sd"] = self.file_sd(got["file_sd"][0])
        if "tls_config" in got:
            kwargs["tls_config"] = self.tls_config(got["tls_config"][0])
        if "basic_auth" in got:
            kwargs["basic_auth"] = self.basic_auth(got["basic_auth"][0])
        peers = PeersConfig(**kwargs)
        if not peers.targets and not peers.file_sd and len(self.issues) == before:
            self.issue(node, "peers", "peers needs targets or file_sd (or leave peers out)")
        if "timeout" in got and "interval" in got and peers.timeout > peers.interval:
            self.issue(
                got["timeout"][0], "peers.timeout", "a round's timeout must not exceed its interval"
            )
        if "tls_config" in got and peers.scheme != "https":
            self.issue(got["tls_config"][0], "peers.tls_config", 'tls_config needs scheme "https"')
        return peers if len(self.issues) == before else None

    def peer_targets(self, node: Node) -> tuple[str, ...]:
        first_at: dict[str, int] = {}

        def target(child: Node, path: str) -> str | None:
            text = self.value(child, path, _peer_target)
            if text is None:
                return None
            if text in first_at:
                self.issue(child, path, f"duplicate target {text} (first at line {first_at[text]})")
                return None
            first_at[text] = child.start_mark.line + 1
            return text

        targets = tuple(self.sequence(node, "peers.targets", target))
        if len(targets) > MAX_PEERS:
            self.issue(node, "peers.targets", f"{len(targets)} targets; at most {MAX_PEERS}")
        return targets

    def file_sd(self, node: Node) -> tuple[str, ...]:
        if _scalar_kind(node) == "str":
            paths = [self.value(node, "peers.file_sd", _path)]
        else:
            paths = self.sequence(
                node, "peers.file_sd", lambda child, path: self.value(child, path, _path)
            )
        return tuple(p for p in paths if p is not None)

    def tls_config(self, node: Node) -> TLSConfig:
        fields = {
            "ca_file": _Field(_path),
            "cert_file": _Field(_path),
            "key_file": _Field(_path),
            "server_name": _Field(_string),
            "insecure_skip_verify": _Field(_boolean),
        }
        got = self.mapping(node, "peers.tls_config", fields) or {}
        if ("cert_file" in got) != ("key_file" in got):
            missing = "key_file" if "cert_file" in got else "cert_file"
            msg = f"cert_file and key_file go together: add {missing}"
            self.issue(node, "peers.tls_config", msg)
        return TLSConfig(**{k: v for k, (_, v) in got.items() if v is not None})

    def basic_auth(self, node: Node) -> BasicAuth | None:
        fields = {
            "username": _Field(_string, required=True),
            "password_file": _Field(_path, required=True),
        }
        got = self.mapping(node, "peers.basic_auth", fields)
        if got is None or len(got) < 2 or any(v is None for _, v in got.values()):
            return None
        return BasicAuth(**{k: v for k, (_, v) in got.items()})

    def probe(self, node: Node) -> ProbeConfig:
        fields = {
            "enabled": _Field(_boolean),
            "timeout": _Field(_duration_field(MAX_PROBE_TIMEOUT, "1m")),
            "addresses": _SECTION,
        }
        got = self.mapping(node, "probe", fields) or {}
        kwargs = {k: v for k, (_, v) in got.items() if v is not None and k != "addresses"}
        probe = ProbeConfig(**kwargs)
        if "addresses" in got:
            addresses = self.addresses(got["addresses"][0])
            if addresses is not None:
                probe = dataclasses.replace(probe, addresses=addresses)
        return probe

    def addresses(self, node: Node) -> tuple[str, ...] | None:
        path = "probe.addresses"
        if _scalar_kind(node) == "str" and node.value == "auto":
            return None
        if not (isinstance(node, SequenceNode) and node.tag == _YAML_TAG + "seq"):
            self.issue(
                node, path, f'expected "auto" or a list of IP addresses, got {_describe(node)}'
            )
            return None
        if not node.value:
            self.issue(node, path, 'an empty list probes nothing (use "enabled: false")')
            return None
        first_at: dict[str, int] = {}
        out: list[str] = []
        for i, child in enumerate(node.value):
            address = self.value(child, f"{path}[{i}]", _probe_address)
            if address is None:
                continue
            if address in first_at:
                msg = f"duplicate address {address} (first at line {first_at[address]})"
                self.issue(child, f"{path}[{i}]", msg)
                continue
            first_at[address] = child.start_mark.line + 1
            out.append(address)
        return tuple(out)

    def unexpected(self, node: Node) -> UnexpectedConfig:
        fields = {"report": _Field(_boolean), "ignore": _SECTION}
        got = self.mapping(node, "unexpected", fields) or {}
        result = UnexpectedConfig()
        if (v := got.get("report")) and v[1] is not None:
            result = dataclasses.replace(result, report=v[1])
        if "ignore" in got and not _is_null(got["ignore"][0]):
            rules = self.sequence(got["ignore"][0], "unexpected.ignore", self.ignore_rule)
            result = dataclasses.replace(result, ignore=tuple(rules))
        return result

    def ignore_rule(self, node: Node, path: str) -> IgnoreRule | None:
        got = self.mapping(node, path, _IGNORE_FIELDS)
        if got is None:
            return None
        if not got and not node.value:
            # An empty rule would match every listener and silently turn reporting off.
            self.issue(
                node, path, f"an ignore rule needs at least one of: {', '.join(_IGNORE_FIELDS)}"
            )
            return None
        if any(v is None for _, v in got.values()):
            return None
        return IgnoreRule(**{k: v for k, (_, v) in got.items()})

    def services(self, node: Node) -> tuple[ServiceSpec, ...]:
        name_lines: dict[str, int] = {}
        places: dict[tuple[int, Protocol, str], tuple[str, int]] = {}

        def service(child: Node, path: str) -> ServiceSpec | None:
            before = len(self.issues)
            got = self.mapping(child, path, _SERVICE_FIELDS)
            if got is None:
                return None
            values = {k: v for k, (_, v) in got.items()}
            if "netns" in got and "container" in got:
                msg = "netns and container are mutually exclusive (a container has its own netns)"
                self.issue(got["container"][0], f"{path}.container", msg)
            # Uniqueness is checked on whatever parsed, so one bad field hides no duplicate.
            if (name := values.get("name")) is not None:
                name_node = got["name"][0]
                if name in name_lines:
                    msg = f'duplicate service name "{name}" (first at line {name_lines[name]})'
                    self.issue(name_node, f"{path}.name", msg)
                else:
                    name_lines[name] = name_node.start_mark.line + 1
            located = all(values[k] is not None for k in ("netns", "container") if k in got)
            where = _location(values.get("netns"), values.get("container")) if located else None
            port, protocol = values.get("port"), values.get("protocol", Protocol.TCP)
            if port is not None and protocol is not None and where is not None:
                port_node = got["port"][0]
                if (port, protocol, where) in places:
                    other, line = places[(port, protocol, where)]
                    msg = (
                        f"{port}/{protocol.value} in {where} is already declared "
                        f'by "{other}" (line {line})'
                    )
                    self.issue(port_node, f"{path}.port", msg)
                elif name is not None:
                    places[(port, protocol, where)] = (name, port_node.start_mark.line + 1)
            if len(self.issues) > before:
                return None
            return ServiceSpec(**values)

        return tuple(self.sequence(node, "services", service))


def _location(netns: str | None, container: re.Pattern[str] | None) -> str:
    """Where a service is judged, as a message names it."""
    if container is not None:
        return f"container {_quote(container.pattern)}"
    return f"netns {netns or HOST_NETNS}"


# --- value parsers: node -> value, or _Invalid with the message ---


def _string(node: Node) -> str:
    if _scalar_kind(node) != "str":
        raise _Invalid(f"expected a string, got {_describe(node)}")
    return node.value


def _boolean(node: Node) -> bool:
    if _scalar_kind(node) == "bool" and node.value in _BOOLEANS:
        return _BOOLEANS[node.value]
    raise _Invalid(f"expected a boolean (true or false), got {_describe(node)}")


def _integer(node: Node) -> int:
    if _scalar_kind(node) == "int":
        try:
            return int(yaml.constructor.SafeConstructor().construct_yaml_int(node))
        except ValueError:
            pass  # an explicit !!int on something that is not a number
    raise _Invalid(f"expected an integer, got {_describe(node)}")


def _port(node: Node) -> int:
    port = _integer(node)
    if not 1 <= port <= 65535:
        raise _Invalid(f"{port} is not a port (1-65535)")
    return port


def _choice(node: Node, choices: list[str]) -> str:
    if _scalar_kind(node) == "str" and node.value in choices:
        return node.value
    raise _Invalid(f"expected one of: {', '.join(choices)}, got {_describe(node)}")


def _protocol(node: Node) -> Protocol:
    return Protocol(_choice(node, [p.value for p in Protocol]))


def _expose(node: Node) -> Exposure:
    return Exposure(_choice(node, [e.value for e in Exposure if e is not Exposure.NONE]))


def _duration_field(maximum: float, maximum_text: str) -> Callable[[Node], float]:
    def parse(node: Node) -> float:
        if _scalar_kind(node) != "str":
            raise _Invalid(f"expected a duration like 15s, got {_describe(node)}")
        try:
            seconds = parse_duration(node.value)
        except ValueError as e:
            raise _Invalid(str(e)) from None
        if seconds > maximum:
            raise _Invalid(f"{_quote(node.value)} is longer than the maximum {maximum_text}")
        return seconds

    return parse


def _regex(node: Node) -> re.Pattern[str]:
    text = _string(node)
    if not text:
        raise _Invalid("expected a regular expression, got an empty string")
    try:
        return re.compile(text)
    except (re.error, OverflowError, RecursionError) as e:
        # re.compile raises the latter two for huge repeat counts and deep nesting.
        raise _Invalid(f"invalid regular expression: {e}") from None


def _netns(node: Node) -> str:
    text = _string(node)
    if not _NETNS_RE.fullmatch(text):
        raise _Invalid(f"{_quote(text)} is not a network namespace name")
    return text


def _service_name(node: Node) -> str:
    text = _string(node)
    if not SERVICE_NAME_RE.fullmatch(text):
        raise _Invalid(
            f"{_quote(text)} is not a service name (letters, digits, _ . : -; "
            "not starting with . : -; at most 64 characters)"
        )
    if text == RESERVED_SERVICE_NAME:
        raise _Invalid(f'"{text}" is reserved for the exporter\'s own listener')
    return text


def _path(node: Node) -> str:
    text = _string(node)
    if not text:
        raise _Invalid("expected a file path, got an empty string")
    return text


def split_target(text: str) -> tuple[str, int]:
    """`198.51.100.1:9917`, `[2001:db8::1]:9917`, `host.example:9917` -> (host, port).

    The host comes back without brackets; ValueError says what is wrong.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or len(port_text) > 5 or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{_quote(text)} is not HOST:PORT (a port is 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{_quote(text)}: {_quote(host)} is not an IPv6 address") from None
        return host[1:-1], int(port_text)
    if ":" in host:
        raise ValueError(f"{_quote(text)}: write IPv6 addresses in brackets, [2001:db8::1]:9917")
    if not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{_quote(text)}: {_quote(host)} is neither an IP address nor a host name")
    return host, int(port_text)


def _peer_target(node: Node) -> str:
    text = _string(node)
    try:
        split_target(text)
    except ValueError as e:
        raise _Invalid(str(e)) from None
    return text


def _ip(node: Node) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    text = _string(node)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _Invalid(f"{_quote(text)} is not an IP address") from None


def _probe_address(node: Node) -> str:
    address = _ip(node)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        if not address.is_link_local:
            raise _Invalid(f"{_quote(node.value)}: only link-local IPv6 addresses take a %zone")
        if not _ZONE_RE.fullmatch(address.scope_id):
            raise _Invalid(f"{_quote(node.value)}: the %zone must be an interface name")
    elif isinstance(address, ipaddress.IPv6Address) and address.is_link_local:
        raise _Invalid(f"{_quote(node.value)}: a link-local IPv6 address needs a %zone")
    return str(address)


def _ignore_address(node: Node) -> str:
    address = _ip(node)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        # Listeners carry their bind address without a zone, so a zone could never match.
        raise _Invalid(f"{_quote(node.value)}: write the address without its %zone")
    return str(address)


_SERVICE_FIELDS = {
    "name": _Field(_service_name, required=True),
    "port": _Field(_port, required=True),
    "protocol": _Field(_protocol),
    "expose": _Field(_expose, required=True),
    "process": _Field(_regex),
    "netns": _Field(_netns),
    "container": _Field(_regex),
}

_IGNORE_FIELDS = {
    "port": _Field(_port),
    "protocol": _Field(_protocol),
    "address": _Field(_ignore_address),
    "process": _Field(_regex),
    "netns": _Field(_netns),
    "container": _Field(_regex),
}
