"""Diagnostic (not product code): where is the churn model's gap to the simulator's truth?

Replays a simulated population through ``services.scorer.core.Scorer`` exactly as
``bench/eval_churn.py`` does, and records on the way

* every training example the scorer learns (customer, snapshot day ``t``, its feature row as
  of ``t``, the observable label, and when it was learned: how many evaluation batches had
  happened before), and
* every evaluation point (customer, day, feature row, the truth label "churns within 30
  days", persona, and the score the product gave it).

Then it replays those examples offline, in the same order relative to the evaluation points
(prequential: every evaluation batch is scored with the model as it was then), through
different learners and label definitions:

* ``logreg/observable``: the product's learner on its own labels (reproduces eval_churn);
* ``logreg/truth``: the same learner, the same snapshots, the same timing, but the label is
  the simulator's truth (churn in ``[t, t + 30 d)``; snapshots of customers truly gone at
  ``t`` dropped) -- isolates the label definition;
* ``logreg/truth-asap``: truth labels learned as soon as the truth decides them (a churn at
  its moment, a survival at ``t + 30 d``) -- isolates the label delay;
* ``arf/…``, ``bag/…``: a stronger River learner (adaptive random forest, bagged Hoeffding
  trees) on the same inputs -- isolates the learner;
* ``offline/…``: the learner on all the training snapshots of half of the customers (future
  included, no label delay), tested on the other half -- the labels' and features' worth
  without the prequential delay;
* ``oracle/…``: a learner trained on the evaluation points themselves with the truth (half
  of the customers, tested on the other half, both ways) -- the ceiling of the features on
  the evaluated population, whatever the training distribution;
* ``--shape``: the same with indicator inputs for the bins of a few features
  (:data:`SHAPE_BINS`): what a linear learner gains from the non-monotonic shapes;
* ``cold-start prior alone``: the product's hand-set prior (``core.CHURN_PRIOR``).

    .venv/bin/python bench/churn_ceiling.py --seeds 7 --customers 1000
    .venv/bin/python bench/churn_ceiling.py --seeds 7 --learners logreg arf --cache /tmp/cc
    .venv/bin/python bench/churn_ceiling.py --seeds 7 --shape --learners logreg logreg-fast \
        --offline logreg logreg-fast --oracle logreg logreg-fast --cache /tmp/cc
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_churn import CHURNING, calibration_error, roc_auc  # noqa: E402

from segflow.sim.generator import DAY, SimConfig, Simulation  # noqa: E402
from segflow.sim.noise import Delivery  # noqa: E402
from segflow.sim.truth import truth_records  # noqa: E402
from services.scorer import core  # noqa: E402
from services.scorer.core import ScoreEmit, Scorer, ScorerConfig, StateWrite  # noqa: E402
from services.scorer.features import FEATURE_INDEX, compute_many  # noqa: E402
from services.scorer.model import ChurnClassifier  # noqa: E402


class RecordingScorer(Scorer):
    """The scorer, recording every example it learns (customer, snapshot, label, row)."""

    def __init__(self, config: ScorerConfig) -> None:
        super().__init__(config)
        self.batch = 0  # evaluation batches so far
        self.train: list[tuple[str, int, bool, int, int, Any]] = []

    def _learn_day(self, day: int, states: Iterable[tuple[str, Any]]) -> int:
        states = list(states)
        every = self.config.snapshot_every_days
        picked = []
        for cid, st in states:
            if zlib.crc32(cid.encode()) % every != day % every:
                continue
            for t, churned in self._labelled(st, day):
                picked.append((cid, st, t, churned))
        if picked:
            sts = [st for _, st, _, _ in picked]
            rows = compute_many(
                sts,
                [t * DAY - 1 for _, _, t, _ in picked],
                [self.buckets(st["customer_id"], st) for st in sts],
            )
            for (cid, _, t, churned), row in zip(picked, rows, strict=True):
                self.train.append((cid, t, churned, day, self.batch, row.astype(np.float32)))
        return super()._learn_day(day, states)


def record(customers: int, days: int, seed: int, warmup: int, every: int) -> dict[str, Any]:
    """Replay one simulation through the recording scorer (as eval_churn does)."""
    config = SimConfig(customers=customers, days=days, seed=seed)
    sim = Simulation(config)
    items = [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]
    truth = {r["customer"]: r for r in truth_records(sim)}
    scorer = RecordingScorer(ScorerConfig())
    horizon = scorer.config.churn_horizon_days * DAY
    store: dict[str, dict[str, Any]] = {}

    def apply(outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite):
                if o.state is None:
                    store.pop(o.customer_id, None)
                else:
                    store[o.customer_id] = o.state
            elif isinstance(o, ScoreEmit):
                pass

    ev_rows: list[Any] = []
    ev: list[tuple[str, int, bool, float, int]] = []  # cid, day, y, product p, batch
    next_eval = config.start_ms + warmup * DAY
    last_eval = config.end_ms - horizon
    for i, (cid, e) in enumerate(items):
        t = e["occurred_at"]
        if t >= next_eval and next_eval <= last_eval:
            apply(scorer.flush(store.get, store.items, t))
            while t >= next_eval and next_eval <= last_eval:
                alive = []
                for c, st in store.items():
                    churn_at = truth[c]["churn_at"]
                    if churn_at is not None and churn_at <= next_eval:
                        continue
                    alive.append((c, st))
                sts = [st for _, st in alive]
                if sts:
                    rows = compute_many(
                        sts,
                        [next_eval - 1] * len(sts),
                        [scorer.buckets(st["customer_id"], st) for st in sts],
                    )
                    scored = scorer.score_many([(st, next_eval - 1) for st in sts])
                    for (c, _), row, s in zip(alive, rows, scored, strict=True):
                        churn_at = truth[c]["churn_at"]
                        y = churn_at is not None and churn_at <= next_eval + horizon
                        day = (next_eval - config.start_ms) // DAY
                        ev.append((c, day, y, s.churn, scorer.batch))
                        ev_rows.append(row.astype(np.float32))
                scorer.batch += 1
                next_eval += every * DAY
        _, outs = scorer.on_event(store.get(cid), cid, e, t)
        apply(outs)
        if i % 2000 == 0:
            apply(scorer.flush(store.get, store.items, t))
    start_day = config.start_ms // DAY
    tr = scorer.train
    return {
        "tr_cid": np.array([r[0] for r in tr]),
        "tr_t": np.array([r[1] - start_day for r in tr]),  # snapshot day in the span
        "tr_y": np.array([r[2] for r in tr], dtype=bool),
        "tr_day": np.array([r[3] - start_day for r in tr]),  # day boundary it matured on
        "tr_batch": np.array([r[4] for r in tr]),
        "tr_rows": np.array([r[5] for r in tr]),
        "ev_cid": np.array([r[0] for r in ev]),
        "ev_day": np.array([r[1] for r in ev]),
        "ev_y": np.array([r[2] for r in ev], dtype=bool),
        "ev_p": np.array([r[3] for r in ev]),
        "ev_batch": np.array([r[4] for r in ev]),
        "ev_rows": np.array(ev_rows),
        "persona": {c: r["persona"] for c, r in truth.items()},
        "churn_day": {
            c: (None if r["churn_at"] is None else (r["churn_at"] - config.start_ms) / DAY)
            for c, r in truth.items()
        },
        "warmup": warmup,
        "every": every,
    }


def load_or_record(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    if args.cache:
        path = Path(args.cache) / f"ceiling_{args.customers}_{args.days}_{seed}.npz"
        if path.exists():
            z = np.load(path, allow_pickle=True)
            return {
                k: (z[k].item() if z[k].dtype == object and z[k].ndim == 0 else z[k])
                for k in z.files
            }
    t0 = time.process_time()
    rec = record(args.customers, args.days, seed, args.warmup_days, args.eval_every_days)
    print(
        f"  recorded seed {seed} in {time.process_time() - t0:.0f} CPU s: "
        f"{len(rec['tr_y'])} training examples, {len(rec['ev_y'])} evaluation points"
    )
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            **{
                k: (np.array(v, dtype=object) if isinstance(v, dict) else v) for k, v in rec.items()
            },
        )
    return rec


# -- learners ------------------------------------------------------------------------------
#: ``--shape``: indicator inputs, one per bin ``[edge_i, edge_i+1)`` (the last open) of
#: features whose relation to churn is not a straight line, added to the model inputs.
SHAPE_BINS: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("idle_days_active", (0, 1, 2, 4, 7, 11, 15, 22, 31, 46)),
    ("idle_days_feature_use", (0, 2, 4, 8, 15, 22, 31, 46, 61, 91, 120)),
    ("idle_days_purchase", (0, 8, 15, 22, 31, 46, 61)),
    ("idle_days_session", (0, 2, 4, 8, 15, 22, 31, 46)),
    ("escalations_28d", (0, 1, 3)),
    ("escalations_7d", (0, 1, 3)),
    ("tenure_days", (0, 14, 30, 60, 90, 121)),
    ("feature_use_90d", (0, 1, 5, 20)),
    ("purchases_90d", (0, 1, 3, 8)),
    ("active_days_28d", (0, 1, 3, 6, 10, 15)),
)
SHAPE_NAMES = tuple(
    f"{name}[{lo:g},{hi:g})"
    for name, edges in SHAPE_BINS
    for lo, hi in zip(edges, (*edges[1:], math.inf), strict=True)
)


def model_rows(rows: Any, shape: bool = False) -> Any:
    """The product's model inputs (``core.MODEL_INPUTS``) of full feature rows, and with
    ``shape`` the :data:`SHAPE_BINS` indicators after them."""
    x = core.model_matrix(rows.astype(np.float64))
    if not shape:
        return x
    cols = []
    for name, edges in SHAPE_BINS:
        v = rows[:, FEATURE_INDEX[name]]
        for lo, hi in zip(edges, (*edges[1:], math.inf), strict=True):
            cols.append(((v >= lo) & (v < hi)).astype(np.float64))
    return np.hstack([x, np.column_stack(cols)])


def prior_scores(xs_ev: Any, names: tuple[str, ...]) -> Any:
    """The product's cold-start prior (``core.CHURN_PRIOR``) alone."""
    intercept, terms = core.CHURN_PRIOR
    index = {n: i for i, n in enumerate(names)}
    z = intercept + sum(w * (xs_ev[:, index[n]] - c) for n, w, c in terms)
    return 1.0 / (1.0 + np.exp(-z))


