"""``python -m services.identity``: run the identity service until SIGTERM.

Settings come from the environment (``SEGFLOW_*``, ``SEGFLOW_IDENTITY_*``); the options below
override them (tests and benchmarks use them).
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys

from segflow.runtime import metrics
from segflow.runtime.log import configure
from segflow.runtime.settings import Settings
from services.identity.app import SERVICE, IdentityService, IdentitySettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: settings)")
    parser.add_argument("--prefix", help="topic prefix (default: settings)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="stop after this many seconds without input",
    )
    parser.add_argument("--max-records", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--pre-commit-delay",
        type=float,
        default=0.0,
        help="fault injection: seconds to wait before each commit",
    )
    parser.add_argument(
        "--role",
        choices=("all", "front", "writer"),
        default=None,
        help="default SEGFLOW_IDENTITY_ROLE, else all. all: one process does everything (one "
        "instance); front: the partitioned per-event stage (N instances); writer: the graph "
        "writer (one active, others warm standbys)",
    )
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)
    overrides = {}
    if args.bootstrap:
        overrides["bootstrap_servers"] = args.bootstrap
    if args.prefix is not None:
        overrides["topic_prefix"] = args.prefix
    settings = Settings(**overrides)
    log = configure(SERVICE, settings.log_level, settings.log_format, instance=settings.instance_id)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    config = IdentitySettings()
    if args.batch_size:
        config = config.model_copy(update={"batch_size": args.batch_size})
    role = args.role or config.role
    if role == "front":
        from services.identity.front import FrontService

        loop = FrontService(settings, config).loop(pre_commit_delay=args.pre_commit_delay)
        restored = 0  # per assigned partition, by the loop
    else:
        if role == "writer":
            from services.identity.writer import GraphWriter

            service: IdentityService = GraphWriter(settings, config)
        else:
            service = IdentityService(settings, config)
        # the writer loads its state when the group makes it the active one (on_assign)
        restored = service.restore() if role == "all" else 0
        if config.http_port is not None:  # the API gateway's query endpoint
            from services.identity import api

            api.start(service, config.http_port)
        loop = service.loop(pre_commit_delay=args.pre_commit_delay)
    loop.install_signal_handlers()
    n = loop.run(max_records=args.max_records, idle_timeout=args.idle_timeout)
    log.info("stopped", extra={"fields": {"processed": n, "restored": restored}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
