"""``python -m commitfs``: the command line."""

import sys

from commitfs.cli import main

sys.exit(main())
