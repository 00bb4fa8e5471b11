"""``python -m services.scorer``: run one scorer instance until SIGTERM.

Settings come from the environment (``SEGFLOW_*`` shared, ``SEGFLOW_SCORER_*`` own);
``--idle-timeout`` stops after that many seconds without input (tests, batch replays).
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys

from segflow.runtime import metrics
from segflow.runtime.log import configure
from segflow.runtime.settings import Settings
from services.scorer.app import ScorerService, ScorerSettings, build_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="segflow scorer")
    parser.add_argument("--idle-timeout", type=float, default=None)
    parser.add_argument("--max-records", type=int, default=None)
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)
    settings = Settings()
    options = ScorerSettings()
    configure("scorer", settings.log_level, settings.log_format, instance=settings.instance_id)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    service = ScorerService(settings, options)
    service.restore(states=False)  # partitions are restored as the group assigns them
    if options.http_port is not None:  # the API gateway's query endpoint
        from services.scorer import api

        api.start(service, options.http_port)
    loop = build_loop(settings, service)
    loop.install_signal_handlers()
    loop.run(max_records=args.max_records, idle_timeout=args.idle_timeout)
    service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
