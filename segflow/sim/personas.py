"""Personas: the behavioural archetypes of simulated customers and their parameters.

A persona gives baseline rates; each customer draws its own latent script from it (onset
dates, churn date, bursts, season) in :mod:`segflow.sim.generator`. Rates are per day for a
fully engaged customer, before weekday, hour-of-day and script multipliers.

=========================  =================================================================
persona                    scripted behaviour
=========================  =================================================================
loyal_power_user           frequent sessions and feature use, regular purchases, opens mail
steady_buyer               moderate sessions, a purchase every ~9 days
silent_decline             at onset feature use stops and sessions drop to 35 %; purchases
                           and revenue continue unchanged; some churn 30–60 days later
gradual_churner            engagement decays exponentially (half-life 10–20 days) from the
                           decline start; purchases stop below 60 %; churns (cancel or
                           silence) when engagement reaches 5 %
sudden_churner             fully engaged until the churn moment, then nothing
support_escalator          1–2 bursts of 3–6 escalated tickets with negative sentiment within
                           5 days; 30 % churn 7–30 days after the last burst
purchase_frequency_drop    weekly purchases until the drop, biweekly after
seasonal                   active in a 90-day season (holiday or summer), 5 % off-season, no
                           purchases off-season; never churns
new_lead_no_content        browses anonymously, signs up with an email, never uses features,
                           never clicks, never buys
reactivated                active, then silent for 30–50 days, then back to normal
=========================  =================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Persona:
    """Baseline rates of one persona (per day unless named otherwise)."""

    name: str
    sessions_per_day: float
    pages_per_session: float
    features_per_session: float
    cart_view_prob: float
    purchase_interval_days: float | None
    amount_mean: float
    open_rate: float
    click_rate: float
    tickets_per_day: float
    high_clv_prob: float
    churn_prob: float
    responsive: bool


PERSONAS: dict[str, Persona] = {
    p.name: p
    for p in (
        Persona(
            "loyal_power_user", 0.5, 2.0, 2.0, 0.25, 14.0, 90.0, 0.55, 0.20, 0.008, 0.6, 0.0, False
        ),
        Persona(
            "steady_buyer", 0.22, 1.5, 0.6, 0.35, 9.0, 45.0, 0.35, 0.08, 0.008, 0.3, 0.0, False
        ),
        Persona(
            "silent_decline", 0.3, 1.5, 1.5, 0.2, 10.0, 60.0, 0.4, 0.1, 0.008, 0.35, 0.35, True
        ),
        Persona(
            "gradual_churner", 0.3, 1.5, 1.0, 0.25, 12.0, 40.0, 0.35, 0.08, 0.01, 0.2, 1.0, True
        ),
        Persona(
            "sudden_churner", 0.25, 1.5, 1.0, 0.25, 12.0, 40.0, 0.35, 0.08, 0.008, 0.2, 1.0, False
        ),
        Persona(
            "support_escalator", 0.25, 1.5, 1.0, 0.2, 14.0, 50.0, 0.3, 0.06, 0.01, 0.3, 0.3, True
        ),
        Persona(
            "purchase_frequency_drop",
            0.22,
            1.5,
            0.8,
            0.3,
            7.0,
            35.0,
            0.35,
            0.08,
            0.008,
            0.2,
            0.0,
            True,
        ),
        Persona("seasonal", 0.4, 2.0, 0.8, 0.4, 7.0, 55.0, 0.3, 0.08, 0.005, 0.2, 0.0, False),
        Persona(
            "new_lead_no_content", 0.3, 2.0, 0.0, 0.0, None, 0.0, 0.15, 0.0, 0.0, 0.0, 0.0, False
        ),
        Persona(
            "reactivated", 0.25, 1.5, 1.0, 0.25, 10.0, 45.0, 0.35, 0.08, 0.008, 0.25, 0.0, False
        ),
    )
}

DEFAULT_MIX: dict[str, float] = {
    "loyal_power_user": 0.15,
    "steady_buyer": 0.2,
    "silent_decline": 0.1,
    "gradual_churner": 0.1,
    "sudden_churner": 0.05,
    "support_escalator": 0.07,
    "purchase_frequency_drop": 0.08,
    "seasonal": 0.1,
    "new_lead_no_content": 0.08,
    "reactivated": 0.07,
}


def parse_mix(text: str) -> dict[str, float]:
    """Parse ``persona=weight,...`` into normalised weights; unknown personas are an error.

    >>> parse_mix("silent_decline=3,steady_buyer=1")
    {'silent_decline': 0.75, 'steady_buyer': 0.25}
    >>> parse_mix("ghost=1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown persona 'ghost' (known: gradual_churner, loyal_power_user, ...)
    """
    weights: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in PERSONAS:
            known = ", ".join(sorted(PERSONAS))
            raise ValueError(f"unknown persona {name!r} (known: {known})")
        weights[name] = float(value) if sep else 1.0
    return normalize_mix(weights)


def normalize_mix(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights scaled to sum to one; negative or all-zero weights are an error.

    >>> normalize_mix({"seasonal": 2.0, "reactivated": 2.0})
    {'seasonal': 0.5, 'reactivated': 0.5}
    """
    if any(w < 0 for w in weights.values()):
        raise ValueError("persona weights must not be negative")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("persona weights must sum to more than zero")
    return {name: w / total for name, w in weights.items() if w > 0}
