"""``segflow demo``: the main job on the embedded default.

Today it runs what exists: a real local Kafka broker, segflow's topics, the customer
simulator producing to ``segflow.events``, and the shared loop validating every event
against the contract with malformed ones dead-lettered. The four services (issues #4-#7)
join here as they land; the report says plainly which stages ran.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from segflow.events import validate_event
from segflow.runtime.broker import LocalBroker
from segflow.runtime.kafka import ensure_topics, make_consumer, wait_for_broker
from segflow.runtime.log import configure
from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery, NoiseConfig
from segflow.sim.sink import KafkaSink, gc_paused
from segflow.sim.truth import truth_records

DAY_MS = 86_400_000
NOT_YET = [
    ("identity", "#4"),
    ("scorer", "#5"),
    ("segmenter", "#6"),
    ("dispatcher", "#7"),
]


def say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    from segflow.cli import external_bootstrap

    started = time.monotonic()
    # Per-record DLQ warnings are for services; the demo reports the totals instead.
    configure("demo", level="ERROR", fmt="text")
    broker: LocalBroker | None = None
    if external_bootstrap():
        settings = Settings()
        say(f"[1/4] using the Kafka broker at {settings.bootstrap_servers}")
        wait_for_broker(settings)
    else:
        broker = LocalBroker(Path(args.state_dir) / "broker", port=args.port)
        was_running = broker.pid() is not None
        say(f"[1/4] starting a local Apache Kafka broker (KRaft) on {broker.bootstrap} ...")
        broker.start()
        settings = Settings(bootstrap_servers=broker.bootstrap)
        say(f"      ready; data in {broker.data_dir}, log in {broker.log_file}")
    try:
        created = ensure_topics(settings)
        say(f"[2/4] topics: {len(TOPICS)} in the registry, {len(created)} created now")
        start_offsets = _end_offsets(settings)
        sim, stats = _simulate(settings, args)
        checked = _validate(settings, start_offsets, stats["records"])
        _report(sim, stats, checked, time.monotonic() - started)
    finally:
        if broker is not None and not args.keep_broker and not was_running:
            broker.stop()
            say("local broker stopped (use --keep-broker to leave it running)")
    return 0


def _end_offsets(settings: Settings) -> dict[int, int]:
    """Current end offset of each events partition: this run's records start there."""
    from confluent_kafka import TopicPartition

    consumer = make_consumer(settings, f"segflow-demo-probe-{uuid.uuid4().hex[:8]}")
    name = TOPICS.events.name(settings)
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
            for p in range(TOPICS.events.partitions)
        }
    finally:
        consumer.close()


def _simulate(settings: Settings, args: argparse.Namespace) -> tuple[Simulation, dict[str, Any]]:
    noise = NoiseConfig(
        duplicates=0.01, late=0.01, out_of_order=0.02, malformed=0.001, blocked=0.01
    )
    config = SimConfig(customers=args.customers, days=args.days, seed=args.seed, noise=noise)
    say(
        f"[3/4] simulating {config.customers:,} customers over {config.days} days "
        f"(seed {config.seed}) into {TOPICS.events.name(settings)} ..."
    )
    sim = Simulation(config)
    sink = KafkaSink.from_settings(settings)
    types: Counter[str] = Counter()
    noise_seen: Counter[str] = Counter()
    t0 = time.monotonic()
    last = t0
    with gc_paused():
        while not (sim.finished and not sim.pending):
            items = sim.step(7)
            sink.write(items)
            for item in items:
                if type(item) is Delivery:
                    types[item.event["event_type"]] += 1
                    if item.noise:
                        noise_seen[item.noise] += 1
                else:
                    noise_seen["malformed"] += 1
            if time.monotonic() - last > 2:
                last = time.monotonic()
                n = sum(types.values())
                say(f"      day {sim.day}/{config.days}: {n:,} events ({n / (last - t0):,.0f}/s)")
        result = sink.close()
    elapsed = time.monotonic() - t0
    say(
        f"      produced {result.records:,} records in {elapsed:.1f}s "
        f"({result.records / max(elapsed, 1e-9):,.0f}/s)"
    )
    return sim, {
        "records": result.records,
        "events": result.events,
        "malformed": result.malformed,
        "types": types,
        "noise": noise_seen,
        "seconds": elapsed,
    }


