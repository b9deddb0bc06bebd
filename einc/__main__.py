"""``python -m einc``: the einc command line."""

import sys

from .cli import main

sys.exit(main())
