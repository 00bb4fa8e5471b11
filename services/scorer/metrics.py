"""The scorer's Prometheus metrics (moved out of :mod:`services.scorer.app`, which imports
them all, so its namespace still lists every metric the scorer exports)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

MODEL_QUALITY = Gauge(
    "segflow_scorer_model_quality",
    "Prequential churn-model quality on matured labels (roc_auc, log_loss, calibration_error, "
    "positive_rate)",
    ["metric"],
)
LABELS = Gauge("segflow_scorer_labels_learned", "Matured churn labels the model learned from")
DRIFTS = Gauge("segflow_scorer_drift_detected", "ADWIN drift detections on the model's log loss")
SCORED = Counter("segflow_scorer_scored_total", "Customers scored (events, timers, merges)")
EMITTED = Counter("segflow_scorer_scores_emitted_total", "CustomerScore records produced")
CHECKPOINTS = Counter("segflow_scorer_checkpoints_total", "Model checkpoints written")
WATERMARK = Gauge("segflow_scorer_watermark_seconds", "Event-time watermark (epoch seconds)")
CUSTOMERS = Gauge("segflow_scorer_customers", "Customers with state")
TIMERS = Gauge("segflow_scorer_timers", "Scheduled scoring timers (pending and refreshes)")
FORGOTTEN = Gauge("segflow_scorer_forgotten_ids", "Customer ids forgotten (retired for good)")
RETIRED_DROPS = Counter(
    "segflow_scorer_retired_drops_total", "Events and merges dropped for a forgotten customer id"
)
HANDOFFS = Counter(
    "segflow_scorer_handoffs_total",
    "Merge hand-offs between instances: sent/received, state/event",
    ["direction", "kind"],
)
LEARNER = Gauge("segflow_scorer_learner", "1 when this instance is the churn-model learner")
MODEL_VERSIONS = Counter(
    "segflow_scorer_model_versions_total",
    "Shared churn-model versions published or adopted",
    ["direction"],
)
FORWARDED = Counter(
    "segflow_scorer_forwarded_events_total",
    "Events for a merged-away id applied to its survivor (here or through a hand-off)",
)
PARKED = Counter(
    "segflow_scorer_parked_records_total",
    "Records of a survivor parked at its merge-causing event until every absorbed id's "
    "hand-off arrived",
)
HOLDS = Counter(
    "segflow_scorer_merge_holds_total",
    "Identified partitions held at a merge-causing event until every absorbed id's hand-off "
    "arrived (counted each time the event is read while one is missing)",
)
VERSION_HOLDS = Counter(
    "segflow_scorer_version_holds_total",
    "Identified partitions held at a record until the shared model's version it scores with "
    "arrived",
)
