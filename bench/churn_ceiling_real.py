"""Diagnostic (not product code): what churn AUC can the scorer's inputs reach on CDNOW?

``bench/churn_real.py`` replays CDNOW through the scorer and compares its online churn score
with lifetimes' BG/NBD and days since the last purchase. This asks the question behind the
target "segflow >= BG/NBD + 0.02": is +0.02 reachable at all from purchase-only data with
these inputs? It fits offline models on the very feature matrix the scorer computes
(``features.apply_event`` / ``compute_many``, the scorer's own BG/NBD fit via
``Scorer.fill_bgnbd``, ``core.model_matrix``) and measures them on the same test as
``churn_real.py``: every customer as of the first day after calibration (1997-10-01 00:00),
label A = no purchase in the next H days, label B = none to 1998-06-30.

Two ways to train:

* ``oracle``: 2-fold by customer on the test instant itself, with label A (B for column B):
  trained on half of the customers' outcomes, tested on the other half. The ceiling of the
  inputs on exactly the evaluated population, whatever any learner could know in time.
* ``past``: trained on snapshots taken every 7 days from ``--train-from`` to ``cal_end - H``
  whose labels (no purchase in [t, t + H)) are known before ``cal_end``: what a learner that
  sees only calibration data, as the online model does, could reach.

Learners: scikit-learn ``LogisticRegression`` (standardised), ``HistGradientBoosting
Classifier``, and a logistic regression with the online model's sign constraints
(``core.CHURN_SIGNS``, scipy L-BFGS-B with bounds): the monotonic form the product keeps.

Input sets: ``scorer`` = the 57 model inputs as served (``core.MODEL_INPUTS``);
``+extra`` = those plus inputs the scorer does not give the model: log T (age), recency / T,
t_x / T, log frequency x log recency, recency bins (one-hot), log revenue per repeat day;
``btyd`` = only (x, t_x, T, recency, monetary) raw; ``scorer+extra+history`` = also the
whole calibration history in nine 30-day bins, the first order's amount and the first gap
(:func:`history_inputs`, from the raw rows). Baselines: recency, BG/NBD expected
(the scorer's fit), P(alive).

    .venv/bin/python bench/churn_ceiling_real.py --horizon-days 90
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import optimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from churn_real import DAY, cdnow_rows, to_day  # noqa: E402
from eval_churn import roc_auc  # noqa: E402

from services.scorer import btyd  # noqa: E402
from services.scorer.core import (  # noqa: E402
    _MI_NAMES,
    CHURN_SIGNS,
    Scorer,
    ScorerConfig,
    model_matrix,
)
from services.scorer.features import (  # noqa: E402
    FEATURE_INDEX,
    QUALIFYING,
    Buckets,
    apply_event,
    compute_many,
    new_state,
    store_buckets,
)

Arr = npt.NDArray[np.float64]


def feature_rows(
    per: dict[str, list[tuple[int, float]]], cutoff: int, sc: Scorer
) -> tuple[list[str], Arr]:
    """Feature rows (as the scorer computes them) of every customer with a purchase before
    day ``cutoff``, as of ``cutoff`` 00:00, the ``bgnbd_*`` columns from a BG/NBD fitted (by
    the scorer's own code) on these customers' summaries, as the scorer refits it."""
    qual = QUALIFYING["purchase"]
    ids, states = [], []
    for cid, evs in per.items():
        seen = [(d, v) for d, v in evs if d < cutoff]
        if not seen:
            continue
        st = new_state(cid, seen[0][0] * DAY + 12 * 3_600_000)
        b: Buckets | None = None
        for k, (d, v) in enumerate(seen):
            ev = {
                "event_type": "purchase",
                "occurred_at": d * DAY + 12 * 3_600_000 + k,
                "amount": v,
            }
            b = apply_event(st, ev, b, qual)
        assert b is not None
        store_buckets(st, b)
        ids.append(cid)
        states.append(st)
    as_of = cutoff * DAY
    out = []
    for lo in range(0, len(states), 512):
        chunk = states[lo : lo + 512]
        out.append(compute_many(chunk, [as_of] * len(chunk), [Buckets.of(s) for s in chunk]))
    rows = np.vstack(out)
    x, tx, t = (
        rows[:, FEATURE_INDEX[n]] for n in ("btyd_frequency", "btyd_recency_days", "btyd_age_days")
    )
    sc.model.bgnbd = btyd.fit(x, tx, t)
    sc.fill_bgnbd(rows)
    return ids, rows


def extra_inputs(rows: Arr) -> Arr:
    """Inputs the scorer does not give its model (see the module doc)."""
    f = FEATURE_INDEX
    x, tx, t = (
        rows[:, f["btyd_frequency"]],
        rows[:, f["btyd_recency_days"]],
        rows[:, f["btyd_age_days"]],
    )
    rec = rows[:, f["days_since_qualifying"]]
    rev = rows[:, f["lifetime_revenue"]]
    bins = np.array([7, 14, 30, 60, 90, 120, 150, 180, 210])
    onehot = (np.digitize(rec, bins)[:, None] == np.arange(len(bins) + 1)[None, :]).astype(float)
    return np.column_stack(
        [
            np.log1p(t),
            rec / np.maximum(t, 1.0),
            tx / np.maximum(t, 1.0),
            np.log1p(x) * np.log1p(rec),
            np.log1p(rev / (x + 1.0)),
            onehot,
        ]
    )


def btyd_inputs(rows: Arr) -> Arr:
    f = FEATURE_INDEX
    cols = ["btyd_frequency", "btyd_recency_days", "btyd_age_days", "days_since_qualifying"]
    return np.column_stack([rows[:, [f[c] for c in cols]], rows[:, f["lifetime_revenue"]]])


def history_inputs(ids: list[str], per: dict[str, list[tuple[int, float]]], cutoff: int) -> Arr:
    """Purchase-only inputs beyond the scorer's: the whole calibration history in nine
    30-day bins back from ``cutoff`` (log purchase days and log revenue per bin), the first
    purchase's amount and the days from the first to the second purchase (what any
    purchase-only model could know; computed from the raw rows, not by the scorer)."""
    out = np.zeros((len(ids), 20))
    for i, c in enumerate(ids):
        days: dict[int, float] = defaultdict(float)
        for d, v in per[c]:
            if d < cutoff:
                days[d] += v
        ds = sorted(days)
        for d in ds:
            k = (cutoff - d - 1) // 30
            if k < 9:
                out[i, k] += 1.0
                out[i, 9 + k] += days[d]
        out[i, 18] = days[ds[0]]
        out[i, 19] = ds[1] - ds[0] if len(ds) > 1 else cutoff - ds[0] + 365.0
    return np.log1p(out)


def labels(
    ids: list[str], per: dict[str, list[tuple[int, float]]], lo: int, hi: int
) -> npt.NDArray[np.bool_]:
    """No purchase in days [lo, hi)."""
    return np.array([not any(lo <= d < hi for d, _ in per[c]) for c in ids])


class SignedLogReg:
    """Logistic regression on standardised inputs with the online model's sign constraints
    (weight >= 0 for +1, <= 0 for -1, free otherwise), L2 ``l2``, fitted by L-BFGS-B."""

    def __init__(self, names: list[str], l2: float = 1e-4) -> None:
        self.signs = [CHURN_SIGNS.get(n, 0) for n in names]
        self.l2 = l2

    def fit(self, x: Arr, y: Any) -> SignedLogReg:
        self.mu, self.sd = x.mean(axis=0), x.std(axis=0) + 1e-9
        z = (x - self.mu) / self.sd
        yv = np.asarray(y, dtype=float)
        n, k = z.shape

        def f(w: Arr) -> tuple[float, Arr]:
            s = z @ w[:k] + w[k]
            p = 1.0 / (1.0 + np.exp(-s))
            loss = np.logaddexp(0.0, s) - yv * s
            g = (p - yv) / n
            grad = np.append(z.T @ g + self.l2 * w[:k], g.sum())
            return float(loss.mean() + 0.5 * self.l2 * (w[:k] ** 2).sum()), grad

        bounds = [(0, None) if s > 0 else (None, 0) if s < 0 else (None, None) for s in self.signs]
        res = optimize.minimize(
            f, np.zeros(k + 1), jac=True, method="L-BFGS-B", bounds=[*bounds, (None, None)]
        )
        self.w = res.x
        return self

    def predict_proba(self, x: Arr) -> Arr:
        s = ((x - self.mu) / self.sd) @ self.w[:-1] + self.w[-1]
        p = 1.0 / (1.0 + np.exp(-s))
        return np.column_stack([1 - p, p])


def learners(names: list[str]) -> dict[str, Any]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)),
        "logreg-signed": lambda: SignedLogReg(names),
        "gbm": lambda: HistGradientBoostingClassifier(
            max_iter=300, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=50, random_state=0
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cal-end", default="1997-10-01", help="first day after calibration")
    parser.add_argument("--end", default="1998-07-01", help="first day after the holdout")
    parser.add_argument("--horizon-days", type=int, default=90)
    parser.add_argument("--train-from", default="1997-02-15", help="first past snapshot")
    parser.add_argument("--every-days", type=int, default=7, help="past snapshots' spacing")
    parser.add_argument(
        "--learners", nargs="+", default=["logreg", "logreg-signed", "gbm"], help="which to fit"
    )
    parser.add_argument("--sets", nargs="+", default=None, help="input sets (default: all)")
    parser.add_argument(
        "--gbm-past-max", type=int, default=150_000, help="past examples the GBM sees (speed)"
    )
    args = parser.parse_args()
    load0 = os.getloadavg()
    started = time.perf_counter()
    h = args.horizon_days
    cal_end, end = to_day(args.cal_end), to_day(args.end)
    per: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for cid, d, v in cdnow_rows():
        per[cid].append((d, v))
    for evs in per.values():
        evs.sort()
    sc = Scorer(replace(ScorerConfig(), churn_horizon_days=h, churn_activity="purchase"))

    ids, rows = feature_rows(per, cal_end, sc)
    ya, yb = labels(ids, per, cal_end, cal_end + h), labels(ids, per, cal_end, end)
    names = list(_MI_NAMES)
    sets = {
        "scorer": (lambda r, i, c: model_matrix(r.copy()), names),
        "scorer+extra": (
            lambda r, i, c: np.column_stack([model_matrix(r.copy()), extra_inputs(r)]),
            names + [f"extra{i}" for i in range(extra_inputs(rows[:1]).shape[1])],
        ),
        "btyd": (lambda r, i, c: btyd_inputs(r), ["x", "tx", "T", "rec", "rev"]),
        "scorer+extra+history": (
            lambda r, i, c: np.column_stack(
                [model_matrix(r.copy()), extra_inputs(r), history_inputs(i, per, c)]
            ),
            names + [f"extra{i}" for i in range(15)] + [f"hist{i}" for i in range(20)],
        ),
    }
    f = FEATURE_INDEX
    print(
        f"CDNOW, test: {len(ids):,} customers as of {args.cal_end} 00:00, H = {h} d; label A "
        f"(no purchase in H) rate {ya.mean():.3f}, label B (none to {args.end}) {yb.mean():.3f}"
    )
    print(f"{'baseline / model':52s} {'AUC A':>7s} {'AUC B':>7s}")
    for name, s in (
        ("days since last purchase", rows[:, f["days_since_qualifying"]]),
        ("BG/NBD expected in H (scorer's fit, negated)", -rows[:, f["bgnbd_expected"]]),
        ("BG/NBD P(alive) (negated)", -rows[:, f["bgnbd_p_alive"]]),
        ("BG/NBD P(none in H)", rows[:, f["bgnbd_p_none"]]),
    ):
        print(f"{name:52s} {roc_auc(s, ya):7.3f} {roc_auc(s, yb):7.3f}")

    # past snapshots (labels known before cal_end)
    past: list[tuple[list[str], int, Arr, npt.NDArray[np.bool_]]] = []
    t = to_day(args.train_from)
    while t + h <= cal_end:
        pids, prows = feature_rows(per, t, sc)
        past.append((pids, t, prows, labels(pids, per, t, t + h)))
        t += args.every_days
    py_all = np.concatenate([y for *_, y in past])
    print(
        f"past snapshots: {len(past)} days from {args.train_from} every {args.every_days} d, "
        f"{len(py_all):,} examples, positive rate {py_all.mean():.3f}"
    )
    rng = np.random.default_rng(0)
    fold = rng.integers(0, 2, len(ids))
    for set_name, (build, cols) in sets.items():
        if args.sets and set_name not in args.sets:
            continue
        xt = build(rows, ids, cal_end)
        xp = np.vstack([build(r, i, c) for i, c, r, _ in past])
        for lname, make in learners(cols).items():
            if lname not in args.learners or (lname == "logreg-signed" and set_name == "btyd"):
                continue
            res = []
            for y in (ya, yb):
                s = np.empty(len(y))
                for k in (0, 1):
                    m = make().fit(xt[fold != k], y[fold != k])
                    s[fold == k] = m.predict_proba(xt[fold == k])[:, 1]
                res.append(roc_auc(s, y))
            sub = np.arange(len(py_all))
            if lname == "gbm" and len(sub) > args.gbm_past_max:
                sub = np.sort(rng.choice(sub, args.gbm_past_max, replace=False))
            m = make().fit(xp[sub], py_all[sub])
            sp = m.predict_proba(xt)[:, 1]
            print(
                f"{set_name + ' / ' + lname:30s} oracle {res[0]:.3f} {res[1]:.3f}   "
                f"past {roc_auc(sp, ya):.3f} {roc_auc(sp, yb):.3f}",
                flush=True,
            )
    load1 = os.getloadavg()
    print(
        f"{time.perf_counter() - started:.0f} s wall; load average {load0[0]:.2f} before, "
        f"{load1[0]:.2f} after (machine shared, numbers under load)"
    )


if __name__ == "__main__":
    main()