def offline(
    rec: dict[str, Any],
    kind: str,
    names: tuple[str, ...],
    ys: Any,
    keep: Any,
    xs_tr: Any,
    xs_ev: Any,
) -> Any:
    """Two-fold by customer, not prequential: trained on all the training snapshots of one
    half of the customers (in time order, the future included), scored on the evaluation
    points of the other half -- what the labels and features allow without the delay."""
    ftr = np.array([zlib.crc32(c.encode()) % 2 for c in rec["tr_cid"]])
    fev = np.array([zlib.crc32(c.encode()) % 2 for c in rec["ev_cid"]])
    order = np.argsort(rec["tr_day"], kind="stable")
    p = np.zeros(len(fev))
    for f in (0, 1):
        learner = make(kind, names)
        for j in order[(ftr[order] != f) & keep[order]]:
            learner.learn(xs_tr[j], bool(ys[j]))
        sel = np.flatnonzero(fev == f)
        p[sel] = learner.predict(xs_ev[sel])
    return p


class Logreg:
    name = "logreg"

    def __init__(self, names: tuple[str, ...], **kw: Any) -> None:
        self.clf = ChurnClassifier(**kw)
        self.names = names

    def learn(self, x: Any, y: bool) -> None:
        self.clf.learn_one(dict(zip(self.names, x.tolist(), strict=True)), y)

    def predict(self, xs: Any) -> Any:
        return self.clf.predict_explain_matrix(self.names, xs, 1)[0]


