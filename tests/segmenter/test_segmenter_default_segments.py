"""Each default segment (SPEC §3) on a hand-built feature history: it enters, then leaves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.segmenter.core import CustomerState, Score, advance, evaluate
from services.segmenter.dsl import DAY, parse

DEFS = parse((Path(__file__).resolve().parents[2] / "services" / "segmenter" / "segments"
              / "default.yaml").read_text())
CALM = {"churn_probability": 0.1, "engagement_score": 70.0, "clv": 100.0,
        "lifecycle_stage": "loyal", "days_since_open": 1.0, "days_since_purchase": 3.0,
        "days_since_feature_use": 0.0, "days_since_login": 0.0, "escalations_7d": 0.0,
        "sentiment_mean_7d": 0.3, "engagement_14d_vs_baseline_change": 0.0,
        "logins_3d_vs_baseline_change": 0.0, "revenue_28d_vs_prior_change": 0.0,
        "purchase_interval_days": 7.0, "purchase_interval_days_vs_baseline_change": 0.0,
        "cart_views_14d": 0.0, "high_value_zip": 0.0, "feature_use_28d": 5.0}
HIGH_CLV = {("clv", 80.0): 1000.0, ("clv", 70.0): 800.0}


def history(
    steps: list[tuple[float, dict[str, Any]]], until: float
) -> list[tuple[float, str, str]]:
    """Scores at the given days (CALM overridden), timers fired up to ``until``; returns
    (day, segment, transition) without primary changes."""
    state: CustomerState | None = None
    out: list[tuple[float, str, str]] = []

    def fire(upto: float) -> None:
        nonlocal state
        while state is not None and state.next_timer is not None and state.next_timer <= upto * DAY:
            state, changes = advance(state, state.next_timer, DEFS, HIGH_CLV)
            out.extend((round(c.occurred_at / DAY, 2), c.segment, c.transition) for c in changes
                       if c.transition != "primary_changed")

    for day, over in steps:
        fire(day)
        state, changes = evaluate(state, Score("c", int(day * DAY), {**CALM, **over}), DEFS,
                                  HIGH_CLV)
        out.extend((round(c.occurred_at / DAY, 2), c.segment, c.transition) for c in changes
                   if c.transition != "primary_changed")
    fire(until)
    return out


def spans(events: list[tuple[float, str, str]], segment: str) -> list[tuple[float, str]]:
    return [(d, t) for d, s, t in events if s == segment]


CASES: dict[str, tuple[list[tuple[float, dict[str, Any]]], float, list[tuple[float, str]]]] = {
    "AtRisk-60d": (
        [(0, {}), (10, {"engagement_14d_vs_baseline_change": -0.7, "days_since_purchase": 15.0}),
         (30, {"engagement_14d_vs_baseline_change": -0.1, "days_since_purchase": 35.0})],
        40, [(16, "entered"), (30, "re_engaged")]),  # no purchase for 21 days: day 16 by timer
    "Silent Decline": (
        [(0, {"days_since_feature_use": 2.0}), (20, {"days_since_feature_use": 0.0})],
        25, [(8, "entered"), (20, "re_engaged")]),
    "Support Escalation": (
        [(0, {"escalations_7d": 3.0, "sentiment_mean_7d": -0.6}),
         (2, {"escalations_7d": 4.0, "sentiment_mean_7d": -0.5})],
        20, [(0, "entered"), (9, "exited")]),  # 7 quiet days: the inactivity TTL ends it
    "Purchase Frequency Drop": (
        [(0, {"purchase_interval_days": 14.0, "purchase_interval_days_vs_baseline_change": 1.0}),
         (14, {"purchase_interval_days": 15.0, "purchase_interval_days_vs_baseline_change": 1.1}),
         (40, {"purchase_interval_days": 7.0})],
        45, [(21, "entered"), (40, "re_engaged")]),
    "High-CLV Login Drop": (
        [(0, {"clv": 1500.0, "logins_3d_vs_baseline_change": -0.8, "days_since_feature_use": 1.0}),
         (6, {"clv": 1500.0, "logins_3d_vs_baseline_change": 0.0, "days_since_feature_use": 0.0})],
        10, [(2, "entered"), (6, "re_engaged")]),
    "Engaged But At-Risk": (
        [(0, {"churn_probability": 0.6, "engagement_score": 75.0}),
         (5, {"churn_probability": 0.2, "engagement_score": 75.0})],
        10, [(0, "entered"), (5, "re_engaged")]),
    "New Lead No Content": (
        [(0, {"lifecycle_stage": "prospect", "days_since_signup": 1.0, "feature_use_28d": 0.0})],
        40, [(6, "entered"), (29, "exited")]),
    "ReEngageAtRisk": (
        [(0, {"days_since_open": 1.0, "days_since_purchase": 40.0, "cart_views_14d": 5.0,
              "churn_probability": 0.5}),
         (3, {"days_since_open": 0.0, "days_since_purchase": 40.0, "cart_views_14d": 5.0,
              "churn_probability": 0.2})],
        10, [(0, "entered"), (3, "re_engaged")]),
    "Re-engaged": (
        [(0, {"churn_probability": 0.6, "engagement_score": 75.0}),
         (5, {"churn_probability": 0.2, "engagement_score": 75.0})],
        40, [(5, "entered"), (35, "exited")]),
    "Lifecycle: at_risk": (
        [(0, {"lifecycle_stage": "at_risk"}), (3, {"lifecycle_stage": "loyal"})],
        5, [(0, "entered"), (3, "exited")]),
}


@pytest.mark.parametrize("segment", list(CASES))
def test_default_segment_enters_and_leaves(segment: str) -> None:
    steps, until, expected = CASES[segment]
    got = spans(history(steps, until), segment)
    assert [(round(d), t) for d, t in got] == expected


def test_calm_customer_is_only_in_its_lifecycle_segment() -> None:
    events = history([(day, {}) for day in range(0, 60, 5)], 60)
    assert {s for _, s, _ in events} == {"Lifecycle: loyal"}


def test_recency_keeps_growing_without_scores() -> None:
    # no score for 30 days: no feature use for 10+ days with stable revenue is Silent Decline
    events = history([(0, {}), (30, {})], 30)
    assert spans(events, "Silent Decline") == [(10, "entered"), (30, "re_engaged")]


def test_at_risk_entry_is_explained_with_margins() -> None:
    _, changes = evaluate(None, Score("c", 0, {**CALM, "engagement_14d_vs_baseline_change": -0.72,
                                                "days_since_purchase": 26.0}), DEFS, HIGH_CLV)
    entered = next(c for c in changes if c.segment == "AtRisk-60d")
    assert [(e.feature, e.observed, e.threshold, e.margin, e.passed)
            for e in entered.explanation] == [
        ("engagement_14d_vs_baseline_change", -0.72, -0.6, 0.12, True),
        ("days_since_purchase", 26.0, 21.0, 5.0, True)]
    assert entered.primary_segment == "AtRisk-60d"


def test_reengage_at_risk_carries_its_weighted_score() -> None:
    _, changes = evaluate(None, Score("c", 0, {**CALM, "days_since_open": 1.0,
                                                "days_since_purchase": 40.0,
                                                "cart_views_14d": 5.0, "high_value_zip": 1.0,
                                                "churn_probability": 0.5}), DEFS, HIGH_CLV)
    entered = next(c for c in changes if c.segment == "ReEngageAtRisk")
    assert entered.score == pytest.approx(1.7)  # open 0.7 + cart 0.6 + zip 0.4
