"""``python -m segflow.collector``: the Segment-spec collector, configured from the environment."""

from __future__ import annotations

import sys

from segflow.collector.app import CollectorSettings, run
from segflow.runtime.settings import Settings

if __name__ == "__main__":
    sys.exit(run(Settings(), CollectorSettings()))
