"""The data every stage passes on: enums used as label values and frozen records.

Data flows one way: config -> discover -> classify -> judge -> probe -> scan -> collector.
Each vocabulary (statuses and their severity, error sources, namespace kinds) is defined
here once; every module, the mixin included, imports it rather than spelling it.
Every record is immutable so a finished scan can be shared with scrapes without locks.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

HOST_NETNS = "host"
UNKNOWN_PROCESS = "unknown"


class Protocol(enum.Enum):
    TCP = "tcp"
    UDP = "udp"


class Scope(enum.Enum):
    """What the bind address alone says."""

    LOOPBACK = "loopback"
    LINK_LOCAL = "link_local"
    PRIVATE = "private"
    PUBLIC = "public"
    WILDCARD = "wildcard"


class Exposure(enum.Enum):
    """Who can reach a socket, ordered from nobody to everybody."""

    NONE = "none"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    PUBLIC = "public"

    @property
    def rank(self) -> int:
        return _EXPOSURE_RANK[self]

    def __lt__(self, other: Exposure) -> bool:
        return self.rank < other.rank

    def __le__(self, other: Exposure) -> bool:
        return self.rank <= other.rank

    def __gt__(self, other: Exposure) -> bool:
        return self.rank > other.rank

    def __ge__(self, other: Exposure) -> bool:
        return self.rank >= other.rank


_EXPOSURE_RANK = {e: i for i, e in enumerate(Exposure)}


class Status(enum.Enum):
    """The one verdict a declared service gets (the order is the label order)."""

    OK = "ok"
    NOT_LISTENING = "not_listening"
    LOOPBACK_ONLY = "loopback_only"
    OVEREXPOSED = "overexposed"
    WRONG_PROCESS = "wrong_process"
    # Listening as declared, but the owner could not be read (no CAP_SYS_PTRACE):
    # a `process:` expectation can be neither confirmed nor refuted.
    PROCESS_UNKNOWN = "process_unknown"
    # Bound wide enough, but the packet filter drops other hosts on every address.
    BLOCKED = "blocked"

    @property
    def severity(self) -> int:
        """How bad it is, 0 for ok: the worst of several services is the highest.

        judge gives a service the most severe status that holds for it; not_listening
        excludes every other (with no listener nothing else can be told).
        """
        return _STATUS_SEVERITY[self]


# a security problem outranks an availability one, and a service nobody can reach
# from another host outranks one that is missing (an alert already covers that case)
_STATUS_SEVERITY = {
    Status.OK: 0,
    Status.PROCESS_UNKNOWN: 1,
    Status.WRONG_PROCESS: 2,
    Status.BLOCKED: 3,
    Status.NOT_LISTENING: 4,
    Status.LOOPBACK_ONLY: 5,
    Status.OVEREXPOSED: 6,
}


class ErrorSource(enum.Enum):
    """Where a scan error came from: the `source` label of bindscope_scan_errors_total."""

    SCAN = "scan"  # a whole scan failed
    PROC = "proc"  # a /proc entry could not be read
    PROC_VANISHED = "proc_vanished"  # a process exited while it was read
    PROCESS_ATTRIBUTION = "process_attribution"  # no right to read another user's fds
    INTERFACES = "interfaces"
    NETNS = "netns"
    FIREWALL = "firewall"
    NAT = "nat"


class NamespaceKind(enum.Enum):
    """The `kind` label of bindscope_network_namespaces."""

    HOST = "host"  # the exporter's own
    CONTAINER = "container"  # a member process belongs to a container runtime's cgroup
    NAMED = "named"  # under /run/netns (`ip netns`)
    OTHER = "other"


class Firewall(enum.Enum):
    """What the namespace's packet filter does to a new connection from another host."""

    ACCEPT = "accept"
    DROP = "drop"
    UNKNOWN = "unknown"


class PublishedStatus(enum.Enum):
    OK = "ok"
    NOT_LISTENING = "not_listening"
    LOOPBACK_ONLY = "loopback_only"

    @property
    def severity(self) -> int:
        # the app on loopback inside outranks a missing app: every host-side tool misses it
        return _PUBLISHED_SEVERITY[self]


_PUBLISHED_SEVERITY = {
    PublishedStatus.OK: 0,
    PublishedStatus.NOT_LISTENING: 1,
    PublishedStatus.LOOPBACK_ONLY: 2,
}


@dataclass(frozen=True)
class Socket:
    """One listening socket as discovery reports it, before any judgement."""

    protocol: Protocol
    address: str  # no brackets; IPv6 link-local without zone
    port: int
    family: int  # 4 or 6
    v6only: bool | None  # None: IPv4, or not known (psutil, /proc/net fallback)
    inode: int
    uid: int | None = None
    netns: str = HOST_NETNS
    container: str = ""
    ifindex: int = 0  # the device it is bound to (SO_BINDTODEVICE, VRF); 0: none
    device: str = ""  # that device's name in its namespace; "" when not bound


@dataclass(frozen=True)
class ProcessInfo:
    pid: int | None
    name: str  # /proc/PID/comm, or UNKNOWN_PROCESS
    cmdline: tuple[str, ...] = ()

    @property
    def known(self) -> bool:
        return self.pid is not None


NO_PROCESS = ProcessInfo(pid=None, name=UNKNOWN_PROCESS)


class InterfaceAddress(NamedTuple):
    """An address as discovery reads it from an interface, before classification."""

    interface: str
    address: str  # no brackets, no zone
    family: int  # 4 or 6
    index: int = 0  # the interface's index in its namespace


