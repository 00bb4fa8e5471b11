"""Churn ROC AUC with 1 vs N scorer instances sharing one model (the scale-out design, in
one process, without Kafka).

Each instance is a scorer core that owns the customers of its partitions (the range split of
4 partitions, as the consumer group assigns them) and sends each partition's contribution per
day (``Scorer.sink``, ``Scorer.sweep``: cluster inputs, matured examples, BG/NBD summaries)
to one learner (``shared.SharedLearner``: a day once every partition completed it, in a
canonical order); every version goes to every instance as it is made, and a score as of day D
uses version D - 1 (``Scorer.model_for``). Evaluated like bench/eval_churn.py: at weekly
points after the warm-up, every customer not truly churned yet is scored by its owner and
labelled by the simulator's script (churn within H days).

    .venv/bin/python bench/eval_churn_scale.py --instances 1 2 --seeds 7
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.eval_churn import roc_auc  # noqa: E402
from segflow.runtime.state import partition_for  # noqa: E402
from segflow.sim.generator import SimConfig, Simulation  # noqa: E402
from segflow.sim.noise import Delivery  # noqa: E402
from segflow.sim.truth import truth_records  # noqa: E402
from services.scorer.core import DAY, Scorer, ScorerConfig, StateWrite  # noqa: E402
from services.scorer.shared import SharedLearner  # noqa: E402

PARTITIONS = 4


def owner(cid: str, instances: int) -> int:
    """The range assignor's split: instance i owns a contiguous run of partition numbers."""
    p = partition_for(cid, PARTITIONS)
    per, extra = divmod(PARTITIONS, instances)
    bounds = [i * per + min(i, extra) for i in range(instances + 1)]
    return next(i for i in range(instances) if bounds[i] <= p < bounds[i + 1])


def evaluate(args: argparse.Namespace, seed: int, instances: int) -> dict[str, Any]:
    config = SimConfig(customers=args.customers, days=args.days, seed=seed)
    sim = Simulation(config)
    items = [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]
    truth = {r["customer"]: r for r in truth_records(sim)}
    cfg = ScorerConfig()
    learner = SharedLearner(PARTITIONS, cfg)
    scorers = []
    stores: list[dict[str, dict[str, Any]]] = [{} for _ in range(instances)]
    for i in range(instances):
        sc = Scorer(cfg)
        sc.partition_of = lambda cid: partition_for(cid, PARTITIONS)
        sc.partition_states = lambda p, i=i: [
            (c, st) for c, st in stores[i].items() if partition_for(c, PARTITIONS) == p
        ]
        sc.sink = lambda kind, payload: deliver(payload)
        scorers.append(sc)

    def deliver(payload: dict[str, Any]) -> None:
        for day, blob in learner.add(payload):  # the versions: to every instance at once
            for sc in scorers:
                sc.receive(day, pickle.loads(blob))  # noqa: S301 - our own model

    def apply(k: int, outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite):
                if o.state is None:
                    stores[k].pop(o.customer_id, None)
                else:
                    stores[k][o.customer_id] = o.state

    def flush_all(t: int) -> None:
        for k, sc in enumerate(scorers):
            apply(k, sc.flush(stores[k].get, stores[k].items, t))

    horizon = cfg.churn_horizon_days * DAY
    ps: list[float] = []
    ys: list[bool] = []
    next_eval = config.start_ms + args.warmup_days * DAY
    last_eval = config.end_ms - horizon
    started = time.process_time()
    for i, (cid, ev) in enumerate(items):
        t = ev["occurred_at"]
        if t >= next_eval and next_eval <= last_eval:
            flush_all(t)
            while t >= next_eval and next_eval <= last_eval:
                for k, sc in enumerate(scorers):
                    for c, st in stores[k].items():
                        churn_at = truth[c]["churn_at"]
                        if churn_at is not None and churn_at <= next_eval:
                            continue
                        ps.append(sc.score(st, next_eval - 1).churn)
                        ys.append(churn_at is not None and churn_at <= next_eval + horizon)
                next_eval += args.eval_every_days * DAY
        k = owner(cid, instances)
        part = partition_for(cid, PARTITIONS)
        _, outs = scorers[k].on_event(stores[k].get(cid), cid, ev, t, part)
        apply(k, outs)
        if i % args.flush_every == 0:
            flush_all(t)
    flush_all(items[-1][1]["occurred_at"])
    p, y = np.array(ps), np.array(ys, dtype=bool)
    return {
        "instances": instances,
        "seed": seed,
        "eval_points": len(p),
        "truth_roc_auc": roc_auc(p, y),
        "labels_learned": learner.model.n_learned,
        "bgnbd_refit_day": learner.model.bgnbd_day,
        "early_scores": sum(sc.early_scores for sc in scorers),
        "customers_per_instance": " / ".join(str(len(s)) for s in stores),
        "cpu_s": round(time.process_time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--days", type=int, default=240)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup-days", type=int, default=90)
    parser.add_argument("--eval-every-days", type=int, default=7)
    parser.add_argument("--flush-every", type=int, default=2000, help="flush every N events")
    args = parser.parse_args()
    for seed in args.seeds:
        for n in args.instances:
            out = evaluate(args, seed, n)
            print(
                "  ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()
                )
            )
            print(f"  load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
