import sys

from bindscope.cli import main

sys.exit(main())
