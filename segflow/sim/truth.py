"""Ground truth: who each customer really is and when each default segment truly applies.

Truth comes from the latent script (onsets, churn, bursts, restoration), never from re-running
rules on emitted events; where a rule has a window, the definition waits the same time after the
scripted cause so that a correct, noise-free implementation can match it. Intervals are
``[start_ms, end_ms]`` clipped to the simulated span; ``end_ms`` is ``None`` when the segment
still applies at the end of the span. Churned customers leave every segment at churn.

Segment definitions (one function each below):

* **AtRisk-60d** — gradual churner: from the later of (14 days after latent engagement fell
  below 40 % of baseline) and (21 days after purchases stopped, which they do below 60 %)
  until churn or restoration; reactivated: from 21 days into its dormancy until it returns.
* **Silent Decline** — silent-decline persona: from 10 days after feature use stopped until
  restoration or churn.
* **Support Escalation** — support escalator: while at least 3 of a scripted burst's escalated,
  negative tickets fall in the trailing 7 days.
* **Purchase Frequency Drop** — frequency-drop persona: from 21 days after the weekly →
  biweekly drop until restoration.
* **High-CLV Login Drop** — high-CLV customers whose logins drop with zero feature use: a
  silent decliner from 3 days after onset, a reactivated customer from 3 days into dormancy.
* **Engaged But At-Risk** — customers who will churn within 30 days while still engaged
  (latent engagement at least 60 % of baseline).
* **New Lead No Content** — a new lead from 7 days after sign-up to 30 days after (it never
  engages with content).
* **ReEngageAtRisk** — responsive personas during their risk episode (from onset until churn,
  restoration or, for escalators who do not churn, 14 days after their last ticket): the
  customers a retention action can still win back.
* **Re-engaged** — the 30 days after behaviour is restored (by a retention action or a
  reactivated customer's return).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import IO, Any

from segflow.sim.generator import DAY, Customer, Script, SimConfig, Simulation

SEGMENTS = (
    "AtRisk-60d",
    "Silent Decline",
    "Support Escalation",
    "Purchase Frequency Drop",
    "High-CLV Login Drop",
    "Engaged But At-Risk",
    "New Lead No Content",
    "ReEngageAtRisk",
    "Re-engaged",
)

#: An open end, beyond any simulated span.
OPEN = 1 << 62

Span = tuple[int, int]


def _episode_end(s: Script) -> int:
    """When the persona's decline ends: churn, restoration, or never."""
    ends = [OPEN]
    if s.churn_at is not None:
        ends.append(s.churn_at)
    if s.restored_at is not None and s.decline_at is not None and s.restored_at >= s.decline_at:
        ends.append(s.restored_at)
    return min(ends)


def _log2_ms(half_life_ms: int, ratio: float) -> int:
    """Time for an exponential decay with ``half_life_ms`` to fall to ``ratio``."""
    return int(half_life_ms * math.log2(1 / ratio))


def at_risk_60d(s: Script) -> list[Span]:
    """AtRisk-60d: engagement down > 60 % over 14 days and no purchase in 21 days.

    >>> s = Script("reactivated", "standard", False, decline_at=0, dormant_end=40 * DAY)
    >>> [(a // DAY, b // DAY) for a, b in at_risk_60d(s)]
    [(21, 40)]
    """
    if s.decline_at is None:
        return []
    if s.persona == "gradual_churner" and s.half_life_ms:
        below_40 = s.decline_at + _log2_ms(s.half_life_ms, 0.4)
        below_60 = s.decline_at + _log2_ms(s.half_life_ms, 0.6)
        return [(max(below_40 + 14 * DAY, below_60 + 21 * DAY), _episode_end(s))]
    if s.persona == "reactivated" and s.dormant_end is not None:
        return [(s.decline_at + 21 * DAY, s.dormant_end)]
    return []


def silent_decline(s: Script) -> list[Span]:
    """Silent Decline: zero feature use for 10+ days while revenue stays stable.

    >>> [(a // DAY, b) for a, b in silent_decline(Script("silent_decline", "high", True,
    ...                                                   decline_at=5 * DAY))]
    [(15, 4611686018427387904)]
    """
    if s.persona != "silent_decline" or s.decline_at is None:
        return []
    return [(s.decline_at + 10 * DAY, _episode_end(s))]