class RiverModel:
    def __init__(self, name: str, model: Any, names: tuple[str, ...]) -> None:
        self.name = name
        self.model = model
        self.names = names

    def learn(self, x: Any, y: bool) -> None:
        self.model.learn_one(dict(zip(self.names, x.tolist(), strict=True)), y)

    def predict(self, xs: Any) -> Any:
        out = []
        for x in xs.tolist():
            p = self.model.predict_proba_one(dict(zip(self.names, x, strict=True))).get(True, 0.0)
            out.append(p if math.isfinite(p) else 0.5)
        return np.array(out)


def make(kind: str, names: tuple[str, ...]) -> Any:
    from river import ensemble, forest, preprocessing, tree

    if kind == "logreg":
        return Logreg(names)
    if kind == "logreg-fast":
        return Logreg(names, lr=0.02)
    if kind == "arf":
        return RiverModel("arf", forest.ARFClassifier(n_models=10, seed=1), names)
    if kind == "bag":
        return RiverModel(
            "bag",
            ensemble.BaggingClassifier(
                tree.HoeffdingTreeClassifier(grace_period=100), n_models=10, seed=1
            ),
            names,
        )
    if kind == "hat":
        return RiverModel(
            "hat",
            preprocessing.StandardScaler() | tree.HoeffdingAdaptiveTreeClassifier(seed=1),
            names,
        )
    raise ValueError(kind)


