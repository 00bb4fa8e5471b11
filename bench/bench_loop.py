"""Pass-through throughput of the shared loop: decode + validate + encode + transactional
produce + offset commit, in one process.

    .venv/bin/python bench/bench_loop.py [--events 200000] [--bootstrap HOST:PORT]

Without --bootstrap it starts a private local broker in a temporary folder. Prints events/s.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow.runtime.loop import LoopConfig, ProcessingLoop  # noqa: E402
from segflow.runtime.passthrough import copier  # noqa: E402
from segflow.runtime.serde import Serde  # noqa: E402
from segflow.runtime.testing import create_topic, isolated_settings, private_broker, produce  # noqa: E402
from segflow.runtime.topics import TOPICS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--bootstrap")
    parser.add_argument("--at-least-once", action="store_true")
    parser.add_argument("--batch-size", type=int, default=2000)
    args = parser.parse_args()

    bootstrap, broker = private_broker(args.bootstrap)
    try:
        s = isolated_settings(bootstrap, "bench")
        serde = Serde.from_settings(s)
        source = TOPICS.events.name(s)
        sink = create_topic(s, s.topic_prefix + "copy", TOPICS.events)
        base = int(time.time() * 1000) - 86_400_000
        t0 = time.perf_counter()
        produce(
            s,
            source,
            (
                (
                    f"u{i % 5000}".encode(),
                    serde.encode(
                        TOPICS.events,
                        {
                            "event_id": f"e{i}",
                            "event_type": "page_view",
                            "occurred_at": base + i,
                            "user_id": f"u{i % 5000}",
                            "anonymous_id": f"a{i % 7000}",
                            "session_seconds": 12.5,
                            "properties": {"path": "/pricing"},
                        },
                    ),
                )
                for i in range(args.events)
            ),
        )
        print(f"loaded {args.events} events in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        config = LoopConfig(
            service="bench",
            group_id=s.topic_prefix + "g",
            sources={source: TOPICS.events},
            exactly_once=not args.at_least_once,
            transactional_id=s.topic_prefix + "tx",
            batch_size=args.batch_size,
        )
        loop = ProcessingLoop(s, config, copier(sink))  # type: ignore[arg-type]
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        n = loop.run(max_records=args.events, idle_timeout=20)
        elapsed = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        mode = "at-least-once" if args.at_least_once else "exactly-once (transactions)"
        print(
            f"pass-through {mode}: {n} events in {elapsed:.2f}s = {n / elapsed:,.0f} events/s "
            f"(process CPU {cpu:.1f}s = {n / cpu:,.0f} events per CPU-second; "
            f"{os.cpu_count()} cores, broker on the same machine)"
        )
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
