"""``python -m services.dispatcher``: run the dispatcher until SIGTERM.

Settings come from the environment (``SEGFLOW_*`` and ``SEGFLOW_DISPATCHER_*``);
``--check`` validates the playbooks and exits.
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
from pathlib import Path

from segflow.errors import ConfigError
from services.dispatcher.playbooks import load_book


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.dispatcher", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="validate playbooks and exit")
    parser.add_argument("--idle-timeout", type=float, default=None)
    parser.add_argument("--max-records", type=int, default=None)
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)
    if args.check:  # no Kafka or HTTP imports needed to validate files
        from services.dispatcher.playbook_settings import PlaybookSettings

        paths = PlaybookSettings().playbooks  # SEGFLOW_DISPATCHER_PLAYBOOKS, or the default
        try:
            book = load_book(Path(p) for p in paths.split(",") if p)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"{len(book.playbooks)} playbooks OK: " + ", ".join(p.name for p in book.playbooks))
        return 0
    from segflow.runtime import metrics
    from segflow.runtime.log import configure
    from segflow.runtime.settings import Settings
    from services.dispatcher.app import Dispatcher, DispatcherSettings

    cfg = DispatcherSettings()
    settings = Settings()
    log = configure(
        "dispatcher", settings.log_level, settings.log_format, instance=settings.instance_id
    )
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    dispatcher = Dispatcher(settings, cfg)
    # The ledger of the partitions this instance is assigned is restored on assignment.
    if cfg.api_port:  # KPIs and ledger queries for the API gateway
        from services.dispatcher import api

        api.start(dispatcher, cfg.api_port)
    log.info(
        "dispatcher starting",
        extra={
            "fields": {
                "playbooks": len(dispatcher.book.playbooks),
                "instance": settings.instance_id,
                "clock": cfg.clock,
            }
        },
    )
    loop = dispatcher.loop()
    loop.install_signal_handlers()
    try:
        loop.run(max_records=args.max_records, idle_timeout=args.idle_timeout)
    finally:
        dispatcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
