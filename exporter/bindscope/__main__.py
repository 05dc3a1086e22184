"""`python -m bindscope` runs the exporter, as `bindscope-exporter` does."""

import sys

from bindscope.cli.exporter import main

sys.exit(main())
