"""The segmenter's Prometheus metrics (split out of ``app.py``, issue #14)."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from services.segmenter import core
from services.segmenter.dsl import DAY, DERIVED_FEATURES

if TYPE_CHECKING:
    from services.segmenter.app import Segmenter

log = logging.getLogger("segflow.segmenter")

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


def count_change(seg: Segmenter, c: core.Change) -> None:
    """Count one emitted change: transitions, segment sizes, flaps (exit within max(min_dwell,
    1 day) of the entry)."""
    key = (c.segment, c.transition)
    counter = seg._m_transitions.get(key)
    if counter is None:
        counter = seg._m_transitions[key] = TRANSITIONS.labels(*key)
    counter.inc()
    if c.transition == core.ENTERED:
        seg.sizes[c.segment] = seg.sizes.get(c.segment, 0) + 1
    elif c.transition in (core.EXITED, core.RE_ENGAGED):
        seg.sizes[c.segment] = max(0, seg.sizes.get(c.segment, 0) - 1)
        segment = seg.defs.by_name.get(c.segment)
        window = max(segment.min_dwell_ms if segment else 0, DAY)
        if c.dwell_ms is not None and c.dwell_ms < window:
            FLAPS.labels(c.segment).inc()
    else:
        return
    gauge = seg._m_sizes.get(c.segment)
    if gauge is None:
        gauge = seg._m_sizes[c.segment] = SEGMENT_SIZE.labels(c.segment)
    gauge.set(seg.sizes[c.segment])


def check_features(seg: Segmenter, score: core.Score, optional: Collection[str]) -> None:
    """Count (and log once) features the definitions read that scores do not carry: such
    a condition is silently false for everyone (a misspelt or renamed feature)."""
    if seg._needed_for is not seg.defs:
        seg._needed_for = seg.defs
        seg._needed = seg.defs.score_features - DERIVED_FEATURES - frozenset(optional)
    missing = seg._needed - score.values.keys()
    for feature in missing:
        MISSING_FEATURES.labels(feature).inc()
        if feature not in seg._reported_missing:
            seg._reported_missing.add(feature)
            log.warning(
                "definitions read a feature the scores do not carry",
                extra={"fields": {"feature": feature, "version": seg.defs.version}},
            )


__all__ = [
    "check_features",
    "count_change",
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
