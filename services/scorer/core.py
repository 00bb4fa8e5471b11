"""Scorer core (pure): event-time features, online churn scoring, coalesced emission.

The shell hands every identified event to :meth:`Scorer.on_event` with the customer's state
(a dict shaped like ``io.segflow.ScorerState``, see :mod:`services.scorer.features`) and gets
back the new state and the outputs to produce; it calls :meth:`Scorer.flush` on every tick.
Time is an argument everywhere: ``now_ms`` (processing time) only stamps ``scored_at`` and
rejects events from the future; everything else runs on event time.

Event time
    ``max_event_ms`` (the clock) is the smallest latest ``occurred_at`` of the input
    partitions that may still deliver older events: those with records in the batch at hand
    or unread records, as the shell reports (:meth:`Scorer.on_batch`); the largest of all
    when every partition has been read to its end. The **watermark** is
    ``max_event_ms - watermark_delay_ms`` (the out-of-orderness we wait for): time-driven work
    (pending scores, refreshes) happens when the watermark passes its due time. The **final
    watermark** is ``max_event_ms - allowed_lateness_ms``: an event older than it is rejected
    (``too_late``, dead-lettered); a later one lands in its own day bucket however late it
    comes, and churn labels mature only when their horizon is behind the final watermark.

Emission (coalescing)
    An *urgent* event (purchase, cancellation, escalated ticket, unsubscribe, or the first
    activity after a day or more of silence) scores the customer at once. Any other event marks
    it pending: it is scored when the watermark passes ``min_emit_interval_ms`` after its last
    emission, so a burst of page views yields one score. A scored customer is emitted only when
    something moved materially (a quantised fingerprint of its features, its churn probability
    by ``churn_delta``, engagement by ``engagement_delta``, lifecycle stage or cluster).
    Every customer is also refreshed on the ``refresh_interval_ms`` event-time grid (weekly
    once churned or silent for four weeks), so recency grows and windows roll for silent
    customers too; a refresh is emitted only when it moved something materially.

Churn
    ``churn_probability`` is the probability of no *qualifying activity* (``churn_activity``:
    purchase, login or any) in the next ``churn_horizon_days`` (H). Every customer is
    snapshotted one day in ``snapshot_every_days`` as scored at that midnight, and the
    snapshot is labelled exactly H days later, once that day is behind the final watermark
    (see :meth:`Scorer.snapshots` and :meth:`Scorer.mature`). The model's inputs include the
    buy-till-you-die summary and a BG/NBD fit of the customers (:mod:`services.scorer.btyd`),
    refitted weekly, whose probability of no activity in H is also the cold-start prior
    (:data:`CHURN_PRIOR`); the weights are sign-constrained (:data:`CHURN_SIGNS`). One
    customer in ``holdout_every`` is never learned from: its labels measure the scores as
    served.

>>> sc = Scorer(ScorerConfig())
>>> t0 = 1_704_067_200_000
>>> st, out = sc.on_event(None, "c1", {"event_type": "purchase", "occurred_at": t0,
...                                    "amount": 20.0}, now_ms=t0)
>>> [type(o).__name__ for o in out]
['StateWrite', 'ScoreEmit']
>>> score = out[1].score
>>> p = score["churn_probability"]
>>> score["features"]["purchases_7d"], score["lifecycle_stage"], 0 <= p <= 1
(1.0, 'onboarded', True)
"""

from __future__ import annotations

import heapq
import math
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from segflow.errors import InvalidRecord
from services.scorer import btyd
from services.scorer.features import (
    DAY,
    EVENT_SIGNAL,
    FEATURE_INDEX,
    FEATURE_NAMES,
    HOUR,
    MINUTE,
    NEVER_DAYS,
    QUALIFYING,
    RING,
    Buckets,
    State,
    apply_event,
    cancelled,
    compute,
    compute_many,
    high_value_zip,
    merge_into,
    new_state,
)
from services.scorer.model import CLUSTER_DIMS, ChurnModel, Prior

#: Deprecated (issue 19): high-value zips are a lookup table now (`segflow lookups load
#: zip_income FILE.csv`, read by the segmenter as lookup.zip_income(attr.zip)); the feature
#: ``high_value_zip`` stays 0 unless SEGFLOW_SCORER_HIGH_VALUE_ZIPS lists zips.
DEFAULT_HIGH_VALUE_ZIPS: frozenset[str] = frozenset()
STAGES = ("prospect", "onboarded", "adopting", "loyal", "at_risk", "churned")
URGENT_TYPES = frozenset({"purchase", "subscription_cancel", "email_unsubscribe"})


