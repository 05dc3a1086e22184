"""One round over every peer: fetch each one's services, then connect to them from here.

Bounded three ways: FETCH_WORKERS fetches at a time, each cut at `timeout`; connects in
batches of at most PROBE_BATCH in flight, each given `timeout`; and the whole round stops
at its deadline (the next round's start), what is left undone counted as timed out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from bindscope.config.load import PeersConfig, split_target
from bindscope.model import PeerError, PeerProbe, PeerRound, PeerState, ProbeResult
from bindscope.peers.answer import InvalidAnswer, PeerServices, parse_services, probe_plan
from bindscope.peers.fetch import Client, FetchError, Request, client_for
from bindscope.peers.routes import routable
from bindscope.peers.targets import TargetList
from bindscope.probe import Target, probe_all

log = logging.getLogger("bindscope.peers")

SERVICES_PATH = "/api/v1/services"
FETCH_WORKERS = 16
PROBE_BATCH = 256
MAX_PROBES_PER_PEER = 256  # 64 addresses x 1024 services would be a port scan
_TICK = 0.05  # how often the round looks for fetches past their deadline


class Rounds:
    """Runs rounds and keeps what outlives one: the file_sd cache and the error counts."""

    def __init__(self, stop: threading.Event, routable: Callable[[str], bool] = routable) -> None:
        self._stop = stop
        self._routable = routable
        self._targets = TargetList()
        self._errors: Counter[tuple[str, str]] = Counter()
        self._up: dict[str, bool] = {}  # each peer's last state, to log only changes

    def run(self, config: PeersConfig, deadline: float) -> PeerRound:
        started, t0 = time.time(), time.monotonic()
        targets, file_errors = self._targets.resolve(config)
        for path, message in file_errors:
            self._count(path, PeerError.FILE_SD, message)
        try:
            client = client_for(config.scheme, config.timeout, config.tls_config, config.basic_auth)
        except FetchError as e:
            states = [PeerState(t, False, e.reason, str(e)) for t in targets]
        else:
            states = self._fetch_all(targets, client, deadline)
            states = self._probe_all(states, config.timeout, deadline)
        for s in states:
            if s.error is not None:
                self._count(s.peer, s.error, s.message)
            if self._up.get(s.peer) is not s.up:
                if s.up:
                    log.info("peer answers", extra={"peer": s.peer})
                else:
                    reason = s.error.value if s.error else ""
                    log.warning(
                        "peer does not answer",
                        extra={"peer": s.peer, "reason": reason, "err": s.message},
                    )
        # forget peers no longer configured: their series go, cardinality stays bounded
        self._up = {s.peer: s.up for s in states}
        kept = set(targets)
        file_sd = PeerError.FILE_SD.value
        self._errors = Counter(
            {k: n for k, n in self._errors.items() if k[0] in kept or k[1] == file_sd}
        )
        return PeerRound(started, time.monotonic() - t0, tuple(states), dict(self._errors))

    def _count(self, peer: str, reason: PeerError, message: str) -> None:
        self._errors[(peer, reason.value)] += 1
        log.debug("peer error", extra={"peer": peer, "reason": reason.value, "err": message})

    def _fetch_all(
        self, targets: tuple[str, ...], client: Client, deadline: float
    ) -> list[PeerState]:
        answers: dict[str, PeerServices | FetchError] = {}
        requests: dict[Future, tuple[str, Request]] = {}
        begun: dict[Request, float] = {}  # when each request's worker took it up

        def fetch(req: Request) -> PeerServices:
            begun[req] = time.monotonic()
            try:
                return parse_services(req.run())
            except InvalidAnswer as e:
                raise FetchError(PeerError.INVALID, str(e)) from None

        pool = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="peer-fetch")
        try:
            for t in targets:
                host, port = split_target(t)
                req = Request(host, port, SERVICES_PATH, client)
                requests[pool.submit(fetch, req)] = (t, req)
            pending = set(requests)
            while pending:
                done, pending = wait(pending, _TICK, FIRST_COMPLETED)
                for f in done:
                    t, _req = requests[f]
                    exc = f.exception()
                    answers[t] = f.result() if exc is None else _as_fetch_error(exc)
                now = time.monotonic()
                over = now >= deadline or self._stop.is_set()
                for f in pending:
                    _t, req = requests[f]
                    if over or now >= begun.get(req, now) + client.timeout:
                        req.abort()
                if over:
                    for f in pending:
                        f.cancel()  # not yet begun: never will be
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        states = []
        for t in targets:
            a = answers.get(t, FetchError(PeerError.TIMEOUT, "round deadline"))
            if isinstance(a, FetchError):
                states.append(PeerState(t, False, a.reason, str(a)))
            else:
                plan = _planned(a, self._routable)
                if len(plan) > MAX_PROBES_PER_PEER:
                    message = f"{len(plan)} connects planned; the first {MAX_PROBES_PER_PEER} run"
                    states.append(
                        PeerState(
                            t, True, PeerError.TOO_MANY_PROBES, message, plan[:MAX_PROBES_PER_PEER]
                        )
                    )
                else:
                    states.append(PeerState(t, True, probes=plan))
        return states

    def _probe_all(
        self, states: list[PeerState], timeout: float, deadline: float
    ) -> list[PeerState]:
        """Each peer's planned probes replaced by the connects' results."""
        planned = [p for s in states for p in s.probes]
        results: dict[tuple[str, int], ProbeResult] = {}
        for start in range(0, len(planned), PROBE_BATCH):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                break
            batch = planned[start : start + PROBE_BATCH]
            got = probe_all(
                [Target(p.address, p.port) for p in batch],
                min(timeout, remaining),
                max_in_flight=PROBE_BATCH,
            )
            for p in batch:
                results[(p.address, p.port)] = got[Target(p.address, p.port)]
        out = []
        for s in states:
            done = tuple(
                PeerProbe(p.service, p.port, p.address, r.success, r.duration, r.error)
                for p in s.probes
                if (r := results.get((p.address, p.port))) is not None
            )
            if len(done) < len(s.probes):
                out.append(PeerState(s.peer, s.up, PeerError.TIMEOUT, "round deadline", done))
            else:
                out.append(PeerState(s.peer, s.up, s.error, s.message, done))
        return out


def _planned(answer: PeerServices, routable: Callable[[str], bool]) -> tuple[PeerProbe, ...]:
    plan = probe_plan(answer, routable)
    return tuple(PeerProbe(s.name, s.port, a, False, 0.0) for s, a in plan)


def _as_fetch_error(exc: BaseException) -> FetchError:
    if isinstance(exc, FetchError):
        return exc
    return FetchError(PeerError.INVALID, type(exc).__name__)
