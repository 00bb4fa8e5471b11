"""Churn scores while the model is cold: the demo-size population over its first 84 days.

Replays a demo-size simulation (300 customers, 84 days, the demo's 192 h allowed lateness)
through ``services.scorer.core.Scorer`` as ``bench/eval_churn.py`` does, and every
``--eval-every-days`` from day 7 on scores every customer seen so far and not truly churned,
labelled by the simulator's script: does it churn within the next 30 days (the script's churn
time is used even when it falls after the simulated span, so the last weeks are not
censored). The model learns only from its own matured labels. Reports per seed and pooled:
ROC AUC and calibration error (ECE, 10 bins) over all points and per two-week block, how many
points got exactly 0.5, and how many labels the model had learned by each block.

    .venv/bin/python bench/churn_coldstart.py --seeds 7 11 13 17 19
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_churn import calibration_error, roc_auc  # noqa: E402

from segflow.sim.generator import DAY, HOUR, SimConfig, Simulation  # noqa: E402
from segflow.sim.noise import Delivery  # noqa: E402
from services.scorer.core import Scorer, ScorerConfig, StateWrite  # noqa: E402


def run(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    config = SimConfig(customers=args.customers, days=args.days, seed=seed)
    sim = Simulation(config)
    items = [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]
    churn_at = {c.key: c.script.churn_at for c in sim.customers}  # not clipped to the span
    scorer = Scorer(replace(ScorerConfig(), allowed_lateness_ms=args.lateness_hours * HOUR))
    horizon = 30 * DAY
    store: dict[str, dict[str, Any]] = {}

    def apply(outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite):
                if o.state is None:
                    store.pop(o.customer_id, None)
                else:
                    store[o.customer_id] = o.state

    ps: list[float] = []
    ys: list[bool] = []
    days: list[int] = []
    learned: dict[int, int] = {}
    next_eval = config.start_ms + args.first_eval_day * DAY
    last_eval = config.end_ms

    def evaluate(at: int) -> None:
        alive = [
            (c, st)
            for c, st in store.items()
            if churn_at[c] is None or churn_at[c] > at  # not truly churned yet
        ]
        scored = scorer.score_many([(st, at - 1) for _, st in alive])
        day = (at - config.start_ms) // DAY
        learned[day] = scorer.model.n_learned
        for (c, _), s in zip(alive, scored, strict=True):
            ca = churn_at[c]
            ps.append(s.churn)
            ys.append(ca is not None and ca <= at + horizon)
            days.append(day)

    started = time.process_time()
    for i, (cid, ev) in enumerate(items):
        t = ev["occurred_at"]
        while t >= next_eval and next_eval <= last_eval:
            apply(scorer.flush(store.get, store.items, t))
            evaluate(next_eval)
            next_eval += args.eval_every_days * DAY
        _, outs = scorer.on_event(store.get(cid), cid, ev, t)
        apply(outs)
        if i % args.flush_every == 0:
            apply(scorer.flush(store.get, store.items, t))
    apply(scorer.flush(store.get, store.items, items[-1][1]["occurred_at"]))
    if next_eval <= last_eval:
        evaluate(next_eval)
    return {
        "p": np.array(ps),
        "y": np.array(ys, dtype=bool),
        "day": np.array(days),
        "learned": learned,
        "cpu": time.process_time() - started,
    }


def summary(name: str, p: Any, y: Any, day: Any, learned: dict[int, int] | None) -> None:
    flat = float(np.mean(np.abs(p - 0.5) < 1e-9))
    print(
        f"{name:10s} AUC {roc_auc(p, y):.3f}  ECE {calibration_error(p, y):.3f}  "
        f"mean p {p.mean():.3f} (truth {y.mean():.3f})  points {len(p):,}  "
        f"exactly 0.5: {flat:.0%}"
    )
    for lo in range(0, int(day.max()) + 1, 14):
        sel = (day >= lo) & (day < lo + 14)
        if not sel.any():
            continue
        n = ""
        if learned:
            n = f"  labels learned by then {max(v for d, v in learned.items() if d < lo + 14)}"
        print(
            f"  days {lo:3d}-{lo + 13:3d}: AUC {roc_auc(p[sel], y[sel]):.3f}  "
            f"ECE {calibration_error(p[sel], y[sel]):.3f}  positives {int(y[sel].sum()):4d}/"
            f"{int(sel.sum()):5d}  exactly 0.5: {np.mean(np.abs(p[sel] - 0.5) < 1e-9):.0%}{n}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--days", type=int, default=84)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 11, 13, 17, 19])
    parser.add_argument("--first-eval-day", type=int, default=7)
    parser.add_argument("--eval-every-days", type=int, default=7)
    parser.add_argument("--lateness-hours", type=int, default=192)
    parser.add_argument("--flush-every", type=int, default=2000)
    args = parser.parse_args()
    print(
        f"{args.customers} customers, {args.days} days, lateness {args.lateness_hours} h, "
        f"eval every {args.eval_every_days} days from day {args.first_eval_day}"
    )
    pooled: list[dict[str, Any]] = []
    for seed in args.seeds:
        r = run(args, seed)
        pooled.append(r)
        summary(f"seed {seed}", r["p"], r["y"], r["day"], r["learned"])
    if len(pooled) > 1:
        summary(
            "pooled",
            np.concatenate([r["p"] for r in pooled]),
            np.concatenate([r["y"] for r in pooled]),
            np.concatenate([r["day"] for r in pooled]),
            None,
        )
    print(f"core CPU {sum(r['cpu'] for r in pooled):.1f} s")


if __name__ == "__main__":
    main()
