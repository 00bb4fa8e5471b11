"""Closed loop: dispatch actions reach simulated customers and change what they do."""

from __future__ import annotations

import math
from typing import Any

from segflow.sim.generator import DAY, SimConfig, Simulation
from segflow.sim.noise import Delivery
from segflow.sim.truth import truth_records


def _action(status: str, decided_at: int, variant: str = "B") -> dict[str, Any]:
    return {
        "customer_id": "seg-123",
        "status": status,
        "channel": "email",
        "campaign_id": "winback-1",
        "variant": variant,
        "playbook": "AtRisk-60d",
        "segment": "AtRisk-60d",
        "decided_at": decided_at,
    }


def _treat_when_at_risk(effect: float, seed: int) -> tuple[Simulation, list[Delivery]]:
    """Gradual churners; even ones get an email when their decline starts, odd ones are held out."""
    sim = Simulation(
        SimConfig(
            customers=400, days=150, seed=seed, treatment_effect=effect, mix={"gradual_churner": 1}
        )
    )
    done: set[str] = set()
    items: list[Delivery] = []
    while not (sim.finished and not sim.pending):
        items.extend(i for i in sim.step(1) if isinstance(i, Delivery))
        for c in sim.customers:
            s = c.script
            if c.key not in done and s.decline_at is not None and s.decline_at < sim.now_ms:
                done.add(c.key)
                status = "sent" if c.idx % 2 == 0 else "holdout"
                # resolve by an identifier the pipeline would know: the customer's email
                outcome = sim.apply_action(c.emails[0], _action(status, sim.now_ms))
                assert outcome.customer == c.key
    return sim, items


def test_sent_actions_lower_churn_and_holdouts_do_not() -> None:
    sim, items = _treat_when_at_risk(0.5, seed=21)
    truth = truth_records(sim)
    treated = [t for t in truth if int(t["customer"][1:]) % 2 == 0]
    held = [t for t in truth if int(t["customer"][1:]) % 2 == 1]

    def churn_rate(group: list[dict[str, Any]]) -> float:
        return sum(t["script"]["scripted_churn_at"] is not None for t in group) / len(group)

    assert churn_rate(held) == 1.0  # every gradual churner churns untreated
    rate = churn_rate(treated)
    sd = math.sqrt(0.25 / len(treated))
    assert abs(rate - 0.5) <= 4 * sd, rate
    rescued = [t for t in treated if t["script"]["restored_at"] is not None]
    for t in rescued:
        assert t["segments"]["Re-engaged"] and t["churn_at"] is None
        assert t["actions"][0]["status"] == "sent"
    assert all(t["actions"][0]["status"] == "holdout" for t in held)
    # a rescued customer is active again after restoration
    by_customer: dict[str, list[dict[str, Any]]] = {}
    for i in items:
        by_customer.setdefault(i.customer, []).append(i.event)
    back = sum(
        any(
            e["event_type"] == "session_start"
            and e["occurred_at"] > t["script"]["restored_at"] + 20 * DAY
            for e in by_customer[t["customer"]]
        )
        for t in rescued
    )
    assert back >= 0.9 * len(rescued)


def test_responses_carry_campaign_and_variant_and_holdouts_get_nothing() -> None:
    sim, items = _treat_when_at_risk(1.0, seed=22)
    campaign = [i for i in items if i.event.get("campaign_id") == "winback-1"]
    kinds = {i.event["event_type"] for i in campaign}
    assert {"email_sent", "email_open", "email_click"} <= kinds
    assert all(i.event["variant"] == "B" for i in campaign)
    assert all(int(i.customer[1:]) % 2 == 0 for i in campaign)
    sent = sum(i.event["event_type"] == "email_sent" for i in campaign)
    bounced = sum(i.event["event_type"] == "email_bounce" for i in campaign)
    assert sent == 200
    assert bounced == sum(1 for c in sim.customers if c.idx % 2 == 0 and not c.email_ok)
    # with a certain effect every treated customer is won back, no held-out one is
    truth = truth_records(sim)
    for t in truth:
        treated = int(t["customer"][1:]) % 2 == 0
        assert (t["script"]["restored_at"] is not None) == treated
        assert (t["script"]["scripted_churn_at"] is None) == treated


def test_actions_resolve_by_any_true_identifier_and_reject_strangers() -> None:
    sim = Simulation(SimConfig(customers=20, days=10, seed=2, mix={"steady_buyer": 1}))
    sim.step(3)
    c = sim.customers[4]
    for ident in (c.user_id, c.emails[0].upper(), c.devices[0][0], c.key):
        assert ident is not None
        assert sim.resolve(ident) is c
    assert sim.apply_action("nobody@example.com", _action("sent", 0)).customer is None
    # an action dated before the frontier happens at the frontier; a steady buyer is not at risk
    outcome = sim.apply_action(c.user_id or "", _action("sent", 0))
    assert outcome.applied and not outcome.rescued
    later = [
        i
        for i in sim.step(2)
        if isinstance(i, Delivery)
        and i.customer == c.key
        and i.event.get("campaign_id") == "winback-1"
    ]
    assert later and min(i.event["occurred_at"] for i in later) >= sim.config.start_ms + 3 * DAY
