"""The segment oracle's features (issue #17), recomputed from the raw events in pandas/numpy.

Every feature the default segment rules read, written out again from the scorer's README
("Features") without importing the scorer: windowed counts and their changes against the 28
(or 42) days before, recencies, lifetime purchases, the purchase-interval EWMAs and drift,
revenue, escalations and sentiment, cart views, the latest zip, cancellation, engagement.
Split out of ``segment_oracle.py`` (issue #14's 600-line limit); see that file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

DAY = 86_400_000
NEVER = 999.0

# -- the feature definitions (services/scorer/README.md, "Features"), written out again ------
#: event type -> count column; escalated tickets also count in ``escalations``.
COUNT_OF = {
    "session_start": "sessions",
    "login": "logins",
    "page_view": "page_views",
    "feature_use": "feature_use",
    "cart_view": "cart_views",
    "cart_abandon": "cart_abandons",
    "purchase": "purchases",
    "email_sent": "emails_sent",
    "email_open": "opens",
    "email_click": "clicks",
    "support_ticket": "tickets",
}
#: "Activity": the customer-initiated events with a count (not identify, cancel, unsubscribe,
#: bounce, email_sent or unknown types).
ACTIVITY_TYPES = frozenset(
    {
        "session_start",
        "login",
        "page_view",
        "feature_use",
        "cart_view",
        "cart_abandon",
        "purchase",
        "email_open",
        "email_click",
        "support_ticket",
    }
)
RECENCY_OF = {
    "login": ["login"],
    "feature_use": ["feature_use"],
    "purchase": ["purchase"],
    "open": ["email_open"],
    "active": sorted(ACTIVITY_TYPES),
}
#: engagement = 100 (1 - exp(-w / 25)), w = weighted 14-day counts
ENGAGEMENT_WEIGHTS = {
    "sessions": 1.0,
    "logins": 0.5,
    "page_views": 0.3,
    "feature_use": 1.5,
    "cart_views": 0.5,
    "purchases": 3.0,
    "opens": 1.0,
    "clicks": 2.0,
}
MAX_CHANGE = 10.0
#: Features taken from the emitted scores (model outputs), not recomputed.
FROM_SCORES = ("churn_probability", "clv", "lifecycle_stage")


def window(a: np.ndarray, w: int) -> np.ndarray:
    """Sum over the w days ending with each day (axis 1), zero before the start."""
    cs = np.cumsum(a, axis=1)
    out = cs.copy()
    out[:, w:] -= cs[:, :-w]
    return out


def shifted(a: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(a)
    out[:, k:] = a[:, :-k]
    return out


def change(daily: np.ndarray, w: int, start: bool = False) -> np.ndarray:
    """Daily rate of the last w days vs the 28 before them, minus 1 (0 when both are 0);
    ``start``: at the day's first instant (the day itself still empty)."""
    cur = (window(daily, w) - (daily if start else 0)) / w
    base = shifted(window(daily, 28), w) / 28.0
    return np.minimum((cur - base) / np.maximum(base, 1e-9), MAX_CHANGE)


def last_time(times: pd.DataFrame, n_cust: int, n_days: int, day0: int) -> np.ndarray:
    """[customer, day] -> latest time (ms) at or before the day's end, NaN when none."""
    out = np.full((n_cust, n_days), -np.inf)
    times = times[(times["d"] >= day0) & (times["d"] < day0 + n_days)]
    if len(times):
        g = times.groupby(["c", "d"])["t"].max()
        ci = g.index.get_level_values(0).to_numpy()
        di = g.index.get_level_values(1).to_numpy() - day0
        out[ci, di] = g.to_numpy()
    out = np.maximum.accumulate(out, axis=1)
    out[np.isinf(out)] = np.nan
    return out


