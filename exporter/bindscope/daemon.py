"""The exporter's running state: config, the scan thread, and the exposition it serves.

A background thread scans on a timer and swaps in the rendered exposition of each
completed scan, in each format, plain and gzipped (only the parts that moved are
rendered again); scrapes read that one reference and never wait for a scan nor compress
it again. Peers, when configured, are watched by a thread of their own in the same way.
"""

from __future__ import annotations

import gzip
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import yaml
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from bindscope.collector.peers import render as render_peers
from bindscope.collector.peers import render_openmetrics as render_peers_openmetrics
from bindscope.collector.runtime import ReloadState, RuntimeCollector
from bindscope.collector.snapshot import Renderer
from bindscope.config.load import Config, ConfigError, ConfigIssue, parse_config
from bindscope.model import PeerRound, Snapshot
from bindscope.peers.watcher import PeerWatcher
from bindscope.scan import Scanner
from bindscope.web.server import MAIN_THREAD_SIGNALS
from bindscope.web.webconfig import read_regular_file

log = logging.getLogger("bindscope.daemon")

_EOF = b"# EOF\n"


@dataclass
class Exposition:
    """One rendered part of the exposition, plain and gzipped, split into metric families
    only when a scrape filters by name."""

    plain: bytes
    zipped: bytes
    _families: list[tuple[frozenset[str], bytes]] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, plain: bytes, level: int = 6) -> Exposition:
        return cls(plain, gzip.compress(plain, compresslevel=level))

    def only(self, names: frozenset[str]) -> bytes:
        """The families any of whose sample names is in names (client_python's name[])."""
        if self._families is None:
            self._families = _split(self.plain)
        return b"".join(block for known, block in self._families if known & names)


_SUFFIXES = ("_total", "_created", "_count", "_sum", "_bucket", "_info", "_gcount", "_gsum")


def _split(text: bytes) -> list[tuple[frozenset[str], bytes]]:
    """Cut an exposition at each family's `# HELP` line, naming each block by the names
    its samples may carry."""
    blocks = []
    start = 0
    while start < len(text):
        end = text.find(b"\n# HELP ", start)
        end = len(text) if end < 0 else end + 1
        block = text[start:end]
        start = end
        if block == _EOF:
            continue
        name = block.split(b" ", 3)[2].decode() if block.startswith(b"# HELP ") else ""
        base = name.removesuffix("_total")
        blocks.append((frozenset({name, base, *(base + s for s in _SUFFIXES)}), block))
    return blocks


def _peer_exposition(r: PeerRound) -> dict[str, Exposition]:
    """A peer round's part in each format, made once per round."""
    return {
        "text": Exposition.of(render_peers(r)),
        "openmetrics": Exposition.of(render_peers_openmetrics(r).removesuffix(_EOF)),
    }


