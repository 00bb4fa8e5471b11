"""The layout of the scorer's per-customer state and feature vector (pure): time units,
the bucket ring, signals, windows, feature names and the precomputed index arrays the
feature computation uses (moved out of :mod:`services.scorer.features`, which re-exports
the public names)."""

from __future__ import annotations

from typing import Any

import numpy as np

SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

#: Days of history kept per customer: the longest window (90) and, for the churn model's
#: matured examples, the 56 days of look-back before a snapshot plus up to the prediction
#: window, the inactivity horizon and a week (30 + 30 + 7) until its label is learned, plus
#: the lateness (see services.scorer.core).
RING = 128
#: The ring of states written before it grew from 120 days (read with their head day).
LEGACY_RING = 120
#: Window lengths in days.
WINDOWS = (3, 7, 10, 14, 21, 28, 90)
#: Daily count signals, in bucket column order.
SIGNALS = (
    "sessions",
    "logins",
    "page_views",
    "feature_use",
    "cart_views",
    "cart_abandons",
    "purchases",
    "emails_sent",
    "opens",
    "clicks",
    "tickets",
    "escalations",
    "other_events",
)
N_SIG = len(SIGNALS)
S = {name: i for i, name in enumerate(SIGNALS)}
#: Event type → count signal (``escalations`` is added for escalated tickets; unknown types
#: count as ``other_events``; identify, subscription_cancel, email_unsubscribe and
#: email_bounce only change scalars).
EVENT_SIGNAL = {
    "session_start": S["sessions"],
    "login": S["logins"],
    "page_view": S["page_views"],
    "feature_use": S["feature_use"],
    "cart_view": S["cart_views"],
    "cart_abandon": S["cart_abandons"],
    "purchase": S["purchases"],
    "email_sent": S["emails_sent"],
    "email_open": S["opens"],
    "email_click": S["clicks"],
    "support_ticket": S["tickets"],
}
SCALAR_ONLY = frozenset({"identify", "subscription_cancel", "email_unsubscribe", "email_bounce"})
#: Signals that are the customer's own doing (email_sent is the provider's; unknown types
#: are not trusted as activity).
ACTIVITY = tuple(
    S[n]
    for n in (
        "sessions",
        "logins",
        "page_views",
        "feature_use",
        "cart_views",
        "cart_abandons",
        "purchases",
        "opens",
        "clicks",
        "tickets",
    )
)
_ACTIVITY_TYPES = frozenset(
    t for t, i in EVENT_SIGNAL.items() if i in ACTIVITY
)  # event types that update last_active_ms
#: What counts as *qualifying activity* for churn (``ScorerConfig.churn_activity``): churn is
#: no qualifying activity in the next H days, and the ``btyd_*`` features summarise the days
#: with qualifying activity (the buy-till-you-die summary when it is ``purchase``).
QUALIFYING = {
    "purchase": frozenset({"purchase"}),
    "login": frozenset({"login"}),
    "any": _ACTIVITY_TYPES,
}

# Extended columns of the per-day matrix: the signals, then derived ones.
COLUMNS = (*SIGNALS, "activity", "active_days", "revenue", "sentiment_sum")
C = {name: i for i, name in enumerate(COLUMNS)}
_N_COLS = len(COLUMNS)

#: Recency timestamps kept exactly (field ``last_<x>_ms``) → feature ``days_since_<x>``.
RECENCY = (
    "active",
    "session",
    "login",
    "feature_use",
    "cart_view",
    "purchase",
    "open",
    "click",
    "ticket",
    "escalation",
)
_RECENCY_OF_TYPE = {
    "session_start": "session",
    "login": "login",
    "feature_use": "feature_use",
    "cart_view": "cart_view",
    "purchase": "purchase",
    "email_open": "open",
    "email_click": "click",
    "support_ticket": "ticket",
}
#: Value of ``days_since_*`` when the thing never happened.
NEVER_DAYS = 999.0

_COUNT_BYTES = RING * N_SIG
_FLOAT_BYTES = RING * 2 * 4
_BLOB_BYTES = _COUNT_BYTES + _FLOAT_BYTES
_LEGACY_BYTES = LEGACY_RING * (N_SIG + 2 * 4)
#: ``idle_days_*`` are capped here (they count back through the ring).
IDLE_CAP_DAYS = 120

