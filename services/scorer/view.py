"""The churn model's view of the features, and the scores computed from a feature row
(engagement, CLV, clusters' inputs, the emission fingerprint, the lifecycle stage); pure,
moved out of :mod:`services.scorer.core`, which re-exports them."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.scorer.config import ScorerConfig
from services.scorer.features import (
    FEATURE_INDEX,
    FEATURE_NAMES,
    State,
    cancelled,
)
from services.scorer.model import CLUSTER_DIMS, ChurnModel, Prior

# -- the model's view of the features ----------------------------------------------------------
_LOG = "log"
_CLIP = "clip"
_ASINH = "asinh"
_OVERDUE = "overdue"
_DROP = "drop"
_LOGIT = "logit"
#: The churn model's inputs: (feature, transform). Counts, days and money are log1p'd
#: (never capped: a customer silent for 300 days is not one silent for 45), the gap z-score
#: asinh'd where it is positive (``overdue``: a purchase sets it to <= 0, whereas its signed
#: value can rise on a purchase that comes sooner than usual, as the mean gap shrinks),
#: probabilities as log-odds; relative changes, log ratios and the trend only where they are
#: negative (``drop``: how far activity fell below the customer's own baseline). A rise above
#: the baseline is not an input: the next day a purchase can move from the current window
#: into the baseline and lower a rise (a purchase on day 0, again on day 13: the 14-day
#: change reads +10 that morning, +1 the day after), and a model that learned a weight for
#: rises would then score the customer who bought again higher than the day before; other
#: rates are used as they are. A training example is the
#: model input as it was scored at its snapshot (:meth:`Scorer.mature`), so training and
#: serving see the same values.
MODEL_INPUTS: tuple[tuple[str, str], ...] = (
    ("sessions_7d", _LOG),
    ("sessions_28d", _LOG),
    ("page_views_7d", _LOG),
    ("logins_7d", _LOG),
    ("feature_use_7d", _LOG),
    ("feature_use_28d", _LOG),
    ("cart_views_14d", _LOG),
    ("opens_28d", _LOG),
    ("clicks_28d", _LOG),
    ("purchases_28d", _LOG),
    ("revenue_28d", _LOG),
    ("tickets_28d", _LOG),
    ("escalations_28d", _LOG),
    ("active_days_7d", ""),
    ("active_days_28d", ""),
    ("activity_3d_vs_prior28_change", _DROP),
    ("activity_7d_vs_prior28_change", _DROP),
    ("activity_14d_vs_prior28_change", _DROP),
    ("sessions_14d_vs_prior28_change", _DROP),
    ("feature_use_14d_vs_prior28_change", _DROP),
    ("opens_14d_vs_prior28_change", _DROP),
    ("purchases_28d_vs_prior28_change", _DROP),
    ("days_since_active", _LOG),
    ("days_since_purchase", _LOG),
    ("days_since_feature_use", _LOG),
    ("sentiment_mean_28d", ""),
    # drop against the longer baseline, recency against the usual gap, purchase drift
    ("activity_14d_vs_prior42_log_ratio", _DROP),
    ("activity_7d_vs_peak_week_log_ratio", _DROP),
    ("activity_trend_8w", _DROP),
    ("idle_vs_usual_gap_active", ""),
    ("idle_vs_usual_gap_purchase", ""),
    ("sessions_14d_vs_prior42_log_ratio", _DROP),
    ("feature_use_14d_vs_prior42_log_ratio", _DROP),
    ("opens_14d_vs_prior42_log_ratio", _DROP),
    ("escalations_14d", _LOG),
    ("active_days_56d", ""),
    # the mix of behaviour (independent of how active the customer is)
    ("feature_use_per_session_56d", ""),
    ("page_views_per_session_56d", ""),
    ("purchases_56d", _LOG),
    ("open_rate_56d", ""),
    ("clicks_per_open_56d", ""),
    ("cart_views_per_session_56d", ""),
    ("sessions_56d", _LOG),
    # the buy-till-you-die summary of the qualifying days, and the BG/NBD estimates
    ("days_since_qualifying", _LOG),
    ("btyd_frequency", _LOG),
    ("btyd_recency_days", _LOG),
    ("btyd_gap_z", _OVERDUE),
    ("btyd_silence_x_frequency", ""),
    ("bgnbd_p_alive", _LOGIT),
    ("bgnbd_expected", _LOG),
    ("bgnbd_p_none", _LOGIT),
    ("avg_order_value", _LOG),
    ("lifetime_purchases", _LOG),
    ("lifetime_revenue", _LOG),
    ("purchases_90d", _LOG),
    ("revenue_90d", _LOG),
    ("active_days_90d", _LOG),
)
_MI_NAMES = tuple(n for n, _ in MODEL_INPUTS)
#: Sign constraints on the churn model's weights (+1: more never lowers churn, -1: more
#: never raises it), so that, whatever it learns, a longer silence never lowers a lapsed
#: customer's churn and buying again lowers it. Inputs that grow with time alone (tenure,
#: the BG/NBD age T, the spread of the gaps) enter only through the BG/NBD estimates and
#: the gap z-score, whose direction is fixed. The mean gap is not an input: a purchase moves
#: it either way (down when it comes sooner than usual, up when later), so no sign makes
#: buying again lower churn. Lifetime revenue only grows with a purchase: never raises
#: churn. Tickets, sentiment and the behaviour mix are free.
GROWS_WITH_SILENCE = frozenset(
    {
        "days_since_active",
        "days_since_purchase",
        "days_since_feature_use",
        "days_since_qualifying",
        "btyd_gap_z",
        "btyd_silence_x_frequency",
        "bgnbd_p_none",
        "idle_vs_usual_gap_active",
        "idle_vs_usual_gap_purchase",
    }
)
_FREE = frozenset(
    {
        "tickets_28d",
        "escalations_28d",
        "escalations_14d",
        "sentiment_mean_28d",
        "feature_use_per_session_56d",
        "page_views_per_session_56d",
        "open_rate_56d",
        "clicks_per_open_56d",
        "cart_views_per_session_56d",
        "avg_order_value",
    }
)
CHURN_SIGNS: dict[str, int] = {
    n: (1 if n in GROWS_WITH_SILENCE else -1) for n in _MI_NAMES if n not in _FREE
}
_CLUSTER_NAMES = tuple(n for n, _ in CLUSTER_DIMS)
_MI_IDX = np.array([FEATURE_INDEX[n] for n, _ in MODEL_INPUTS])
_MI_LOG = np.array([i for i, (_, k) in enumerate(MODEL_INPUTS) if k == _LOG])
_MI_CLIP = np.array([i for i, (_, k) in enumerate(MODEL_INPUTS) if k == _CLIP], dtype=int)
_MI_ASINH = np.array([i for i, (_, k) in enumerate(MODEL_INPUTS) if k == _ASINH], dtype=int)
_MI_OVERDUE = np.array([i for i, (_, k) in enumerate(MODEL_INPUTS) if k == _OVERDUE])
_MI_DROP = np.array([i for i, (_, k) in enumerate(MODEL_INPUTS) if k == _DROP])
_MI_LOGIT = np.array([i for i, (_, k) in enumerate(MODEL_INPUTS) if k == _LOGIT])
_BG_P_ALIVE, _BG_EXPECTED, _BG_P_NONE = (
    FEATURE_INDEX[n] for n in ("bgnbd_p_alive", "bgnbd_expected", "bgnbd_p_none")
)
_BT_X, _BT_TX, _BT_T = (
    FEATURE_INDEX[n] for n in ("btyd_frequency", "btyd_recency_days", "btyd_age_days")
)
_SINCE_Q = FEATURE_INDEX["days_since_qualifying"]

# engagement: weighted 14-day activity
_ENG = {
    "sessions_14d": 1.0,
    "logins_14d": 0.5,
    "page_views_14d": 0.3,
    "feature_use_14d": 1.5,
    "cart_views_14d": 0.5,
    "purchases_14d": 3.0,
    "opens_14d": 1.0,
    "clicks_14d": 2.0,
}
_ENG_IDX = np.array([FEATURE_INDEX[n] for n in _ENG])
_ENG_W = np.array(list(_ENG.values()))
ENGAGEMENT_SCALE = 25.0

# fingerprint quantisation: counts and days exact (floored), ratios in 5 % steps, money and
# sentiment on a log scale
_Q_SCALE = np.ones(len(FEATURE_NAMES))
_Q_LOG = np.zeros(len(FEATURE_NAMES), dtype=bool)
for _name, _i in FEATURE_INDEX.items():
    if (
        _name.startswith("days_since_")
        or _name in ("tenure_days", "btyd_age_days", "btyd_gap_z", "btyd_silence_x_frequency")
        or _name.startswith("bgnbd_")
    ):
        # they move with time alone: the segmenter ages days_since_* itself, and the
        # churn probability they feed is compared on its own (churn_delta)
        _Q_SCALE[_i] = 0.0
    elif _name.startswith("idle_days_") or _name == "usual_gap_days_active":
        _Q_SCALE[_i] = 1.0 / 7.0  # whole weeks: a silence grows them every day
    elif _name.startswith("idle_vs_usual_gap"):
        _Q_SCALE[_i] = 4.0  # quarter steps: a silence grows them every day
    elif "change" in _name or "rate" in _name:
        _Q_SCALE[_i] = 20.0
    elif "sentiment" in _name:
        _Q_SCALE[_i] = 10.0
    elif "revenue" in _name or "order_value" in _name:
        _Q_LOG[_i] = True

_I = FEATURE_INDEX

#: (intercept, (model input, weight, centre)...): what the churn score answers before the
#: model has learned from enough matured labels (its share of the log-odds is
#: ``prior_strength / (prior_strength + labels learned)``, see
#: :class:`services.scorer.model.ChurnModel`): the BG/NBD probability of no qualifying
#: activity in the next H days (``bgnbd_p_none``, as log-odds), from the scorer's latest
#: fit of its own customers (published CDNOW parameters before the first fit).
CHURN_PRIOR: tuple[float, tuple[tuple[str, float, float], ...]] = (
    0.0,
    (("bgnbd_p_none", 1.0, 0.0),),
)
#: Labels after which the model and the prior weigh the same.
PRIOR_STRENGTH = 1000.0
#: The entry of ``CustomerScore.features`` that carries the prior's share of the churn score.
PRIOR_SHARE_FEATURE = "churn_prior_share"


def churn_prior() -> Prior:
    """The :data:`CHURN_PRIOR` as a :class:`~services.scorer.model.Prior`."""
    intercept, terms = CHURN_PRIOR
    return Prior(intercept, {name: (w, c) for name, w, c in terms})


def new_model(created_at: int = 0) -> ChurnModel:
    """A churn model with no labels learned yet, answering with :data:`CHURN_PRIOR`.

    >>> m = new_model()
    >>> v = np.zeros(len(FEATURE_NAMES))
    >>> v[FEATURE_INDEX["bgnbd_p_none"]] = 0.2
    >>> p0 = m.predict(model_input(v))  # no label learned: the prior alone, not 0.5
    >>> v[FEATURE_INDEX["bgnbd_p_none"]] = 0.9
    >>> round(p0, 3), round(m.predict(model_input(v)), 3), m.version
    (0.2, 0.9, 'churn-logreg-0.3.0+n0+prior100')
    """
    return ChurnModel(
        created_at=created_at,
        prior=churn_prior(),
        prior_strength=PRIOR_STRENGTH,
        signs=CHURN_SIGNS,
    )


def model_input(vec: npt.NDArray[np.float64]) -> dict[str, float]:
    """The churn model's inputs from a feature vector (log counts, clipped changes, capped
    idle days), keyed by the feature names they come from.

    >>> x = model_input(np.zeros(len(FEATURE_NAMES)))
    >>> len(x), x["days_since_active"]
    (57, 0.0)
    """
    return dict(zip(_MI_NAMES, model_vector(vec).tolist(), strict=True))


def model_vector(vec: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """:func:`model_input` as an array in :data:`MODEL_INPUTS` order."""
    row: npt.NDArray[np.float64] = model_matrix(vec[None, :])[0]
    return row


def model_matrix(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """:func:`model_vector` of every row (one customer's feature vector each)."""
    v: npt.NDArray[np.float64] = rows[:, _MI_IDX]
    v[:, _MI_LOG] = np.log1p(np.maximum(v[:, _MI_LOG], 0.0))
    v[:, _MI_CLIP] = np.minimum(v[:, _MI_CLIP], 3.0)
    v[:, _MI_ASINH] = np.arcsinh(v[:, _MI_ASINH])
    v[:, _MI_OVERDUE] = np.arcsinh(np.maximum(v[:, _MI_OVERDUE], 0.0))
    v[:, _MI_DROP] = np.minimum(v[:, _MI_DROP], 0.0)
    p = np.clip(v[:, _MI_LOGIT], 1e-6, 1.0 - 1e-6)
    v[:, _MI_LOGIT] = np.log(p / (1.0 - p))
    return v


def engagement(vec: npt.NDArray[np.float64]) -> float:
    """Engagement 0-100: ``100 * (1 - exp(-w / 25))`` of the weighted 14-day activity ``w``.

    >>> engagement(np.zeros(len(FEATURE_NAMES)))
    0.0
    """
    return float(engagement_rows(vec[None, :])[0])


def engagement_rows(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """:func:`engagement` of every row."""
    w = rows[:, _ENG_IDX] @ _ENG_W
    out: npt.NDArray[np.float64] = 100.0 * (1.0 - np.exp(-w / ENGAGEMENT_SCALE))
    return out


def clv(
    vec: npt.NDArray[np.float64], churn: float, months: int, horizon_days: float = 30.4375
) -> float:
    """Expected revenue over the next ``months``: the monthly revenue rate of the last 90 days
    (or the tenure, if shorter, at least 14 days) times the expected number of retained
    months when each month keeps the customer with probability ``(1 - churn) ** (month /
    horizon)`` (``churn``: no activity within ``horizon_days``).

    >>> v = np.zeros(len(FEATURE_NAMES)); v[FEATURE_INDEX["revenue_90d"]] = 90.0
    >>> v[FEATURE_INDEX["tenure_days"]] = 200.0
    >>> round(clv(v, 0.0, 12), 1), round(clv(v, 1.0, 12), 1)
    (365.2, 30.4)
    """
    days = min(90.0, max(14.0, float(vec[_I["tenure_days"]])))
    monthly = float(vec[_I["revenue_90d"]]) / days * 30.4375
    monthly_churn = 1.0 - (1.0 - churn) ** (30.4375 / horizon_days)
    churn = monthly_churn
    keep = 1.0 - churn
    months_kept = float(months) if churn <= 0 else (1.0 - keep**months) / churn
    return monthly * months_kept


def cluster_input(vec: npt.NDArray[np.float64], eng: float) -> dict[str, float]:
    """The clustering vector (each dimension roughly in [0, 1])."""
    return {
        "engagement": eng / 100.0,
        "purchasing": min(1.0, math.log1p(vec[_I["purchases_90d"]]) / math.log1p(20.0)),
        "idle": min(1.0, float(vec[_I["idle_days_active"]]) / 90.0),
        "features": min(1.0, math.log1p(vec[_I["feature_use_28d"]]) / math.log1p(60.0)),
        "support": min(1.0, math.log1p(vec[_I["tickets_28d"]]) / math.log1p(10.0)),
        "email": min(1.0, float(vec[_I["open_rate_28d"]])),
    }


def cluster_rows(
    rows: npt.NDArray[np.float64], eng: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """:func:`cluster_input` of every row, as columns in ``CLUSTER_DIMS`` order."""
    out = np.empty((len(rows), 6))
    out[:, 0] = eng / 100.0
    out[:, 1] = np.log1p(rows[:, _I["purchases_90d"]]) / math.log1p(20.0)
    out[:, 2] = rows[:, _I["idle_days_active"]] / 90.0
    out[:, 3] = np.log1p(rows[:, _I["feature_use_28d"]]) / math.log1p(60.0)
    out[:, 4] = np.log1p(rows[:, _I["tickets_28d"]]) / math.log1p(10.0)
    out[:, 5] = rows[:, _I["open_rate_28d"]]
    return np.minimum(out, 1.0)


def fingerprint(vec: npt.NDArray[np.float64]) -> int:
    """A stable hash of the quantised features: it changes when a feature moves materially
    (a count changes, a ratio moves 5 points, money moves ~13 %), not when time alone moves
    one (``days_since_*``, tenure and age: the segmenter ages recencies itself; idle days
    count in whole weeks, idle against the usual gap in quarter steps; purchase drift, which
    default segments compare with 0.6, in 5-point steps like the other ratios).

    >>> v = np.zeros(len(FEATURE_NAMES))
    >>> a = fingerprint(v); v[FEATURE_INDEX["logins_7d"]] = 0.5; b = fingerprint(v)
    >>> v[FEATURE_INDEX["logins_7d"]] = 1.0; c = fingerprint(v)
    >>> v[FEATURE_INDEX["days_since_open"]] = 9.0
    >>> a == b, b == c, c == fingerprint(v)
    (True, False, True)
    """
    return fingerprints(vec[None, :])[0]


def fingerprints(rows: npt.NDArray[np.float64]) -> list[int]:
    """:func:`fingerprint` of every row."""
    q = np.where(_Q_LOG, np.log1p(np.abs(rows)) * 8.0, rows * _Q_SCALE)
    ints = np.floor(q).astype(np.int64)
    return [zlib.crc32(row.tobytes()) for row in ints]


def lifecycle(
    st: State, vec: npt.NDArray[np.float64], churn: float, model_ready: bool, cfg: ScorerConfig
) -> str:
    """Lifecycle stage: prospect → onboarded → adopting → loyal, or at_risk / churned.

    * churned: cancelled with no activity since, or silent for the churn horizon — longer
      for a customer whose silences are long anyway: ``sparse_churn_factor`` times its usual
      gap between active days, up to ``max_churn_idle_days`` (a customer active once every
      three weeks is not gone after 30 quiet days; one active every few days is);
    * prospect: never logged in, bought or used a feature;
    * at_risk: churn probability ≥ ``at_risk_probability`` (once the model has learned
      ``min_learned_for_stage`` examples), activity down ≥ 60 % over 14 days against the
      prior 28, or silent for 14 days (or 1.5 times its usual gap, if longer);
    * onboarded: tenure < 14 days or fewer than 3 feature uses and purchases in total;
    * adopting: tenure < 60 days or active on fewer than 8 of the last 28 days;
    * loyal: otherwise.

    >>> cfg = ScorerConfig()
    >>> st = {"last_active_ms": 0, "last_cancel_ms": None, "lifetime_logins": 9,
    ...       "lifetime_purchases": 2, "lifetime_feature_use": 9}
    >>> v = np.zeros(len(FEATURE_NAMES)); v[_I["tenure_days"]] = 200.0
    >>> v[_I["days_since_active"]] = 35.0; v[_I["usual_gap_days_active"]] = 3.0
    >>> lifecycle(st, v, 0.1, True, cfg)  # regular customer, 35 days silent
    'churned'
    >>> v[_I["usual_gap_days_active"]] = 20.0  # active once in three weeks: not yet
    >>> lifecycle(st, v, 0.1, True, cfg)
    'at_risk'
    """
    idle = float(vec[_I["days_since_active"]])
    if st["last_active_ms"] is None:
        return "prospect"
    gap = float(vec[_I["usual_gap_days_active"]])
    horizon = max(
        float(cfg.churn_horizon_days), min(cfg.sparse_churn_factor * gap, cfg.max_churn_idle_days)
    )
    if cancelled(st) or idle >= horizon:
        return "churned"
    if (
        st["lifetime_logins"] == 0
        and st["lifetime_purchases"] == 0
        and (st["lifetime_feature_use"] == 0)
    ):
        return "prospect"
    if (
        (model_ready and churn >= cfg.at_risk_probability)
        or vec[_I["activity_14d_vs_prior28_change"]] <= -0.6
        or idle >= max(14.0, 1.5 * gap)
    ):
        return "at_risk"
    tenure = float(vec[_I["tenure_days"]])
    if tenure < 14 or st["lifetime_feature_use"] + st["lifetime_purchases"] < 3:
        return "onboarded"
    if tenure < 60 or vec[_I["active_days_28d"]] < 8:
        return "adopting"
    return "loyal"


@dataclass(frozen=True)
class Scored:
    """One customer scored as of ``as_of``."""

    as_of: int
    vector: npt.NDArray[np.float64]
    churn: float
    engagement: float
    clv: float
    cluster: int
    stage: str
    top: list[tuple[str, float]]
    fingerprint: int
    #: The model that scored it (the shared model's version of its day), and that model's
    #: cluster descriptions (None: the scorer's current ones).
    model: Any = None
    descriptions: dict[int, str] | None = None
