"""Scale-out numbers for the segmenter's partitioned state: changelog bytes per customer, and
the time and memory to restore 1 M customers as 1 instance (4 partitions) or as one of 2 (2
partitions), which is what a restart or a rebalance costs.

    .venv/bin/python bench/bench_scale.py [--customers 1000000] [--bootstrap HOST:PORT]

States are real: 2,000 template customers are evaluated by the segmenter's core with the
default definitions over 6 scores each (memberships, timers, the values the definitions read);
the 1 M changelog records are those templates under 1 M distinct 8-character ids (the id is
patched into the encoded bytes, so generating them costs no Avro encoding). Each restore runs
in a fresh process: the store's restore (read_committed, Avro decode) plus the segmenter's
rebuild (customers, timers, sizes, percentile columns), and its RSS growth (VmRSS after minus
before). A private broker starts in a temporary folder unless --bootstrap is given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_segmenter import _fresh  # noqa: E402
from segflow.runtime.kafka import ensure_topics, make_producer  # noqa: E402
from segflow.runtime.settings import Settings  # noqa: E402
from segflow.runtime.state import partition_for  # noqa: E402
from segflow.runtime.testing import private_broker, unique_prefix  # noqa: E402
from services.segmenter import core  # noqa: E402
from services.segmenter.app import (  # noqa: E402
    CUSTOMER_RECORD,
    DEFAULT_DEFINITIONS,
    STATE_TOPIC,
    Segmenter,
    SegmenterConfig,
    serde_for,
)
from services.segmenter.dsl import DAY, parse  # noqa: E402

T0 = 1_700_000_000_000


def cid(i: int) -> str:
    return f"c{i:07d}"


def templates(n: int, settings: Settings) -> list[bytes]:
    """Encoded state records of ``n`` customers evaluated over 6 scores each, ids ``c{i:07d}``."""
    defs = parse(DEFAULT_DEFINITIONS.read_text())
    serde = serde_for(settings)
    rng = random.Random(11)
    out = []
    for i in range(n):
        st = None
        for day in range(6):
            fresh = _fresh(rng, slim=True)
            record = {
                **fresh,
                "customer_id": cid(i),
                "as_of": T0 + day * DAY,
                "model_version": "bench",
                "scored_at": 0,
            }
            score = core.Score.from_record(record, defs.features)
            st, _ = core.evaluate(st, score, defs, {})
        assert st is not None
        record = core.state_to_record(st)
        record["customer"] = (CUSTOMER_RECORD, record["customer"])
        out.append(serde.encode(STATE_TOPIC, record))
    return out


def fill(settings: Settings, customers: int, n_templates: int) -> tuple[float, float]:
    """Produce the changelog; returns (bytes per customer incl. key, seconds)."""
    name = STATE_TOPIC.name(settings)
    ensure_topics(settings, topics=[], names={name: STATE_TOPIC})
    temps = templates(n_templates, settings)
    producer = make_producer(settings)
    started = time.monotonic()
    total = 0
    for i in range(customers):
        j = i % n_templates
        key = cid(i).encode()
        value = temps[j].replace(cid(j).encode(), key, 1)
        total += len(key) + len(value)
        while True:
            try:
                producer.produce(name, value, key, partition=partition_for(key, 4))
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)
    return total / customers, time.monotonic() - started


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def restore(bootstrap: str, prefix: str, partitions: list[int]) -> dict[str, float]:
    """In this process: restore ``partitions`` as the segmenter does on assignment."""
    settings = Settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    seg = Segmenter(settings, SegmenterConfig())
    before = rss_kb()
    started = time.monotonic()
    seg.store.assigned = set()
    seg.store.on_assign(set(partitions))
    restored = time.monotonic()
    seg.on_assign(set(partitions))
    done = time.monotonic()
    return {
        "partitions": len(partitions),
        "customers": len(seg.states),
        "store_restore_s": round(restored - started, 1),
        "rebuild_s": round(done - restored, 1),
        "total_s": round(done - started, 1),
        "rss_growth_mb": round((rss_kb() - before) / 1024),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--templates", type=int, default=2000)
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--restore", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--prefix", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.restore is not None:
        parts = [int(p) for p in args.restore.split(",")]
        print(json.dumps(restore(args.bootstrap, args.prefix, parts)))
        return 0
    bootstrap, broker = private_broker(args.bootstrap)
    try:
        settings = Settings(bootstrap_servers=bootstrap, topic_prefix=unique_prefix("scale"))
        per_customer, seconds = fill(settings, args.customers, args.templates)
        print(
            f"changelog: {args.customers:,} customers, {per_customer:,.0f} B per customer "
            f"(key + Avro value; segmenter state only), produced in {seconds:.0f} s"
        )
        for parts in ("0,1,2,3", "0,1"):
            out = subprocess.run(
                [sys.executable, __file__, "--restore", parts, "--bootstrap", bootstrap,
                 "--prefix", settings.topic_prefix],
                capture_output=True, text=True, check=True, env=os.environ,
            )  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            role = "1 instance (4 partitions)" if parts == "0,1,2,3" else "1 of 2 (2 partitions)"
            print(f"restore as {role}: {result}")
        print(f"load average: {os.getloadavg()[0]:.1f} (numbers measured under load)")
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
