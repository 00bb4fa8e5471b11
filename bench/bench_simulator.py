"""Simulator throughput: events/s written to a JSON-lines file, and to Kafka with --bootstrap.

    python bench/bench_simulator.py                         # 10k customers, 365 days, to a file
    python bench/bench_simulator.py --customers 2000 --days 60
    python bench/bench_simulator.py --bootstrap 127.0.0.1:9092 --kafka-customers 2000

Targets (issue 3): >= 100,000 events/s to a file (a year of 10k customers in under a minute),
>= 50,000 events/s to Kafka.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import NoiseConfig
from segflow.sim.sink import JsonLinesSink, KafkaSink, Sink, gc_paused


def _noise(args: argparse.Namespace) -> NoiseConfig:
    if not args.noise:
        return NoiseConfig()
    return NoiseConfig(duplicates=0.01, late=0.01, out_of_order=0.02, malformed=0.001, blocked=0.01)


def _drive(sim: Simulation, sink: Sink) -> tuple[int, float]:
    started = time.perf_counter()
    with gc_paused():
        while not (sim.finished and not sim.pending):
            sink.write(sim.step(7))
        stats = sink.close()
    return stats.records, time.perf_counter() - started


def bench_file(args: argparse.Namespace) -> None:
    """Generate and write a span to a temporary file; print records/s."""
    config = SimConfig(customers=args.customers, days=args.days, seed=args.seed, noise=_noise(args))
    t0 = time.perf_counter()
    sim = Simulation(config)
    setup = time.perf_counter() - t0
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as f:
            n, took = _drive(sim, JsonLinesSink(f))
        size = os.path.getsize(path)
    finally:
        os.unlink(path)
    print(
        f"file : {args.customers:,} customers x {args.days} days: {n:,} records in "
        f"{took:.1f}s (+{setup:.1f}s setup) = {n / took:,.0f} records/s, "
        f"{size / 1e6:,.0f} MB"
    )


def bench_kafka(args: argparse.Namespace) -> None:
    """Produce a span to a fresh topic; print records/s (flush included)."""
    from segflow.runtime.kafka import ensure_topics  # noqa: F401 - fail early without runtime
    from segflow.runtime.settings import Settings

    settings = Settings(bootstrap_servers=args.bootstrap)
    topic = f"bench-sim-{int(time.time())}"
    config = SimConfig(
        customers=args.kafka_customers, days=args.kafka_days, seed=args.seed, noise=_noise(args)
    )
    sim = Simulation(config)
    sink = KafkaSink.from_settings(settings, topic=topic)
    n, took = _drive(sim, sink)
    print(
        f"kafka: {args.kafka_customers:,} customers x {args.kafka_days} days to {topic}: "
        f"{n:,} records in {took:.1f}s = {n / took:,.0f} records/s"
    )


def main() -> int:
    """Run the benchmarks the arguments ask for."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--customers", type=int, default=10_000)
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", action="store_true", help="typical noise rates on")
    p.add_argument("--bootstrap", help="also benchmark producing to this Kafka cluster")
    p.add_argument("--kafka-customers", type=int, default=2_000)
    p.add_argument("--kafka-days", type=int, default=90)
    p.add_argument("--skip-file", action="store_true")
    args = p.parse_args()
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus",
        file=sys.stderr,
    )
    if not args.skip_file:
        bench_file(args)
    if args.bootstrap:
        bench_kafka(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
