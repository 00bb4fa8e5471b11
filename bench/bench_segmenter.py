"""Segmenter throughput: score updates per second per worker, with the default segments.

    .venv/bin/python bench/bench_segmenter.py [--customers 10000] [--updates 200000]
    .venv/bin/python bench/bench_segmenter.py --service [--bootstrap HOST:PORT]

``core``: the pure evaluation plus what the shell does per update besides Kafka (state record
for the changelog, change records). ``--service``: the whole service on the shared loop —
decode, evaluate, encode state + changes, transactional produce and commit — against a real
broker (a private one in a temporary folder unless --bootstrap is given).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.segmenter import core  # noqa: E402
from services.segmenter.app import DEFAULT_DEFINITIONS  # noqa: E402
from services.segmenter.dsl import DAY, parse  # noqa: E402

STAGES = ["prospect", "onboarded", "adopting", "loyal", "at_risk", "churned"]


def _fresh(rng: random.Random) -> dict[str, Any]:
    return {
        "churn_probability": rng.random(),
        "engagement_score": rng.uniform(0, 100),
        "clv": rng.lognormvariate(5, 1),
        "cluster": rng.randrange(8),
        "lifecycle_stage": rng.choice(STAGES),
        "features": {
            "days_since_open": rng.uniform(0, 30),
            "days_since_purchase": rng.uniform(0, 60),
            "days_since_feature_use": rng.uniform(0, 20),
            "days_since_login": rng.uniform(0, 20),
            "days_since_signup": rng.uniform(0, 400),
            "escalations_7d": float(rng.randrange(5)),
            "sentiment_mean_7d": rng.uniform(-1, 1),
            "engagement_14d_vs_baseline_change": rng.uniform(-1, 0.5),
            "logins_3d_vs_baseline_change": rng.uniform(-1, 0.5),
            "revenue_28d_vs_prior_change": rng.uniform(-0.5, 0.5),
            "purchase_interval_days": rng.uniform(3, 20),
            "purchase_interval_days_vs_baseline_change": rng.uniform(-0.5, 1.5),
            "cart_views_14d": float(rng.randrange(8)),
            "high_value_zip": float(rng.random() < 0.2),
            "feature_use_28d": float(rng.randrange(3)),
            "opens_7d": float(rng.randrange(9)),
            "sessions_14d": float(rng.randrange(30)),
            "purchases_90d": float(rng.randrange(12)),
        },
    }


def make_scores(
    customers: int, updates: int, churny: bool = False, seed: int = 1
) -> list[dict[str, Any]]:
    """Score records for ``customers``. By default each update nudges a customer's features a
    little (a drifting population, occasional segment changes); ``churny`` draws every update
    afresh (several changes per update: a worst case)."""
    rng = random.Random(seed)
    current: dict[int, dict[str, Any]] = {}
    out = []
    t0 = 1_700_000_000_000
    for i in range(updates):
        c = rng.randrange(customers)
        if churny or c not in current:
            current[c] = _fresh(rng)
        else:
            base = current[c]
            feats = dict(base["features"])
            for name in rng.sample(sorted(feats), 3):
                feats[name] = feats[name] + rng.uniform(-0.15, 0.15) * (abs(feats[name]) + 1)
            base = {
                **base,
                "features": feats,
                "churn_probability": min(
                    1.0, max(0.0, base["churn_probability"] + rng.uniform(-0.03, 0.03))
                ),
            }
            current[c] = base
        rec = current[c]
        out.append(
            {
                "customer_id": f"c{c}",
                "as_of": t0 + i * 20_000,
                **rec,
                "top_features": [],
                "model_version": "bench",
                "scored_at": 0,
            }
        )
    return out


def bench_core(customers: int, updates: int, churny: bool) -> None:
    defs = parse(DEFAULT_DEFINITIONS.read_text())
    records = make_scores(customers, updates, churny)
    pop = [r["clv"] for r in records[: customers * 2]]
    thresholds = core.percentile_thresholds(defs, {"clv": pop})
    states: dict[str, core.CustomerState] = {}
    n_changes = 0
    started = time.perf_counter()
    for r in records:
        score = core.Score.from_record(r)
        old = states.get(score.customer_id)
        new, changes = core.evaluate(old, score, defs, thresholds)
        states[score.customer_id] = new
        core.state_to_record(new)
        for c in changes:
            c.to_record(0)
        n_changes += len(changes)
    elapsed = time.perf_counter() - started
    kind = "churny" if churny else "drifting"
    print(
        f"core ({kind}): {updates} updates of {customers} customers, "
        f"{len(defs.segments)} segments, {n_changes} changes in {elapsed:.2f}s = "
        f"{updates / elapsed:,.0f} updates/s"
    )
    # timers: everyone's recencies age 30 days with no new score
    started = time.perf_counter()
    fired = 0
    for cid, st in states.items():
        if st.next_timer is not None:
            states[cid], _ = core.advance(st, st.next_timer, defs, thresholds)
            fired += 1
    elapsed = time.perf_counter() - started
    print(
        f"core timers: {fired} timer evaluations in {elapsed:.2f}s = "
        f"{fired / max(elapsed, 1e-9):,.0f}/s"
    )


def bench_service(updates: int, customers: int, bootstrap: str | None, churny: bool) -> None:
    from segflow.runtime.broker import LocalBroker, free_port
    from segflow.runtime.testing import isolated_settings, produce, read_all
    from segflow.runtime.topics import TOPICS
    from services.segmenter.app import SegmenterConfig, build_loop, serde_for

    broker = None
    if bootstrap is None:
        broker = LocalBroker(
            Path(tempfile.mkdtemp(prefix="segflow-bench-")),
            port=free_port(),
            controller_port=free_port(),
        )
        broker.start()
        bootstrap = broker.bootstrap
    try:
        s = isolated_settings(bootstrap, "benchseg")
        serde = serde_for(s)
        records = make_scores(customers, updates, churny)
        produce(
            s,
            TOPICS.scores.name(s),
            ((r["customer_id"].encode(), serde.encode(TOPICS.scores, r)) for r in records),
        )
        segmenter, loop = build_loop(
            s, SegmenterConfig(instance="bench", batch_size=5000, percentile_refresh=3600)
        )
        started = time.perf_counter()
        n = loop.run(max_records=updates, idle_timeout=10)
        elapsed = time.perf_counter() - started
        out = read_all(s, TOPICS.segment_changes.name(s), idle=2, timeout=120)
        print(
            f"service: {n} score updates in {elapsed:.2f}s = {n / elapsed:,.0f} updates/s "
            f"(exactly-once, state changelog + {len(out)} changes produced)"
        )
    finally:
        if broker is not None:
            broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--service", action="store_true", help="through Kafka on the shared loop")
    parser.add_argument("--bootstrap")
    parser.add_argument("--churny", action="store_true", help="every update drawn afresh")
    args = parser.parse_args()
    if args.service:
        bench_service(args.updates, args.customers, args.bootstrap, args.churny)
    else:
        bench_core(args.customers, args.updates, args.churny)
    return 0


if __name__ == "__main__":
    assert DAY  # keep the import (time unit used by readers of this file)
    sys.exit(main())
