"""The segment oracle's features at any instant (issue #17): point queries on the raw events
sorted by (id, time), for the event-by-event oracle (``oracle_events.py``; split out of it,
issue #14's 600-line limit). Written from the scorer's README ("Features"), not its code.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from oracle_features import (
    ACTIVITY_TYPES,
    COUNT_OF,
    DAY,
    MAX_CHANGE,
    NEVER,
    RECENCY_OF,
    interval_drift,
    window_features,
)

SHIFT = 1 << 40  # key = row * SHIFT + (t - origin): per-row sorted event times in one array


# -- features at any instant, from the raw events ---------------------------------------------
class Stream:
    """One kind of event (with a weight), sorted by (row, time), for point queries."""

    def __init__(self, rows: np.ndarray, times: np.ndarray, weights: np.ndarray, origin: int):
        key = rows.astype(np.int64) * SHIFT + (times.astype(np.int64) - origin)
        order = np.argsort(key, kind="stable")
        self.key = key[order]
        self.times = times.astype(np.int64)[order]
        self.rows = rows.astype(np.int64)[order]
        self.cum = np.concatenate([[0.0], np.cumsum(weights.astype(float)[order])])
        self.origin = origin

    def _pos(self, rows: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Number of keys <= (row, time)."""
        return np.searchsorted(self.key, rows * SHIFT + (times - self.origin), side="right")

    def total(self, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Sum of the weights of the row's events with lo <= time <= hi."""
        return self.cum[self._pos(rows, hi)] - self.cum[self._pos(rows, lo - 1)]

    def last(self, rows: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index of the row's latest event at or before t, or -1; its time or NaN)."""
        if not len(self.key):
            return np.full(len(rows), -1), np.full(len(rows), np.nan)
        i = self._pos(rows, t) - 1
        ok = (i >= 0) & (self.rows[np.maximum(i, 0)] == rows)
        idx = np.where(ok, i, -1)
        return idx, np.where(ok, self.times[np.maximum(i, 0)].astype(float), np.nan)


def point_features(
    ev: pd.DataFrame, rows: np.ndarray, t: np.ndarray, zips: frozenset[str]
) -> dict[str, np.ndarray]:
    """Every feature the default rules read, for each query (row ``rows[i]`` at instant
    ``t[i]``), from the events (columns c = row, event_type, occurred_at, amount, sentiment,
    escalated, zip) that occurred at or before the instant. Windows are whole days ending with
    the instant's day (its events up to the instant), as the scorer's README defines them."""
    rows = rows.astype(np.int64)
    t = t.astype(np.int64)
    origin = int(min(ev["occurred_at"].min(), t.min())) - 400 * DAY
    c = ev["c"].to_numpy()
    occ = ev["occurred_at"].to_numpy().astype(np.int64)
    etype = ev["event_type"].to_numpy()
    ones = np.ones(len(ev))

    def stream(mask: np.ndarray, w: np.ndarray | None = None) -> Stream:
        return Stream(c[mask], occ[mask], (ones if w is None else w)[mask], origin)

    day = t // DAY

    def win(s: Stream, days: int, back: int = 0) -> np.ndarray:
        """The ``days`` whole days ending ``back`` days before the instant's day."""
        lo = (day - back - days + 1) * DAY
        hi = np.where(back == 0, t, (day - back + 1) * DAY - 1)
        return s.total(rows, lo, hi)

    def change(s: Stream, w: int) -> np.ndarray:
        cur = win(s, w) / w
        base = win(s, 28, w) / 28.0
        return np.minimum((cur - base) / np.maximum(base, 1e-9), MAX_CHANGE)

    streams = {col: stream(etype == et) for et, col in COUNT_OF.items()}
    escalated = ev["escalated"].fillna(False).astype(bool).to_numpy()
    streams["escalations"] = stream((etype == "support_ticket") & escalated)
    is_active = np.isin(etype, list(ACTIVITY_TYPES))
    streams["activity"] = stream(is_active)
    purchase = etype == "purchase"
    streams["revenue"] = stream(purchase, ev["amount"].fillna(0.0).astype(float).to_numpy())
    sent = ev["sentiment"].astype(float).to_numpy()
    has_sent = (etype == "support_ticket") & ~np.isnan(sent)
    streams["sentiment"] = stream(has_sent, np.nan_to_num(sent))

    f: dict[str, np.ndarray] = {}
    f.update(window_features(streams, win, change))
    far = np.full(len(t), origin + 1)
    f["lifetime_purchases"] = streams["purchases"].total(rows, far, t)

    for name, types in RECENCY_OF.items():
        _, last = stream(np.isin(etype, types)).last(rows, t)
        f[f"days_since_{name}"] = np.where(np.isnan(last), NEVER, (t - last) / DAY)
    ident = stream(etype == "identify")
    first_ident = np.full(len(t), np.nan)
    if len(ident.key):
        firsts = pd.Series(ident.times).groupby(ident.rows).min()
        first_ident = pd.Series(rows).map(firsts).to_numpy(dtype=float)
    known = ~np.isnan(first_ident) & (first_ident <= t)
    f["days_since_signup"] = np.where(known, (t - first_ident) / DAY, NEVER)

    _, cancel = stream(etype == "subscription_cancel").last(rows, t)
    _, active = streams["activity"].last(rows, t)
    f["cancelled"] = np.where(~np.isnan(cancel) & (np.isnan(active) | (active <= cancel)), 1.0, 0.0)

    zmask = ev["zip"].notna().to_numpy()
    hv = ev["zip"].isin(zips).to_numpy().astype(float)
    zi, _ = Stream(c[zmask], occ[zmask], hv[zmask], origin).last(rows, t)
    zs = Stream(c[zmask], occ[zmask], hv[zmask], origin)
    zval = np.diff(zs.cum)  # the weights in key order
    f["high_value_zip"] = np.where(zi >= 0, zval[np.maximum(zi, 0)] if len(zval) else 0.0, 0.0)

    # purchase intervals: EWMAs of the gaps in days (alpha 0.5 current, 0.05 baseline), in
    # occurred-at order, the state after the latest purchase at or before the instant
    ps = stream(purchase)
    fast = np.zeros(len(ps.key))
    slow = np.zeros(len(ps.key))
    prev_row, prev_t, fa, sl, n = -1, 0, 0.0, 0.0, 0
    for i, (r, tt) in enumerate(zip(ps.rows.tolist(), ps.times.tolist(), strict=True)):
        if r != prev_row:
            prev_row, prev_t, fa, sl, n = r, tt, 0.0, 0.0, 0
        elif tt > prev_t:
            gap = (tt - prev_t) / DAY
            if n == 0:
                fa = sl = gap
            else:
                fa += 0.5 * (gap - fa)
                sl += 0.05 * (gap - sl)
            n += 1
            prev_t = tt
        fast[i], slow[i] = fa, sl
    pi, _ = ps.last(rows, t)
    fa_t = np.where(pi >= 0, fast[np.maximum(pi, 0)] if len(fast) else 0.0, 0.0)
    sl_t = np.where(pi >= 0, slow[np.maximum(pi, 0)] if len(slow) else 0.0, 0.0)
    for k, a in f.items():  # published with 4 decimals (CustomerScore.features)
        if not k.startswith("days_since_"):
            f[k] = np.round(a, 4)
    f["engagement_score"] = np.round(f["engagement_score"], 2)  # published with 2
    f["purchase_interval_days"] = fa_t
    f["purchase_interval_baseline_days"] = sl_t
    f["purchase_interval_drift"] = interval_drift(fa_t, sl_t, f["days_since_purchase"])
    return f
