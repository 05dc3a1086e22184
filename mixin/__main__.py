"""`python -m mixin`: write the generated rules and dashboards into the repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixin import ROOT, generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixin", description=__doc__)
    parser.add_argument(
        "--output-dir", type=Path, default=ROOT, help="repository root to write into"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a committed file differs from what would be generated",
    )
    args = parser.parse_args(argv)
    stale = []
    for rel, text in generate().items():
        path = args.output_dir / rel
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {rel}")
    for rel in stale:
        print(f"{rel}: differs from `python -m mixin`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
