"""Each default segment (SPEC §3) on a hand-built feature history: it enters, then leaves.

Feature names are the scorer's (services/scorer/features.py): a name the scorer does not emit
would make its condition silently false in production (a missing feature is false).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.scorer.features import FEATURE_NAMES
from services.segmenter.core import CustomerState, Score, advance, evaluate, set_attributes
from services.segmenter.dsl import DAY, DERIVED_FEATURES, SCORE_FIELDS, parse

DEFS = parse(
    (
        Path(__file__).resolve().parents[2] / "services" / "segmenter" / "segments" / "default.yaml"
    ).read_text()
)
CALM = {
    "churn_probability": 0.1,
    "engagement_score": 70.0,
    "clv": 100.0,
    "lifecycle_stage": "loyal",
    "days_since_open": 1.0,
    "days_since_purchase": 3.0,
    "days_since_feature_use": 0.0,
    "days_since_login": 0.0,
    "days_since_active": 0.0,
    "escalations_7d": 0.0,
    "sentiment_mean_7d": 0.3,
    "activity_14d_vs_prior28_change": 0.0,
    "activity_14d_vs_prior42_log_ratio": 0.0,
    "logins_3d_vs_prior28_change": 0.0,
    "revenue_28d": 120.0,
    "revenue_28d_vs_prior28_change": 0.0,
    "purchase_interval_days": 7.0,
    "purchase_interval_baseline_days": 7.0,
    "purchase_interval_drift": 0.0,
    "lifetime_purchases": 10.0,
    "cart_views_14d": 0.0,
    "high_value_zip": 0.0,
    "feature_use_28d": 8.0,
    "cancelled": 0.0,
}
AT_RISK = {
    "activity_14d_vs_prior28_change": -0.7,
    "activity_14d_vs_prior42_log_ratio": -1.0,
    "days_since_purchase": 15.0,
}
#: The population's percentile thresholds (``pNN`` in the file) the histories are evaluated with.
THRESHOLDS = {
    ("clv", 80.0): 1000.0,
    ("clv", 70.0): 800.0,
    ("churn_probability", 80.0): 0.2,
    ("churn_probability", 70.0): 0.12,
    ("engagement_score", 50.0): 30.0,
    ("engagement_score", 40.0): 22.0,
}
LEAD = {  # signed up a day ago, never bought, no feature used yet
    "days_since_signup": 1.0,
    "lifetime_purchases": 0.0,
    "days_since_purchase": 999.0,
    "revenue_28d": 0.0,
    "feature_use_28d": 0.0,
}


#: The zip_income lookup table (issue 19: ReEngageAtRisk's high-value zip) and a customer
#: whose zip attribute it marks high.
LOOKUPS = {"zip_income": {"94027": "high", "10001": "mid"}}
HIGH_ZIP = {"zip": "94027"}


def history(
    steps: list[tuple[float, dict[str, Any]]],
    until: float,
    attrs: dict[str, str] | None = None,
) -> list[tuple[float, str, str]]:
    """Scores at the given days (CALM overridden), timers fired up to ``until``; returns
    (day, segment, transition) without primary changes. ``attrs``: the customer's attributes
    (before its first score)."""
    state: CustomerState | None = None
    if attrs:
        state, _ = set_attributes(None, "c", attrs, 0, DEFS, THRESHOLDS, LOOKUPS)
    out: list[tuple[float, str, str]] = []

    def fire(upto: float) -> None:
        nonlocal state
        while state is not None and state.next_timer is not None and state.next_timer <= upto * DAY:
            state, changes = advance(state, state.next_timer, DEFS, THRESHOLDS, LOOKUPS)
            out.extend(
                (round(c.occurred_at / DAY, 2), c.segment, c.transition)
                for c in changes
                if c.transition != "primary_changed"
            )

    for day, over in steps:
        fire(day)
        state, changes = evaluate(
            state, Score("c", int(day * DAY), {**CALM, **over}), DEFS, THRESHOLDS, LOOKUPS
        )
        out.extend(
            (round(c.occurred_at / DAY, 2), c.segment, c.transition)
            for c in changes
            if c.transition != "primary_changed"
        )
    fire(until)
    return out


def spans(events: list[tuple[float, str, str]], segment: str) -> list[tuple[float, str]]:
    return [(d, t) for d, s, t in events if s == segment]


CASES: dict[str, tuple[list[tuple[float, dict[str, Any]]], float, list[tuple[float, str]]]] = {
    "AtRisk-60d": (
        [
            (0, {}),
            (10, AT_RISK),
            (
                30,
                {
                    "activity_14d_vs_prior28_change": -0.1,
                    "activity_14d_vs_prior42_log_ratio": -0.2,
                    "days_since_purchase": 35.0,
                },
            ),
        ],
        40,
        [(16, "entered"), (30, "re_engaged")],
    ),  # no purchase for 21 days: day 16 by timer
    "Silent Decline": (
        [(0, {"days_since_feature_use": 2.0}), (20, {"days_since_feature_use": 0.0})],
        25,
        [(8, "entered"), (20, "re_engaged")],
    ),
    "Support Escalation": (
        [
            (0, {"escalations_7d": 3.0, "sentiment_mean_7d": -0.6}),
            (2, {"escalations_7d": 4.0, "sentiment_mean_7d": -0.5}),
        ],
        20,
        [(0, "entered"), (9, "exited")],
    ),  # 7 quiet days: the inactivity TTL ends it
    # a weekly buyer buying every 14 days, then weekly again; the 21 days count from the last
    # purchase before the overdue gap (day -10), so it enters on day 11
    "Purchase Frequency Drop": (
        [
            (0, {"purchase_interval_drift": 0.45, "days_since_purchase": 10.0}),
            (
                4,
                {
                    "purchase_interval_drift": 0.43,
                    "purchase_interval_days": 10.5,
                    "days_since_purchase": 0.0,
                },
            ),
            (
                18,
                {
                    "purchase_interval_drift": 0.62,
                    "purchase_interval_days": 12.3,
                    "days_since_purchase": 0.0,
                },
            ),
            (
                32,
                {
                    "purchase_interval_drift": 0.66,
                    "purchase_interval_days": 13.1,
                    "days_since_purchase": 0.0,
                },
            ),
            (40, {"purchase_interval_drift": 0.05, "days_since_purchase": 0.0}),
        ],
        45,
        [(11, "entered"), (40, "re_engaged")],
    ),
    "High-CLV Login Drop": (
        [
            (
                0,
                {"clv": 1500.0, "logins_3d_vs_prior28_change": -0.8, "days_since_feature_use": 1.0},
            ),
            (9, {"clv": 1500.0, "logins_3d_vs_prior28_change": 0.0, "days_since_feature_use": 0.0}),
        ],
        12,
        [(2, "entered"), (9, "re_engaged")],
    ),
    "Engaged But At-Risk": (  # a lower churn score is a plain exit, not re-engagement
        [
            (0, {"churn_probability": 0.25, "engagement_score": 75.0}),
            (5, {"churn_probability": 0.1, "engagement_score": 75.0}),
        ],
        10,
        [(0, "entered"), (5, "exited")],
    ),
    "New Lead No Content": (
        [
            (
                0,
                {
                    "lifecycle_stage": "prospect",
                    "days_since_signup": 1.0,
                    "feature_use_28d": 0.0,
                    "lifetime_purchases": 0.0,
                },
            )
        ],
        40,
        [(6, "entered"), (29, "exited")],
    ),
    "ReEngageAtRisk": (
        [
            (
                0,
                {
                    "days_since_open": 1.0,
                    "days_since_purchase": 40.0,
                    "cart_views_14d": 5.0,
                    "lifecycle_stage": "at_risk",
                },
            ),
            (
                3,
                {
                    "days_since_open": 0.0,
                    "days_since_purchase": 40.0,
                    "cart_views_14d": 5.0,
                    "lifecycle_stage": "loyal",
                },
            ),
        ],
        10,
        [(0, "entered"), (3, "exited")],
    ),
    "Re-engaged": (  # the 30 days after AtRisk-60d's re_engaged exit
        [
            (0, {}),
            (5, {}),
            (10, AT_RISK),
            (
                30,
                {
                    "activity_14d_vs_prior28_change": -0.1,
                    "activity_14d_vs_prior42_log_ratio": -0.2,
                    "days_since_purchase": 35.0,
                },
            ),
        ],
        70,
        [(30, "entered"), (60, "exited")],
    ),
    # the scorer's stages along a customer's life: each stage's segment is entered with the
    # stage and left (a plain exit) when the scorer moves the customer on
    "Lifecycle: prospect": (
        [
            (0, {**LEAD, "lifecycle_stage": "prospect"}),
            (3, {**LEAD, "lifecycle_stage": "onboarded", "days_since_signup": 4.0}),
        ],
        5,
        [(0, "entered"), (3, "exited")],
    ),
    "Lifecycle: onboarded": (
        [
            (0, {**LEAD, "lifecycle_stage": "prospect"}),
            (3, {**LEAD, "lifecycle_stage": "onboarded", "days_since_signup": 4.0}),
            (14, {"lifecycle_stage": "adopting", "days_since_signup": 15.0}),
        ],
        20,
        [(3, "entered"), (14, "exited")],
    ),
    "Lifecycle: adopting": (
        [
            (0, {"lifecycle_stage": "onboarded", "days_since_signup": 4.0}),
            (10, {"lifecycle_stage": "adopting", "days_since_signup": 14.0}),
            (60, {"lifecycle_stage": "loyal", "days_since_signup": 64.0}),
        ],
        70,
        [(10, "entered"), (60, "exited")],
    ),
    "Lifecycle: loyal": (  # CALM is a loyal customer
        [(0, {}), (20, {}), (30, {"lifecycle_stage": "at_risk"})],
        35,
        [(0, "entered"), (30, "exited")],
    ),
    "Lifecycle: at_risk": (
        [(0, {"lifecycle_stage": "at_risk"}), (3, {"lifecycle_stage": "loyal"})],
        5,
        [(0, "entered"), (3, "exited")],
    ),
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
    _, changes = evaluate(
        None,
        Score(
            "c",
            0,
            {
                **CALM,
                **AT_RISK,
                "activity_14d_vs_prior28_change": -0.72,
                "days_since_purchase": 26.0,
            },
        ),
        DEFS,
        THRESHOLDS,
    )
    entered = next(c for c in changes if c.segment == "AtRisk-60d")
    assert [
        (e.feature, e.observed, e.threshold, e.margin, e.passed) for e in entered.explanation
    ] == [
        ("activity_14d_vs_prior28_change", -0.72, -0.6, 0.12, True),
        ("days_since_purchase", 26.0, 21.0, 5.0, True),
        ("lifetime_purchases", 10.0, 1.0, 9.0, True),
    ]
    assert entered.primary_segment == "AtRisk-60d"


def test_reengage_at_risk_carries_its_weighted_score() -> None:
    known, _ = set_attributes(None, "c", HIGH_ZIP, 0, DEFS)
    _, changes = evaluate(
        known,
        Score(
            "c",
            0,
            {
                **CALM,
                "days_since_open": 1.0,
                "days_since_purchase": 40.0,
                "cart_views_14d": 5.0,
                "lifecycle_stage": "at_risk",
            },
        ),
        DEFS,
        THRESHOLDS,
        LOOKUPS,
    )
    entered = next(c for c in changes if c.segment == "ReEngageAtRisk")
    assert entered.score == pytest.approx(1.7)  # open 0.7 + cart 0.6 + zip 0.4
    zip_income = next(e for e in entered.explanation if e.feature.startswith("lookup."))
    assert (zip_income.feature, zip_income.observed_text, zip_income.passed) == (
        "lookup.zip_income(attr.zip)",
        "high",
        True,
    )


def test_default_definitions_read_only_features_the_scorer_emits() -> None:
    known = set(FEATURE_NAMES) | set(SCORE_FIELDS) | DERIVED_FEATURES
    assert sorted(DEFS.score_features - known) == []
    # the rest are attributes and lookups (issue 19), not scorer features
    assert sorted(DEFS.features - DEFS.score_features) == ["lookup.zip_income(attr.zip)"]


def test_a_silent_customer_stays_at_risk_until_it_is_active_again() -> None:
    silent = {
        "activity_14d_vs_prior28_change": 0.0,
        "days_since_active": 20.0,
        "days_since_purchase": 45.0,
        "days_since_feature_use": 30.0,
        "revenue_28d": 0.0,
    }  # both windows empty: the change reads 0
    active = {
        "activity_14d_vs_prior28_change": 3.0,
        "days_since_active": 0.5,
        "days_since_purchase": 50.0,
    }
    events = history([(0, {}), (5, {}), (10, AT_RISK), (40, silent), (50, active)], 55)
    assert spans(events, "AtRisk-60d") == [(16, "entered"), (50, "re_engaged")]
    assert spans(events, "Re-engaged") == [(50, "entered")]


def test_a_dormant_customer_the_scorer_calls_churned_stays_at_risk_a_cancellation_leaves() -> None:
    dormant = {
        "activity_14d_vs_prior28_change": -1.0,
        "days_since_active": 31.0,
        "days_since_purchase": 45.0,
        "lifecycle_stage": "churned",
    }
    events = history([(0, {}), (10, AT_RISK), (40, dormant)], 80)
    assert spans(events, "AtRisk-60d") == [(16, "entered")]
    cancelled = {**dormant, "cancelled": 1.0}
    events = history([(0, {}), (10, AT_RISK), (40, cancelled)], 80)
    assert spans(events, "AtRisk-60d") == [(16, "entered"), (40, "exited")]  # not re_engaged


def test_a_slow_decline_does_not_read_as_engagement_restored() -> None:
    # weeks into the decline the prior 28 days are the decline itself: the 28-day change
    # reads "back to normal" on a couple of events, the 42 days before the last 14 do not
    still_down = {
        "activity_14d_vs_prior28_change": 0.25,
        "activity_14d_vs_prior42_log_ratio": -0.9,
        "days_since_active": 1.0,
        "days_since_purchase": 50.0,
    }
    events = history([(0, {}), (10, AT_RISK), (45, still_down)], 60)
    assert spans(events, "AtRisk-60d") == [(16, "entered")]  # no re_engaged on day 45


def test_a_dormant_high_clv_customer_is_not_re_engaged_by_empty_login_windows() -> None:
    drop = {"clv": 1500.0, "logins_3d_vs_prior28_change": -1.0, "days_since_feature_use": 3.0}
    dormant = {
        **drop,
        "logins_3d_vs_prior28_change": 0.0,  # no login in 3 days nor in the 28 before
        "days_since_login": 31.0,
        "days_since_feature_use": 34.0,
        "lifecycle_stage": "churned",
    }
    back = {**drop, "logins_3d_vs_prior28_change": 2.0, "days_since_login": 0.1}
    events = history([(0, drop), (31, dormant), (40, back)], 45)
    assert spans(events, "High-CLV Login Drop") == [(0, "entered"), (40, "re_engaged")]


def test_a_stay_shorter_than_a_week_ends_as_a_plain_exit() -> None:
    # three quiet days of a customer who logs in a few times a week: transient, not a drop
    # the customer recovered from (seed 001: a cooldown window before re-engagement triggers)
    drop = {"clv": 1500.0, "logins_3d_vs_prior28_change": -0.8, "days_since_feature_use": 3.0}
    events = history([(0, drop), (2, {"clv": 1500.0})], 10)
    assert spans(events, "High-CLV Login Drop") == [(0, "entered"), (2, "exited")]
    assert spans(events, "Re-engaged") == []


def test_purchase_frequency_drop_counts_21_days_from_the_last_purchase() -> None:
    overdue = {"purchase_interval_drift": 0.4, "days_since_purchase": 9.5}  # first observable
    bought = {"purchase_interval_drift": 0.45, "days_since_purchase": 0.0}
    events = history([(0, overdue), (5, bought), (19, bought)], 30)
    assert spans(events, "Purchase Frequency Drop") == [(11.5, "entered")]


def test_a_new_sign_up_who_bought_is_not_a_lead() -> None:
    new = {"lifecycle_stage": "onboarded", "days_since_signup": 8.0, "feature_use_28d": 0.0}
    lead = {**new, "lifetime_purchases": 0.0, "days_since_purchase": 999.0}
    bought = {**new, "lifetime_purchases": 1.0, "days_since_purchase": 0.5}
    assert spans(history([(0, {**new, "lifetime_purchases": 2.0})], 5), "New Lead No Content") == []
    events = history([(0, lead), (3, bought)], 5)
    assert spans(events, "New Lead No Content") == [(0, "entered"), (3, "exited")]


def test_a_customer_who_never_bought_is_not_at_risk_of_no_purchase() -> None:
    lead = {**AT_RISK, "days_since_purchase": 999.0, "lifetime_purchases": 0.0}
    assert spans(history([(0, lead)], 30), "AtRisk-60d") == []


@pytest.mark.parametrize(("change", "entered"), [(-0.6, False), (-0.61, True)])
def test_at_risk_needs_an_activity_drop_of_more_than_60_percent(
    change: float, entered: bool
) -> None:
    # SPEC §3 / seed 000 §3.4: "engagement drop > 60 %": exactly 60 % is not enough
    lapsed = {**AT_RISK, "activity_14d_vs_prior28_change": change, "days_since_purchase": 25.0}
    events = spans(history([(0, lapsed)], 5), "AtRisk-60d")
    assert events == ([(0, "entered")] if entered else [])


@pytest.mark.parametrize(
    "over",
    [
        {"feature_use_28d": 1.0},  # rarely used features: ten quiet days are no news
        {"revenue_28d": 0.0, "revenue_28d_vs_prior28_change": 0.0},  # no revenue is not stable
        {"revenue_28d_vs_prior28_change": -0.6},  # revenue falling: not a *silent* decline
    ],
    ids=["no-feature-habit", "no-revenue", "revenue-falling"],
)
def test_silent_decline_is_a_paying_feature_user_gone_quiet(over: dict[str, Any]) -> None:
    events = history([(0, {"days_since_feature_use": 2.0, **over})], 20)
    assert spans(events, "Silent Decline") == []


def test_purchase_frequency_drop_needs_21_days_in_a_row() -> None:
    slow = {"purchase_interval_drift": 0.5, "days_since_purchase": 2.0}
    bought = {**slow, "days_since_purchase": 0.0}
    events = history(
        [(0, slow), (10, {"purchase_interval_drift": 0.05}), (12, bought), (24, bought)], 40
    )
    assert spans(events, "Purchase Frequency Drop") == [(33, "entered")]
    stopped = {"purchase_interval_drift": 0.5, "days_since_purchase": 10.0}  # buys no more
    assert spans(history([(0, stopped)], 40), "Purchase Frequency Drop") == []


def test_a_churned_customer_active_again_is_re_engaged() -> None:
    events = history(
        [
            (0, {"lifecycle_stage": "churned", "days_since_active": 31.0}),
            (40, {"days_since_active": 0.2}),
        ],
        45,
    )
    assert spans(events, "Lifecycle: churned") == [(0, "entered"), (40, "re_engaged")]
    assert spans(events, "Re-engaged") == [(40, "entered")]


def test_engaged_but_at_risk_is_relative_to_the_population() -> None:
    # The scorer's probability is calibrated to a churn rate of a few % a month: 0.25 is in the
    # population's top fifth (p80 = 0.2) although far under the former absolute 0.5.
    risky = {"churn_probability": 0.25, "engagement_score": 40.0}
    assert spans(history([(0, risky)], 1), "Engaged But At-Risk") == [(0, "entered")]
    # engaged below the population's median, or a churn risk outside the top fifth: not in
    below_median = {**risky, "engagement_score": 25.0}
    assert spans(history([(0, below_median)], 1), "Engaged But At-Risk") == []
    not_top_fifth = {**risky, "churn_probability": 0.15}
    assert spans(history([(0, not_top_fifth)], 1), "Engaged But At-Risk") == []
    # hysteresis: it stays while the risk is in the top 30 % and engagement above p40
    events = history(
        [
            (0, risky),
            (2, {"churn_probability": 0.15, "engagement_score": 25.0}),
            (4, {"churn_probability": 0.1, "engagement_score": 25.0}),
        ],
        6,
    )
    assert spans(events, "Engaged But At-Risk") == [(0, "entered"), (4, "exited")]


def test_engaged_but_at_risk_waits_for_the_population_thresholds() -> None:
    # no percentile computed yet (an empty population): a condition on it is false
    _, changes = evaluate(
        None,
        Score("c", 0, {**CALM, "churn_probability": 0.9, "engagement_score": 90.0}),
        DEFS,
        {},
    )
    assert "Engaged But At-Risk" not in {c.segment for c in changes}


def test_reengage_at_risk_needs_the_at_risk_stage() -> None:
    # SPEC's weighted rule alone holds for a happy customer (open 0.7 + purchase 0.5 + cart 0.6
    # + zip 0.4): without the at_risk stage it is not "at risk"
    keen = {"cart_views_14d": 5.0}
    assert spans(history([(0, keen)], 5, HIGH_ZIP), "ReEngageAtRisk") == []
    events = history([(0, keen), (2, {**keen, "lifecycle_stage": "at_risk"})], 5, HIGH_ZIP)
    assert spans(events, "ReEngageAtRisk") == [(2, "entered")]


def test_reengage_at_risk_holds_until_the_last_open_is_14_days_old() -> None:
    # open 0.7 + cart views 0.6 = 1.3: the open stops counting for entry after 7 days, for the
    # exit after 14 (hysteresis), with no new score
    at_risk = {
        "lifecycle_stage": "at_risk",
        "days_since_open": 1.0,
        "days_since_purchase": 40.0,
        "cart_views_14d": 5.0,
    }
    events = history([(0, at_risk)], 20)
    assert [(round(d), t) for d, t in spans(events, "ReEngageAtRisk")] == [
        (0, "entered"),
        (13, "exited"),
    ]


def test_a_buyer_who_never_opens_mail_can_be_reengage_at_risk() -> None:
    # purchase 0.5 + cart views 0.6 + high-value zip 0.4 = 1.5 without any open: SPEC's rule
    # holds, and the exit's 14-day open window does not hold the customer out
    never_opens = {
        "lifecycle_stage": "at_risk",
        "days_since_open": 999.0,
        "cart_views_14d": 5.0,
    }
    assert spans(history([(0, never_opens)], 3, HIGH_ZIP), "ReEngageAtRisk") == [(0, "entered")]
    # the same customer in a zip the table does not mark high: 1.1, not entered
    mid = spans(history([(0, never_opens)], 3, {"zip": "10001"}), "ReEngageAtRisk")
    assert mid == []
