"""A/B variants and holdouts: deterministic assignment and KPIs with uplift intervals.

>>> from services.dispatcher.playbooks import Experiment, Variant
>>> exp = Experiment(holdout=0.1, variants=(Variant("A"), Variant("B")))
>>> assign("c-1", "AtRisk-60d", exp) == assign("c-1", "AtRisk-60d", exp)
True
>>> sorted({assign(f"c-{i}", "AtRisk-60d", exp) for i in range(200)})
['A', 'B', 'holdout']
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.dispatcher.playbooks import HOLDOUT, Experiment

KPI_FIELDS = ("assigned", "sent", "opened", "clicked", "converted", "unsubscribed", "churned")


def unit(customer_id: str, salt: str) -> float:
    """A uniform number in [0, 1) from a hash of (salt, customer): stable across runs."""
    digest = hashlib.sha256(f"{salt}\x00{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(customer_id: str, playbook: str, experiment: Experiment) -> str:
    """The variant name (or ``"holdout"``) for a customer in a playbook's experiment.

    The holdout draw and the variant draw use separate hashes, so changing the holdout
    fraction does not reshuffle which variant a treated customer gets.
    """
    if experiment.holdout > 0 and unit(customer_id, f"{playbook}:holdout") < experiment.holdout:
        return HOLDOUT
    total = sum(v.weight for v in experiment.variants)
    point = unit(customer_id, f"{playbook}:variant") * total
    for v in experiment.variants:
        point -= v.weight
        if point < 0:
            return v.name
    return experiment.variants[-1].name


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for one proportion.

    >>> lo, hi = wilson(50, 100)
    >>> round(lo, 3), round(hi, 3)
    (0.404, 0.596)
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(x1: int, n1: int, x2: int, n2: int, z: float = 1.96) -> tuple[float, float, float]:
    """Difference p1 − p2 with Newcombe's hybrid score interval (method 10, 1998).

    >>> d, lo, hi = newcombe(56, 70, 48, 80)   # Newcombe's worked example
    >>> round(d, 4), round(lo, 4), round(hi, 4)
    (0.2, 0.0524, 0.3339)
    """
    p1 = x1 / n1 if n1 else 0.0
    p2 = x2 / n2 if n2 else 0.0
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, lo, hi


@dataclass(frozen=True)
class KpiSummary:
    """KPIs of one segment × playbook × variant, with uplift vs the playbook's holdout."""

    segment: str
    playbook: str
    variant: str
    counts: Mapping[str, int]
    open_rate: float | None
    click_rate: float | None
    conversion_rate: float | None
    unsubscribe_rate: float | None
    churn_rate: float | None
    uplift: float | None = None  # conversion_rate − holdout conversion rate
    uplift_low: float | None = None
    uplift_high: float | None = None


def kpi_rows(rows: Iterable[tuple[str, str, str, Mapping[str, int]]]) -> list[dict[str, Any]]:
    """The KPI rows the API serves (counts, rates, uplift with its interval), from counts per
    (segment, playbook, variant): what the dispatcher answers, and what the gateway computes
    again from the counts summed over several dispatcher instances.

    >>> kpi_rows([("S", "P", "A", {"assigned": 10, "sent": 10, "opened": 5})])[0]["open_rate"]
    0.5
    """
    out = []
    for k in summarise(rows):
        out.append(
            {
                "segment": k.segment,
                "playbook": k.playbook,
                "variant": k.variant,
                **k.counts,
                "open_rate": k.open_rate,
                "click_rate": k.click_rate,
                "conversion_rate": k.conversion_rate,
                "unsubscribe_rate": k.unsubscribe_rate,
                "churn_rate": k.churn_rate,
                "uplift": k.uplift,
                "uplift_ci": [k.uplift_low, k.uplift_high] if k.uplift is not None else None,
            }
        )
    return out


def _rate(x: int, n: int) -> float | None:
    return x / n if n else None


def summarise(
    rows: Iterable[tuple[str, str, str, Mapping[str, int]]], z: float = 1.96
) -> list[KpiSummary]:
    """Rates per (segment, playbook, variant) and conversion uplift vs the holdout.

    Conversion and churn are intention-to-treat (per assigned customer), so treated and
    holdout groups compare fairly; open, click and unsubscribe rates are per customer sent.

    >>> rows = [("S", "P", "A", {"assigned": 100, "sent": 100, "opened": 40, "converted": 20}),
    ...         ("S", "P", "holdout", {"assigned": 100, "converted": 10})]
    >>> a, h = summarise(rows)
    >>> a.open_rate, a.conversion_rate, round(a.uplift, 2), a.uplift_low < 0.1 < a.uplift_high
    (0.4, 0.2, 0.1, True)
    >>> h.uplift is None
    True
    """
    table = {(s, p, v): {k: int(c.get(k, 0)) for k in KPI_FIELDS} for s, p, v, c in rows}
    out: list[KpiSummary] = []
    for (seg, pb, var), c in sorted(table.items()):
        uplift = lo = hi = None
        hold = table.get((seg, pb, HOLDOUT))
        if var != HOLDOUT and hold is not None and hold["assigned"] and c["assigned"]:
            uplift, lo, hi = newcombe(
                c["converted"], c["assigned"], hold["converted"], hold["assigned"], z
            )
        out.append(
            KpiSummary(
                segment=seg,
                playbook=pb,
                variant=var,
                counts=c,
                open_rate=_rate(c["opened"], c["sent"]),
                click_rate=_rate(c["clicked"], c["sent"]),
                conversion_rate=_rate(c["converted"], c["assigned"]),
                unsubscribe_rate=_rate(c["unsubscribed"], c["sent"]),
                churn_rate=_rate(c["churned"], c["assigned"]),
                uplift=uplift,
                uplift_low=lo,
                uplift_high=hi,
            )
        )
    return out