def window_features(
    series: Mapping[str, Any],
    win: Callable[[Any, int], np.ndarray],
    change: Callable[[Any, int], np.ndarray],
) -> dict[str, np.ndarray]:
    """The windowed features, from ``series`` (counts per column: ``COUNT_OF``'s columns,
    ``escalations``, ``activity``, ``revenue``, ``sentiment``) and how to read them: ``win``
    sums a series over a window of whole days, ``change`` compares a window with the 28 days
    before it. The daily-sample oracle passes day columns, the point-in-time one event
    streams; the formulas are one."""
    f: dict[str, np.ndarray] = {}
    f["activity_14d_vs_prior28_change"] = change(series["activity"], 14)
    f["logins_3d_vs_prior28_change"] = change(series["logins"], 3)
    f["revenue_28d_vs_prior28_change"] = change(series["revenue"], 28)
    a14 = win(series["activity"], 14)
    a56 = win(series["activity"], 56)
    f["activity_14d_vs_prior42_log_ratio"] = np.log((a14 + 1.0) / ((a56 - a14) / 3.0 + 1.0))
    f["feature_use_28d"] = win(series["feature_use"], 28)
    f["cart_views_14d"] = win(series["cart_views"], 14)
    f["revenue_28d"] = win(series["revenue"], 28)
    f["escalations_7d"] = win(series["escalations"], 7)
    t7 = win(series["tickets"], 7)
    s7 = win(series["sentiment"], 7)
    f["sentiment_mean_7d"] = np.where(t7 > 0, s7 / np.maximum(t7, 1), 0.0)
    w = sum(wt * win(series[k], 14) for k, wt in ENGAGEMENT_WEIGHTS.items())
    f["engagement_score"] = 100.0 * (1.0 - np.exp(-w / 25.0))
    return f


