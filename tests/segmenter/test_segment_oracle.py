"""The default segments against the independent batch oracle (``bench/segment_oracle.py``).

The oracle recomputes, from the raw simulated events, every feature the default rules read and
steps each rule's own state machine; the segmenter's memberships come from the identity,
scorer and segmenter cores run in one process on the same simulation (the replay harness of
``bench/eval_segments.py``). The features-from-events part is first checked on hand-made events
whose answers are worked out here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import segment_oracle as so  # noqa: E402

DAY = so.DAY
D0 = 19_723  # 2024-01-01


def _events(rows: list[tuple[str, float, dict[str, object]]]) -> pd.DataFrame:
    out = []
    for etype, day, extra in rows:
        out.append(
            {
                "c": 0,
                "event_type": etype,
                "occurred_at": int((D0 + day) * DAY),
                "amount": extra.get("amount"),
                "sentiment": extra.get("sentiment"),
                "escalated": bool(extra.get("escalated", False)),
                "zip": extra.get("zip"),
            }
        )
    return pd.DataFrame(out)


def test_oracle_features_from_hand_made_events() -> None:
    # 20 page views on days 0..19 (one a day), then 4 on days 28..41 (every 3.5 days)
    rows: list[tuple[str, float, dict[str, object]]] = [
        ("page_view", d + 0.5, {}) for d in range(20)
    ]
    rows += [("page_view", 28.5 + 3.5 * k, {}) for k in range(4)]
    rows += [
        ("purchase", 1.25, {"amount": 10.0}),
        ("purchase", 8.25, {"amount": 30.0}),
        ("purchase", 22.25, {"amount": 5.0}),
        ("identify", 0.1, {"zip": "90210"}),
        ("identify", 30.1, {"zip": "12345"}),
        ("subscription_cancel", 40.9, {}),
        ("support_ticket", 38.0, {"sentiment": -0.5, "escalated": True}),
        ("support_ticket", 39.0, {"sentiment": 0.1}),
    ]
    f = so.oracle_features(_events(rows), 1, D0, 45, frozenset({"90210"}))
    d = 41  # end of day 41: last 14 days = 28..41, the 28 before = 0..27
    activity_14 = 4 + 2  # page views + tickets in days 28..41
    activity_prior = 20 + 3  # page views + purchases in days 0..27
    want = round((activity_14 / 14 - activity_prior / 28) / (activity_prior / 28), 4)
    assert f["activity_14d_vs_prior28_change"][0, d] == pytest.approx(want)
    assert f["lifetime_purchases"][0, d] == 3
    assert f["days_since_purchase"][0, d] == pytest.approx(42 - 22.25 - 1 / DAY)
    # gaps 7 and 14 days: current 7 + 0.5 (14 - 7), baseline 7 + 0.05 (14 - 7)
    assert f["purchase_interval_days"][0, d] == pytest.approx(10.5)
    assert f["purchase_interval_baseline_days"][0, d] == pytest.approx(7.35)
    drift = max(10.5, 42 - 22.25 - 1 / DAY) / 7.35 - 1
    assert f["purchase_interval_drift"][0, d] == pytest.approx(round(drift, 4))
    assert f["revenue_28d"][0, 27] == 45.0 and f["revenue_28d"][0, 36] == 5.0
    assert f["high_value_zip"][0, 29] == 1.0 and f["high_value_zip"][0, 30] == 0.0
    assert f["escalations_7d"][0, d] == 1
    # engagement as CustomerScore publishes it: 2 decimals
    assert f["engagement_score"][0, d] > 0
    assert all(round(float(x), 2) == x for x in f["engagement_score"][0])
    assert f["sentiment_mean_7d"][0, d] == pytest.approx(-0.2)
    # a cancellation on day 40 with no activity since: cancelled from that day on
    assert f["cancelled"][0, 39] == 0.0 and f["cancelled"][0, 40] == 1.0
    # at midnight the day itself is still empty: day 28's page view is not in yet
    g = so.oracle_features(_events(rows), 1, D0, 45, frozenset({"90210"}), start=True)
    assert g["days_since_active"][0, 28] == pytest.approx(28 - 22.25)
    assert f["days_since_active"][0, 28] == pytest.approx(29 - 28.5 - 1 / DAY)


def test_a_drop_of_exactly_sixty_percent_is_not_more_than_sixty() -> None:
    # 20 active days in the 28 before, 4 in the last 14: exactly -60 % (float: -0.6000000001)
    rows: list[tuple[str, float, dict[str, object]]] = [
        ("page_view", d + 0.5, {}) for d in range(20)
    ]
    rows += [("page_view", 28.5 + d, {}) for d in range(4)]
    f = so.oracle_features(_events(rows), 1, D0, 42, frozenset())
    assert f["activity_14d_vs_prior28_change"][0, 41] == -0.6
    rule = {"feature": "activity_14d_vs_prior28_change", "op": "<", "value": -0.6}
    v = {k: a[:, 41] for k, a in f.items()}
    assert not so.evaluate(rule, v, {})[0]


#: Segments whose rule reads only behavioural features and the lifecycle stage: no population
#: percentile (thresholds refreshed every 6 h over a different population) and not fed by
#: other segments' exits.
EXACT = (
    "Support Escalation",
    "AtRisk-60d",
    "Silent Decline",
    "Purchase Frequency Drop",
    "ReEngageAtRisk",
    "New Lead No Content",
    "Lifecycle: prospect",
    "Lifecycle: onboarded",
    "Lifecycle: adopting",
    "Lifecycle: loyal",
    "Lifecycle: at_risk",
    "Lifecycle: churned",
)


def test_default_segments_agree_with_the_batch_oracle() -> None:
    run = so.run_pipeline(customers=120, days=42, seed=11)
    cmp = so.compare(run)
    assert cmp.customer_days > 3_000
    for name in EXACT:
        # days where the customer's events are still on more than one customer id (not merged
        # yet) are the identity service's doing, not the rule's: counted as agreeing
        one_id = cmp.agree[name] + cmp.reasons[name][so.IDENTITY]
        assert one_id / cmp.customer_days >= 0.998, (name, cmp.reasons[name])
    # the oracle is not vacuous: most of these segments have members
    populated = [n for n in EXACT if cmp.oracle_days[n] > 0]
    assert len(populated) >= 8, cmp.oracle_days
    total = sum(cmp.agree.values()) + sum(r[so.IDENTITY] for r in cmp.reasons.values())
    assert total / (cmp.customer_days * len(cmp.agree)) >= 0.99
    # event by event (the default mode): every default segment, percentiles and Re-engaged
    # included, on >= 99.9 % of customer-days counted raw (issue #17's target)
    for name, ok in cmp.agree.items():
        assert ok / cmp.customer_days >= 0.999, (name, cmp.reasons[name])
    # the oracle re-derived the scores' features from the raw events, and most agree (the rest
    # are scores that missed a late event)
    eo = cmp.events
    assert eo is not None and eo.n_scores > 5_000
    assert eo.n_mismatched / eo.n_scores < 0.05, eo.by_feature


# -- the event-by-event oracle (bench/oracle_events.py) ---------------------------------------
import math  # noqa: E402

import numpy as np  # noqa: E402
import oracle_events as oe  # noqa: E402
import yaml  # noqa: E402
from oracle_rules import Segment, _features_of, load_segments  # noqa: E402


def test_point_features_agree_with_the_daily_features_at_day_ends_and_see_intra_day() -> None:
    rows: list[tuple[str, float, dict[str, object]]] = [
        ("page_view", d + 0.5, {}) for d in range(20)
    ]
    rows += [("login", 28.5 + 3.5 * k, {}) for k in range(4)]
    rows += [("purchase", 1.25, {"amount": 10.0}), ("purchase", 8.25, {"amount": 30.0})]
    rows += [("feature_use", 40.75, {}), ("identify", 0.1, {"zip": "90210"})]
    ev = _events(rows)
    daily = so.oracle_features(ev, 1, D0, 42, frozenset({"90210"}))
    ends = np.array([(D0 + d + 1) * DAY - 1 for d in range(42)])
    point = oe.point_features(ev, np.zeros(42, dtype=np.int64), ends, frozenset({"90210"}))
    for k, a in point.items():
        np.testing.assert_allclose(a, daily[k][0], atol=1e-9, err_msg=k)
    # within day 40: the feature use at 40.75 is not there at 40.5, is at 40.8
    t = np.array([int((D0 + 40.5) * DAY), int((D0 + 40.8) * DAY)])
    f = oe.point_features(ev, np.zeros(2, dtype=np.int64), t, frozenset())
    assert f["feature_use_28d"].tolist() == [0.0, 1.0]
    assert f["days_since_feature_use"][0] == so.NEVER
    assert f["days_since_feature_use"][1] == pytest.approx(0.05)


def _segment(doc: str) -> list[Segment]:
    s = yaml.safe_load(doc)
    seg = Segment(s["name"], 1, s["enter"], s.get("exit"), min_dwell=float(s.get("min_dwell", 0)))
    for r in (seg.enter, seg.exit):
        _features_of(r, seg.features)
    return [seg]


def test_an_intra_day_stay_is_stepped_at_its_own_instants() -> None:
    # the case the twice-a-day oracle could not see: the feature use ages past 3 days at
    # 3.0 (no event, no score: the oracle's own crossing timer enters), a use at 3.5 makes the
    # exit rule hold, and the 1-day dwell keeps the membership to 4.0; the use ages past 3
    # days again at 6.5
    segs, bounds = oe.compile_segments(
        _segment(
            "{name: Drop, enter: {feature: days_since_feature_use, op: '>=', value: 3},"
            " exit: {feature: days_since_feature_use, op: '<', value: 1}, min_dwell: 1}"
        )
    )
    assert bounds == [("days_since_feature_use", 1.0), ("days_since_feature_use", 3.0)]
    tl = oe.IdTimeline(
        [
            (0, 0, {"days_since_feature_use": 0.0}),
            (int(3.5 * DAY), int(3.5 * DAY), {"days_since_feature_use": 0.0}),
        ],
        None,
    )
    st = oe.run_id(tl, segs, bounds, [], [], 10 * DAY)
    assert st.stays["Drop"] == [[3 * DAY, 4 * DAY], [6.5 * DAY, math.inf]]


def test_a_percentile_refresh_moves_only_the_customers_it_crosses() -> None:
    segs, bounds = oe.compile_segments(
        _segment("{name: Top, enter: {feature: clv, op: '>=', value: p80}}")
    )
    key = ("clv", 80.0)
    tl = oe.IdTimeline([(0, 0, {"clv": 50.0})], None)
    refreshes = [(DAY, DAY, {key: 40.0}), (2 * DAY, 2 * DAY, {key: 60.0})]
    st = oe.run_id(tl, segs, bounds, refreshes, [key], 5 * DAY)
    assert st.stays["Top"] == [[DAY, 2 * DAY]]


def test_re_engaged_counts_a_feeding_exit_at_its_own_instant() -> None:
    segs, _ = oe.compile_segments(load_segments(so.DEFAULT_DEFINITIONS))
    names = [c.seg.name for c in segs]
    assert names.index("Re-engaged") > names.index("Lifecycle: churned")


def test_the_oracles_tables_follow_each_partitions_grid_and_merge_times() -> None:
    import oracle_grid as og

    hour = 3_600_000
    h0 = 1_000 * hour
    ids = [f"id{i}" for i in range(40)]
    a, b, c = [i for i in ids if og.partition_of(i) == 0][:3]
    other = next(i for i in ids if og.partition_of(i) == 1)
    key = ("clv", 80.0)

    def sc(seq: int, as_of: int, clv: float) -> dict[str, object]:
        return {"seq": seq, "as_of": as_of, "values": {"clv": clv}}

    scores = {
        a: [sc(1, h0 + 10 * 60_000, 1.0)],
        b: [sc(2, h0 + 10 * 60_000, 5.0)],
        c: [sc(5, h0 + hour + 1, 3.0)],
        other: [sc(4, h0 + 5 * hour, 9.0)],  # another partition's grid: not partition 0's
    }
    for merged_at, want in ((h0 + 40 * 60_000, 1.0), (h0 + hour + 5, 5.0)):
        grids = og.grid_refreshes(scores, {b: 3}, {b: merged_at}, [key], hour)
        # the first score makes the first (empty) table at its grid instant; c's score reaches
        # the next one: b (merged at seq 3) counts only if its merge's time is after it
        assert grids[0] == [(h0, 1, {}), (h0 + hour, 5, {key: want})]
        assert grids[1] == [(h0 + 5 * hour, 4, {})]
