"""Startup of both programs: an empty --config.file is a usage error naming the flag; the
`Scan errors:` line says what failed, and blames privileges only when not root."""

from __future__ import annotations

import logging
import subprocess
import time

import pytest
from support import EXPORTER, TOOL

from bindscope.cli import tool
from bindscope.cli.output import Paint, scan_notes
from bindscope.model import Snapshot


@pytest.mark.parametrize(
    "argv",
    [
        [*TOOL, "scan", "--config.file="],
        [*TOOL, "scan", "--config.file", "  "],
        [*TOOL, "diagnose", "22", "--config.file="],
        [*EXPORTER, "--config.file=", "--web.listen-address=127.0.0.1:0"],
    ],
    ids=["scan-empty", "scan-whitespace", "diagnose-empty", "exporter-empty"],
)
def test_an_empty_config_file_flag_is_a_usage_error(argv):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--config.file is empty" in r.stderr
    assert r.stdout == ""


def test_check_config_of_an_empty_name_still_fails():
    r = subprocess.run([*TOOL, "check-config", ""], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2


def _snap(errors: dict[str, int]) -> Snapshot:
    return Snapshot(time.time(), 0.1, True, (), (), (), (), errors=errors)


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        (
            True,
            "Scan errors: netns=1: 1 processes' /proc/PID/ns/net not readable (permission "
            "denied) (docs/operator.md)",
        ),
        (
            False,
            "Scan errors: netns=1: 1 processes' /proc/PID/ns/net not readable (permission "
            "denied) (some need root or capabilities: docs/operator.md)",
        ),
    ],
    ids=["root", "unprivileged"],
)
def test_scan_errors_say_the_first_cause(root, expected):
    detail = {"netns": "1 processes' /proc/PID/ns/net not readable (permission denied)"}
    assert scan_notes(_snap({"netns": 1}), Paint(False), detail, root=root) == [expected]


def test_the_tool_keeps_the_first_detail_of_each_source():
    handler = tool.FirstErrors()
    for detail in ("ns1: gone", "ns2: gone too"):
        handler.emit(logging.makeLogRecord({"levelno": 30, "source": "netns", "detail": detail}))
    assert handler.details == {"netns": "ns1: gone"}
