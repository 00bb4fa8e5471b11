"""Personas behave as their parameters and scripts say (checked on emitted events)."""

from __future__ import annotations

import statistics
from typing import Any

from segflow.sim.generator import DAY

#: Events a customer causes (email_sent and bounces come from the email provider).
CUSTOMER_TYPES = frozenset(
    {
        "identify",
        "session_start",
        "login",
        "page_view",
        "feature_use",
        "cart_view",
        "cart_abandon",
        "purchase",
        "subscription_cancel",
        "email_open",
        "email_click",
        "email_unsubscribe",
        "support_ticket",
    }
)


def _of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event_type"] == kind]


def _active(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event_type"] in CUSTOMER_TYPES]


def _revenue(events: list[dict[str, Any]], lo: int, hi: int) -> float:
    return sum(e["amount"] for e in _of(events, "purchase") if lo <= e["occurred_at"] < hi)


def test_silent_decline_stops_feature_use_but_keeps_revenue(clean_run: Any) -> None:
    before = after = 0.0
    checked = 0
    for key in clean_run.customers("silent_decline"):
        t = clean_run.truth[key]
        onset = t["script"]["decline_at"]
        events = clean_run.by_customer[key]
        assert not [e for e in _of(events, "feature_use") if e["occurred_at"] >= onset], key
        stop = min(x for x in (t["churn_at"], onset + 45 * DAY, clean_run.sim.config.end_ms) if x)
        span = stop - onset
        if span < 20 * DAY:
            continue
        checked += 1
        before += _revenue(events, onset - span, onset)
        after += _revenue(events, onset, stop)
        # engagement other than features continues: they still log in and buy
        assert _of([e for e in events if e["occurred_at"] >= onset], "purchase")
    assert checked >= 20
    assert abs(after / before - 1) <= 0.10, (before, after)
    # before the onset they used features like everyone else
    early = [
        e
        for k in clean_run.customers("silent_decline")
        for e in _of(clean_run.by_customer[k], "feature_use")
    ]
    assert len(early) > 20 * checked


def test_purchase_frequency_drops_from_weekly_to_biweekly(clean_run: Any) -> None:
    gaps_before: list[float] = []
    gaps_after: list[float] = []
    for key in clean_run.customers("purchase_frequency_drop"):
        drop = clean_run.truth[key]["script"]["decline_at"]
        times = [e["occurred_at"] for e in _of(clean_run.by_customer[key], "purchase")]
        for a, b in zip(times, times[1:], strict=False):
            (gaps_before if b < drop else gaps_after if a >= drop else []).append((b - a) / DAY)
    assert 6.0 <= statistics.median(gaps_before) <= 8.0
    assert 12.5 <= statistics.median(gaps_after) <= 15.5


def test_support_escalators_burst_with_escalated_negative_tickets(clean_run: Any) -> None:
    escalators = clean_run.customers("support_escalator")
    assert escalators
    for key in escalators:
        tickets = [e for e in _of(clean_run.by_customer[key], "support_ticket") if e["escalated"]]
        for burst in clean_run.truth[key]["script"]["escalation_tickets"]:
            in_burst = [e for e in tickets if burst[0] <= e["occurred_at"] <= burst[-1]]
            assert len(in_burst) >= 3
            assert burst[-1] - burst[0] <= 5 * DAY
            assert all(e["sentiment"] <= -0.45 for e in in_burst)
    # other personas almost never escalate: fewer than 3 escalated tickets in total per 100
    others = [
        e
        for k, evs in clean_run.by_customer.items()
        if clean_run.truth[k]["persona"] != "support_escalator"
        for e in _of(evs, "support_ticket")
        if e["escalated"]
    ]
    assert len(others) < 0.03 * len(clean_run.by_customer)


def test_churners_go_quiet_and_gradual_ones_fade_first(clean_run: Any) -> None:
    churned = [k for k, t in clean_run.truth.items() if t["churn_at"] is not None]
    assert len(churned) >= 30
    for key in churned:
        t = clean_run.truth[key]
        events = clean_run.by_customer[key]
        late = [e for e in _active(events) if e["occurred_at"] > t["churn_at"]]
        assert not late, (key, t["persona"], late[:2])
        cancels = _of(events, "subscription_cancel")
        assert len(cancels) == (1 if t["churn_kind"] == "cancel" else 0)
    fading = baseline = 0
    for key in clean_run.customers("gradual_churner"):
        t = clean_run.truth[key]
        decline = t["script"]["decline_at"]
        if t["churn_at"] is None or decline - clean_run.sim.config.start_ms < 28 * DAY:
            continue
        active = [e["occurred_at"] for e in _active(clean_run.by_customer[key])]
        baseline += sum(decline - 28 * DAY <= x < decline for x in active)
        fading += sum(t["churn_at"] - 14 * DAY <= x < t["churn_at"] for x in active)
    # the 14 days before churn carry under a fifth of a 14-day baseline's activity
    assert baseline > 0 and fading < 0.2 * baseline / 2


def test_new_leads_never_engage_with_content(clean_run: Any) -> None:
    leads = clean_run.customers("new_lead_no_content")
    assert leads
    for key in leads:
        t = clean_run.truth[key]
        kinds = {e["event_type"] for e in clean_run.by_customer[key]}
        assert not kinds & {"feature_use", "email_click", "purchase", "login"}
        signups = _of(clean_run.by_customer[key], "identify")
        assert [e["occurred_at"] for e in signups] == [t["signup_at"]]
        assert t["identity"]["user_id"] is None


def test_seasonal_users_are_quiet_off_season(clean_run: Any) -> None:
    sim = clean_run.sim
    on = off = on_days = off_days = 0
    for key in clean_run.customers("seasonal"):
        c = sim.resolve(key)
        assert c is not None
        for e in _active(clean_run.by_customer[key]):
            if c.levels(e["occurred_at"])[0] == 1.0:
                on += 1
            else:
                off += 1
        for d in range(sim.config.days):
            in_season = c.levels(sim.config.start_ms + d * DAY + DAY // 2)[0] == 1.0
            on_days += in_season
            off_days += not in_season
    assert on_days and off_days
    assert off / off_days < 0.15 * on / on_days
    assert all(clean_run.truth[k]["churn_at"] is None for k in clean_run.customers("seasonal"))


def test_reactivated_customers_go_silent_then_return(clean_run: Any) -> None:
    keys = clean_run.customers("reactivated")
    assert keys
    for key in keys:
        s = clean_run.truth[key]["script"]
        times = [e["occurred_at"] for e in _active(clean_run.by_customer[key])]
        assert not [x for x in times if s["decline_at"] + DAY <= x < s["dormant_end"]]
        if s["dormant_end"] + 30 * DAY < clean_run.sim.config.end_ms:
            assert [x for x in times if x >= s["dormant_end"]]


def test_signals_have_plausible_shapes(clean_run: Any) -> None:
    events = [e for evs in clean_run.by_customer.values() for e in evs]
    kinds = {e["event_type"] for e in events}
    assert kinds == CUSTOMER_TYPES | {"email_sent", "email_bounce"}
    amounts = [e["amount"] for e in events if e["event_type"] == "purchase"]
    assert min(amounts) > 0 and 20 < statistics.median(amounts) < 200
    assert all(e["currency"] in ("USD", "EUR") for e in events if e["event_type"] == "purchase")
    sessions = [e["session_seconds"] for e in events if e.get("session_seconds") is not None]
    assert 120 < statistics.mean(sessions) < 1200
    assert all(-1 <= e["sentiment"] <= 1 for e in events if e["event_type"] == "support_ticket")
    sent = sum(e["event_type"] == "email_sent" for e in events)
    opened = sum(e["event_type"] == "email_open" for e in events)
    clicked = sum(e["event_type"] == "email_click" for e in events)
    assert 0.15 < opened / sent < 0.6 and 0.02 < clicked / sent < opened / sent
    # weekday pattern: office-hours customers make weekdays busier than weekends
    dow = [0] * 7
    for e in events:
        if e["event_type"] == "session_start":
            dow[(e["occurred_at"] // DAY + 3) % 7] += 1  # 1970-01-01 was a Thursday
    assert sum(dow[:5]) / 5 > 1.05 * sum(dow[5:]) / 2
    identify = [e for e in events if e["event_type"] == "identify"]
    assert all({"zip", "timezone", "first_name", "plan"} <= set(e["properties"]) for e in identify)
