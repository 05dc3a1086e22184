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
        print(common.table(rows, ("method (median)", *columns, "vs floor @1000/20000")))
        for note in notes:
            print(f"- {note}")
        sys.stdout.flush()
        rows, notes = scrape.run(h)
        print("\n## Scrapes\n")
        print(common.table(rows, scrape.HEADER))
        for note in notes:
            print(f"- {note}")
        sys.stdout.flush()
        rows, notes = resources.run(h)
        print("\n## Resources\n")
        print(common.table(rows, ("measure", "value", "target")))
        for note in notes:
            print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