def truth_labels(rec: dict[str, Any], window: int = 30) -> tuple[Any, Any, Any]:
    """Truth label of each training snapshot (churn in ``[t, t + window)``), whether the
    customer was truly still there at ``t``, and the batch by which the truth is known as
    soon as decided (the churn moment, or ``t + window``; plus the 2 days of lateness)."""
    churn = rec["churn_day"]
    t = rec["tr_t"]
    cd = np.array([np.inf if churn[c] is None else churn[c] for c in rec["tr_cid"]])
    alive = cd > t
    y = alive & (cd < t + window)
    known_day = np.where(y, np.ceil(cd), t + window) + 2
    batch = np.maximum(0, np.ceil((known_day - rec["warmup"]) / rec["every"])).astype(int)
    return y, alive, batch


def prequential(
    rec: dict[str, Any],
    learner: Any,
    labels: Any,
    keep: Any,
    batches: Any,
    xs_tr: Any,
    xs_ev: Any,
) -> Any:
    """Scores of the evaluation points, each batch with the learner trained on the examples
    learned before it (in their original order)."""
    order = np.lexsort((np.arange(len(batches)), batches))
    order = order[keep[order]]
    ev_batch = rec["ev_batch"]
    p = np.zeros(len(ev_batch))
    k = 0
    for b in range(int(ev_batch.max()) + 1 if len(ev_batch) else 0):
        while k < len(order) and batches[order[k]] <= b:
            j = order[k]
            learner.learn(xs_tr[j], bool(labels[j]))
            k += 1
        sel = np.flatnonzero(ev_batch == b)
        if len(sel):
            p[sel] = learner.predict(xs_ev[sel])
    return p


def oracle(rec: dict[str, Any], kind: str, names: tuple[str, ...], xs_ev: Any) -> Any:
    """Two-fold by customer: trained on the evaluation points (truth labels, in time order)
    of one half of the customers, scored on the other half."""
    cids = rec["ev_cid"]
    fold = np.array([zlib.crc32(c.encode()) % 2 for c in cids])
    order = np.argsort(rec["ev_day"], kind="stable")
    p = np.zeros(len(cids))
    for f in (0, 1):
        learner = make(kind, names)
        for j in order[fold[order] != f]:
            learner.learn(xs_ev[j], bool(rec["ev_y"][j]))
        sel = np.flatnonzero(fold == f)
        p[sel] = learner.predict(xs_ev[sel])
    return p


