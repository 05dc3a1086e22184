"""A collector that is off costs no import: its modules load only when it has work."""

import subprocess
import sys

_SCAN = r"""
import sys
from bindscope.config.load import parse_config
from bindscope.scan import Scanner

Scanner(namespaces=False, firewall=False, published=False).scan(
    parse_config("probe: {enabled: false}\n", "off.yml")
)
print(" ".join(sorted(m for m in sys.modules if m.startswith("bindscope"))))
"""

OPTIONAL = (
    "bindscope.discover.namespaces",
    "bindscope.discover.containers",
    "bindscope.discover.psutil_backend",
    "bindscope.netfilter.read",
    "bindscope.netfilter.evaluate",
    "bindscope.netfilter.nat",
    "bindscope.probe",
)


def test_a_scan_with_every_optional_collector_off_imports_none_of_them():
    done = subprocess.run(
        [sys.executable, "-c", _SCAN], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(done.stdout.split())
    assert "bindscope.scan" in loaded
    assert loaded.isdisjoint(OPTIONAL), sorted(loaded & set(OPTIONAL))
