"""``python -m chattune``: the ``chattune`` command (the workbench starts its jobs this way)."""

import sys

from chattune.cli import main

sys.exit(main())
