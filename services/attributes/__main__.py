"""``python -m services.attributes``: run the attributes service until SIGTERM."""

from __future__ import annotations

import faulthandler
import signal
import sys

from segflow.runtime import metrics
from segflow.runtime.log import configure
from segflow.runtime.settings import Settings
from services.attributes.app import AttributesConfig, build_loop


def main() -> int:
    faulthandler.register(signal.SIGUSR1)
    settings = Settings()
    config = AttributesConfig()
    log = configure(
        "attributes", settings.log_level, settings.log_format, instance=settings.instance_id
    )
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    service, loop = build_loop(settings, config)
    log.info("attributes started", extra={"fields": {"customers": len(service.store)}})
    loop.install_signal_handlers()
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