@dataclass(frozen=True)
class ScorerConfig:
    """Event-time, labelling and emission settings (all durations in epoch milliseconds)."""

    allowed_lateness_ms: int = 2 * DAY
    watermark_delay_ms: int = 5 * MINUTE
    max_future_ms: int = DAY
    #: H: ``churn_probability`` is the probability of no qualifying activity in the next H
    #: days (and the lifecycle stage says churned after H quiet days, longer for a sparse
    #: customer). Choose it from the time between qualifying days: about the 80th percentile
    #: of the gaps (``Scorer.suggested_horizon_days``, exported as model quality
    #: ``suggested_horizon_days``), so that a customer who is still a customer almost always
    #: comes back within H. 30 suits the simulated product (active every few days); a store
    #: whose customers buy every few months wants 90 to 180 (CDNOW: bench/churn_real.py).
    churn_horizon_days: int = 30
    #: What counts as activity for churn: ``purchase``, ``login`` or ``any`` customer-initiated
    #: event (see :data:`services.scorer.features.QUALIFYING`). Changing it on a running
    #: deployment needs its states rebuilt (the ``btyd_*`` summary counts these events).
    churn_activity: str = "any"
    #: Training snapshots: every customer is snapshotted one day in ``snapshot_every_days``
    #: (its features as scored at that day boundary), labelled H days later.
    snapshot_every_days: int = 7
    #: At most this many snapshots wait for their label (a day's snapshots are thinned to
    #: ``max_pending_labels / H``, deterministically by customer and day).
    max_pending_labels: int = 200_000
    #: One customer in ``holdout_every`` is never learned from: its matured labels measure the
    #: scores as served (``holdout_*`` model quality).
    holdout_every: int = 10
    #: The BG/NBD behind the ``bgnbd_*`` inputs and the cold-start prior is refitted on every
    #: customer's summary this often (days of event time).
    bgnbd_refit_days: int = 7
    min_emit_interval_ms: int = 5 * MINUTE
    refresh_interval_ms: int = DAY
    #: Refreshes of a churned customer, or of one without any event for
    #: ``slow_refresh_after_ms``, come this often instead: its scores move slowly by then, and
    #: lapsed customers are most of a store's (CDNOW: 85 %), so daily refreshes of them were
    #: most of the scorer's work (issue #17).
    churned_refresh_interval_ms: int = 7 * DAY
    slow_refresh_after_ms: int = 28 * DAY
    churn_delta: float = 0.02
    engagement_delta: float = 2.0
    at_risk_probability: float = 0.5
    sparse_churn_factor: float = 3.0
    max_churn_idle_days: float = 90.0
    min_learned_for_stage: int = 500
    top_k: int = 5
    clv_months: int = 12
    #: Customers one :meth:`Scorer.flush` (the loop's tick, while input waits) scores at
    #: most; the rest stay due for the next flush (see also its ``out_of_time``).
    max_scores_per_flush: int = 50_000
    #: How many records of one input partition may arrive out of event-time order: the
    #: identity service re-keys a batch (up to 2,000 records) input partition by input
    #: partition, so one identified partition holds runs of days that start over.
    reorder_records: int = 2000
    reactivation_gap_ms: int = 3 * DAY
    source_idle_ms: int = 30_000
    high_value_zips: frozenset[str] = DEFAULT_HIGH_VALUE_ZIPS

    def __post_init__(self) -> None:
        if self.churn_activity not in QUALIFYING:
            raise ValueError(
                f"churn_activity must be one of {sorted(QUALIFYING)}, got {self.churn_activity!r}"
            )
        if self.churn_horizon_days < 1:
            raise ValueError(f"churn_horizon_days must be >= 1, got {self.churn_horizon_days}")


# -- outputs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateWrite:
    """Write the customer's state (``None``: delete it, a tombstone on the changelog)."""

    customer_id: str
    state: State | None


@dataclass(frozen=True)
class ScoreEmit:
    """Produce a CustomerScore (``None``: tombstone the customer's score)."""

    customer_id: str
    score: dict[str, Any] | None


@dataclass(frozen=True)
class Retire:
    """Remember for good that ``customer_id`` was forgotten (``at``: when, event time of the
    request): the shell persists a marker next to the states, and every later event or merge
    for the id is dropped instead of profiling the person again."""

    customer_id: str
    at: int


Out = StateWrite | ScoreEmit | Retire

#: The identified event the identity service emits after erasing a profile (``segflow forget``).
FORGET_EVENT = "customer_forgotten"


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


def _overlay(
    states: Mapping[str, State | None], get: Callable[[str], State | None]
) -> Callable[[str], State | None]:
    def lookup(cid: str) -> State | None:
        return states[cid] if cid in states else get(cid)

    return lookup


