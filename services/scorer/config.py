"""The scorer's settings and the outputs its core returns (pure; moved out of
:mod:`services.scorer.core`, which re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.scorer.features import (
    DAY,
    MINUTE,
    QUALIFYING,
    State,
)

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
    """Produce a CustomerScore (``None``: tombstone the customer's score; ``merged``: the
    tombstone of an id merged away, (survivor, merge event time), written in its headers)."""

    customer_id: str
    score: dict[str, Any] | None
    merged: tuple[str, int] | None = None


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
