import sys

from commitfs.cli import main

sys.exit(main())