@dataclass(frozen=True)
class HostAddress:
    """An address of one of the namespace's interfaces."""

    address: str  # no brackets, no zone
    interface: str
    family: int  # 4 or 6
    scope: Scope  # never WILDCARD

    @property
    def probe_target(self) -> str:
        """The address as connect() needs it: IPv6 link-local carries its zone."""
        if self.family == 6 and self.scope is Scope.LINK_LOCAL:
            return f"{self.address}%{self.interface}"
        return self.address


@dataclass(frozen=True)
class Listener:
    """A socket after attribution and classification."""

    socket: Socket
    process: ProcessInfo
    scope: Scope
    exposure: Exposure  # from the bind address alone
    service: str = ""  # the declared service it belongs to, "bindscope" for our own
    # None: not evaluated (loopback-only, or the firewall is not read)
    firewall: Firewall | None = None
    effective: Exposure | None = None  # exposure after the firewall; None: same as bind

    @property
    def effective_exposure(self) -> Exposure:
        return self.exposure if self.effective is None else self.effective


@dataclass(frozen=True)
class ServiceSpec:
    """One entry of `services:` in the config."""

    name: str
    port: int
    protocol: Protocol = Protocol.TCP
    expose: Exposure = Exposure.PRIVATE
    process: re.Pattern[str] | None = None
    netns: str | None = None  # None: the host's namespace unless `container` is set
    container: re.Pattern[str] | None = None


@dataclass(frozen=True)
class ProbeResult:
    address: str  # the label value, zone included for link-local IPv6
    success: bool
    duration: float
    error: str = ""  # errno name or "timeout"; for humans (diagnose), never a label


@dataclass(frozen=True)
class Verdict:
    service: ServiceSpec
    status: Status
    exposure: Exposure
    listeners: tuple[Listener, ...] = ()
    probes: tuple[ProbeResult, ...] = ()
    effective: Exposure | None = None  # after the firewall; None: same as exposure

    @property
    def effective_exposure(self) -> Exposure:
        return self.exposure if self.effective is None else self.effective

    @property
    def listening(self) -> bool:
        return bool(self.listeners)


@dataclass(frozen=True)
class PublishedPort:
    """A host address:port that NAT (or docker-proxy) forwards to a target address:port."""

    protocol: str  # tcp | udp
    host_address: str  # "0.0.0.0" or "::": every host address of that family
    host_port: int
    target_address: str
    target_port: int
    source: str  # nft | iptables | docker-proxy

    @property
    def key(self) -> tuple[str, str, int, str, int]:
        return (
            self.protocol,
            self.host_address,
            self.host_port,
            self.target_address,
            self.target_port,
        )


@dataclass(frozen=True)
class Published:
    """A host port that NAT forwards into a namespace, and what listens at its target."""

    protocol: Protocol
    host_address: str  # 0.0.0.0 / :: for every host address of the family
    host_port: int
    target_address: str
    target_port: int
    status: PublishedStatus
    netns: str = ""  # the namespace holding the target address
    container: str = ""
    listeners: tuple[Listener, ...] = ()  # what listens on the target port in there
    probe: ProbeResult | None = None  # a connect to the target from the host


def worst_published(published: Iterable[Published]) -> dict[tuple[str, str, int], Published]:
    """One verdict per (container, protocol, host port): IPv4 and IPv6 rules of one
    published port share the status series, and the worse of the two speaks for it."""
    worst: dict[tuple[str, str, int], Published] = {}
    for p in published:
        key = (p.container, p.protocol.value, p.host_port)
        if key not in worst or p.status.severity > worst[key].status.severity:
            worst[key] = p
    return worst


@dataclass(frozen=True)
class Snapshot:
    """One completed scan; the collector renders it, scrapes never wait for it."""

    timestamp: float
    duration: float
    success: bool
    verdicts: tuple[Verdict, ...]
    listeners: tuple[Listener, ...]
    unexpected: tuple[Listener, ...]
    host_addresses: tuple[HostAddress, ...]
    errors: dict[str, int] = field(default_factory=dict)  # cumulative, by source
    published: tuple[Published, ...] = ()
    namespaces: dict[str, int] = field(default_factory=dict)  # kind -> count
    backend: str = ""


class PeerError(enum.Enum):
    """Why a peer's round failed or was cut short: the `reason` of bindscope_peer_errors_total."""

    UNREACHABLE = "unreachable"  # no connection to its API (refused, no route, DNS)
    TIMEOUT = "timeout"  # connect, answer or round deadline passed
    TLS = "tls"  # handshake or certificate check failed
    HTTP_STATUS = "http_status"  # answered, but not 200 (401 when credentials are wrong)
    TOO_LARGE = "too_large"  # the answer exceeds the size limit
    INVALID = "invalid"  # not the documented JSON shape
    CREDENTIALS = "credentials"  # this host's password or TLS files cannot be read
    TOO_MANY_PROBES = "too_many_probes"  # more services x addresses than a round probes
    FILE_SD = "file_sd"  # a file_sd file cannot be read or parsed (peer: the file)


@dataclass(frozen=True)
class PeerProbe:
    """A TCP connect from this host to one declared service of a peer, on one address."""

    service: str
    port: int
    address: str
    success: bool
    duration: float
    error: str = ""  # errno name or "timeout"; never a label


@dataclass(frozen=True)
class PeerState:
    """One peer after one round: did its API answer, and what our connects to it gave."""

    peer: str  # the target as configured, host:port
    up: bool
    error: PeerError | None = None
    message: str = ""  # for the log; never a label
    probes: tuple[PeerProbe, ...] = ()


@dataclass(frozen=True)
class PeerRound:
    """One completed round over every peer; the collector renders it, scrapes never wait."""

    timestamp: float
    duration: float
    peers: tuple[PeerState, ...]
    errors: dict[tuple[str, str], int] = field(default_factory=dict)  # (peer, reason), cumulative
