"""Segmenter throughput: score updates per second per worker, with the default segments.

    .venv/bin/python bench/bench_segmenter.py [--customers 10000] [--updates 200000] [--slim]
    .venv/bin/python bench/bench_segmenter.py --service [--bootstrap HOST:PORT] [--slim]

Scores look like the scorer's: every feature of ``services.scorer.features.FEATURE_NAMES``
(``--slim``: only the ~25 the default segments read), those the segments read drifting around
their thresholds, ``as_of`` 20 s apart (so recency timers fire as event time moves on).

``core``: the pure evaluation plus what the shell does per update besides Kafka (state record
for the changelog, change records). ``--service``: the whole service on the shared loop —
decode, evaluate, encode state + changes, transactional produce and commit — against a real
broker (a private one in a temporary folder unless --bootstrap is given). It prints updates/s
of wall time from the first record, and per CPU-second of the segmenter process: on a shared
machine the second is the one that compares runs (the broker runs beside it either way).
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.scorer.features import FEATURE_NAMES  # noqa: E402
from services.segmenter import core  # noqa: E402
from services.segmenter.app import DEFAULT_DEFINITIONS  # noqa: E402
from services.segmenter.dsl import DAY, parse  # noqa: E402

STAGES = ["prospect", "onboarded", "adopting", "loyal", "at_risk", "churned"]
T0 = 1_700_000_000_000


def _fresh(rng: random.Random, slim: bool = False) -> dict[str, Any]:
    """A customer's score: every feature the scorer emits (so decoding and reading cost what
    they cost in production; ``slim``: only those the segments read), the ones the default
    segments read drawn around their thresholds."""
    features = {} if slim else {name: float(rng.randrange(12)) for name in FEATURE_NAMES}
    features.update(
        {
            "days_since_open": rng.uniform(0, 30),
            "days_since_purchase": rng.uniform(0, 60),
            "days_since_feature_use": rng.uniform(0, 20),
            "days_since_login": rng.uniform(0, 20),
            "days_since_active": rng.uniform(0, 20),
            "days_since_signup": rng.uniform(0, 400),
            "escalations_7d": float(rng.randrange(5)),
            "sentiment_mean_7d": rng.uniform(-1, 1),
            "activity_14d_vs_prior28_change": rng.uniform(-1, 0.5),
            "activity_14d_vs_prior42_log_ratio": rng.uniform(-2, 1),
            "cancelled": float(rng.random() < 0.02),
            "logins_3d_vs_prior28_change": rng.uniform(-1, 0.5),
            "revenue_28d": rng.uniform(0, 300),
            "revenue_28d_vs_prior28_change": rng.uniform(-0.8, 0.5),
            "purchase_interval_days": rng.uniform(3, 20),
            "purchase_interval_baseline_days": rng.uniform(5, 15),
            "purchase_interval_drift": rng.uniform(-0.3, 1.0),
            "lifetime_purchases": float(rng.randrange(10)),
            "cart_views_14d": float(rng.randrange(8)),
            "high_value_zip": float(rng.random() < 0.2),
            "feature_use_28d": float(rng.randrange(8)),
        }
    )
    return {
        "churn_probability": rng.random(),
        "engagement_score": rng.uniform(0, 100),
        "clv": rng.lognormvariate(5, 1),
        "cluster": rng.randrange(8),
        "lifecycle_stage": rng.choice(STAGES),
        "features": features,
    }


#: The features the default segments read (the ones a drifting update nudges).
_DRIFTING = sorted(parse(DEFAULT_DEFINITIONS.read_text()).features & set(FEATURE_NAMES))


def iter_scores(
    customers: int, updates: int, churny: bool = False, seed: int = 1, slim: bool = False
) -> Iterator[dict[str, Any]]:
    """Score records for ``customers``, one per update (generated lazily: each carries the
    scorer's full feature map). By default each update nudges three of the features the
    segments read (a drifting population, occasional segment changes); ``churny`` draws every
    update afresh (several changes per update: a worst case)."""
    rng = random.Random(seed)
    current: dict[int, dict[str, Any]] = {}
    for i in range(updates):
        c = rng.randrange(customers)
        if churny or c not in current:
            current[c] = _fresh(rng, slim)
        else:
            base = current[c]
            feats = dict(base["features"])
            for name in rng.sample(_DRIFTING, 3):
                feats[name] = feats[name] + rng.uniform(-0.15, 0.15) * (abs(feats[name]) + 1)
            churn = base["churn_probability"] + rng.uniform(-0.03, 0.03)
            current[c] = {**base, "features": feats, "churn_probability": min(1.0, max(0.0, churn))}
        yield {
            "customer_id": f"c{c}",
            "as_of": T0 + i * 20_000,
            **current[c],
            "top_features": [],
            "model_version": "bench",
            "scored_at": 0,
        }


def bench_core(customers: int, updates: int, churny: bool, slim: bool) -> None:
    defs = parse(DEFAULT_DEFINITIONS.read_text())
    records = iter_scores(customers, updates, churny, slim=slim)
    sample = list(iter_scores(customers, customers * 2, churny))
    # every score field a definition reads as a percentile (clv, churn, engagement), as the
    # service computes them over its population
    pop = {f: [r[f] for r in sample] for f, _pct in defs.percentiles}
    thresholds = core.percentile_thresholds(defs, pop)
    states: dict[str, core.CustomerState] = {}
    n_changes = 0
    elapsed = 0.0
    while True:
        chunk = list(itertools.islice(records, 5000))  # generated outside the timed part
        if not chunk:
            break
        started = time.perf_counter()
        for r in chunk:
            score = core.Score.from_record(r, defs.features)
            old = states.get(score.customer_id)
            new, changes = core.evaluate(old, score, defs, thresholds)
            states[score.customer_id] = new
            core.state_to_record(new)
            for c in changes:
                c.to_record(0)
            n_changes += len(changes)
        elapsed += time.perf_counter() - started
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


def bench_service(
    updates: int, customers: int, bootstrap: str | None, churny: bool, slim: bool
) -> None:
    from segflow.runtime.testing import isolated_settings, private_broker, produce, read_all
    from segflow.runtime.topics import TOPICS
    from services.segmenter.app import STATE_TOPIC, SegmenterConfig, build_loop, serde_for

    bootstrap, broker = private_broker(bootstrap)
    try:
        s = isolated_settings(bootstrap, "benchseg")
        serde = serde_for(s)
        produce(
            s,
            TOPICS.scores.name(s),
            (
                (r["customer_id"].encode(), serde.encode(TOPICS.scores, r))
                for r in iter_scores(customers, updates, churny, slim=slim)
            ),
        )
        segmenter, loop = build_loop(
            s, SegmenterConfig(instance="bench", batch_size=5000, percentile_refresh=3600)
        )
        first: list[float] = []

        def handler(record: Any) -> Any:  # notes when the first record arrives
            if not first:
                first.append(time.perf_counter())
            return segmenter(record)

        loop.handler = handler
        started, cpu = time.perf_counter(), time.process_time()
        n = loop.run(max_records=updates, idle_timeout=10)
        done, cpu = time.perf_counter(), time.process_time() - cpu
        out = read_all(s, TOPICS.segment_changes.name(s), timeout=120)
        state = read_all(s, STATE_TOPIC.name(s), timeout=120)
        print(
            f"service: {n} score updates in {done - first[0]:.2f}s from the first record = "
            f"{n / (done - first[0]):,.0f} updates/s ({n / (done - started):,.0f}/s counting "
            f"start-up: group join, transactions); {n / cpu:,.0f} updates per CPU-second of "
            f"this process (librdkafka threads included); exactly-once, {len(out)} changes and "
            f"{len(state)} state records produced"
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
    parser.add_argument(
        "--slim",
        action="store_true",
        help=f"scores carry only the {len(_DRIFTING)} features the segments read "
        f"instead of the scorer's {len(FEATURE_NAMES)}",
    )
    args = parser.parse_args()
    if args.service:
        bench_service(args.updates, args.customers, args.bootstrap, args.churny, args.slim)
    else:
        bench_core(args.customers, args.updates, args.churny, args.slim)
    return 0


if __name__ == "__main__":
    assert DAY  # keep the import (time unit used by readers of this file)
    sys.exit(main())
