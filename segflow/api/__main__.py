"""``python -m segflow.api``: serve the HTTP API gateway until SIGTERM (as ``segflow api``)."""

from __future__ import annotations

import sys

from segflow.api.cli import main

if __name__ == "__main__":
    sys.exit(main())