def oracle_features(
    events: pd.DataFrame,
    n_cust: int,
    day0: int,
    n_days: int,
    zips: frozenset[str],
    start: bool = False,
) -> dict[str, np.ndarray]:
    """Every feature the default rules read, [customer, day] at the day's last millisecond
    (``start``: at its first, midnight, when the scorer's daily refresh scores), from the raw
    events (columns c, event_type, occurred_at, amount, sentiment, escalated, zip),
    deduplicated by the caller. Windows end with the day and include it (empty at midnight)."""
    ev = events.assign(d=events["occurred_at"] // DAY, t=events["occurred_at"])
    ev = ev[(ev["d"] >= day0) & (ev["d"] < day0 + n_days)]
    ends = (np.arange(n_days) + day0 + (0 if start else 1)) * DAY - (0 if start else 1)
    f: dict[str, np.ndarray] = {}
    daily: dict[str, np.ndarray] = {}

    def win(a: np.ndarray, w: int) -> np.ndarray:
        return window(a, w) - (a if start else 0)

    def before(a: np.ndarray, fill: float) -> np.ndarray:
        """The value at the end of the previous day (at midnight: nothing of today yet)."""
        if not start:
            return a
        out = np.full_like(a, fill)
        out[:, 1:] = a[:, :-1]
        return out

    def count(mask: pd.Series, value: pd.Series | None = None) -> np.ndarray:
        sub = ev[mask]
        out = np.zeros((n_cust, n_days))
        if len(sub):
            vals = value[mask] if value is not None else pd.Series(1.0, index=sub.index)
            g = vals.groupby([sub["c"], sub["d"]]).sum()
            out[g.index.get_level_values(0), g.index.get_level_values(1) - day0] = g.to_numpy()
        return out

    for etype, col in COUNT_OF.items():
        daily[col] = count(ev["event_type"] == etype)
    daily["escalations"] = count((ev["event_type"] == "support_ticket") & ev["escalated"])
    daily["activity"] = count(ev["event_type"].isin(ACTIVITY_TYPES))
    purchase = ev["event_type"] == "purchase"
    daily["revenue"] = count(purchase, ev["amount"].fillna(0.0).astype(float))
    ticket = ev["event_type"] == "support_ticket"
    daily["sentiment"] = count(ticket & ev["sentiment"].notna(), ev["sentiment"].astype(float))

    f.update(window_features(daily, win, lambda a, w: change(a, w, start)))
    f["lifetime_purchases"] = before(np.cumsum(daily["purchases"], axis=1), 0.0)

    for name, types in RECENCY_OF.items():
        last = before(last_time(ev[ev["event_type"].isin(types)], n_cust, n_days, day0), np.nan)
        f[f"days_since_{name}"] = np.where(np.isnan(last), NEVER, (ends - last) / DAY)
    ident = ev[ev["event_type"] == "identify"]
    first = np.full((n_cust, n_days), np.inf)
    if len(ident):
        g = ident.groupby(["c", "d"])["t"].min()
        first[g.index.get_level_values(0), g.index.get_level_values(1) - day0] = g.to_numpy()
    first = before(np.minimum.accumulate(first, axis=1), np.inf)
    f["days_since_signup"] = np.where(np.isinf(first), NEVER, (ends - first) / DAY)

    # cancelled: the latest cancellation with no activity since (at or after it)
    cancel = before(
        last_time(ev[ev["event_type"] == "subscription_cancel"], n_cust, n_days, day0), np.nan
    )
    active = before(
        last_time(ev[ev["event_type"].isin(ACTIVITY_TYPES)], n_cust, n_days, day0), np.nan
    )
    f["cancelled"] = np.where(~np.isnan(cancel) & (np.isnan(active) | (active <= cancel)), 1.0, 0.0)

    # the latest known zip (by occurred_at), high value or not
    hv = np.full((n_cust, n_days), np.nan)
    z = ev[ev["zip"].notna()].sort_values("t")
    if len(z):
        g = z.groupby(["c", "d"]).tail(1)
        hv[g["c"].to_numpy(), g["d"].to_numpy() - day0] = g["zip"].isin(zips).to_numpy()
    hv = pd.DataFrame(hv).ffill(axis=1).fillna(0.0).to_numpy()
    f["high_value_zip"] = before(hv, 0.0)

    # purchase intervals: EWMAs of the gaps in days (alpha 0.5 current, 0.05 baseline), in
    # occurred-at order; drift = max(current, days since the last purchase) / baseline - 1
    fast = np.zeros((n_cust, n_days))
    slow = np.zeros((n_cust, n_days))
    for c, grp in ev[purchase].sort_values("t").groupby("c"):
        times = grp["t"].to_numpy()
        fa = sl = 0.0
        n = 0
        prev = None
        for t in times:
            if prev is not None and t > prev:
                gap = (t - prev) / DAY
                if n == 0:
                    fa = sl = gap
                else:
                    fa += 0.5 * (gap - fa)
                    sl += 0.05 * (gap - sl)
                n += 1
            prev = t if prev is None else max(prev, t)
            d = int(t // DAY) - day0
            fast[c, d:] = fa
            slow[c, d:] = sl
    # published with 4 decimals (CustomerScore.features): a drop of exactly 60 % is -0.6, not
    # the -0.6000000000000001 of the float arithmetic, and `< -0.6` does not hold for it
    for k, a in f.items():
        if not k.startswith("days_since_"):
            f[k] = np.round(a, 4)
    # CustomerScore.engagement_score is published with 2 decimals (services/scorer/core.py), and
    # the rules compare that value: near a percentile made of ties (5.07 for many customers
    # early on) 5.0708 and 5.07 fall on different sides
    f["engagement_score"] = np.round(f["engagement_score"], 2)
    fast, slow = before(fast, 0.0), before(slow, 0.0)
    f["purchase_interval_days"] = fast
    f["purchase_interval_baseline_days"] = slow
    f["purchase_interval_drift"] = interval_drift(fast, slow, f["days_since_purchase"])
    return f


def interval_drift(fast: Any, slow: Any, days_since_purchase: Any) -> Any:
    """``purchase_interval_drift`` as documented: how much longer the current gap (the fast
    interval, or the time since the last purchase if longer) is than the usual one (the slow
    interval), capped at ``MAX_CHANGE``; 0 without a usual interval or a purchase (4 decimals,
    as published)."""
    dsp = days_since_purchase
    return np.round(
        np.where(
            (slow > 0) & (dsp < NEVER),
            np.minimum(MAX_CHANGE, np.maximum(fast, dsp) / np.where(slow > 0, slow, 1.0) - 1.0),
            0.0,
        ),
        4,
    )
