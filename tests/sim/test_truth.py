"""Ground truth: segment intervals follow each persona's script."""

from __future__ import annotations

from typing import Any

from segflow.sim.generator import DAY
from segflow.sim.truth import SEGMENTS

#: Which segments each persona can truly be in (Engaged But At-Risk follows any churn).
ALLOWED = {
    "loyal_power_user": set(),
    "steady_buyer": set(),
    "seasonal": set(),
    "silent_decline": {
        "Silent Decline",
        "High-CLV Login Drop",
        "ReEngageAtRisk",
        "Engaged But At-Risk",
    },
    "gradual_churner": {"AtRisk-60d", "ReEngageAtRisk", "Engaged But At-Risk"},
    "sudden_churner": {"Engaged But At-Risk"},
    "support_escalator": {"Support Escalation", "ReEngageAtRisk", "Engaged But At-Risk"},
    "purchase_frequency_drop": {"Purchase Frequency Drop", "ReEngageAtRisk"},
    "new_lead_no_content": {"New Lead No Content"},
    "reactivated": {"AtRisk-60d", "High-CLV Login Drop", "Re-engaged"},
}


def test_segments_belong_to_the_personas_that_cause_them(clean_run: Any) -> None:
    cfg = clean_run.sim.config
    hits: dict[str, int] = {name: 0 for name in SEGMENTS}
    for t in clean_run.truth.values():
        assert set(t["segments"]) == set(SEGMENTS)
        for name, spans in t["segments"].items():
            if spans:
                hits[name] += 1
                assert name in ALLOWED[t["persona"]], (t["persona"], name)
            for start, end in spans:
                assert cfg.start_ms <= start < cfg.end_ms
                assert end is None or start < end <= cfg.end_ms
    assert all(hits.values()), hits


def test_intervals_follow_the_script(clean_run: Any) -> None:
    for t in clean_run.truth.values():
        s, seg = t["script"], t["segments"]
        if t["persona"] == "silent_decline" and seg["Silent Decline"]:
            assert seg["Silent Decline"][0][0] == s["decline_at"] + 10 * DAY
            end = seg["Silent Decline"][0][1]
            assert end == t["churn_at"] if t["churn_at"] else end is None
        if t["persona"] == "gradual_churner" and seg["AtRisk-60d"]:
            start, end = seg["AtRisk-60d"][0]
            assert start - s["decline_at"] >= 21 * DAY
            assert end == t["churn_at"] or (end is None and t["churn_at"] is None)
        if t["persona"] == "purchase_frequency_drop" and seg["Purchase Frequency Drop"]:
            assert seg["Purchase Frequency Drop"] == [[s["decline_at"] + 21 * DAY, None]]
        if t["persona"] == "support_escalator" and seg["Support Escalation"]:
            third = s["escalation_tickets"][0][2]
            assert seg["Support Escalation"][0][0] == third
        if seg["High-CLV Login Drop"]:
            assert t["value_tier"] == "high"
        if seg["Engaged But At-Risk"]:
            start, end = seg["Engaged But At-Risk"][0]
            assert s["scripted_churn_at"] - 30 * DAY <= start
            assert end is None or end <= s["scripted_churn_at"]