def report(name: str, rec: dict[str, Any], p: Any, extra: str = "") -> None:
    y = rec["ev_y"]
    who = np.array([rec["persona"][c] for c in rec["ev_cid"]])
    parts = []
    for persona in CHURNING:
        sel = (y & (who == persona)) | ~y
        parts.append(f"{roc_auc(p[sel], y[sel]):.2f}")
    idle = rec["ev_rows"][:, FEATURE_INDEX["idle_days_active"]]
    quiet = idle >= 7
    print(
        f"  {name:34s} AUC {roc_auc(p, y):.3f}  ECE {calibration_error(p, y):.3f}  "
        f"mean p {p.mean():.3f}  grad/sudden/silent/support {'/'.join(parts)}  "
        f"active<7d {roc_auc(p[~quiet], y[~quiet]):.3f} idle>=7d {roc_auc(p[quiet], y[quiet]):.3f}"
        f"{extra}"
    )


def main() -> None:
    if not hasattr(Scorer, "_labelled"):
        sys.exit(
            "bench/churn_ceiling.py records the labels of the scorer before issue #17 (silence "
            "after a regular customer's activity, recomputed snapshots); the scorer now labels "
            "snapshots as scored, H days later (Scorer.mature). Not ported yet: use "
            "bench/eval_churn.py and bench/churn_real.py."
        )
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--days", type=int, default=240)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7])
    parser.add_argument("--warmup-days", type=int, default=90)
    parser.add_argument("--eval-every-days", type=int, default=7)
    parser.add_argument("--learners", nargs="+", default=["logreg", "arf", "bag"])
    parser.add_argument("--oracle", nargs="*", default=["logreg", "arf"])
    parser.add_argument("--offline", nargs="*", default=["logreg"])
    parser.add_argument("--shape", action="store_true", help="add the SHAPE_BINS indicators")
    parser.add_argument("--cache", default="", help="directory to keep recordings in")
    args = parser.parse_args()
    names = tuple(n for n, _ in core.MODEL_INPUTS) + (SHAPE_NAMES if args.shape else ())
    for seed in args.seeds:
        print(f"seed {seed}: {args.customers} customers, {args.days} days")
        rec = load_or_record(args, seed)
        y_obs = rec["tr_y"]
        y_true, alive, truth_batch = truth_labels(rec)
        all_rows = np.ones(len(y_obs), dtype=bool)
        xs_tr = model_rows(rec["tr_rows"], args.shape)
        xs_ev = model_rows(rec["ev_rows"], args.shape)
        print(
            f"  {len(y_obs)} training snapshots: observable positive rate {y_obs.mean():.3f}; "
            f"truly gone at t {(~alive).mean():.3f}; truth positive rate (alive) "
            f"{y_true[alive].mean():.3f}; observable vs truth disagree on "
            f"{(y_obs[alive] != y_true[alive]).mean():.3f} of the alive ones"
        )
        report("product (as replayed)", rec, rec["ev_p"])
        report("cold-start prior alone", rec, prior_scores(xs_ev, names))
        variants: list[tuple[str, Any, Any, Any]] = [
            ("observable", y_obs, all_rows, rec["tr_batch"]),
            ("truth", y_true, alive, rec["tr_batch"]),
            ("truth-asap", y_true, alive, truth_batch),
        ]
        for kind in args.learners:
            for label, ys, keep, batches in variants:
                if kind not in ("logreg", "logreg-fast") and label == "truth-asap":
                    continue
                t0 = time.process_time()
                p = prequential(rec, make(kind, names), ys, keep, batches, xs_tr, xs_ev)
                report(f"{kind}/{label}", rec, p, f"  ({time.process_time() - t0:.0f} s)")
        for kind in args.offline:
            for label, ys, keep, _ in variants[:2]:
                t0 = time.process_time()
                p = offline(rec, kind, names, ys, keep, xs_tr, xs_ev)
                report(
                    f"offline {kind}/{label} (2-fold)",
                    rec,
                    p,
                    f"  ({time.process_time() - t0:.0f} s)",
                )
        for kind in args.oracle:
            t0 = time.process_time()
            p = oracle(rec, kind, names, xs_ev)
            report(
                f"oracle {kind} (2-fold, truth)", rec, p, f"  ({time.process_time() - t0:.0f} s)"
            )
        print()


if __name__ == "__main__":
    main()
