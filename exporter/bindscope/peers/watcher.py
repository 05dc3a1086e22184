"""The peer thread: a round every `peers.interval`, each one's exposition swapped in whole.

Scans and scrapes never wait on it: rounds run here, and a scrape reads the last
rendered exposition, one reference. The daemon hands in the renderer (the collector is
downstream of this stage), and what it returns is kept as it is.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from bindscope.config.load import PeersConfig
from bindscope.model import PeerRound
from bindscope.peers.rounds import Rounds
from bindscope.peers.routes import routable

log = logging.getLogger("bindscope.peers")

Body = TypeVar("Body")


class PeerWatcher(Generic[Body]):
    def __init__(
        self,
        config: Callable[[], PeersConfig | None],
        render: Callable[[PeerRound], Body],
        routable: Callable[[str], bool] = routable,
        signals: frozenset[signal.Signals] = frozenset(),
    ) -> None:
        self._config = config
        self._render = render
        self._signals = signals
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._rounds = Rounds(self._stop, routable)
        self._round: PeerRound | None = None
        self._body: Body | None = None  # None: no peers, no families at all
        self._thread: threading.Thread | None = None

    @property
    def latest(self) -> PeerRound | None:
        return self._round

    def exposition(self) -> Body | None:
        return self._body

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="peers", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Start a round now: the config may have new peers."""
        self._wake.set()

    def stop(self, timeout: float = 1.5) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        if self._signals:
            signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        while not self._stop.is_set():
            started = time.monotonic()
            config = self._config()
            if config is None:
                self._round, self._body = None, None
                self._wake.wait()
            else:
                try:
                    self.run_once(config, started + config.interval)
                except Exception:  # a bug in one round must not stop every later one
                    log.exception("peer round failed")
                self._wake.wait(max(0.0, started + config.interval - time.monotonic()))
            self._wake.clear()

    def run_once(self, config: PeersConfig, deadline: float) -> PeerRound:
        r = self._rounds.run(config, deadline)
        # one assignment: a scrape sees the last round's exposition or this one's
        self._body = self._render(r)
        self._round = r
        return r
