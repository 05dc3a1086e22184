"""Metric families that change without a scan: config reload state, build, web config."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from bindscope import __version__


@dataclass(frozen=True)
class ReloadState:
    successful: bool
    success_timestamp: float


class RuntimeCollector(Collector):
    """What changes without a scan: the config reload state and the build.

    bindscope_build_info{discovery="netlink",version="0.1.0"} 1.0
    """

    def __init__(
        self,
        reload_state: Callable[[], ReloadState],
        backend: Callable[[], str],
        web_config_errors: Callable[[], int] | None = None,
    ) -> None:
        self._reload_state = reload_state
        self._backend = backend
        self._web_config_errors = web_config_errors

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        state = self._reload_state()
        yield GaugeMetricFamily(
            "bindscope_config_last_reload_successful",
            "1 if the last config (re)load succeeded.",
            value=float(state.successful),
        )
        yield GaugeMetricFamily(
            "bindscope_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully, in Unix time.",
            value=state.success_timestamp,
        )
        build = GaugeMetricFamily(
            "bindscope_build_info",
            "The running bindscope: its version, the socket "
            "discovery backend (netlink or psutil) and Python. Always 1.",
            labels=["version", "discovery", "python_version"],
        )
        build.add_metric([__version__, self._backend(), platform.python_version()], 1)
        yield build
        if self._web_config_errors is not None:
            yield CounterMetricFamily(
                "bindscope_web_config_reload_errors",
                "Changes of --web.config.file (or of the files it names) that could not be "
                "loaded; the last good web config stays in force.",
                value=self._web_config_errors(),
            )
