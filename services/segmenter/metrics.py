"""The segmenter's Prometheus metrics (split out of ``app.py``, issue #14)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SEGMENT_SIZE = Gauge("segflow_segment_size", "Current members per segment", ["segment"])
TRANSITIONS = Counter(
    "segflow_segment_transitions_total",
    "Membership changes by transition",
    ["segment", "transition"],
)
FLAPS = Counter(
    "segflow_segment_flaps_total",
    "Exits within the flap window (max of min_dwell and 1 day) of the entry",
    ["segment"],
)
EVAL_LAG = Histogram(
    "segflow_segmenter_evaluation_lag_seconds",
    "Processing time from a score being produced to its evaluation",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
WATERMARK = Gauge("segflow_segmenter_watermark_ms", "Event-time watermark (highest as_of)")
DEFINITIONS = Counter(
    "segflow_segmenter_definitions_total", "Definition loads by outcome", ["outcome"]
)
RETIRED_SCORES = Counter(
    "segflow_segmenter_retired_scores_total",
    "Scores dropped because their customer id was merged away or forgotten",
    ["reason"],
)
LOOKUP_LOADS = Counter(
    "segflow_segmenter_lookup_loads_total",
    "Lookup table versions taken (segflow.lookups), and customers queued for re-evaluation",
    ["table"],
)
ATTRIBUTE_UPDATES = Counter(
    "segflow_segmenter_attribute_updates_total", "CustomerAttributes records applied"
)
MISSING_FEATURES = Counter(
    "segflow_segmenter_missing_features_total",
    "Sampled scores (1 in 16) lacking a feature the definitions read",
    ["feature"],
)

__all__ = [
    "SEGMENT_SIZE",
    "TRANSITIONS",
    "FLAPS",
    "EVAL_LAG",
    "WATERMARK",
    "DEFINITIONS",
    "RETIRED_SCORES",
    "LOOKUP_LOADS",
    "ATTRIBUTE_UPDATES",
    "MISSING_FEATURES",
]