State = dict[str, Any]

# -- windows, relative changes and idle days: which columns are exported --------------------
_WINDOW_COLS = (*SIGNALS, "activity", "active_days", "revenue")
_CHANGE_SIGNALS = (
    "sessions",
    "logins",
    "page_views",
    "feature_use",
    "opens",
    "clicks",
    "purchases",
    "activity",
)
_CHANGE_WINDOWS = (3, 7, 14)
_IDLE = (
    ("active", "active_days"),
    ("purchase", "purchases"),
    ("feature_use", "feature_use"),
    ("open", "opens"),
    ("login", "logins"),
    ("session", "sessions"),
)

# Feature names, in the order of the value vector built by compute().
WINDOW_FEATURES = [f"{c}_{w}d" for w in WINDOWS for c in _WINDOW_COLS]
CHANGE_FEATURES = [
    f"{c}_{w}d_vs_prior28_change" for w in _CHANGE_WINDOWS for c in _CHANGE_SIGNALS
] + ["purchases_28d_vs_prior28_change", "revenue_28d_vs_prior28_change"]
IDLE_FEATURES = [f"idle_days_{n}" for n, _ in _IDLE]
SCALAR_FEATURES = [f"days_since_{n}" for n in RECENCY] + [
    "days_since_signup",
    "tenure_days",
    "sentiment_mean_7d",
    "sentiment_mean_14d",
    "sentiment_mean_28d",
    "open_rate_28d",
    "purchase_interval_days",
    "purchase_interval_baseline_days",
    "purchase_interval_drift",
    "avg_order_value",
    "lifetime_purchases",
    "lifetime_revenue",
    "lifetime_feature_use",
    "lifetime_logins",
    "unsubscribed",
    "bounced",
    "cancelled",
    "high_value_zip",
]
#: Longer-term behaviour over the 8 weeks (56 days) ending with ``as_of``: the last 14 days
#: against the 42 before them and the last 7 against the busiest week (log ratios, +1
#: smoothed: 0 = unchanged, -1.1 = a third), the slope of log weekly activity (per week),
#: idle time against the customer's usual gap between active days (or purchases), and the
#: mix of the customer's behaviour (rates that do not depend on how active it is);
#: ``usual_gap_days_active``: days per active day in the 56 days up to its last active day
#: (how long a silence is normal for this customer; 56 when it was active once).
TREND_FEATURES = [
    "activity_14d_vs_prior42_log_ratio",
    "sessions_14d_vs_prior42_log_ratio",
    "feature_use_14d_vs_prior42_log_ratio",
    "opens_14d_vs_prior42_log_ratio",
    "activity_7d_vs_peak_week_log_ratio",
    "activity_trend_8w",
    "active_days_56d",
    "sessions_56d",
    "purchases_56d",
    "idle_vs_usual_gap_active",
    "idle_vs_usual_gap_purchase",
    "feature_use_per_session_56d",
    "page_views_per_session_56d",
    "cart_views_per_session_56d",
    "avg_order_value_56d",
    "open_rate_56d",
    "clicks_per_open_56d",
    "usual_gap_days_active",
]
#: The buy-till-you-die summary of the days with qualifying activity (see
#: :data:`QUALIFYING`), uncapped: days since the last (``days_since_qualifying``, 999 if
#: never), repeat days (``btyd_frequency``, BG/NBD's x), days from the first to the last
#: (``btyd_recency_days``, t_x), days from the first to ``as_of`` (``btyd_age_days``, T),
#: mean and standard deviation of the gaps between consecutive days, and the customer's own
#: gap z-score: (days since the last - mean gap) / max(sd, mean / 2, 1) (0 before a second
#: day); ``btyd_silence_x_frequency`` = max(0, log((days since the last + 1) / 2)) *
#: log(1 + repeat days): a silence weighs more for a frequent customer. ``bgnbd_*`` are
#: the BG/NBD estimates for the horizon H from the scorer's latest fit (probability alive,
#: expected qualifying days in H, probability of none in H): filled in by the scorer
#: (:mod:`services.scorer.core`), 0 from :func:`compute`.
BTYD_FEATURES = [
    "days_since_qualifying",
    "btyd_frequency",
    "btyd_recency_days",
    "btyd_age_days",
    "btyd_gap_mean_days",
    "btyd_gap_std_days",
    "btyd_gap_z",
    "btyd_silence_x_frequency",
    "bgnbd_p_alive",
    "bgnbd_expected",
    "bgnbd_p_none",
]
FEATURE_NAMES: tuple[str, ...] = tuple(
    WINDOW_FEATURES
    + CHANGE_FEATURES
    + IDLE_FEATURES
    + SCALAR_FEATURES
    + TREND_FEATURES
    + BTYD_FEATURES
)

