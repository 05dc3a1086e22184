"""The exporter's running state: config, the scan thread, and the exposition it serves.

A background thread scans on a timer and swaps in the rendered exposition of each
completed scan, plain and gzipped (only the parts that moved are rendered again);
scrapes read that one reference and never wait for a scan nor compress it again.
"""

from __future__ import annotations

import gzip
import logging
import signal
import threading
import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from bindscope.collector.runtime import ReloadState, RuntimeCollector
from bindscope.collector.snapshot import Renderer
from bindscope.config.load import Config, ConfigError, load_config
from bindscope.model import Snapshot
from bindscope.scan import Scanner
from bindscope.web.server import MAIN_THREAD_SIGNALS

log = logging.getLogger("bindscope.daemon")


class Daemon:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        scanner: Scanner,
        max_listeners: int = 0,
        web_config_errors: Callable[[], int] | None = None,
    ) -> None:
        self._config = config
        self._config_path = config_path
        self._scanner = scanner
        self._renderer = Renderer(max_listeners)
        self._snapshot: Snapshot | None = None
        self._body: tuple[bytes, bytes] = (b"", gzip.compress(b""))  # plain, gzipped
        self._reload = ReloadState(successful=True, success_timestamp=time.time())
        self._reload_lock = threading.RLock()
        self._reload_depth = 0  # reload() calls in progress, nested ones by signals
        self._reload_again = False
        self._runtime_cache: tuple[object, bytes, bytes] = (None, b"", b"")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._runtime = CollectorRegistry(auto_describe=False)
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

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scan", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.5) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        # signals go to the main thread, which alone runs Python's handlers (web.py
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
        # one assignment each: a scrape sees the old exposition or the new, never a mix
        self._body = self._renderer.render(snap)
        self._snapshot = snap
        return snap

    def reload(self) -> tuple[bool, str]:
        """Re-read the config file; on error keep the last good config and say why.

        SIGHUP calls this from a signal handler, which may fire again while the main
        thread is inside reload(). The lock is reentrant so that thread never waits on
        itself, and a nested call only asks the running one to read the file once more:
        the last file written is the one that stays in force.
        """
        with self._reload_lock:
            self._reload_depth += 1
            try:
                if self._reload_depth > 1:
                    self._reload_again = True
                    return True, "a reload is running in this thread; it reads the file again"
                ok, message = self._load()
                while self._reload_again:
                    self._reload_again = False
                    ok, message = self._load()
            finally:
                self._reload_depth -= 1
        self._wake.set()  # judge the new config now rather than at the next tick
        return ok, message

    def _load(self) -> tuple[bool, str]:
        if self._config_path is None:
            self._reload = ReloadState(True, time.time())
            return True, "no --config.file: the embedded default stays in force"
        try:
            config = load_config(self._config_path)
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

    def metrics(self, compressed: bool = False) -> tuple[bytes, bytes]:
        """The exposition in two parts: the last scan's, and the runtime state.

        Sent one after the other, never joined: no copy of the body per scrape. Gzipped,
        each part is a gzip member, and consecutive members are one valid gzip stream.
        """
        plain, zipped = self._body
        runtime, runtime_zipped = self._runtime_exposition()
        return (zipped, runtime_zipped) if compressed else (plain, runtime)

    def _runtime_exposition(self) -> tuple[bytes, bytes]:
        """The runtime part, plain and gzipped, made at most once a second (and after
        each reload): it costs more than serving the whole body, and a 1 s old process
        CPU or RSS figure is as good as a fresh one."""
        key = (int(time.monotonic()), self._reload)
        cached = self._runtime_cache
        if cached[0] != key:
            text = generate_latest(self._runtime)
            cached = (key, text, gzip.compress(text, compresslevel=1))
            self._runtime_cache = cached  # one assignment: threads see old or new
        return cached[1], cached[2]
