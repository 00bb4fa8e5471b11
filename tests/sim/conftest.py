"""Shared simulated populations for the simulator tests (generated once per session)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest

from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery, Item, NoiseConfig
from segflow.sim.truth import truth_records

#: Every persona, weighted so each has dozens of customers in a few hundred.
EVEN_MIX = {
    "loyal_power_user": 1,
    "steady_buyer": 1,
    "silent_decline": 2,
    "gradual_churner": 2,
    "sudden_churner": 1,
    "support_escalator": 1.5,
    "purchase_frequency_drop": 1.5,
    "seasonal": 1,
    "new_lead_no_content": 1,
    "reactivated": 1,
}


@dataclass
class Run:
    """A finished simulation: its items, events per true customer, and ground truth."""

    sim: Simulation
    items: list[Item]
    by_customer: dict[str, list[dict[str, Any]]]
    truth: dict[str, dict[str, Any]]

    def customers(self, persona: str) -> list[str]:
        return [k for k, t in self.truth.items() if t["persona"] == persona]


def simulate(config: SimConfig) -> Run:
    sim = Simulation(config)
    items = list(sim.run())
    by_customer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[str] = set()
    for item in items:
        if isinstance(item, Delivery) and item.event["event_id"] not in seen:
            seen.add(item.event["event_id"])
            by_customer[item.customer].append(item.event)
    for events in by_customer.values():
        events.sort(key=lambda e: e["occurred_at"])
    truth = {t["customer"]: t for t in truth_records(sim)}
    return Run(sim, items, by_customer, truth)


@pytest.fixture(scope="session")
def clean_run() -> Run:
    """400 customers over 200 days, no noise."""
    return simulate(SimConfig(customers=400, days=200, seed=11, mix=EVEN_MIX))


@pytest.fixture(scope="session")
def noisy_run() -> Run:
    """300 customers over 45 days with every kind of noise at a few percent."""
    noise = NoiseConfig(duplicates=0.03, late=0.02, out_of_order=0.04, malformed=0.01, blocked=0.05)
    return simulate(SimConfig(customers=300, days=45, seed=5, noise=noise))
