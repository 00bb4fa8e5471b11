"""``python -m services.segmenter``: run the segmenter until SIGTERM."""

from __future__ import annotations

import faulthandler
import signal
import sys

from segflow.runtime import metrics
from segflow.runtime.log import configure
from segflow.runtime.settings import Settings
from services.segmenter import api
from services.segmenter.app import SegmenterConfig, build_loop


def main() -> int:
    faulthandler.register(signal.SIGUSR1)
    settings = Settings()
    config = SegmenterConfig()
    log = configure(
        "segmenter", settings.log_level, settings.log_format, instance=settings.instance_id
    )
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    segmenter, loop = build_loop(settings, config)
    if config.http_port is not None:
        api.serve(segmenter, config.http_port)
    log.info(
        "segmenter started",
        extra={
            "fields": {
                "definitions": str(config.definitions),
                "version": segmenter.defs.version,
                "customers": len(segmenter.states),
            }
        },
    )
    loop.install_signal_handlers()
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
