"""Scorer benchmark: throughput of the pure core, state size, and churn quality vs ground truth.

Replays the simulator's population through ``services.scorer.core.Scorer`` the way the
service does (``on_event`` per event, ``flush`` every ``--tick`` seconds of processing time,
as the loop's tick), with the identity service stubbed by the simulator's true customer key.
Batches of ``--batch`` events; at the end of each, as the service does before each commit,
the batch's urgent customers are scored together (``Scorer.settle``; ``--immediate``: each
urgent event scored on its own inside ``on_event``, as before) and states are compressed once
(``Scorer.seal``).
Prints events/s, scorings and emissions per event, Avro bytes of state per customer, and a
quick churn ROC AUC and calibration error against the simulator's ground truth, measured
prequentially after ``--warmup-days``: at every ``--eval-every-days`` boundary ``t`` each
customer not yet churned is scored as of ``t`` with the model as it was then, and labelled
1 when its true churn falls in ``(t, t + horizon]``. The flush follows wall-clock ticks here,
so that AUC moves a little from run to run: ``bench/eval_churn.py`` is the deterministic
quality reference.

    .venv/bin/python bench/bench_scorer.py --customers 3000 --days 240
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow import stats  # noqa: E402
from segflow.runtime.serde import SchemaStore, Serde  # noqa: E402
from segflow.runtime.topics import TOPICS  # noqa: E402
from segflow.sim.generator import DAY, SimConfig, Simulation  # noqa: E402
from segflow.sim.noise import Delivery  # noqa: E402
from segflow.sim.truth import truth_records  # noqa: E402
from services.scorer.core import ScoreEmit, Scorer, ScorerConfig, StateWrite  # noqa: E402


def roc_auc(scores: Any, labels: Any) -> float:
    """segflow.stats.roc_auc, NaN (not None) when one class is missing, for printing."""
    auc = stats.roc_auc(scores, labels)
    return float("nan") if auc is None else auc


calibration_error = stats.calibration_error


def run(args: argparse.Namespace) -> dict[str, float]:
    config = SimConfig(customers=args.customers, days=args.days, seed=args.seed)
    sim = Simulation(config)
    t_gen = time.perf_counter()
    items = [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]
    gen_s = time.perf_counter() - t_gen
    truth = {r["customer"]: r for r in truth_records(sim)}
    # as the service runs it: states compressed once per batch (seal), not per event
    bounds = ScorerConfig(
        max_scores_per_flush=args.tick_scores or ScorerConfig.max_scores_per_flush
    )
    scorer = Scorer(bounds, pack_states=False, defer_scores=not args.immediate)
    horizon = scorer.config.churn_horizon_days * DAY
    store: dict[str, dict] = {}
    scorer.store = store.get  # as the service: timers the watermark passed fire together
    emitted = 0
    evals: list[tuple[float, bool]] = []
    next_eval = config.start_ms + args.warmup_days * DAY
    last_eval = config.end_ms - horizon
    busy = 0.0
    busy_cpu = 0.0
    last_flush = time.perf_counter()
    tick_max = 0.0  # the longest flush: input waits while the loop's tick runs

    def apply(outs: list) -> int:
        n = 0
        for o in outs:
            if isinstance(o, StateWrite):
                if o.state is None:
                    store.pop(o.customer_id, None)
                else:
                    store[o.customer_id] = o.state
            elif isinstance(o, ScoreEmit):
                n += 1
        return n

    chunk = args.batch
    for start in range(0, len(items), chunk):
        batch = items[start : start + chunk]
        # evaluation against ground truth (not timed): every customer alive at t, as of t
        while batch[0][1]["occurred_at"] >= next_eval and next_eval <= last_eval:
            for cid, st in store.items():
                churn_at = truth[cid]["churn_at"]
                if churn_at is not None and churn_at <= next_eval:
                    continue
                p = scorer.score(st, next_eval - 1).churn
                evals.append((p, churn_at is not None and churn_at <= next_eval + horizon))
            next_eval += args.eval_every_days * DAY
        t0, c0 = time.perf_counter(), time.process_time()
        for cid, ev in batch:
            now = ev["occurred_at"]
            emitted += apply(scorer.on_event(store.get(cid), cid, ev, now)[1])
        emitted += apply(scorer.settle(store.get, now))  # before the commit
        if time.perf_counter() - last_flush >= args.tick:
            t_tick = time.perf_counter()
            deadline = t_tick + (args.tick_label_seconds or float("inf"))
            emitted += apply(
                scorer.flush(
                    store.get,
                    store.items,
                    now,
                    out_of_time=lambda until=deadline: time.perf_counter() >= until,
                )
            )
            last_flush = time.perf_counter()
            tick_max = max(tick_max, last_flush - t_tick)
        apply(scorer.seal())  # the batch's commit
        busy += time.perf_counter() - t0
        busy_cpu += time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    emitted += apply(scorer.flush(store.get, store.items, now))
    apply(scorer.seal())
    busy += time.perf_counter() - t0
    busy_cpu += time.process_time() - c0

    serde = Serde(SchemaStore.from_dir())
    sizes = [len(serde.encode(TOPICS.scorer_state, st)) - 5 for st in store.values()]
    ps = [p for p, _ in evals]
    ys = [y for _, y in evals]
    q = scorer.model.quality()
    return {
        "events": len(items),
        "customers": len(store),
        "generate_s": gen_s,
        "core_s": busy,
        "core_cpu_s": busy_cpu,
        "events_per_s": len(items) / busy,
        "events_per_cpu_s": len(items) / busy_cpu,
        "tick_max_s": tick_max,
        "scored_per_event": scorer.scored / len(items),
        "emitted_per_event": emitted / len(items),
        "state_bytes_mean": float(np.mean(sizes)),
        "state_bytes_p99": stats.quantile(sizes, 0.99),
        "state_bytes_max": float(max(sizes)),
        "eval_points": len(evals),
        "eval_positive_rate": float(np.mean(ys)) if ys else 0.0,
        "truth_roc_auc": roc_auc(ps, ys),
        "truth_calibration_error": calibration_error(ps, ys) if ps else 0.0,
        "truth_mean_p": float(np.mean(ps)) if ps else 0.0,
        "prequential_roc_auc": q["roc_auc"],
        "prequential_log_loss": q["log_loss"],
        "prequential_calibration_error": q["calibration_error"],
        "labels_learned": q["n_learned"],
        "drifts": q["drifts"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--days", type=int, default=240)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--warmup-days", type=int, default=90)
    parser.add_argument("--eval-every-days", type=int, default=7)
    parser.add_argument("--tick", type=float, default=1.0, help="flush every N s (the loop tick)")
    parser.add_argument("--batch", type=int, default=1000, help="events per batch (transaction)")
    parser.add_argument(
        "--tick-scores", type=int, default=0, help="scores per flush at most (service: 5000)"
    )
    parser.add_argument(
        "--tick-label-seconds",
        type=float,
        default=0.0,
        help="label days learned per flush until this is spent (service: 1.0)",
    )
    parser.add_argument(
        "--immediate", action="store_true", help="score urgent events one by one (as before)"
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}, {__import__('os').cpu_count()} cores"
    )
    out = run(args)
    for key, value in out.items():
        if value is None:
            print(f"{key:32s} n/a")
        else:
            print(f"{key:32s} {value:,.4f}" if isinstance(value, float) else f"{key:32s} {value:,}")


if __name__ == "__main__":
    main()
