"""`python -m bench NAME` = `rawwave bench NAME`."""

import sys

from rawwave.cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))