def read_config(path: str, reload_of: Config | None = None) -> Config:
    """The config in a regular file (a FIFO would hang every later reload). On a reload, a
    file with no services while some run must say `services: []`: an emptied or half-written
    file must not silently drop every check."""
    try:
        text = read_regular_file(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError([ConfigIssue(path, 0, 0, "", f"cannot read: {reason}")]) from e
    config = parse_config(text, path)
    if reload_of is not None and reload_of.services and not config.services:
        try:
            root = yaml.safe_load(text)
        except yaml.YAMLError:
            root = None
        if not isinstance(root, dict) or root.get("services") != []:
            raise ConfigError(
                [
                    ConfigIssue(
                        path,
                        1,
                        1,
                        "services",
                        "no services, while the running config declares some: the file "
                        "may be empty or half-written. To declare none, write `services: []`",
                    )
                ]
            )
    return config


class Daemon:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        scanner: Scanner,
        max_listeners: int = 0,
        web_config_errors: Callable[[], int] | None = None,
        exporter_metrics: bool = True,
    ) -> None:
        self._config = config
        self._config_path = config_path
        self._scanner = scanner
        self._renderers = {fmt: Renderer(max_listeners, fmt) for fmt in ("text", "openmetrics")}
        self._snapshot: Snapshot | None = None
        # format -> the scan's part; swapped whole, so a scrape sees one scan's
        self._body: dict[str, Exposition] = {
            "text": Exposition.of(b""),
            "openmetrics": Exposition.of(b""),
        }
        self._reload = ReloadState(successful=True, success_timestamp=time.time())
        self._reload_lock = threading.Lock()
        self._runtime_cache: tuple[object, dict[str, Exposition]] = (None, {})
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._peers = PeerWatcher(
            lambda: self._config.peers, _peer_exposition, signals=frozenset(MAIN_THREAD_SIGNALS)
        )
        self._runtime = CollectorRegistry(auto_describe=False)
        if exporter_metrics:
            ProcessCollector(registry=self._runtime)
            PlatformCollector(registry=self._runtime)
            GCCollector(registry=self._runtime)
        self._runtime.register(
            RuntimeCollector(lambda: self._reload, lambda: self._scanner.backend, web_config_errors)
        )

    @property
    def config(self) -> Config:
        return self._config

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def peer_round(self) -> PeerRound | None:
        return self._peers.latest

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scan", daemon=True)
        self._thread.start()
        self._peers.start()

    def stop(self, timeout: float = 1.5) -> None:
        self._stop.set()
        self._wake.set()
        self._peers.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        # signals go to the main thread, which alone runs Python's handlers (web/server.py
        # says why); threads the scan starts inherit this mask
        signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.scan_once()
            except Exception:  # a bug in one scan must not stop every later one
                log.exception("scan failed")
            interval = self._config.scan_interval
            self._wake.wait(max(0.0, started + interval - time.monotonic()))
            self._wake.clear()

    def scan_once(self) -> Snapshot:
        snap = self._scanner.scan(self._config)
        # one assignment: a scrape sees the old exposition or the new, never a mix
        self._body = {
            fmt: Exposition(*renderer.render(snap)) for fmt, renderer in self._renderers.items()
        }
        self._snapshot = snap
        return snap

    def reload(self) -> tuple[bool, str]:
        """Re-read the config file; on error keep the last good config and say why.

        The exporter's reload thread (SIGHUP) and POST /-/reload may call this at once:
        one reads at a time, and the last file written is the one that stays in force.
        """
        with self._reload_lock:
            ok, message = self._load()
        self._wake.set()  # judge the new config now rather than at the next tick
        self._peers.wake()
        return ok, message

    def _load(self) -> tuple[bool, str]:
        if self._config_path is None:
            self._reload = ReloadState(True, time.time())
            return True, "no --config.file: the embedded default stays in force"
        try:
            config = read_config(self._config_path, reload_of=self._config)
        except ConfigError as e:
            self._reload = ReloadState(False, self._reload.success_timestamp)
            log.error(
                "config reload failed, keeping the last good config",
                extra={"file": self._config_path, "err": str(e)},
            )
            return False, str(e)
        self._config = config
        self._reload = ReloadState(True, time.time())
        log.info(
            "config reloaded", extra={"file": self._config_path, "services": len(config.services)}
        )
        return True, "config reloaded"

    def ready(self) -> bool:
        return self._snapshot is not None

    def metrics(
        self, fmt: str = "text", compressed: bool = False, names: frozenset[str] = frozenset()
    ) -> Sequence[bytes]:
        """The exposition in parts: the last scan's, the last peer round's (when peers are
        configured), and the runtime state.

        Sent one after the other, never joined: no copy of the body per scrape. Gzipped,
        each part is a gzip member, and consecutive members are one valid gzip stream.
        In OpenMetrics the runtime part ends with the one `# EOF`. A name[] filter picks
        families from both parts, made for that scrape alone.
        """
        peers = self._peers.exposition()
        parts = (
            self._body[fmt],
            *((peers[fmt],) if peers is not None else ()),
            self._runtime_exposition()[fmt],
        )
        if names:
            text = b"".join(p.only(names) for p in parts)
            if fmt == "openmetrics":
                text += _EOF
            return (gzip.compress(text, compresslevel=1) if compressed else text,)
        return tuple(p.zipped if compressed else p.plain for p in parts)

    def _runtime_exposition(self) -> dict[str, Exposition]:
        """The runtime part in each format, plain and gzipped, made at most once a second
        (and after each reload): it costs more than serving the whole body, and a 1 s old
        process CPU or RSS figure is as good as a fresh one."""
        key = (int(time.monotonic()), self._reload)
        cached = self._runtime_cache
        if cached[0] != key:
            made = {
                "text": Exposition.of(generate_latest(self._runtime), 1),
                "openmetrics": Exposition.of(generate_openmetrics(self._runtime), 1),
            }
            cached = (key, made)
            self._runtime_cache = cached  # one assignment: threads see old or new
        return cached[1]
