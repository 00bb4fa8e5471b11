"""``segflow simulate``: write simulated customers to a JSON-lines file or to Kafka.

Two modes: a span (``--days``) generated as fast as possible, or a steady rate (``--rate`` events
per second for ``--duration`` seconds, events re-timed to the wall clock) for benchmarks. The
ground truth goes to ``--truth`` as JSON lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import UTC, datetime
from typing import IO, Any

from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import NoiseConfig
from segflow.sim.personas import DEFAULT_MIX, parse_mix
from segflow.sim.sink import (
    DeliveryFailed,
    JsonLinesSink,
    KafkaSink,
    Pacer,
    Sink,
    SinkStats,
    chunks,
    gc_paused,
    retime,
)
from segflow.sim.truth import write_truth


def _date_ms(text: str) -> int:
    """Midnight UTC of a YYYY-MM-DD date, in epoch milliseconds.

    >>> _date_ms("2024-01-01")
    1704067200000
    """
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from exc
    return int(day.timestamp() * 1000)


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"rate {text} is not in [0, 1]")
    return value


def _mix(text: str) -> dict[str, float]:
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``simulate`` to a CLI's subparsers; the handler is set as ``handler``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="generate simulated customers (events and ground truth)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--customers", type=int, default=1000, help="population size (1000)")
    p.add_argument("--days", type=int, default=30, help="simulated days (30)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument(
        "--start",
        type=_date_ms,
        default=_date_ms("2024-01-01"),
        help="first simulated day, YYYY-MM-DD (2024-01-01)",
    )
    p.add_argument(
        "--mix",
        type=_mix,
        default=None,
        help="persona weights, e.g. silent_decline=2,steady_buyer=1 "
        f"(default: {','.join(f'{k}={v}' for k, v in DEFAULT_MIX.items())})",
    )
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", help="write events as JSON lines to this file ('-' = stdout)")
    dest.add_argument("--kafka", action="store_true", help="produce to the events topic")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: from settings)")
    p.add_argument("--topic", help="topic to produce to (default: the events topic)")
    p.add_argument("--truth", help="write the ground truth as JSON lines to this file")
    p.add_argument("--duplicates", type=_rate, default=0.0, help="duplicate rate per event")
    p.add_argument("--late", type=_rate, default=0.0, help="late-delivery rate (1–36 h)")
    p.add_argument("--out-of-order", type=_rate, default=0.0, help="out-of-order rate (5 s–10 min)")
    p.add_argument("--malformed", type=_rate, default=0.0, help="malformed records per event")
    p.add_argument(
        "--blocked",
        type=_rate,
        default=0.0,
        help="rate of placeholder identifiers such as 'unknown'",
    )
    p.add_argument(
        "--treatment-effect",
        type=_rate,
        default=0.4,
        help="chance a sent action rescues a responsive at-risk customer (0.4)",
    )
    p.add_argument("--rate", type=float, help="steady mode: events per second")
    p.add_argument("--duration", type=float, default=60.0, help="steady mode: seconds to run (60)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(handler=run)
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The simulation configuration the arguments describe."""
    noise = NoiseConfig(
        duplicates=args.duplicates,
        late=args.late,
        out_of_order=args.out_of_order,
        malformed=args.malformed,
        blocked=args.blocked,
    )
    return SimConfig(
        customers=args.customers,
        days=args.days,
        seed=args.seed,
        start_ms=args.start,
        mix=args.mix or dict(DEFAULT_MIX),
        noise=noise,
        treatment_effect=args.treatment_effect,
    )


class Progress:
    """Events written and events/s on stderr, at most every ``every`` seconds."""

    def __init__(self, out: IO[str] | None, every: float = 2.0) -> None:
        self.out = out
        self.every = every
        self.started = time.monotonic()
        self.last = self.started
        self.count = 0

    def add(self, n: int, where: str) -> None:
        """Count ``n`` more records; print if it is time."""
        self.count += n
        now = time.monotonic()
        if self.out is not None and now - self.last >= self.every:
            self.last = now
            rate = self.count / max(now - self.started, 1e-9)
            print(f"simulate: {self.count:,} records, {rate:,.0f}/s, {where}", file=self.out)

    def done(self, stats: SinkStats) -> None:
        """Print the final summary."""
        took = max(time.monotonic() - self.started, 1e-9)
        if self.out is not None:
            print(
                f"simulate: wrote {stats.events:,} events and {stats.malformed:,} malformed "
                f"records in {took:.1f}s ({stats.records / took:,.0f} records/s)",
                file=self.out,
            )


def _sink(args: argparse.Namespace) -> tuple[Sink, IO[bytes] | None]:
    if args.kafka:
        from segflow.runtime.settings import Settings

        settings = Settings(bootstrap_servers=args.bootstrap) if args.bootstrap else Settings()
        return KafkaSink.from_settings(settings, topic=args.topic), None
    if args.out == "-":
        return JsonLinesSink(sys.stdout.buffer), None
    f = open(args.out, "wb")  # noqa: SIM115 - closed by run()
    return JsonLinesSink(f), f


def run_span(sim: Simulation, sink: Sink, progress: Progress) -> SinkStats:
    """Write a whole span as fast as possible."""
    days = sim.config.days
    while not (sim.finished and not sim.pending):
        items = sim.step(7)
        sink.write(items)
        progress.add(len(items), f"day {sim.day}/{days}")
    return sink.close()


def run_steady(
    config: SimConfig, sink: Sink, rate: float, duration: float, progress: Progress
) -> SinkStats:
    """Emit ``rate`` records per second for ``duration`` seconds, re-timed to the wall clock.

    When the span runs out the population is simulated again with the next seed.
    """
    pacer = Pacer(rate)
    batch = max(1, int(rate / 50))
    deadline = time.monotonic() + duration
    seed = config.seed
    while time.monotonic() < deadline:
        sim = Simulation(dataclasses.replace(config, seed=seed))
        for items in chunks(sim.run(), batch):
            now_ms = int(time.time() * 1000)
            sink.write([retime(item, now_ms) for item in items])
            progress.add(len(items), f"{rate:,.0f}/s asked")
            pacer.pace(len(items))
            if time.monotonic() >= deadline:
                break
        seed += 1
    return sink.close()


def run(args: argparse.Namespace) -> int:
    """Handle ``segflow simulate``."""
    config = config_from_args(args)
    progress = Progress(None if args.quiet else sys.stderr)
    sink, f = _sink(args)
    try:
        if args.rate:
            stats = run_steady(config, sink, args.rate, args.duration, progress)
        else:
            with gc_paused():
                sim = Simulation(config)
                stats = run_span(sim, sink, progress)
            if args.truth:
                with open(args.truth, "w", encoding="utf-8") as tf:
                    write_truth(sim, tf)
    except DeliveryFailed as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 1
    finally:
        if f is not None:
            f.close()
    progress.done(stats)
    if args.rate and args.truth:
        print("simulate: --truth is not written in steady-rate mode", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``simulate`` on its own (``python -m segflow.sim``)."""
    parser = argparse.ArgumentParser(prog="segflow")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["simulate", *(argv if argv is not None else sys.argv[1:])])
    return int(args.handler(args))
