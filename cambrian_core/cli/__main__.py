"""``python -m cambrian_core.cli`` = ``cambrian``."""

import sys

from cambrian_core.cli import main

sys.exit(main())