def support_escalation(s: Script) -> list[Span]:
    """Support Escalation: at least 3 escalated negative tickets in a trailing 7-day window.

    >>> [(a // DAY, b // DAY) for a, b in support_escalation(Script(
    ...     "support_escalator", "standard", True, bursts=[[0, DAY, 2 * DAY, 4 * DAY]]))]
    [(2, 8)]
    """
    out: list[Span] = []
    for burst in s.bursts:
        tickets = [t for t in burst if s.churn_at is None or t < s.churn_at]
        for i in range(2, len(tickets)):
            start, end = tickets[i], tickets[i - 2] + 7 * DAY
            if start < end:
                out.append((start, end))
    return _merge(out)


def purchase_frequency_drop(s: Script) -> list[Span]:
    """Purchase Frequency Drop: weekly → biweekly purchases for 21 consecutive days.

    >>> [(a // DAY, b // DAY) for a, b in purchase_frequency_drop(Script(
    ...     "purchase_frequency_drop", "standard", True, decline_at=DAY, restored_at=40 * DAY))]
    [(22, 40)]
    """
    if s.persona != "purchase_frequency_drop" or s.decline_at is None:
        return []
    return [(s.decline_at + 21 * DAY, _episode_end(s))]


def high_clv_login_drop(s: Script) -> list[Span]:
    """High-CLV Login Drop: high CLV, logins down for 3 days, zero feature use.

    >>> high_clv_login_drop(Script("silent_decline", "standard", True, decline_at=0))
    []
    """
    if s.value_tier != "high" or s.decline_at is None:
        return []
    if s.persona == "silent_decline":
        return [(s.decline_at + 3 * DAY, _episode_end(s))]
    if s.persona == "reactivated" and s.dormant_end is not None:
        return [(s.decline_at + 3 * DAY, s.dormant_end)]
    return []


def engaged_but_at_risk(s: Script) -> list[Span]:
    """Engaged But At-Risk: still engaged (≥ 60 % of baseline) yet churning within 30 days.

    >>> [(a // DAY, b // DAY) for a, b in engaged_but_at_risk(Script(
    ...     "sudden_churner", "standard", False, decline_at=50 * DAY, churn_at=50 * DAY))]
    [(20, 50)]
    """
    if s.churn_at is None:
        return []
    engaged_until = s.churn_at
    if s.persona == "gradual_churner" and s.decline_at is not None and s.half_life_ms:
        engaged_until = s.decline_at + _log2_ms(s.half_life_ms, 0.6)
    elif s.persona == "silent_decline" and s.decline_at is not None:
        engaged_until = s.decline_at
    return [(s.churn_at - 30 * DAY, min(s.churn_at, engaged_until))]


def new_lead_no_content(s: Script) -> list[Span]:
    """New Lead No Content: a lead 7–30 days after sign-up that never engaged with content.

    >>> [(a // DAY, b // DAY) for a, b in new_lead_no_content(Script(
    ...     "new_lead_no_content", "standard", False, signup_at=3 * DAY))]
    [(10, 33)]
    """
    if s.persona != "new_lead_no_content" or s.signup_at is None:
        return []
    return [(s.signup_at + 7 * DAY, s.signup_at + 30 * DAY)]


def risk_episode(s: Script) -> list[Span]:
    """The span in which a retention action can still change a responsive customer's course.

    >>> [(a // DAY, b // DAY) for a, b in risk_episode(Script(
    ...     "support_escalator", "standard", True, decline_at=0, bursts=[[0, DAY, 2 * DAY]]))]
    [(0, 16)]
    """
    if not s.responsive or s.decline_at is None:
        return []
    end = _episode_end(s)
    if s.persona == "support_escalator" and s.churn_at is None and s.bursts:
        end = min(end, s.bursts[-1][-1] + 14 * DAY)
    return [(s.decline_at, end)]


