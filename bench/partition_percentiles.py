"""How far each scores partition's ``pNN`` is from the deployment-wide one (issue #15).

The segmenter computes percentile thresholds per partition of ``segflow.scores``
(services/segmenter/README.md). Customers are spread over the partitions by a hash of their
id, so each partition is a uniform sample of a quarter of the customers, and its nearest-rank
``pNN`` is the deployment's ``pNN`` up to sampling error. This measures that error in *rank*:
where a partition's threshold falls among all the deployment's customers, in percentile
points off the nominal percentile (0 when the nominal rank falls among the customers whose
value equals the threshold, so ties cost nothing).

Populations: the simulator (demo noise) through identity, scorer and segmenter in one
process (``segment_pipeline.py``), every live customer's latest ``clv``, ``churn_probability``
and ``engagement_score`` at the end of the span; for more customers than that run holds,
customers drawn from it with replacement (whole rows, so ties stay) under fresh random ids.
Each size is drawn ``--repeats`` times; the pipeline's own population is reported as well.

    .venv/bin/python bench/partition_percentiles.py                  # 150, 2,000, 100,000
    .venv/bin/python bench/partition_percentiles.py --sizes 150 2000 --pipeline-days 30
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from segflow.runtime.state import partition_for  # noqa: E402

DEFAULT_DEFINITIONS = (
    Path(__file__).resolve().parents[1] / "services" / "segmenter" / "segments" / "default.yaml"
)
PARTITIONS = 4


def pipeline_population(customers: int, days: int, seed: int) -> tuple[list[str], np.ndarray, list]:
    """(customer ids, values [customer, feature], the definitions' (feature, pct) pairs)."""
    from segment_pipeline import DEMO_NOISE, Pipeline

    from segflow.sim.generator import SimConfig, Simulation
    from services.scorer.core import ScorerConfig

    config = SimConfig(customers=customers, days=days, seed=seed, noise=DEMO_NOISE)
    sim = Simulation(config)
    pipe = Pipeline(DEFAULT_DEFINITIONS, ScorerConfig())
    pipe.drive(sim, to_end=False)
    keys = list(pipe.segmenter.defs.percentiles)
    features = sorted({f for f, _ in keys})
    ids, rows = [], []
    for cid, st in pipe.segmenter.states.items():
        row = [st.values.get(f) for f in features]
        if all(isinstance(x, float) for x in row):
            ids.append(cid)
            rows.append(row)
    return ids, np.array(rows, dtype=np.float64), [(features.index(f), f, p) for f, p in keys]


def nearest_rank(values: np.ndarray, pct: float) -> float:
    data = np.sort(values)
    return float(data[min(max(1, math.ceil(pct / 100 * len(data))), len(data)) - 1])


def rank_errors(ids: list[str], values: np.ndarray, keys: list) -> list[float]:
    """Per partition and (feature, pct): the partition's threshold's distance, in percentile
    points, from the nominal rank among all customers."""
    parts = np.array([partition_for(cid, PARTITIONS) for cid in ids])
    out = []
    for col, _feature, pct in keys:
        everyone = np.sort(values[:, col])
        n = len(everyone)
        for p in range(PARTITIONS):
            mine = values[parts == p, col]
            if not len(mine):
                continue
            t = nearest_rank(mine, pct)
            below = 100 * np.searchsorted(everyone, t, side="left") / n
            at_or_below = 100 * np.searchsorted(everyone, t, side="right") / n
            out.append(max(0.0, below - pct, pct - at_or_below))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[150, 2000, 100_000])
    ap.add_argument("--pipeline-customers", type=int, default=2000)
    ap.add_argument("--pipeline-days", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    started = time.perf_counter()
    pools = {}
    for n in sorted({min(s, args.pipeline_customers) for s in args.sizes}):
        if n <= args.pipeline_customers:
            pools[n] = pipeline_population(n, args.pipeline_days, args.seed)
    pool_ids, pool, keys = pools[max(pools)]
    print(
        f"pipeline: {sorted(pools)} customers x {args.pipeline_days} days, seed {args.seed} "
        f"({time.perf_counter() - started:.0f} s); keys: "
        + ", ".join(f"{f} p{p:g}" for _, f, p in keys)
    )
    print("| customers (4 partitions) | population | mean | p95 | max | (rank error, points) |")
    print("|---|---|---|---|---|---|")
    rng = random.Random(args.seed)
    nrng = np.random.default_rng(args.seed)
    for size in args.sizes:
        if size in pools:
            ids, vals, _ = pools[size]
            e = rank_errors(ids, vals, keys)
            print(
                f"| {len(ids):,} | pipeline's own (one run) | {np.mean(e):.2f} | "
                f"{np.percentile(e, 95):.2f} | {max(e):.2f} | |"
            )
        errs: list[float] = []
        for _ in range(args.repeats):
            rows = nrng.integers(0, len(pool), size)
            ids = [f"c-{rng.getrandbits(64):016x}" for _ in range(size)]
            errs += rank_errors(ids, pool[rows], keys)
        print(
            f"| {size:,} | drawn from the {len(pool_ids):,}, {args.repeats} draws | "
            f"{np.mean(errs):.2f} | {np.percentile(errs, 95):.2f} | {max(errs):.2f} | |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
