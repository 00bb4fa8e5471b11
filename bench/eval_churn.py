"""Churn model quality against the simulator's ground truth, measured prequentially.

Replays simulated populations through ``services.scorer.core.Scorer`` (``on_event`` per
event, ``flush`` every ``--flush-every`` events: deterministic, unlike the wall-clock tick
of bench_scorer.py) with the identity service stubbed by the simulator's true customer key.
The model learns only from its own matured labels (what the service can observe); the truth
is used for evaluation only:

* every ``--eval-every-days`` after ``--warmup-days``, at day boundary ``t`` (the scorer
  flushed up to then), every customer seen so far and not truly churned at ``t`` is scored
  as of ``t`` with the model as it was then; label = its true churn falls in ``(t, t + 30d]``;
* ROC AUC over all those points, per 6-week block, and per churning persona (that persona's
  positives against all negatives); expected calibration error (10 bins) and mean
  probability against the true rate;
* the model's own prequential metrics (rolling AUC, log loss, calibration on its labels);
* the lifecycle stage of every customer's last score against the truth at that time
  (``churned`` vs truly churned), and the stage mix.

    .venv/bin/python bench/eval_churn.py --seeds 7 11
    .venv/bin/python bench/eval_churn.py --model arf     # River ARF instead of the logreg
"""

from __future__ import annotations

import argparse
import bisect
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow import stats  # noqa: E402
from segflow.sim.generator import DAY, SimConfig, Simulation  # noqa: E402
from segflow.sim.noise import Delivery  # noqa: E402
from segflow.sim.truth import truth_records  # noqa: E402
from services.scorer.core import ScoreEmit, Scorer, ScorerConfig, StateWrite  # noqa: E402
from services.scorer.features import QUALIFYING  # noqa: E402

CHURNING = ("gradual_churner", "sudden_churner", "silent_decline", "support_escalator")


def roc_auc(scores: Any, labels: Any) -> float:
    """segflow.stats.roc_auc, NaN (not None) when one class is missing, for printing."""
    auc = stats.roc_auc(scores, labels)
    return float("nan") if auc is None else auc


calibration_error = stats.calibration_error