class _Validator:
    """Counts valid events by type; contract violations raise and are dead-lettered."""

    def __init__(self) -> None:
        self.valid = 0

    def __call__(self, record: Incoming) -> list[Output]:
        validate_event(record.value, int(time.time() * 1000), DAY_MS)
        self.valid += 1
        return []


def _validate(settings: Settings, start: dict[int, int], expected: int) -> dict[str, Any]:
    """Run the shared loop over this run's records: decode, validate, dead-letter."""
    from confluent_kafka import TopicPartition

    name = TOPICS.events.name(settings)
    group = f"segflow-demo-validate-{uuid.uuid4().hex[:8]}"
    seeder = make_consumer(settings, group)  # start the new group at this run's first offsets
    seeder.commit(
        offsets=[TopicPartition(name, p, o) for p, o in start.items()], asynchronous=False
    )
    seeder.close()
    say(f"[4/4] validating {expected:,} records with the shared loop (exactly-once, DLQ on) ...")
    validator = _Validator()
    config = LoopConfig(
        service="demo-validate",
        group_id=group,
        sources={name: TOPICS.events},
        transactional_id=group,
    )
    loop = ProcessingLoop(settings, config, validator)  # type: ignore[arg-type]
    t0 = time.monotonic()
    n = loop.run(max_records=expected, idle_timeout=30)
    elapsed = time.monotonic() - t0
    from prometheus_client import REGISTRY

    dlq = {
        s.labels["reason"]: int(s.value)
        for metric in REGISTRY.collect()
        if metric.name == "segflow_dlq_records"
        for s in metric.samples
        if s.name.endswith("_total") and s.labels.get("service") == "demo-validate"
    }
    return {"processed": n, "valid": validator.valid, "dlq": dlq, "seconds": elapsed}


def _report(sim: Simulation, stats: dict[str, Any], checked: dict[str, Any], total: float) -> None:
    truth = truth_records(sim)
    personas = Counter(t["persona"] for t in truth)
    churned = sum(1 for t in truth if t["churn_at"] is not None)
    in_segment = Counter(name for t in truth for name, spans in t["segments"].items() if spans)
    say()
    say("=== segflow demo report " + "=" * 40)
    say(f"customers: {len(truth):,} ({churned:,} churn during the span)")
    say("  " + ", ".join(f"{p} {n}" for p, n in personas.most_common()))
    say(f"events produced: {stats['events']:,} plus {stats['malformed']:,} malformed records")
    say("  " + ", ".join(f"{t} {n:,}" for t, n in stats["types"].most_common()))
    say("  noise: " + (", ".join(f"{k} {v:,}" for k, v in stats["noise"].items()) or "none"))
    say(
        f"validated by the shared loop: {checked['processed']:,} records in "
        f"{checked['seconds']:.1f}s; {checked['valid']:,} valid"
    )
    dlq = checked["dlq"]
    say(
        "  dead-lettered: "
        + (", ".join(f"{r} {n}" for r, n in sorted(dlq.items())) or "none")
        + f" (expected {stats['malformed']} malformed)"
    )
    say("true segment membership (simulator ground truth), customers ever in each:")
    for name, n in in_segment.most_common():
        say(f"  {name:24} {n:6,}")
    say(
        "not running yet: "
        + ", ".join(f"{s} ({i})" for s, i in NOT_YET)
        + " - segments, scores and actions appear here when they land"
    )
    say(f"total {total:.1f}s")
    if sum(dlq.values()) != stats["malformed"]:
        print("demo: the DLQ count does not match the malformed records sent", file=sys.stderr)
