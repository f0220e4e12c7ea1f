"""`python -m lowrank_fx.cli` runs the `lowrank-fx` command."""

import sys

from .main import main

sys.exit(main())