class RiverAdapter:
    """Any River binary classifier behind the scorer's classifier interface (no
    explanations: top features come out empty), for comparing model families."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def learn_one(self, x: dict[str, float], y: bool) -> None:
        self.model.learn_one(x, y)

    def predict_proba_one(self, x: dict[str, float]) -> dict[bool, float]:
        p = float(self.model.predict_proba_one(x).get(True, 0.0))
        p = min(1.0, max(0.0, p)) if math.isfinite(p) else 0.5
        return {False: 1.0 - p, True: p}

    def predict_explain_one(self, x: dict[str, float]) -> tuple[float, list[tuple[str, float]]]:
        return self.predict_proba_one(x)[True], []

    def predict_explain_array(self, names: Any, x: Any, k: int) -> tuple[float, list[Any]]:
        return self.predict_proba_one(dict(zip(names, x.tolist(), strict=True)))[True], []

    def predict_explain_matrix(self, names: Any, x: Any, k: int) -> tuple[Any, list[Any]]:
        ps = [self.predict_explain_array(names, row, k)[0] for row in x]
        return np.array(ps), [[] for _ in ps]


def make_scorer(kind: str) -> Scorer:
    scorer = Scorer(ScorerConfig())
    if kind == "logreg":
        return scorer
    from river import forest, tree

    model: Any = {
        "arf": lambda: forest.ARFClassifier(n_models=10, seed=1),
        "hat": lambda: tree.HoeffdingAdaptiveTreeClassifier(seed=1),
    }[kind]()
    scorer.model.classifier = RiverAdapter(model)  # type: ignore[assignment]
    return scorer


def evaluate(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    config = SimConfig(customers=args.customers, days=args.days, seed=seed)
    sim = Simulation(config)
    items = [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]
    truth = {r["customer"]: r for r in truth_records(sim)}
    scorer = make_scorer(args.model)
    horizon = scorer.config.churn_horizon_days * DAY
    # what churn_probability now means: no qualifying activity in [t, t + H), from the
    # simulator's delivered events (the truth of that meaning; the script's churn time is
    # the other truth, kept for comparison)
    qualifying = QUALIFYING[scorer.config.churn_activity]
    active_at: dict[str, list[int]] = {}
    for cid, ev in items:
        if ev["event_type"] in qualifying:
            active_at.setdefault(cid, []).append(int(ev["occurred_at"]))
    for times in active_at.values():
        times.sort()
    ys_quiet: list[bool] = []
    store: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}

    def apply(outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite):
                if o.state is None:
                    store.pop(o.customer_id, None)
                else:
                    store[o.customer_id] = o.state
            elif isinstance(o, ScoreEmit) and o.score is not None:
                last[o.customer_id] = o.score

    ps: list[float] = []
    stage_conf: Counter[tuple[bool, bool]] = Counter()  # (stage churned, truly churned)
    ys: list[bool] = []
    at: list[int] = []
    persona: list[str] = []
    next_eval = config.start_ms + args.warmup_days * DAY
    last_eval = config.end_ms - horizon
    started = time.process_time()
    for i, (cid, ev) in enumerate(items):
        t = ev["occurred_at"]
        if t >= next_eval and next_eval <= last_eval:
            apply(scorer.flush(store.get, store.items, t))
            while t >= next_eval and next_eval <= last_eval:
                for c, st in store.items():
                    churn_at = truth[c]["churn_at"]
                    scored = scorer.score(st, next_eval - 1)
                    gone = churn_at is not None and churn_at <= next_eval
                    stage_conf[(scored.stage == "churned", gone)] += 1
                    if gone:
                        continue
                    ps.append(scored.churn)
                    ys.append(churn_at is not None and churn_at <= next_eval + horizon)
                    times = active_at.get(c, [])
                    k = bisect.bisect_left(times, next_eval)
                    ys_quiet.append(k == len(times) or times[k] >= next_eval + horizon)
                    at.append((next_eval - config.start_ms) // DAY)
                    persona.append(truth[c]["persona"])
                next_eval += args.eval_every_days * DAY
        st, outs = scorer.on_event(store.get(cid), cid, ev, t)
        apply(outs)
        if i % args.flush_every == 0:
            apply(scorer.flush(store.get, store.items, t))
    apply(scorer.flush(store.get, store.items, items[-1][1]["occurred_at"]))
    cpu = time.process_time() - started

    p, y, day, who = np.array(ps), np.array(ys, dtype=bool), np.array(at), np.array(persona)
    yq = np.array(ys_quiet, dtype=bool)
    out: dict[str, Any] = {
        "seed": seed,
        "events": len(items),
        "eval_points": len(p),
        "truth_positive_rate": float(y.mean()),
        "truth_roc_auc": roc_auc(p, y),
        "inactivity_roc_auc (no activity in H, not truly churned at t)": roc_auc(p, yq),
        "inactivity_positive_rate": float(yq.mean()),
        "inactivity_calibration_error": calibration_error(p, yq),
        "truth_calibration_error": calibration_error(p, y),
        "mean_churn_probability": float(p.mean()),
        # issue #17: no single value (as emitted, 4 decimals) shared by more than 5 %
        "most_common_value_share (4 decimals)": Counter(np.round(p, 4).tolist()).most_common(1)[0][
            1
        ]
        / len(p),
    }
    for lo in range(args.warmup_days, args.days, 42):
        sel = (day >= lo) & (day < lo + 42)
        if sel.any():
            out[f"truth_roc_auc_days_{lo}_{lo + 41}"] = roc_auc(p[sel], y[sel])
            out[f"inactivity_roc_auc_days_{lo}_{lo + 41}"] = roc_auc(p[sel], yq[sel])
    neg = ~y
    for name in CHURNING:
        sel = y & (who == name)
        if sel.any():
            both = sel | neg
            out[f"truth_roc_auc_{name}_positives({int(sel.sum())})"] = roc_auc(p[both], y[both])
    q = scorer.model.quality()
    out.update(
        {
            "own_labels_learned": q["n_learned"],
            "own_positive_rate": q["positive_rate"],
            "own_prequential_roc_auc": q["roc_auc"],
            "own_prequential_log_loss": q["log_loss"],
            "own_prequential_calibration_error": q["calibration_error"],
        }
    )
    # lifecycle stage at every evaluation point against the truth at that time
    for said in (True, False):
        for truly in (True, False):
            out[
                f"stage_at_eval_points_{'churned' if said else 'other'}_truly_"
                f"{'churned' if truly else 'alive'}"
            ] = stage_conf[(said, truly)]
    # lifecycle of every customer's last score against the truth at that time
    conf: Counter[tuple[bool, bool]] = Counter()
    stages: Counter[str] = Counter()
    for cid, score in last.items():
        churn_at = truth[cid]["churn_at"]
        truly = churn_at is not None and churn_at <= score["as_of"]
        conf[(score["lifecycle_stage"] == "churned", truly)] += 1
        stages[score["lifecycle_stage"]] += 1
    out["lifecycle_churned_and_truly_churned"] = conf[(True, True)]
    out["lifecycle_churned_but_not_truly"] = conf[(True, False)]
    out["lifecycle_not_churned_but_truly"] = conf[(False, True)]
    out["lifecycle_not_churned_and_not_truly"] = conf[(False, False)]
    out["lifecycle_stages"] = ", ".join(f"{k} {v}" for k, v in stages.most_common())
    out["core_cpu_s_incl_eval"] = cpu
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--days", type=int, default=240)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7])
    parser.add_argument("--warmup-days", type=int, default=90)
    parser.add_argument("--eval-every-days", type=int, default=7)
    parser.add_argument("--flush-every", type=int, default=2000, help="flush every N events")
    parser.add_argument("--model", choices=["logreg", "arf", "hat"], default="logreg")
    args = parser.parse_args()
    print(
        f"{args.customers} customers, {args.days} days, model {args.model}, "
        f"warm-up {args.warmup_days} days, eval every {args.eval_every_days} days"
    )
    for seed in args.seeds:
        for key, value in evaluate(args, seed).items():
            if isinstance(value, float):
                print(f"{key:48s} {value:,.4f}")
            else:
                print(f"{key:48s} {value}")
        print()


if __name__ == "__main__":
    main()
