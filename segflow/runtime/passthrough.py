"""A pass-through service on the shared loop: validates BehaviorEvents and copies them.

It is the smallest complete service: the integration tests and ``bench/`` run it to prove
the loop (decode, DLQ, encode, transactional produce) and to measure it::

    python -m segflow.runtime.passthrough --source segflow.events --sink segflow.events.copy
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
import time
from collections.abc import Iterator

from segflow.events import validate_event
from segflow.runtime import metrics
from segflow.runtime.log import configure
from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS

MAX_FUTURE_MS = 24 * 3600 * 1000


def copier(sink: str) -> object:
    """A handler that validates each event and copies it, same key, to ``sink``."""

    def handle(record: Incoming) -> Iterator[Output]:
        validate_event(record.value, int(time.time() * 1000), MAX_FUTURE_MS)
        yield Output(TOPICS.events, record.key, record.value, topic_name=sink)

    return handle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: settings)")
    parser.add_argument("--prefix", default=None, help="topic prefix (DLQ goes to PREFIXdlq)")
    parser.add_argument("--source", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--transactional-id", default=None)
    parser.add_argument("--at-least-once", action="store_true")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--idle-timeout", type=float, default=None)
    parser.add_argument("--max-records", type=int, default=None)
    parser.add_argument(
        "--pre-commit-delay",
        type=float,
        default=0.0,
        help="fault injection: seconds to wait before each commit (tests kill mid-transaction)",
    )
    parser.add_argument(
        "--stuck-timeout",
        type=float,
        default=120.0,
        help="exit (status 75) when a commit blocks this long",
    )
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` dumps every thread's stack
    overrides = {}
    if args.bootstrap:
        overrides["bootstrap_servers"] = args.bootstrap
    if args.prefix is not None:
        overrides["topic_prefix"] = args.prefix
    settings = Settings(**overrides)
    configure("passthrough", settings.log_level, settings.log_format)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    config = LoopConfig(
        service="passthrough",
        group_id=args.group,
        sources={args.source: TOPICS.events},
        exactly_once=not args.at_least_once,
        transactional_id=args.transactional_id,
        batch_size=args.batch_size,
        pre_commit_delay=args.pre_commit_delay,
        stuck_timeout=args.stuck_timeout,
    )
    loop = ProcessingLoop(settings, config, copier(args.sink))  # type: ignore[arg-type]
    loop.install_signal_handlers()
    started = time.perf_counter()
    n = loop.run(max_records=args.max_records, idle_timeout=args.idle_timeout)
    elapsed = time.perf_counter() - started
    print(f"processed {n} records in {elapsed:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
