"""The latent script a simulated customer follows (its risk episodes, bursts, churn) and how
it is drawn (moved out of ``generator.py``, unchanged).

Pure: no clock, no environment, no I/O.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segflow.sim.behaviour import DAY, _cdf
from segflow.sim.personas import Persona

if TYPE_CHECKING:
    from segflow.sim.generator import SimConfig


@dataclass(slots=True)
class Script:
    """A customer's latent script: what it truly does and when (the source of ground truth).

    Times are epoch milliseconds; scripted times may fall after the simulated span.
    ``decline_at`` is the persona's onset: decay start (gradual churner), feature stop (silent
    decline), drop (purchase frequency drop), dormancy start (reactivated), first escalation
    (support escalator). Actions can change ``restored_at``, ``churn_at`` and ``churn_kind``.
    """

    persona: str
    value_tier: str
    responsive: bool
    signup_at: int | None = None
    decline_at: int | None = None
    half_life_ms: int | None = None
    churn_at: int | None = None
    churn_kind: str | None = None
    dormant_end: int | None = None
    season: tuple[int, int] | None = None
    bursts: list[list[int]] = field(default_factory=list)
    restored_at: int | None = None
    rescue_drawn: bool = False
    actions: list[dict[str, Any]] = field(default_factory=list)

    def at_risk(self, t: int) -> bool:
        """Whether the customer is in a phase a retention action can end (before restoration).

        >>> Script("silent_decline", "standard", True, decline_at=10).at_risk(20)
        True
        >>> Script("silent_decline", "standard", True, decline_at=10, churn_at=15).at_risk(20)
        False
        """
        if self.decline_at is None or t < self.decline_at:
            return False
        if self.restored_at is not None and t >= self.restored_at:
            return False
        if self.churn_at is not None and t >= self.churn_at:
            return False
        if (
            self.persona == "support_escalator"
            and self.churn_at is None
            and self.bursts
            and t >= self.bursts[-1][-1] + 14 * DAY
        ):
            return False
        return self.persona in (
            "gradual_churner",
            "silent_decline",
            "purchase_frequency_drop",
            "support_escalator",
        )


def _to_utc(cdf: tuple[float, ...], tz_h: int) -> tuple[float, ...]:
    """A cumulative local-hour profile re-indexed by UTC hour.

    >>> _to_utc(_cdf((1, 0, 0, 0) + (0,) * 20), 1)[-1], _to_utc(_cdf((1,) + (0,) * 23), 1)[22]
    (1.0, 0.0)
    """
    local = [b - a for a, b in zip((0.0, *cdf[:-1]), cdf, strict=True)]
    return _cdf(tuple(local[(h + tz_h) % 24] for h in range(24)))


def _draw_script(persona: Persona, tier: str, rng: random.Random, config: SimConfig) -> Script:
    """Draw a customer's latent script from its persona (times relative to the span)."""
    r = rng.random
    start = config.start_ms
    span = max(config.days, 1) * DAY
    s = Script(persona.name, tier, persona.responsive)

    def at(lo: float, hi: float) -> int:
        return start + int((lo + (hi - lo) * r()) * span)

    name = persona.name
    if name == "silent_decline":
        s.decline_at = at(0.3, 0.55)
        if r() < persona.churn_prob:
            s.churn_at = s.decline_at + int((30 + 30 * r()) * DAY)
    elif name == "gradual_churner":
        s.decline_at = at(0.15, 0.45)
        s.half_life_ms = int((10 + 10 * r()) * DAY)
        s.churn_at = s.decline_at + int(s.half_life_ms * math.log2(20))
    elif name == "sudden_churner":
        s.churn_at = at(0.3, 0.9)
        s.decline_at = s.churn_at
    elif name == "support_escalator":
        n = 1 if config.days < 120 else 1 + (r() < 0.5)
        starts = sorted(at(0.2, 0.8) for _ in range(n))
        for b in starts:
            if s.bursts and b < s.bursts[-1][-1] + 14 * DAY:
                continue
            k = 3 + int(r() * 4)
            s.bursts.append(sorted(b + int(r() * 5 * DAY) for _ in range(k)))
        s.decline_at = s.bursts[0][0]
        if r() < persona.churn_prob:
            s.churn_at = s.bursts[-1][-1] + int((7 + 23 * r()) * DAY)
    elif name == "purchase_frequency_drop":
        s.decline_at = at(0.25, 0.5)
    elif name == "seasonal":
        s.season = (300, 75) if r() < 0.6 else (152, 92)
    elif name == "new_lead_no_content":
        s.signup_at = at(0.05, 0.6)
    elif name == "reactivated":
        s.decline_at = at(0.15, 0.45)
        s.dormant_end = s.decline_at + int((30 + 20 * r()) * DAY)
        s.restored_at = s.dormant_end
    if s.churn_at is not None:
        s.churn_kind = "cancel" if r() < 0.5 else "silence"
    return s
