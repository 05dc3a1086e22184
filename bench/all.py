"""Every bench in one run on one host, for bench/README.md.

.venv/bin/python bench/all.py
"""

from __future__ import annotations

import sys
import time

import common
import discovery
import resources
import scrape


def main() -> int:
    print(f"machine: {common.machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    with common.host() as h:
        rows, columns, notes = discovery.run(h)
        print("\n## Discovery and scans\n")
        common.report(rows, ("method (median)", *columns, "vs floor @1000/20000"), notes)
        rows, notes = scrape.run(h)
        print("\n## Scrapes\n")
        common.report(rows, scrape.HEADER, notes)
        rows, notes = resources.run(h)
        print("\n## Resources\n")
        common.report(rows, ("measure", "value", "target"), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