def reengage_at_risk(s: Script) -> list[Span]:
    """ReEngageAtRisk: a responsive customer during its risk episode (see :func:`risk_episode`).

    >>> reengage_at_risk(Script("sudden_churner", "standard", False, decline_at=0, churn_at=0))
    []
    """
    return risk_episode(s)


def re_engaged(s: Script) -> list[Span]:
    """Re-engaged: the 30 days after behaviour was restored.

    >>> [(a // DAY, b // DAY) for a, b in re_engaged(Script(
    ...     "reactivated", "standard", False, restored_at=9 * DAY))]
    [(9, 39)]
    """
    if s.restored_at is None:
        return []
    return [(s.restored_at, s.restored_at + 30 * DAY)]


_DEFINITIONS = {
    "AtRisk-60d": at_risk_60d,
    "Silent Decline": silent_decline,
    "Support Escalation": support_escalation,
    "Purchase Frequency Drop": purchase_frequency_drop,
    "High-CLV Login Drop": high_clv_login_drop,
    "Engaged But At-Risk": engaged_but_at_risk,
    "New Lead No Content": new_lead_no_content,
    "ReEngageAtRisk": reengage_at_risk,
    "Re-engaged": re_engaged,
}


def _merge(spans: Iterable[Span]) -> list[Span]:
    """Union of spans, sorted.

    >>> _merge([(5, 9), (1, 3), (2, 6)])
    [(1, 9)]
    """
    out: list[Span] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def clip(spans: Iterable[Span], start_ms: int, end_ms: int) -> list[list[int | None]]:
    """Spans clipped to ``[start_ms, end_ms)``; an end at or past ``end_ms`` becomes ``None``.

    >>> clip([(0, 5), (8, 20), (30, 40)], 2, 10)
    [[2, 5], [8, None]]
    """
    out: list[list[int | None]] = []
    for a, b in _merge(spans):
        a2, b2 = max(a, start_ms), min(b, end_ms)
        if a2 < b2:
            out.append([a2, None if b >= end_ms else b2])
    return out


def segment_intervals(s: Script, start_ms: int, end_ms: int) -> dict[str, list[list[int | None]]]:
    """Every default segment's true intervals for one script, within the span.

    >>> segment_intervals(Script("steady_buyer", "standard", False), 0, 10 * DAY)["Re-engaged"]
    []
    """
    return {name: clip(fn(s), start_ms, end_ms) for name, fn in _DEFINITIONS.items()}


def truth_record(c: Customer, config: SimConfig) -> dict[str, Any]:
    """The ground-truth JSON object of one customer."""
    s = c.script
    end = config.end_ms
    churn_at = s.churn_at if s.churn_at is not None and s.churn_at < end else None
    return {
        "customer": c.key,
        "persona": s.persona,
        "value_tier": s.value_tier,
        "responsive": s.responsive,
        "identity": c.identity().to_json(),
        "properties": dict(c.props),
        "signup_at": s.signup_at,
        "churn_at": churn_at,
        "churn_kind": s.churn_kind if churn_at is not None else None,
        "script": {
            "decline_at": s.decline_at,
            "half_life_days": None if s.half_life_ms is None else s.half_life_ms / DAY,
            "scripted_churn_at": s.churn_at,
            "dormant_end": s.dormant_end,
            "season": None
            if s.season is None
            else {"start_day_of_year": s.season[0], "days": s.season[1]},
            "escalation_tickets": [list(b) for b in s.bursts],
            "restored_at": s.restored_at,
        },
        "actions": list(s.actions),
        "segments": segment_intervals(s, config.start_ms, end),
    }


def truth_records(sim: Simulation) -> list[dict[str, Any]]:
    """Ground truth of every customer, reflecting all actions applied so far."""
    return [truth_record(c, sim.config) for c in sim.customers]


def write_truth(sim: Simulation, out: IO[str]) -> int:
    """Write the ground truth as JSON lines (one customer per line); return the line count."""
    n = 0
    for record in truth_records(sim):
        out.write(json.dumps(record, separators=(",", ":")))
        out.write("\n")
        n += 1
    return n
