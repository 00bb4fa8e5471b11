"""Churn scores on real purchase-only data: CDNOW (shipped in the ``lifetimes`` wheel).

CDNOW_master.txt: 69,659 transactions of 23,570 customers of an online CD store, first
purchases in the first quarter of 1997, followed to the end of June 1998 (one row per
transaction: customer, date, number of CDs, dollar value). Nothing is downloaded at run time.

Every calibration-period transaction is replayed through ``services.scorer.core.Scorer`` in
event time as one ``purchase`` event (at noon of its date, a second apart within a day);
before the first event of each day the scorer flushes, so silent customers are refreshed and
labels mature day by day as in the service; after the last event the clock is advanced day
by day to the end of calibration. Each customer's churn probability is then read as of that
instant (``Scorer.score_many``) and compared, by ROC AUC, with

* the BG/NBD expected number of purchases in the horizon (``lifetimes.BetaGeoFitter``,
  fitted here on the calibration summary computed from the raw rows, not by segflow; its
  negative, so that higher means more likely to churn),
* days since the customer's last purchase,

against two labels: no purchase in the next H days (the scorer's horizon) and no purchase in
the whole holdout (the nine months to 1998-06-30). Also printed: the share of customers
holding the most common churn value (as emitted, 4 decimals), the replay's speed and the
number of scores emitted.

    .venv/bin/python bench/churn_real.py                    # calibration to 1997-09-30
    .venv/bin/python bench/churn_real.py --horizon-days 90 --cal-end 1997-09-30
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_churn import calibration_error, roc_auc  # noqa: E402

from services.scorer.core import ScoreEmit, Scorer, ScorerConfig, StateWrite  # noqa: E402

DAY = 86_400_000
EPOCH = dt.date(1970, 1, 1)


def cdnow_rows() -> list[tuple[str, int, float]]:
    """(customer, day number since the epoch, dollar value) of every CDNOW transaction."""
    import lifetimes

    path = Path(lifetimes.__file__).parent / "datasets" / "CDNOW_master.txt"
    rows = []
    with path.open() as f:
        next(f)  # header
        for line in f:
            cid, date, _cds, value = line.split()
            d = dt.date(int(date[:4]), int(date[4:6]), int(date[6:]))
            rows.append((cid, (d - EPOCH).days, float(value)))
    return rows


def to_day(s: str) -> int:
    return (dt.date.fromisoformat(s) - EPOCH).days


def summary(rows: list[tuple[str, int, float]], end: int) -> dict[str, tuple[int, int, int]]:
    """BG/NBD summary per customer from purchases before day ``end``, in days: (repeat
    purchase days x, recency t_x from the first to the last purchase day, age T)."""
    days: dict[str, set[int]] = defaultdict(set)
    for cid, d, _ in rows:
        if d < end:
            days[cid].add(d)
    out = {}
    for cid, ds in days.items():
        first, last = min(ds), max(ds)
        out[cid] = (len(ds) - 1, last - first, end - first)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cal-end", default="1997-10-01", help="first day after calibration")
    parser.add_argument("--end", default="1998-07-01", help="first day after the holdout")
    parser.add_argument("--horizon-days", type=int, default=None, help="default: the scorer's")
    parser.add_argument("--activity", default="purchase", help="qualifying activity")
    parser.add_argument("--sample", type=int, default=1, help="every Nth customer only (speed)")
    args = parser.parse_args()
    load0 = os.getloadavg()
    rows = cdnow_rows()
    if args.sample > 1:
        rows = [r for r in rows if int(r[0]) % args.sample == 0]
    cal_end, end = to_day(args.cal_end), to_day(args.end)
    config = ScorerConfig()
    names = {f.name for f in fields(ScorerConfig)}
    if args.horizon_days is not None and "churn_horizon_days" in names:
        config = replace(config, churn_horizon_days=args.horizon_days)
    if "churn_activity" in names:
        config = replace(config, churn_activity=args.activity)
    horizon = config.churn_horizon_days
    sc = Scorer(config)
    store: dict[str, dict[str, Any]] = {}
    emitted = Counter()

    def apply(outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite):
                if o.state is None:
                    store.pop(o.customer_id, None)
                else:
                    store[o.customer_id] = o.state
            elif isinstance(o, ScoreEmit) and o.score is not None:
                emitted[o.customer_id] += 1

    cal = sorted((d, i, cid, v) for i, (cid, d, v) in enumerate(rows) if d < cal_end)
    print(
        f"CDNOW: {len(rows):,} transactions, {len({r[0] for r in rows}):,} customers; "
        f"calibration {len(cal):,} transactions before {args.cal_end}, holdout to {args.end} "
        f"({end - cal_end} days); scorer horizon H = {horizon} days, qualifying activity "
        f"{getattr(config, 'churn_activity', 'n/a')}"
    )
    started, cpu0 = time.perf_counter(), time.process_time()
    day_now = None
    seq = 0
    for d, _i, cid, value in cal:
        if d != day_now:
            # time passes to this day's first minutes (the service sees midnight go by
            # before the noon purchases): refreshes and snapshots as of midnight
            if day_now is not None and d // 30 != day_now // 30:
                print(
                    f"  replay at {EPOCH + dt.timedelta(days=d)}: "
                    f"{time.perf_counter() - started:.0f} s, "
                    f"labels learned {sc.model.n_learned:,}",
                    flush=True,
                )
            if day_now is not None:
                sc.max_event_ms = max(sc.max_event_ms or 0, d * DAY + config.watermark_delay_ms)
                apply(sc.flush(store.get, store.items, d * DAY))
            day_now, seq = d, 0
        t = d * DAY + 12 * 3_600_000 + seq * 1000
        seq += 1
        event = {"event_type": "purchase", "occurred_at": t, "amount": value}
        apply(sc.on_event(store.get(cid), cid, event, now_ms=t)[1])
    # the clock on to the end of calibration, a day at a time (as time passes in the service)
    assert day_now is not None
    for d in range(day_now + 1, cal_end + 1):
        t = d * DAY + config.watermark_delay_ms
        sc.max_event_ms = max(sc.max_event_ms or 0, t)
        apply(sc.flush(store.get, store.items, t))
    replay_s, replay_cpu = time.perf_counter() - started, time.process_time() - cpu0
    ids = sorted(store)
    as_of = cal_end * DAY
    scored = sc.score_many([(store[c], as_of) for c in ids])
    churn = np.array([round(s.churn, 4) for s in scored])

    # labels and baselines from the raw rows (not the scorer's code)
    after: dict[str, list[int]] = defaultdict(list)
    for cid, d, _ in rows:
        if d >= cal_end:
            after[cid].append(d)
    lapse_h = np.array([not any(d < cal_end + horizon for d in after[c]) for c in ids])
    lapse_all = np.array([not any(d < end for d in after[c]) for c in ids])
    summ = summary(rows, cal_end)
    x, tx, tt = (np.array([summ[c][k] for c in ids], dtype=float) for k in range(3))
    from lifetimes import BetaGeoFitter

    bg = BetaGeoFitter(penalizer_coef=0.0).fit(x, tx, tt)
    exp_h = bg.conditional_expected_number_of_purchases_up_to_time(horizon, x, tx, tt)
    exp_all = bg.conditional_expected_number_of_purchases_up_to_time(end - cal_end, x, tx, tt)
    recency = tt - tx  # days since the last purchase day
    # CLV: segflow's 12-month clv against BG/NBD + Gamma-Gamma, both against the holdout's
    # actual revenue (rank correlation; totals with segflow's scaled to the holdout length)
    from lifetimes import GammaGammaFitter
    from scipy.stats import spearmanr

    day_rev: dict[tuple[str, int], float] = defaultdict(float)
    for cid, d, v in rows:
        if d < cal_end:
            day_rev[(cid, d)] += v
    per: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for (cid, d), v in day_rev.items():
        per[cid].append((d, v))
    repeat_mean = np.array(
        [np.mean([v for _, v in sorted(per[c])[1:]]) if len(per[c]) > 1 else 0.0 for c in ids]
    )
    held_rev: dict[str, float] = defaultdict(float)
    for cid, d, v in rows:
        if cal_end <= d < end:
            held_rev[cid] += v
    actual = np.array([held_rev[c] for c in ids])
    rep = (x > 0) & (repeat_mean > 0)  # (a few CDNOW transactions are worth 0)
    gg = GammaGammaFitter(penalizer_coef=0.0).fit(x[rep], repeat_mean[rep])
    spend = np.full(
        len(ids), float(np.mean(gg.conditional_expected_average_profit(x[rep], repeat_mean[rep])))
    )
    spend[rep] = gg.conditional_expected_average_profit(x[rep], repeat_mean[rep])
    clv_bg = np.asarray(exp_all) * spend
    clv_sf = np.array([s.clv for s in scored]) * (end - cal_end) / 365.25
    value, count = Counter(churn.tolist()).most_common(1)[0]
    load1 = os.getloadavg()
    q = sc.model.quality()

    print(f"customers scored as of {args.cal_end} 00:00: {len(ids):,}")
    print(f"label A: no purchase in the next {horizon} days     positive rate {lapse_h.mean():.3f}")
    print(
        f"label B: no purchase to {args.end} ({end - cal_end} days) positive rate "
        f"{lapse_all.mean():.3f}"
    )
    print(f"{'score':44s} {'AUC A':>7s} {'AUC B':>7s}")
    for name, s_a, s_b in (
        ("segflow churn_probability", churn, churn),
        ("BG/NBD expected purchases (negated)", -np.asarray(exp_h), -np.asarray(exp_all)),
        ("days since last purchase", recency, recency),
    ):
        print(f"{name:44s} {roc_auc(s_a, lapse_h):7.3f} {roc_auc(s_b, lapse_all):7.3f}")
    print(
        f"segflow calibration error (ECE, label A): {calibration_error(churn, lapse_h):.3f}; "
        f"mean churn {churn.mean():.3f}"
    )
    print(
        f"most common churn value {value} held by {count / len(churn):.1%} of customers; "
        f"{len(set(churn.tolist())):,} distinct values"
    )
    print(f"CLV over the holdout ({end - cal_end} days; actual total {actual.sum():,.0f}):")
    for name, c in (("segflow clv (12 months, scaled)", clv_sf), ("BG/NBD + Gamma-Gamma", clv_bg)):
        rho = spearmanr(c, actual).statistic
        print(
            f"  {name:36s} Spearman {rho:.3f}, total {c.sum():,.0f} "
            f"({c.sum() / actual.sum():.2f} x actual), top-decile capture "
            f"{actual[np.argsort(-c)[: len(c) // 10]].sum() / actual.sum():.1%}"
        )
    print(f"BG/NBD (lifetimes) params: { {k: round(v, 4) for k, v in bg.params_.items()} }")
    print(f"model: {q}")
    print(
        f"replay: {len(cal):,} events in {replay_s:.1f} s wall ({len(cal) / replay_s:,.0f} "
        f"events/s), {replay_cpu:.1f} s CPU; scored {sc.scored:,}, emitted {sc.emitted:,} "
        f"scores; load average {load0[0]:.2f} before, {load1[0]:.2f} after (machine shared, "
        f"numbers under load)"
    )


if __name__ == "__main__":
    main()
