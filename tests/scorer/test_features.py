"""Feature tests on hand-built histories: windows, baselines, recency, late events, replay."""

from __future__ import annotations

from typing import Any

import pytest

from segflow.errors import InvalidRecord
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery
from services.scorer.core import Scorer, ScorerConfig, StateWrite
from services.scorer.features import DAY, HOUR, MINUTE, compute

T0 = 1_704_067_200_000  # 2024-01-01T00:00Z


def ev(kind: str, t: int, **extra: Any) -> dict[str, Any]:
    return {"event_type": kind, "occurred_at": t, **extra}


def feed(events: list[dict[str, Any]], sc: Scorer | None = None) -> tuple[Scorer, dict[str, Any]]:
    sc = sc or Scorer(ScorerConfig())
    st = None
    for e in sorted(events, key=lambda e: e["occurred_at"]):
        st, _ = sc.on_event(st, "c1", e, now_ms=e["occurred_at"])
    assert st is not None
    return sc, st


def weekly(kind: str, per_week: int, weeks: range, end: int) -> list[dict[str, Any]]:
    """``per_week`` events in each week ``w`` (0 = the 7 days ending at ``end``)."""
    out = []
    for w in weeks:
        for i in range(per_week):
            out.append(ev(kind, end - w * 7 * DAY - (i * 7 * DAY) // per_week - HOUR))
    return out


AS_OF = T0 + 60 * DAY + 12 * HOUR


@pytest.mark.parametrize(
    ("history", "feature", "expected"),
    [
        # opens per week 10 -> 3: a 70 % drop against the prior four weeks
        (
            weekly("email_open", 10, range(1, 5), AS_OF) + weekly("email_open", 3, range(1), AS_OF),
            "opens_7d_vs_prior28_change",
            -0.7,
        ),
        (
            weekly("email_open", 10, range(1, 5), AS_OF) + weekly("email_open", 3, range(1), AS_OF),
            "opens_7d",
            3.0,
        ),
        # steady logins: no change; stopped: -100 %; from nothing: +1 capped at +10
        (weekly("login", 4, range(0, 5), AS_OF), "logins_7d_vs_prior28_change", 0.0),
        (weekly("login", 4, range(1, 5), AS_OF), "logins_7d_vs_prior28_change", -1.0),
        (weekly("login", 4, range(0, 1), AS_OF), "logins_7d_vs_prior28_change", 10.0),
        # 21 days without purchase
        ([ev("purchase", AS_OF - 21 * DAY, amount=30.0)], "days_since_purchase", 21.0),
        ([ev("purchase", AS_OF - 21 * DAY, amount=30.0)], "purchases_21d", 0.0),
        ([ev("purchase", AS_OF - 21 * DAY, amount=30.0)], "purchases_28d", 1.0),
        ([ev("purchase", AS_OF - 21 * DAY, amount=30.0)], "revenue_28d", 30.0),
        ([ev("purchase", AS_OF - 21 * DAY, amount=30.0)], "idle_days_purchase", 21.0),
        # three escalated tickets in a week, negative sentiment
        (
            [
                ev("support_ticket", AS_OF - d * DAY, escalated=True, sentiment=-0.6)
                for d in (1, 3, 5)
            ]
            + [ev("support_ticket", AS_OF - 9 * DAY, escalated=False, sentiment=0.3)],
            "escalations_7d",
            3.0,
        ),
        (
            [
                ev("support_ticket", AS_OF - d * DAY, escalated=True, sentiment=-0.6)
                for d in (1, 3, 5)
            ]
            + [ev("support_ticket", AS_OF - 9 * DAY, escalated=False, sentiment=0.3)],
            "sentiment_mean_7d",
            -0.6,
        ),
        (
            [
                ev("support_ticket", AS_OF - d * DAY, escalated=True, sentiment=-0.6)
                for d in (1, 3, 5)
            ]
            + [ev("support_ticket", AS_OF - 9 * DAY, escalated=False, sentiment=0.3)],
            "sentiment_mean_14d",
            -0.375,
        ),
        # feature use stopped 12 days ago while sessions continue
        (
            [ev("feature_use", AS_OF - d * DAY) for d in range(12, 40)]
            + [ev("session_start", AS_OF - d * DAY) for d in range(0, 40, 2)],
            "feature_use_10d",
            0.0,
        ),
        (
            [ev("feature_use", AS_OF - d * DAY) for d in range(12, 40)]
            + [ev("session_start", AS_OF - d * DAY) for d in range(0, 40, 2)],
            "idle_days_feature_use",
            12.0,
        ),
        (
            [ev("feature_use", AS_OF - d * DAY) for d in range(12, 40)]
            + [ev("session_start", AS_OF - d * DAY) for d in range(0, 40, 2)],
            "days_since_active",
            0.0,
        ),
        # purchase gaps 7, 7, 7, 7, then 21 days: fast and slow averages of the gaps
        (
            [ev("purchase", AS_OF - d * DAY, amount=10.0) for d in (56, 49, 42, 35, 28, 7)],
            "purchase_interval_baseline_days",
            7.0 + 0.05 * 14.0,
        ),
        (
            [ev("purchase", AS_OF - d * DAY, amount=10.0) for d in (56, 49, 42, 35, 28, 7)],
            "purchase_interval_days",
            7.0 + 0.5 * 14.0,
        ),
        # daily logins that thin out to one in three days over the last 14: against the 42
        # days before (14 per 14 days), log((4 + 1) / (14 + 1)) = -1.0986
        (
            [ev("login", AS_OF - d * DAY) for d in range(14, 56)]
            + [ev("login", AS_OF - d * DAY) for d in (2, 5, 8, 11)],
            "activity_14d_vs_prior42_log_ratio",
            -1.0986,
        ),
        # ... the last week (2 logins) against the busiest (7): log(3 / 8)
        (
            [ev("login", AS_OF - d * DAY) for d in range(14, 56)]
            + [ev("login", AS_OF - d * DAY) for d in (2, 5, 8, 11)],
            "activity_7d_vs_peak_week_log_ratio",
            -0.9808,
        ),
        # a login every 4 days, then 20 days of silence: its usual gap is 4 days, and the
        # silence is log((20 + 1) / (56 / 9 + 1)) against the last 8 weeks (9 active days)
        (
            [ev("login", AS_OF - d * DAY) for d in range(20, 76, 4)],
            "usual_gap_days_active",
            4.0,
        ),
        (
            [ev("login", AS_OF - d * DAY) for d in range(20, 76, 4)],
            "idle_vs_usual_gap_active",
            1.0674,
        ),
        # the mix of behaviour: 3 feature uses and 2 page views per session, 25 per order
        (
            [ev("session_start", AS_OF - d * DAY) for d in (1, 9, 20, 30)]
            + [ev("feature_use", AS_OF - d * DAY) for d in (1, 1, 1, 9, 9, 9, 20, 20, 20, 30)]
            + [ev("feature_use", AS_OF - d * DAY) for d in (30, 30)]
            + [ev("page_view", AS_OF - d * DAY) for d in (1, 1, 9, 9, 20, 20, 30, 30)]
            + [ev("purchase", AS_OF - d * DAY, amount=a) for d, a in ((3, 20.0), (40, 30.0))],
            "feature_use_per_session_56d",
            3.0,
        ),
        (
            [ev("session_start", AS_OF - d * DAY) for d in (1, 9, 20, 30)]
            + [ev("page_view", AS_OF - d * DAY) for d in (1, 1, 9, 9, 20, 20, 30, 30)]
            + [ev("purchase", AS_OF - d * DAY, amount=a) for d, a in ((3, 20.0), (40, 30.0))],
            "avg_order_value_56d",
            25.0,
        ),
        # cart views in 14 days, open recency
        ([ev("cart_view", AS_OF - d * DAY) for d in (1, 2, 4, 13, 15)], "cart_views_14d", 4.0),
        ([ev("email_open", AS_OF - 6 * DAY - 12 * HOUR)], "days_since_open", 6.5),
        ([ev("email_open", AS_OF - 6 * DAY - 12 * HOUR)], "days_since_click", 999.0),
    ],
)
def test_feature_on_a_hand_built_history(
    history: list[dict[str, Any]], feature: str, expected: float
) -> None:
    _, st = feed(history)
    assert compute(st, AS_OF).values[feature] == pytest.approx(expected, abs=1e-3)


def test_weekly_turning_biweekly_for_21_days_shows_as_interval_drift() -> None:
    weekly = [ev("purchase", AS_OF - d * DAY, amount=10.0) for d in range(84, 34, -7)]
    _, before = feed(weekly)
    assert compute(before, AS_OF - 34 * DAY).values["purchase_interval_drift"] == 0.0
    _, st = feed(weekly + [ev("purchase", AS_OF - d * DAY, amount=10.0) for d in (21, 7)])
    f = compute(st, AS_OF).values
    assert f["purchase_interval_baseline_days"] < 8
    assert f["purchase_interval_days"] > 12
    assert f["purchase_interval_drift"] > 0.5  # biweekly against a weekly baseline
    assert f["purchases_28d"] == 2.0 and f["purchases_28d_vs_prior28_change"] == -0.3333  # 2 vs 3


def test_a_late_event_within_the_lateness_lands_in_its_own_day() -> None:
    sc, st = feed([ev("login", T0 + 10 * DAY + HOUR), ev("login", T0 + 11 * DAY + HOUR)])
    late_t = T0 + 9 * DAY + 20 * HOUR  # 29 h before the newest event, lateness is 48 h
    st, _ = sc.on_event(st, "c1", ev("login", late_t), now_ms=T0 + 11 * DAY + 2 * HOUR)
    as_of = T0 + 12 * DAY + HOUR
    f = compute(st, as_of).values
    assert f["logins_3d"] == 2.0  # days 10..12: the late day-9 login is not in it
    assert f["logins_7d"] == 3.0
    assert compute(st, T0 + 9 * DAY + 23 * HOUR).values["logins_3d"] == 1.0  # as of day 9


def test_an_event_older_than_the_lateness_is_rejected_with_a_reason() -> None:
    sc, st = feed([ev("login", T0 + 10 * DAY)])
    with pytest.raises(InvalidRecord) as exc:
        sc.on_event(st, "c1", ev("login", T0 + 7 * DAY), now_ms=T0 + 10 * DAY)
    assert exc.value.reason == "too_late"
    with pytest.raises(InvalidRecord) as exc:
        sc.on_event(st, "c1", ev("login", T0 + 13 * DAY), now_ms=T0 + 10 * DAY)
    assert exc.value.reason == "future_event"


def test_replay_fast_or_slow_gives_identical_features() -> None:
    sim = Simulation(SimConfig(customers=40, days=45, seed=5))
    items = [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]

    def replay(flush_every: int | None) -> dict[str, dict[str, Any]]:
        sc = Scorer(ScorerConfig())
        store: dict[str, dict[str, Any]] = {}
        for i, (cid, e) in enumerate(items):
            store[cid], _ = sc.on_event(store.get(cid), cid, e, now_ms=e["occurred_at"])
            if flush_every and i % flush_every == 0:
                for out in sc.flush(store.get, store.items, e["occurred_at"]):
                    if isinstance(out, StateWrite) and out.state is not None:
                        store[out.customer_id] = out.state
        return store

    fast, slow = replay(None), replay(3)
    assert fast.keys() == slow.keys()
    end = items[-1][1]["occurred_at"]
    for cid in fast:
        for as_of in (end - 10 * DAY, end - DAY + 7 * MINUTE, end):
            a, b = compute(fast[cid], as_of), compute(slow[cid], as_of)
            assert a.values == b.values, cid
        keep = [k for k in fast[cid] if not k.startswith(("emitted_", "scored_", "pending"))]
        assert {k: fast[cid][k] for k in keep} == {k: slow[cid][k] for k in keep}


def test_a_state_written_with_the_former_120_day_ring_reads_the_same() -> None:
    import zlib

    import numpy as np

    from services.scorer.features import LEGACY_RING, RING, Buckets, upgrade

    history = [ev("login", AS_OF - d * DAY) for d in range(0, 100, 3)]
    history += [ev("purchase", AS_OF - d * DAY, amount=7.5) for d in (2, 40, 90)]
    _, st = feed(history)
    b = Buckets.of(st)
    days = st["head_day"] - np.arange(LEGACY_RING)
    counts = np.zeros((LEGACY_RING, b.counts.shape[1]), dtype=np.uint8)
    floats = np.zeros((LEGACY_RING, 2), dtype=np.float32)
    counts[days % LEGACY_RING] = b.counts[days % RING]
    floats[days % LEGACY_RING] = b.floats[days % RING]
    old = dict(st, buckets=zlib.compress(counts.tobytes() + floats.tobytes()))
    assert upgrade(old) and not upgrade(old)
    for as_of in (AS_OF, AS_OF - 30 * DAY):
        assert compute(old, as_of).values == compute(st, as_of).values