class Pending:
    """One day's training snapshots waiting for their label (H days later): per snapshot the
    customer, its qualifying days before the day, its model input and churn score as scored,
    whether it is held back (measured, never learned) and its days since the last qualifying
    activity (recency)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.q_days: list[int] = []
        self.x: list[npt.NDArray[np.float32]] = []
        self.p: list[float] = []
        self.holdout: list[bool] = []
        self.since: list[float] = []

    def add(
        self, cid: str, q_days: int, x: npt.NDArray[np.float64], p: float, held: bool, since: float
    ) -> None:
        self.ids.append(cid)
        self.q_days.append(q_days)
        self.x.append(x.astype(np.float32))
        self.p.append(p)
        self.holdout.append(held)
        self.since.append(since)


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


@dataclass
class Scorer:
    """The scorer's process-wide state: event-time clock, model, timers (rebuildable)."""

    config: ScorerConfig
    model: ChurnModel = field(default_factory=new_model)
    max_event_ms: int | None = None
    #: Per input partition: (largest occurred_at, processing time it last had an event).
    _sources: dict[Any, tuple[int, int]] = field(default_factory=dict)
    #: Per input partition, as last reported by :meth:`on_batch`: records of the batch at
    #: hand not handled yet, and records not read yet after the batch (None: unknown).
    _pending: dict[Any, int] = field(default_factory=dict)
    _lag: dict[Any, int | None] = field(default_factory=dict)
    #: Per input partition: (sequence number, occurred_at) of its last ``reorder_records``
    #: records that no later record undercuts (the front is their minimum).
    _recent: dict[Any, deque[tuple[int, int]]] = field(default_factory=dict)
    _seq: dict[Any, int] = field(default_factory=dict)
    _timers: list[tuple[int, str]] = field(default_factory=list)
    #: Each customer's live timer (the heap may also hold superseded ones, skipped when
    #: popped): one per customer, so no customer is ever left without one.
    _timer_at: dict[str, int] = field(default_factory=dict)
    _descriptions: dict[int, str] = field(default_factory=dict)
    emitted: int = 0
    scored: int = 0
    #: Decompressed buckets of recently seen customers: (the compressed blob they match,
    #: buckets). A state whose blob is not the cached object (a rollback, a restore) reloads.
    cache_size: int = 20_000
    _cache: dict[str, tuple[bytes, Buckets]] = field(default_factory=dict)
    #: True: every state an output carries is complete. False: a changed customer's buckets
    #: stay decompressed in the cache and its state's ``buckets`` field is stale until
    #: :meth:`seal` compresses it (once per batch instead of once per event); call
    #: :meth:`seal` before persisting states or reading them outside the scorer.
    pack_states: bool = True
    _unsealed: dict[str, State] = field(default_factory=dict)
    #: False: an urgent event is scored inside :meth:`on_event`. True: it only marks the
    #: customer, and :meth:`settle` scores every marked customer once, on stacked arrays,
    #: before the batch commits (the service's mode: the same transaction, so the same
    #: exactly-once outputs, without per-event numpy work on one-row arrays; several urgent
    #: events of one customer in a batch give one score, with all of them).
    defer_scores: bool = False
    #: Customers to score at :meth:`settle` (True: emit even if nothing moved, after a merge).
    _urgent: dict[str, bool] = field(default_factory=dict)
    #: Customer ids that were forgotten (see :meth:`forget`); the shell restores them.
    retired: set[str] = field(default_factory=set)
    #: Events and merges dropped because their customer id was forgotten.
    dropped_retired: int = 0
    #: None: this scorer learns its own model. Set (N instances, one model): what it would
    #: learn goes to ``sink(kind, payload)`` instead, for the deployment's one learner
    #: (:func:`learn_from`): ``"examples"`` (a label day's matured snapshots), ``"clusters"``
    #: (cluster inputs of the snapshots) and ``"summary"`` (the BG/NBD summaries of a refit
    #: day); the scorer scores with the model versions the learner publishes.
    sink: Callable[[str, dict[str, Any]], None] | None = None

    # -- clock ---------------------------------------------------------------------------
    @property
    def watermark(self) -> int | None:
        """Event time up to which the stream is considered complete enough to act on."""
        if self.max_event_ms is None:
            return None
        return self.max_event_ms - self.config.watermark_delay_ms

    @property
    def final_watermark(self) -> int | None:
        """Event time before which no event is accepted any more."""
        if self.max_event_ms is None:
            return None
        return self.max_event_ms - self.config.allowed_lateness_ms

    def _observe(self, source: Any, t: int, now_ms: int) -> None:
        """Advance the clock with an event of ``t`` from input partition ``source``: the clock
        is the smallest latest event time of the partitions that can still deliver older
        events (see :meth:`on_batch`), or the largest of all when none can; it never goes
        backwards. A replay that reads one partition ahead of the others thus does not make
        the others' events late."""
        old = self._sources.get(source)
        self._sources[source] = (t if old is None or t > old[0] else old[0], now_ms)
        if source in self._lag:  # the floor only matters for reported partitions
            recent = self._recent.get(source)
            if recent is None:
                recent = self._recent[source] = deque()
            seq = self._seq[source] = self._seq.get(source, 0) + 1
            while recent and recent[-1][1] >= t:
                recent.pop()
            recent.append((seq, t))
            if recent[0][0] <= seq - self.config.reorder_records:
                recent.popleft()
        self._advance(now_ms)

    def _holds(self, source: Any, seen: int, now_ms: int) -> bool:
        """Whether ``source`` may still deliver events older than its latest: it has records
        in the batch at hand or unread ones (as last reported); without a report, whether it
        delivered within ``source_idle_ms`` of processing time."""
        if source in self._lag:
            lag = self._lag[source]
            if self._pending.get(source, 0) > 0 or (lag is not None and lag > 0):
                return True
            if lag is not None:
                return False
        return now_ms - seen <= self.config.source_idle_ms

    def _advance(self, now_ms: int) -> None:
        holding = [
            self._floor(src, t)
            for src, (t, seen) in self._sources.items()
            if self._holds(src, seen, now_ms)
        ]
        clock = min(holding) if holding else max(t for t, _ in self._sources.values())
        if clock >= 0 and (self.max_event_ms is None or clock > self.max_event_ms):
            self.max_event_ms = clock

    def _floor(self, source: Any, latest: int) -> int:
        """What a partition that may still deliver holds the clock at: the oldest of its last
        ``reorder_records`` records when it is reported (its unread records may start over
        from there), else its latest."""
        recent = self._recent.get(source)
        if source in self._lag and recent:
            return min(latest, recent[0][1])
        return latest

    def expect_sources(self, sources: Iterable[Any], now_ms: int) -> None:
        """Declare input partitions before they deliver: each holds the clock back until its
        first event, until it is reported caught up, or (without reports) until it has been
        idle for ``source_idle_ms``."""
        for source in sources:
            self._sources.setdefault(source, (-1, now_ms))

    def drop_sources(self, sources: Iterable[Any]) -> None:
        """Input partitions this instance no longer reads (another owns them): they stop
        holding the clock back."""
        for source in sources:
            for table in (self._sources, self._pending, self._lag, self._recent, self._seq):
                table.pop(source, None)

    def on_batch(
        self, pending: Mapping[Any, int], lag: Mapping[Any, int | None], now_ms: int
    ) -> None:
        """Report the input partitions' progress before a batch is handled: ``pending`` =
        records of each partition in the batch, ``lag`` = records of each assigned partition
        not read yet after the batch (None: unknown). A partition with either holds the clock
        back, so a burst read from one partition after a pause does not carry the clock past
        older events waiting in another; one read to its end does not hold it at all (an
        empty or quiet partition does not stall the clock either). Partitions missing from
        ``lag`` fall back to the processing-time rule."""
        self._pending = dict(pending)
        self._lag = dict(lag)
        for source in self._lag:
            self._sources.setdefault(source, (-1, now_ms))
        if self._sources:
            self._advance(now_ms)

    def _handled(self, source: Any) -> None:
        n = self._pending.get(source)
        if n:
            self._pending[source] = n - 1

    # -- events --------------------------------------------------------------------------
    def on_event(
        self,
        state: State | None,
        customer_id: str,
        event: Mapping[str, Any],
        now_ms: int,
        source: Any = 0,
    ) -> tuple[State | None, list[Out]]:
        """Apply one event to the customer's state; score at once if the event is urgent.

        A ``customer_forgotten`` event deletes the customer (:meth:`forget`); an event for a
        forgotten id is dropped (state None, no output). Raises
        :class:`~segflow.errors.InvalidRecord` (dead-lettered by the shell) for an event from
        the future (``future_event``), older than the allowed lateness (``too_late``) or
        without a customer id (``missing_field``).
        """
        self._handled(source)
        if not customer_id:
            raise InvalidRecord("identified event without customer_id", reason="missing_field")
        kind = str(event["event_type"])
        if kind == FORGET_EVENT:  # stamped in processing time: not a clock reading
            return None, self.forget(customer_id, int(event.get("occurred_at") or 0))
        if customer_id in self.retired:
            self.dropped_retired += 1  # never dead-lettered: it would keep the person's data
            return None, []
        t = int(event["occurred_at"])
        if t > now_ms + self.config.max_future_ms:
            raise InvalidRecord(
                f"event occurred {(t - now_ms) / 1000:.0f}s in the future", reason="future_event"
            )
        fw = self.final_watermark
        if fw is not None and t < fw:
            raise InvalidRecord(
                f"event is {(fw - t) / 1000:.0f}s older than the allowed lateness",
                reason="too_late",
            )
        self._observe(source, t, now_ms)
        st = new_state(customer_id, t) if state is None else dict(state)
        prev_active = st["last_active_ms"]
        b = self.buckets(customer_id, st)
        sd = self.model.snapshot_day
        if state is not None and sd is not None and t // DAY > sd:
            # the first event after a snapshot day the watermark has not passed yet: snapshot
            # the state before it (exactly as of that midnight)
            due = self._snapshot_days(customer_id, state, sd, t // DAY)
            if due:
                self._snapshot([(state, d) for d in due])
        del self._cache[customer_id]  # mutated below: not valid for the old blob any more
        b = apply_event(st, event, b, QUALIFYING[self.config.churn_activity])
        if kind == "identify":
            high_value_zip(st, event, self.config.high_value_zips)
        if self.pack_states:
            self._cache[customer_id] = (b.dump(), b)
            st["buckets"] = self._cache[customer_id][0]
        else:
            self._cache[customer_id] = (st["buckets"], b)
            self._unsealed[customer_id] = st
        urgent = (
            kind in URGENT_TYPES
            or (kind == "support_ticket" and bool(event.get("escalated")))
            or (
                st["last_active_ms"] is not None
                and st["last_active_ms"] != prev_active
                and (
                    prev_active is None
                    or st["last_active_ms"] - prev_active >= self.config.reactivation_gap_ms
                )
            )
        )
        outs: list[Out] = []
        if urgent and self.defer_scores:
            self._urgent.setdefault(customer_id, False)
        elif urgent:
            scored = self.score(st, max(st["last_event_ms"], self.watermark or 0), b)
            emit = self._settle(st, scored, now_ms)
            outs.append(StateWrite(customer_id, st))
            if emit is not None:
                outs.append(emit)
            return st, outs
        if not st["pending"]:
            st["pending"] = True
            self._schedule(customer_id, self._due(st))
        outs.append(StateWrite(customer_id, st))
        return st, outs

    def on_merge(
        self, get: Callable[[str], State | None], merge: Mapping[str, Any], now_ms: int
    ) -> list[Out]:
        """Fold the absorbed customers' states into the survivor's, delete theirs (state and
        score tombstones) and rescore the survivor. Replaying a merge is a no-op."""
        survivor_id = str(merge["survivor_id"])
        outs: list[Out] = []
        if survivor_id in self.retired:
            # read after the survivor's forget (merges and events are separate topics): the
            # absorbed ids are the same forgotten person, so they go too
            self.dropped_retired += 1
            for absorbed_id in merge["absorbed_ids"]:
                if absorbed_id != survivor_id:
                    outs += self.forget(absorbed_id, self.max_event_ms or 0)
            return outs
        for cid in (survivor_id, *merge["absorbed_ids"]):
            self._seal_one(cid)  # merge_into reads the compressed buckets
        survivor = get(survivor_id)
        merged = False
        for absorbed_id in merge["absorbed_ids"]:
            if absorbed_id == survivor_id:
                continue
            absorbed = get(absorbed_id)
            if absorbed is None:
                continue
            if survivor is None:
                survivor = dict(absorbed)
                survivor["customer_id"] = survivor_id
                survivor["pending"] = True
            else:
                survivor = merge_into(survivor, absorbed)
            merged = True
            outs.append(StateWrite(absorbed_id, None))
            outs.append(ScoreEmit(absorbed_id, None))
        if not merged or survivor is None:
            return outs
        for absorbed_id in merge["absorbed_ids"]:
            self._urgent.pop(absorbed_id, None)
        if self.defer_scores:
            self._urgent[survivor_id] = True
            outs.append(StateWrite(survivor_id, survivor))
            return outs
        scored = self.score(survivor, max(survivor["last_event_ms"], self.watermark or 0))
        emit = self._settle(survivor, scored, now_ms, force=True)
        outs.append(StateWrite(survivor_id, survivor))
        if emit is not None:
            outs.append(emit)
        return outs

    def forget(self, customer_id: str, at: int) -> list[Out]:
        """Delete the customer for good (a ``segflow forget`` erasure): its state (changelog
        tombstone), its last score (tombstone on ``segflow.scores``), its cached buckets and
        pending timers, and retire the id so that nothing recreates it (:class:`Retire`).
        Forgetting a forgotten id again is a no-op."""
        if customer_id in self.retired:
            return []
        self.retired.add(customer_id)
        self._urgent.pop(customer_id, None)
        self._cache.pop(customer_id, None)
        self._unsealed.pop(customer_id, None)
        if self._timer_at.pop(customer_id, None) is not None:
            self._timers = [x for x in self._timers if x[1] != customer_id]
            heapq.heapify(self._timers)
        return [
            StateWrite(customer_id, None),
            ScoreEmit(customer_id, None),
            Retire(customer_id, at),
        ]

    def release(self, customer_id: str) -> None:
        """Drop the customer's timer, cached buckets and deferred score without retiring the
        id: its state moved to another instance (a merge hand-off, or a revoked partition)."""
        self._urgent.pop(customer_id, None)
        self._cache.pop(customer_id, None)
        self._unsealed.pop(customer_id, None)
        self._timer_at.pop(customer_id, None)  # its heap entry is skipped as superseded

    def settle(self, get: Callable[[str], State | None], now_ms: int) -> list[Out]:
        """Score the customers whose urgent events or merges :meth:`on_event` /
        :meth:`on_merge` deferred (:attr:`defer_scores`), each once, as of its latest event
        (or the watermark, if later), on stacked arrays; call before the batch commits."""
        if not self._urgent:
            return []
        wm = self.watermark or 0
        due: list[tuple[str, State, bool]] = []
        for cid, force in self._urgent.items():
            st = get(cid)
            if st is None:
                continue
            st = dict(st)
            if cid in self._unsealed:
                self._unsealed[cid] = st
            due.append((cid, st, force))
        self._urgent.clear()
        scored = self.score_many([(st, max(st["last_event_ms"], wm)) for _, st, _ in due])
        outs: list[Out] = []
        for (cid, st, force), s in zip(due, scored, strict=True):
            emit = self._settle(st, s, now_ms, force=force)
            outs.append(StateWrite(cid, st))
            if emit is not None:
                outs.append(emit)
        return outs

    def seal(self) -> list[StateWrite]:
        """Compress the buckets of every customer changed since the last call into its state
        (in place) and return those states (see :attr:`pack_states`)."""
        outs = [StateWrite(cid, st) for cid, st in self._unsealed.items()]
        for cid in list(self._unsealed):
            self._seal_one(cid)
        return outs

    def _seal_one(self, customer_id: str) -> None:
        st = self._unsealed.pop(customer_id, None)
        if st is not None:
            b = self._cache[customer_id][1]
            blob = st["buckets"] = b.dump()
            self._cache[customer_id] = (blob, b)

    def buckets(self, customer_id: str, st: State) -> Buckets:
        """The customer's decompressed buckets, from the cache when they match ``st``."""
        hit = self._cache.get(customer_id)
        if hit is not None and hit[0] is st["buckets"]:
            return hit[1]
        b = Buckets.of(st)
        cache = self._cache
        if len(cache) >= self.cache_size:
            unsealed = self._unsealed
            for key in [k for k in list(cache)[: self.cache_size // 10] if k not in unsealed]:
                del cache[key]
        cache[customer_id] = (st["buckets"], b)
        return b

    # -- scoring -------------------------------------------------------------------------
    def score(self, st: State, as_of: int, b: Buckets | None = None) -> Scored:
        """Features and scores of one customer as of ``as_of`` (does not change anything)."""
        if b is None:
            b = self.buckets(st["customer_id"], st)
        return self._scored([st], [as_of], compute(st, as_of, b).vector[None, :])[0]

    def score_many(self, items: Sequence[tuple[State, int]]) -> list[Scored]:
        """:meth:`score` of many ``(state, as_of)`` at once (the same results, computed on
        stacked arrays: a refresh of thousands of customers costs far less per customer)."""
        out: list[Scored] = []
        for lo in range(0, len(items), 512):
            chunk = items[lo : lo + 512]
            states = [st for st, _ in chunk]
            as_ofs = [as_of for _, as_of in chunk]
            bs = [self.buckets(st["customer_id"], st) for st in states]
            out += self._scored(states, as_ofs, compute_many(states, as_ofs, bs))
        return out

    def _scored(
        self, states: Sequence[State], as_ofs: Sequence[int], rows: npt.NDArray[np.float64]
    ) -> list[Scored]:
        model, cfg = self.model, self.config
        self.fill_bgnbd(rows)
        churn, tops = model.predict_explain_matrix(_MI_NAMES, model_matrix(rows), cfg.top_k)
        eng = engagement_rows(rows)
        clusters = model.cluster_rows(cluster_rows(rows, eng)).tolist()
        prints = fingerprints(rows)
        ready = model.n_learned >= cfg.min_learned_for_stage
        out = []
        for i, (st, as_of) in enumerate(zip(states, as_ofs, strict=True)):
            vec = rows[i]
            p = float(churn[i])
            out.append(
                Scored(
                    as_of=as_of,
                    vector=vec,
                    churn=p,
                    engagement=float(eng[i]),
                    clv=clv(vec, p, cfg.clv_months, cfg.churn_horizon_days),
                    cluster=clusters[i],
                    stage=lifecycle(st, vec, p, ready, cfg),
                    top=tops[i],
                    fingerprint=prints[i],
                )
            )
        return out

    def fill_bgnbd(self, rows: npt.NDArray[np.float64]) -> None:
        """The ``bgnbd_*`` columns of feature rows (in place), from the latest BG/NBD fit and
        the rows' ``btyd_*`` summary (a customer without qualifying activity: as one whose
        first qualifying day is today)."""
        params = self.model.bgnbd or btyd.DEFAULT_PARAMS
        h = float(self.config.churn_horizon_days)
        x, tx = rows[:, _BT_X], rows[:, _BT_TX]
        t = np.maximum(rows[:, _BT_T], tx)
        rows[:, _BG_P_ALIVE] = btyd.p_alive(params, x, tx, t)
        rows[:, _BG_EXPECTED] = btyd.expected(params, x, tx, t, h)
        rows[:, _BG_P_NONE] = btyd.p_none(params, x, tx, t, h)

    def record(self, customer_id: str, s: Scored, now_ms: int) -> dict[str, Any]:
        """The CustomerScore record of a scored customer."""
        vec = s.vector
        values = np.round(vec, 4).tolist()
        features = dict(zip(FEATURE_NAMES, values, strict=True))
        # not a behavioural feature: how much of the churn score is still the prior (1 = no
        # label learned yet, 0.5 after PRIOR_STRENGTH labels), for rules that want a warm model
        features[PRIOR_SHARE_FEATURE] = round(self.model.prior_share(), 4)
        return {
            "customer_id": customer_id,
            "as_of": s.as_of,
            "churn_probability": round(s.churn, 4),
            "engagement_score": round(s.engagement, 2),
            "clv": round(s.clv, 2),
            "cluster": s.cluster,
            "lifecycle_stage": s.stage,
            "features": features,
            "top_features": [
                {"name": n, "value": values[FEATURE_INDEX[n]], "contribution": round(c, 4)}
                for n, c in s.top
            ],
            "model_version": self.model.version,
            "scored_at": now_ms,
            "cluster_description": self._descriptions.get(s.cluster, ""),
        }

    def _settle(self, st: State, s: Scored, now_ms: int, force: bool = False) -> ScoreEmit | None:
        """Record that ``st`` was scored (mutates ``st``: a fresh copy); emit if material."""
        self.scored += 1
        st["pending"] = False
        st["scored_as_of"] = s.as_of
        material = (
            force
            or st["emitted_as_of"] is None
            or s.fingerprint != st["emitted_fingerprint"]
            or s.stage != st["emitted_stage"]
            or s.cluster != st["emitted_cluster"]
            or abs(s.churn - st["emitted_churn"]) >= self.config.churn_delta
            or abs(s.engagement - st["emitted_engagement"]) >= self.config.engagement_delta
        )
        if not material:
            self._schedule(st["customer_id"], self._due(st))
            return None
        st["emitted_as_of"] = s.as_of
        st["emitted_fingerprint"] = s.fingerprint
        st["emitted_stage"] = s.stage
        st["emitted_cluster"] = s.cluster
        st["emitted_churn"] = s.churn
        st["emitted_engagement"] = s.engagement
        # after the stage: a customer just turned churned is next due on the weekly grid
        self._schedule(st["customer_id"], self._due(st))
        self.emitted += 1
        return ScoreEmit(st["customer_id"], self.record(st["customer_id"], s, now_ms))

    # -- timers --------------------------------------------------------------------------
    def _due(self, st: State) -> int:
        """When the customer should next be scored (event time)."""
        if st["pending"]:
            last = st["emitted_as_of"]
            return 0 if last is None else int(last) + self.config.min_emit_interval_ms
        every = self._every(st)
        scored = int(st["scored_as_of"] or st["last_event_ms"])
        return (scored // every + 1) * every

    def _every(self, st: State) -> int:
        cfg = self.config
        quiet = int(st["scored_as_of"] or st["last_event_ms"]) - int(st["last_event_ms"])
        if st["emitted_stage"] == "churned" or quiet >= cfg.slow_refresh_after_ms:
            return cfg.churned_refresh_interval_ms
        return cfg.refresh_interval_ms

    def _schedule(self, customer_id: str, due: int) -> None:
        if self._timer_at.get(customer_id) == due:
            return
        self._timer_at[customer_id] = due
        heapq.heappush(self._timers, (due, customer_id))

    def rebuild(
        self, states: Iterable[tuple[str, State]], retired: Iterable[str] | None = None
    ) -> None:
        """Recreate the timers from the states (after a restore or an abort) and, if given, the
        forgotten ids. The clock is not taken from the states: the newest customer may be far
        ahead of a partition that was behind, whose events would then look late; the inputs
        re-establish it."""
        self._cache.clear()  # may hold changes that were rolled back
        self._unsealed.clear()
        self._urgent.clear()
        if retired is not None:
            self.retired = set(retired)
        self._timers = [(self._due(st), cid) for cid, st in states]
        self._timer_at = {cid: due for due, cid in self._timers}
        heapq.heapify(self._timers)

    def flush(
        self,
        get: Callable[[str], State | None],
        states: Callable[[], Iterable[tuple[str, State]]],
        now_ms: int,
        out_of_time: Callable[[], bool] | None = None,
    ) -> list[Out]:
        """Time-driven work up to the watermark: score customers whose timer is due (pending
        ones and refreshes, up to ``max_scores_per_flush``), then learn from the labels that
        matured (see :meth:`mature` for ``out_of_time``)."""
        outs: list[Out] = self.settle(get, now_ms)
        if outs:  # the states just settled, before the caller has stored them
            get = _overlay({o.customer_id: o.state for o in outs if isinstance(o, StateWrite)}, get)
        if self._sources:
            self._advance(now_ms)
        wm = self.watermark
        if wm is None:
            return outs
        timers = self._timers
        budget = self.config.max_scores_per_flush
        due: list[tuple[str, State]] = []
        as_ofs: list[int] = []
        seen: set[str] = set()
        while timers and timers[0][0] <= wm and len(due) < budget:
            at, cid = heapq.heappop(timers)
            if cid in seen or self._timer_at.get(cid) != at:
                continue  # superseded: the customer's live timer is elsewhere in the heap
            del self._timer_at[cid]
            st = get(cid)
            if st is None:
                continue  # deleted since
            if self._due(st) > wm:  # its due time moved on (e.g. onto the weekly grid)
                self._schedule(cid, self._due(st))
                continue
            seen.add(cid)
            st = dict(st)
            if cid in self._unsealed:
                self._unsealed[cid] = st
            if st["pending"]:
                as_of = max(st["last_event_ms"], wm)
            else:  # a refresh: as of the latest grid time the watermark passed
                every = self._every(st)
                as_of = max(st["last_event_ms"], wm // every * every)
            due.append((cid, st))
            as_ofs.append(as_of)
        scored = self.score_many([(st, a) for (_, st), a in zip(due, as_ofs, strict=True)])
        for (cid, st), s in zip(due, scored, strict=True):
            emit = self._settle(st, s, now_ms)
            outs.append(StateWrite(cid, st))
            if emit is not None:
                outs.append(emit)
        self.snapshots(states)  # (their features do not depend on the scoring fields)
        self.mature(states, out_of_time)
        return outs

    # -- labels --------------------------------------------------------------------------
    def mature(
        self,
        states: Callable[[], Iterable[tuple[str, State]]],
        out_of_time: Callable[[], bool] | None = None,
    ) -> int:
        """Learn from every snapshot whose horizon is now behind the final watermark, day by
        day; with ``out_of_time`` (the shell's budget: True once it is spent) stop after the
        first day that ends with it spent, the rest in the next calls. Returns the number of
        examples learned."""
        fw = self.final_watermark
        if fw is None:
            return 0
        target = fw // DAY  # day boundaries up to target * DAY are final
        model = self.model
        if model.matured_through_day is None:
            model.matured_through_day = target
            return 0
        n = 0
        while model.matured_through_day < target:
            model.matured_through_day += 1
            n += self._learn_day(model.matured_through_day, states())
            if out_of_time is not None and out_of_time():
                break
        if n:
            self._descriptions = model.describe_clusters()
        return n

    def _learn_day(self, day: int, states: Iterable[tuple[str, State]]) -> int:
        """The day boundary ``day`` is final: label the snapshots of ``day - H`` (churned:
        no qualifying day in ``[day - H, day)``) and learn them (the held-back customers'
        only measure the scores as served); refit the BG/NBD if it is due."""
        cfg, model = self.config, self.model
        h = cfg.churn_horizon_days
        end = day * DAY
        due = model.pending.pop(day - h, None)
        want = {} if due is None else {cid: i for i, cid in enumerate(due.ids)}
        now_days = np.full(len(want), -1, dtype=np.int64)
        refit = model.bgnbd_day is None or day - model.bgnbd_day >= cfg.bgnbd_refit_days
        summary: list[tuple[float, float, float]] = []
        for cid, st in states:
            i = want.get(cid)
            if i is not None:
                now_days[i] = self.qualifying_days_before(st, day)
            first = st.get("q_first_ms")
            if refit and first is not None and first < end:
                f, last = first // DAY, int(st["q_last_ms"]) // DAY
                tx = float(last - f)
                summary.append((float(st["q_days"] - 1), tx, max(float(day - f), tx)))
        n = 0
        if due is not None:
            n = self._learn_snapshots(due, now_days, end)
        if refit and self.sink is not None:
            self.sink("summary", {"day": day, "rows": np.array(summary).reshape(-1, 3)})
        elif refit and len(summary) >= btyd.MIN_FIT_CUSTOMERS:
            a = np.array(summary)
            model.bgnbd = btyd.fit(a[:, 0], a[:, 1], a[:, 2], start=model.bgnbd)
            model.bgnbd_day = day
            model.suggested_horizon_days = self.suggested_horizon_days(states=None, gaps=a)
        return n

    def snapshots(self, states: Callable[[], Iterable[tuple[str, State]]]) -> int:
        """Take the training snapshots of the day boundaries the watermark passed since the
        last call: each customer on the days of its phase (one in ``snapshot_every_days``),
        its features and score as of that midnight. Only customers with no event after the
        boundary are taken here (their state is exactly what it was then); one whose event
        after the boundary came first was taken by :meth:`on_event`, from its state before
        that event. Returns the number of snapshots taken."""
        wm = self.watermark
        if wm is None:
            return 0
        hi = wm // DAY
        model, cfg = self.model, self.config
        lo = model.snapshot_day
        if lo is None:
            model.snapshot_day = hi
            return 0
        if hi <= lo:
            return 0
        every = cfg.snapshot_every_days
        todo: list[tuple[State, int]] = []
        n = 0
        for cid, st in states():
            n += 1
            todo += [(st, d) for d in self._snapshot_days(cid, st, lo, hi)]
        model.snapshot_day = hi
        cap = cfg.max_pending_labels / max(cfg.churn_horizon_days, 1)
        model.snapshot_rate = min(1.0, cap / max(1.0, n / every))
        model.observe_scores(self._snapshot(todo))
        self._descriptions = model.describe_clusters()
        return len(todo)

    def _snapshot_days(self, cid: str, st: State, lo: int, hi: int) -> list[int]:
        """The snapshot days ``d`` in ``(lo, hi]`` of the customer's phase that its state
        holds exactly (no event at or after ``d * DAY``), sampled at the snapshot rate."""
        every = self.config.snapshot_every_days
        phase = zlib.crc32(cid.encode()) % every
        s0 = max(lo + 1, int(st["last_event_ms"]) // DAY + 1)
        rate = int(self.model.snapshot_rate * 10_000)
        out = []
        for d in range(s0 + (phase - s0) % every, hi + 1, every):
            if rate >= 10_000 or zlib.crc32(f"{cid}:{d}".encode()) % 10_000 < rate:
                out.append(d)
        return out

    def _snapshot(self, todo: list[tuple[State, int]]) -> npt.NDArray[np.float64]:
        """Record training snapshots ``(state, day)``: the model input and churn score as
        served at the day boundary, and how many qualifying days the customer had before."""
        model, cfg = self.model, self.config
        scores = [np.zeros(0)]
        for lo in range(0, len(todo), 512):
            chunk = todo[lo : lo + 512]
            sts = [st for st, _ in chunk]
            bs = [self.buckets(st["customer_id"], st) for st in sts]
            rows = compute_many(sts, [d * DAY for _, d in chunk], bs)
            self.fill_bgnbd(rows)
            xm = model_matrix(rows)
            ps = model.predict_explain_matrix(_MI_NAMES, xm, 0)[0]
            crows = cluster_rows(rows, engagement_rows(rows))
            if self.sink is not None:
                self.sink("clusters", {"rows": crows})
            for cx in [] if self.sink is not None else crows.tolist():
                model.learn_cluster(dict(zip(_CLUSTER_NAMES, cx, strict=True)))
            for k, (st, d) in enumerate(chunk):
                cid = st["customer_id"]
                held = zlib.crc32(b"holdout:" + cid.encode()) % cfg.holdout_every == 0
                day = model.pending.get(d)
                if day is None:
                    day = model.pending[d] = Pending()
                day.add(
                    cid,
                    self.qualifying_days_before(st, d),
                    xm[k],
                    float(ps[k]),
                    held,
                    float(rows[k, _SINCE_Q]),
                )
            scores.append(ps)
        return np.concatenate(scores)

    def _learn_snapshots(self, due: Pending, now_days: npt.NDArray[np.int64], end: int) -> int:
        """Label matured snapshots and learn from those not held back; returns how many."""
        if self.sink is not None:
            keep = now_days >= 0  # not forgotten or merged away since
            idx = np.flatnonzero(keep)
            churned = now_days[idx] == np.asarray(due.q_days, dtype=np.int64)[idx]
            held = np.asarray(due.holdout, dtype=bool)[idx]
            self.sink(
                "examples",
                {
                    "end": end,
                    "x": np.array([due.x[i] for i in idx], dtype=np.float32).reshape(
                        -1, len(_MI_NAMES)
                    ),
                    "y": churned,
                    "p": np.asarray(due.p, dtype=np.float64)[idx],
                    "holdout": held,
                    "since": np.asarray(due.since, dtype=np.float64)[idx],
                },
            )
            return int((~held).sum())
        model = self.model
        n = 0
        for i in range(len(due.ids)):
            if now_days[i] < 0:
                continue  # the customer was forgotten or merged away since
            churned = bool(now_days[i] == due.q_days[i])
            p = float(due.p[i])
            if due.holdout[i]:
                model.observe_holdout(p, churned, float(due.since[i]))
                continue
            x = dict(zip(_MI_NAMES, due.x[i].astype(np.float64).tolist(), strict=True))
            model.learn(x, churned, at=end, p=p)
            n += 1
        return n

    def qualifying_days_before(self, st: State, day: int) -> int:
        """Distinct days with qualifying activity before the day boundary ``day`` (the
        summary's count less the days from ``day`` on that the buckets hold)."""
        total = int(st.get("q_days", 0))
        head = int(st["head_day"])
        if head < day or total == 0:
            return total
        b = self.buckets(st["customer_id"], st)
        slots = np.arange(max(day, head - RING + 1), head + 1) % RING
        sigs = self._qualifying_signals
        later = int(b.counts[slots][:, sigs].any(axis=1).sum())
        return total - later

    @property
    def _qualifying_signals(self) -> list[int]:
        return [
            EVENT_SIGNAL[k]
            for k in sorted(QUALIFYING[self.config.churn_activity])
            if k in EVENT_SIGNAL
        ]

    def suggested_horizon_days(
        self,
        states: Iterable[tuple[str, State]] | None = None,
        gaps: npt.NDArray[np.float64] | None = None,
    ) -> float:
        """A horizon H for this population: the 80th percentile of the mean gap between
        qualifying days of the customers with more than one (weighted by their gaps), rounded
        up to a week; 30 when no customer has two yet. ``gaps``: summaries ``(x, t_x, T)``."""
        if gaps is None:
            rows = [
                (float(st["q_days"] - 1), float(st["q_gap_sum"]), 0.0)
                for _, st in (states or [])
                if st.get("q_gaps")
            ]
            gaps = np.array(rows).reshape(-1, 3)
        x, tx = gaps[:, 0], gaps[:, 1]
        sel = x > 0
        if not sel.any():
            return 30.0
        mean = tx[sel] / x[sel]
        order = np.argsort(mean)
        w = np.cumsum(x[sel][order])
        q = float(mean[order][np.searchsorted(w, 0.8 * w[-1])])
        return float(max(7, math.ceil(q / 7) * 7))

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, name: str, now_ms: int) -> dict[str, Any]:
        """A ``io.segflow.ModelCheckpoint`` record of the current model."""
        m = self.model
        descriptions = m.describe_clusters()
        return {
            "model_name": name,
            "version": m.version,
            "created_at": m.created_at,
            "checkpointed_at": now_ms,
            "n_learned": m.n_learned,
            "matured_through_day": m.matured_through_day,
            "max_event_ms": self.max_event_ms,
            # undefined metrics (an AUC with one class so far) are left out
            "metrics": {k: v for k, v in m.quality().items() if v is not None},
            "clusters": [
                {
                    "cluster": k,
                    "description": descriptions.get(k, ""),
                    "centroid": centroid,
                }
                for k, centroid in sorted(m.centroids().items())
            ],
            "model": m.to_bytes(),
        }

    def restore(self, record: Mapping[str, Any]) -> None:
        """Resume from a checkpoint record. A model from before issue #17 (its classifier has
        no sign constraints) learned another label on other inputs: it is replaced by a new
        model (the BG/NBD prior until labels mature), not resumed."""
        model = ChurnModel.from_bytes(record["model"])
        if getattr(model.classifier, "signs", None) is None:
            model = new_model(created_at=int(record.get("created_at") or 0))
        self.model = model
        self._descriptions = self.model.describe_clusters()

    def pending_timers(self) -> int:
        return len(self._timers)


def adopt(scorer: Scorer, shared: ChurnModel) -> None:
    """Score with ``shared`` (a model version the deployment's learner published; not shared
    with anything else afterwards), keeping this scorer's own label bookkeeping: the snapshots
    waiting for their labels, the days snapshotted and matured, the tie metrics."""
    old = scorer.model
    for name in (
        "pending",
        "snapshot_day",
        "snapshot_rate",
        "matured_through_day",
        "tie_share",
        "mean_score",
    ):
        setattr(shared, name, getattr(old, name))
    scorer.model = shared
    scorer._descriptions = shared.describe_clusters()


def learn_from(
    model: ChurnModel, kind: str, payload: Mapping[str, Any], config: ScorerConfig
) -> int:
    """What a :attr:`Scorer.sink` sent, learned by the deployment's one learner into
    ``model``, exactly as a scorer without a sink learns it itself; returns the examples
    learned. ``summary``: BG/NBD summaries of every partition for one refit day, stacked."""
    if kind == "clusters":
        for cx in np.asarray(payload["rows"]).tolist():
            model.learn_cluster(dict(zip(_CLUSTER_NAMES, cx, strict=True)))
        return 0
    if kind == "summary":
        a, day = np.asarray(payload["rows"]).reshape(-1, 3), int(payload["day"])
        last = model.bgnbd_day  # scorers that hold an older version ask more often
        due = last is None or day - last >= config.bgnbd_refit_days
        if due and len(a) >= btyd.MIN_FIT_CUSTOMERS:
            model.bgnbd = btyd.fit(a[:, 0], a[:, 1], a[:, 2], start=model.bgnbd)
            model.bgnbd_day = day
            model.suggested_horizon_days = Scorer(config).suggested_horizon_days(gaps=a)
        return 0
    n = 0
    end = int(payload["end"])
    for x, y, p, held, since in zip(
        np.asarray(payload["x"], dtype=np.float64).tolist(),
        np.asarray(payload["y"]).tolist(),
        np.asarray(payload["p"]).tolist(),
        np.asarray(payload["holdout"]).tolist(),
        np.asarray(payload["since"]).tolist(),
        strict=True,
    ):
        if held:
            model.observe_holdout(float(p), bool(y), float(since))
            continue
        model.learn(dict(zip(_MI_NAMES, x, strict=True)), bool(y), at=end, p=float(p))
        n += 1
    return n


__all__ = [
    "CLUSTER_DIMS",
    "DAY",
    "HOUR",
    "DEFAULT_HIGH_VALUE_ZIPS",
    "MODEL_INPUTS",
    "NEVER_DAYS",
    "FORGET_EVENT",
    "STAGES",
    "Out",
    "Retire",
    "ScoreEmit",
    "Scored",
    "Scorer",
    "ScorerConfig",
    "StateWrite",
    "clv",
    "engagement",
    "fingerprint",
    "adopt",
    "learn_from",
    "lifecycle",
    "model_input",
]
