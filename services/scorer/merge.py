"""Merging two customers' states (pure; moved out of :mod:`services.scorer.features`)."""

from __future__ import annotations

import numpy as np

from services.scorer.features import Buckets, advance, new_btyd
from services.scorer.layout import RECENCY, State


def merge_into(survivor: State, absorbed: State) -> State:
    """A new state holding both customers' histories (buckets summed, recency the latest,
    lifetime totals added, purchase intervals from the one with more history).

    >>> from services.scorer.features import DAY, apply_event, compute, new_state, store_buckets
    >>> a, b = new_state("a", 5 * DAY), new_state("b", 3 * DAY)
    >>> store_buckets(a, apply_event(a, {"event_type": "login", "occurred_at": 5 * DAY}))
    >>> store_buckets(b, apply_event(b, {"event_type": "login", "occurred_at": 3 * DAY}))
    >>> m = merge_into(a, b)
    >>> m["customer_id"], m["first_seen_ms"] // DAY, compute(m, 6 * DAY).values["logins_7d"]
    ('a', 3, 2.0)
    """
    out = dict(survivor)
    ba, bb = Buckets.of(survivor), Buckets.of(absorbed)
    head = max(survivor["head_day"], absorbed["head_day"])
    advance(ba, out, head)
    tmp = dict(absorbed)
    advance(bb, tmp, head)
    counts = ba.counts.astype(np.uint16) + bb.counts
    ba.counts[:] = np.minimum(counts, 255).astype(np.uint8)
    ba.floats[:] += bb.floats
    out["buckets"] = ba.dump()
    out["first_seen_ms"] = min(survivor["first_seen_ms"], absorbed["first_seen_ms"])
    out["last_event_ms"] = max(survivor["last_event_ms"], absorbed["last_event_ms"])
    for name in [f"last_{n}_ms" for n in RECENCY] + ["last_cancel_ms"]:
        values = [v for v in (survivor[name], absorbed[name]) if v is not None]
        out[name] = max(values) if values else None
    signups = [v for v in (survivor["signup_ms"], absorbed["signup_ms"]) if v is not None]
    out["signup_ms"] = min(signups) if signups else None
    for name in ("unsubscribed", "bounced", "high_value_zip"):
        out[name] = bool(survivor[name] or absorbed[name])
    for name in (
        "lifetime_events",
        "lifetime_logins",
        "lifetime_feature_use",
        "lifetime_purchases",
        "lifetime_revenue",
    ):
        out[name] = survivor[name] + absorbed[name]
    sa, sb = {**new_btyd(), **survivor}, {**new_btyd(), **absorbed}
    for name in ("q_first_ms", "q_last_ms"):
        values = [v for v in (sa[name], sb[name]) if v is not None]
        out[name] = (min if name == "q_first_ms" else max)(values) if values else None
    for name in ("q_days", "q_gaps", "q_gap_sum", "q_gap_sumsq"):  # days both had count twice
        out[name] = sa[name] + sb[name]
    if absorbed["purchase_gaps"] > survivor["purchase_gaps"]:
        for name in ("purchase_interval_fast", "purchase_interval_slow", "purchase_gaps"):
            out[name] = absorbed[name]
    out["pending"] = True
    return out