# Rows of the cumulative day matrix that compute() reads (k = sum of the last k + 1 days).
_ROWS = np.array([w - 1 for w in WINDOWS] + [30, 34, 41, 55])
_R = {w: i for i, w in enumerate(WINDOWS)}
_PRIOR_ROW = {3: 7, 7: 8, 14: 9, 28: 10}  # row index (in _ROWS) where the prior 28 days end


def _flat(row: int, col: int) -> int:
    return row * len(COLUMNS) + col


_WIN_FLAT = np.array([_flat(_R[w], C[c]) for w in WINDOWS for c in _WINDOW_COLS])
_CHANGE_KEYS = [(w, c) for w in _CHANGE_WINDOWS for c in _CHANGE_SIGNALS] + [
    (28, "purchases"),
    (28, "revenue"),
]
_CUR_FLAT = np.array([_flat(_R[w], C[c]) for w, c in _CHANGE_KEYS])
_PRIOR_FLAT = np.array([_flat(_PRIOR_ROW[w], C[c]) for w, c in _CHANGE_KEYS])
_CUR_LEN = np.array([float(w) for w, _ in _CHANGE_KEYS])
_SMALL_FLAT = np.array(
    [
        _flat(_R[7], C["sentiment_sum"]),
        _flat(_R[7], C["tickets"]),
        _flat(_R[14], C["sentiment_sum"]),
        _flat(_R[14], C["tickets"]),
        _flat(_R[28], C["sentiment_sum"]),
        _flat(_R[28], C["tickets"]),
        _flat(_R[28], C["opens"]),
        _flat(_R[28], C["emails_sent"]),
    ]
)
_IDLE_COLS = np.array([C[c] for _, c in _IDLE])
_BACK = np.arange(RING)
_ACT = np.array(ACTIVITY)
_ACT_MASK = np.array([1.0 if i in ACTIVITY else 0.0 for i in range(N_SIG)])
_N_WIN, _N_CH, _N_IDLE = len(WINDOW_FEATURES), len(CHANGE_FEATURES), len(IDLE_FEATURES)
_O_CH = _N_WIN
_O_IDLE = _O_CH + _N_CH
_O_SC = _O_IDLE + _N_IDLE
_O_TR = _O_SC + len(SCALAR_FEATURES)
_O_BT = _O_TR + len(TREND_FEATURES)
_TREND_COLS = [C[c] for c in ("activity", "sessions", "feature_use", "opens")]
#: Centred week index (newest week first) for the activity slope, and its sum of squares.
_WEEK_X = [3.5 - i for i in range(8)]
_WEEK_XX = sum(x * x for x in _WEEK_X)
_SESSIONS, _PURCHASES, _OPENS = C["sessions"], C["purchases"], C["opens"]
_FEATURE_USE, _PAGE_VIEWS, _CART_VIEWS = C["feature_use"], C["page_views"], C["cart_views"]
_EMAILS_SENT, _CLICKS = C["emails_sent"], C["clicks"]
_LAST_FIELDS = tuple(f"last_{n}_ms" for n in RECENCY)
#: Ring slots of the days going back from a day in slot ``i``.
_SLOTS = [(i - _BACK) % RING for i in range(RING)]
_REV, _ACTIVITY, _ACTIVE = C["revenue"], C["activity"], C["active_days"]
_WEEK_ROWS_ABS = np.arange(6, 56, 7)  # cumulative rows of the last 1, 2, ..., 8 weeks
_FLOAT_ZERO = np.zeros((RING, 2), dtype=np.float32)

#: Clip of relative changes (a customer going from 0.1 to 5 a day is "+10", not "+49").
MAX_CHANGE = 10.0
