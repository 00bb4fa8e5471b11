"""``python -m segflow.sim``: the ``simulate`` command on its own."""

from __future__ import annotations

import sys

from segflow.sim.cli import main

sys.exit(main())
