"""Segment membership's data: the score a customer is evaluated on, its memberships and
state, the changes emitted, and the values a rule reads at an instant (pure; split out of
:mod:`services.segmenter.core`, issue #14).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.segmenter.dsl import (
    AGING_PREFIX,
    ATTR_PREFIX,
    DAY,
    Definitions,
    Explanation,
    Lookups,
    Thresholds,
    Value,
)

ENTERED = "entered"
EXITED = "exited"
RE_ENGAGED = "re_engaged"
DEPRECATED = "deprecated"
REACTIVATED = "reactivated"
PRIMARY_CHANGED = "primary_changed"
TRANSITIONS = (ENTERED, EXITED, RE_ENGAGED, DEPRECATED, REACTIVATED, PRIMARY_CHANGED)
EMPTY: Mapping[tuple[str, float], float] = {}
#: ``as_of`` of a customer known only by its attributes (no score yet: not evaluated).
UNSCORED = -1


# -- inputs, state, outputs ---------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """A customer's features and scores at event time ``as_of`` (from ``segflow.scores``)."""

    customer_id: str
    as_of: int
    values: Mapping[str, Value]

    @classmethod
    def from_record(cls, record: Mapping[str, Any], used: Collection[str] | None = None) -> Score:
        """Build from a CustomerScore record: ``features`` plus the score fields.

        ``used`` (the definitions' features) keeps only those: a score carries a few hundred
        features and the definitions read a few dozen.

        >>> r = {"customer_id": "c", "as_of": 5, "churn_probability": 0.5,
        ...      "engagement_score": 10, "clv": 3.0, "cluster": 2, "lifecycle_stage": "loyal",
        ...      "features": {"opens_7d": 1.0, "logins_7d": 2.0}}
        >>> Score.from_record(r).values["cluster"]
        2.0
        >>> sorted(Score.from_record(r, used={"logins_7d", "clv"}).values)
        ['churn_probability', 'cluster', 'clv', 'engagement_score', 'lifecycle_stage', 'logins_7d']
        """
        features = record.get("features") or {}
        if used is None:
            values: dict[str, Value] = {
                k: float(v) for k, v in features.items() if v is not None and math.isfinite(v)
            }
        else:
            values = {}
            get = features.get
            for k in used:
                v = get(k)
                if v is not None and math.isfinite(v):
                    values[k] = float(v)
        for key in ("churn_probability", "engagement_score", "clv", "cluster"):
            v = record.get(key)
            if v is not None:
                values[key] = float(v)
        stage = record.get("lifecycle_stage")
        if stage:
            values["lifecycle_stage"] = str(stage)
        return cls(str(record["customer_id"]), int(record["as_of"]), values)


@dataclass(frozen=True)
class Membership:
    """One customer's history in one segment."""

    segment: str
    active: bool = False
    seq: int = 0  # stays so far; the current stay's entry_id ends with it
    entered_at: int | None = None
    exited_at: int | None = None
    pending_since: int | None = None  # enter held since (for ``sustain``)


@dataclass(frozen=True)
class CustomerState:
    """What the segmenter keeps per customer (a changelog record in the shell)."""

    customer_id: str
    as_of: int  # event time of the latest score
    values: Mapping[str, Value]  # the latest score's values the definitions use (not aged)
    memberships: Mapping[str, Membership] = field(default_factory=dict)
    primary: str | None = None
    primary_seq: int = 0
    re_engaged_at: int | None = None
    next_timer: int | None = None

    def active(self) -> list[str]:
        return sorted(n for n, m in self.memberships.items() if m.active)

    @property
    def scored(self) -> bool:
        """Whether a score came (a customer known only by its attributes has ``as_of`` -1)."""
        return self.as_of >= 0

    @property
    def has_attributes(self) -> bool:
        return any(k.startswith(ATTR_PREFIX) for k in self.values)

    def attribute(self, name: str) -> str | None:
        v = self.values.get(ATTR_PREFIX + name)
        return v if isinstance(v, str) else None


@dataclass(frozen=True)
class Change:
    """One membership transition with its explanation (a SegmentChange record)."""

    customer_id: str
    segment: str
    transition: str
    entry_id: str
    definition_version: str
    occurred_at: int
    primary_segment: str | None
    reason: str | None = None
    score: float | None = None
    explanation: tuple[Explanation, ...] = ()
    previous_primary: str | None = None
    dwell_ms: int | None = None
    seq: int = 0

    @property
    def change_id(self) -> str:
        """Deterministic: the same transition always gets the same id."""
        if self.transition == PRIMARY_CHANGED:
            return f"{self.customer_id}|primary|{self.seq}"
        return f"{self.entry_id}|{self.transition}"

    def to_record(self, emitted_at: int) -> dict[str, Any]:
        """The SegmentChange Avro record."""
        return {
            "change_id": self.change_id,
            "customer_id": self.customer_id,
            "segment": self.segment,
            "transition": self.transition,
            "reason": self.reason,
            "entry_id": self.entry_id,
            "definition_version": self.definition_version,
            "occurred_at": self.occurred_at,
            "emitted_at": emitted_at,
            "primary_segment": self.primary_segment,
            "score": self.score,
            "previous_primary": self.previous_primary,
            "dwell_ms": self.dwell_ms,
            "explanation": [
                {
                    "path": e.path,
                    "feature": e.feature,
                    "operator": e.operator,
                    "observed": _finite(e.observed),
                    "threshold": _finite(e.threshold),
                    "margin": _finite(e.margin),
                    "passed": e.passed,
                    "observed_text": e.observed_text,
                    "threshold_text": e.threshold_text,
                }
                for e in self.explanation
            ],
        }


def entry_id(customer_id: str, segment: str, seq: int) -> str:
    """Identifies one stay of a customer in a segment.

    >>> entry_id("c1", "AtRisk-60d", 2)
    'c1|AtRisk-60d|2'
    """
    return f"{customer_id}|{segment}|{seq}"


def aged_values(state: CustomerState, now: int) -> dict[str, Value]:
    """The stored values as of ``now``: recencies (``days_since_*``) grow with event time.

    >>> s = CustomerState("c", 0, {"days_since_open": 2.0, "clv": 5.0}, re_engaged_at=DAY)
    >>> v = aged_values(s, 3 * DAY)
    >>> v["days_since_open"], v["clv"], v["days_since_re_engaged"]
    (5.0, 5.0, 2.0)
    """
    values = dict(state.values)
    elapsed = (now - state.as_of) / DAY
    if elapsed > 0:
        for key, v in state.values.items():
            if key.startswith(AGING_PREFIX) and isinstance(v, float):
                values[key] = v + elapsed
    if state.re_engaged_at is not None:
        values["days_since_re_engaged"] = (now - state.re_engaged_at) / DAY
    return values


def with_lookups(values: dict[str, Value], defs: Definitions, lookups: Lookups) -> None:
    """Add the lookup features the definitions read (``lookup.<table>(attr.<name>)``) to
    ``values``; a missing attribute, table or entry leaves the feature missing.

    >>> from services.segmenter.dsl import parse
    >>> defs = parse('version: 1\\nsegments:\\n  - {name: A, enter: '
    ...     '{feature: "lookup.zip_income(attr.zip)", op: "==", value: high}}\\n')
    >>> v = {"attr.zip": "94027"}
    >>> with_lookups(v, defs, {"zip_income": {"94027": "high"}})
    >>> v["lookup.zip_income(attr.zip)"]
    'high'
    """
    for feature, table, arg in defs.lookups:
        key = values.get(arg)
        entries = lookups.get(table)
        if entries is None or not isinstance(key, str):
            continue
        hit = entries.get(key.strip())
        if hit is not None:
            values[feature] = hit


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


# -- helpers of core._step (moved from core.py, issue #14's 600-line limit) ---------------
def with_primary(c: Change, primary: str | None) -> Change:
    return Change(
        c.customer_id,
        c.segment,
        c.transition,
        c.entry_id,
        c.definition_version,
        c.occurred_at,
        primary,
        c.reason,
        c.score,
        c.explanation,
        c.previous_primary,
        c.dwell_ms,
        c.seq,
    )


def primary_of(mems: Mapping[str, Membership], defs: Definitions) -> str | None:
    """Highest priority wins; ties go to the alphabetically first name (deterministic)."""
    best: tuple[int, str] | None = None
    for name, m in mems.items():
        seg = defs.by_name.get(name)
        if m.active and seg is not None:
            key = (-seg.priority, name)
            if best is None or key < best:
                best = key
    return best[1] if best is not None else None


def crossings(
    defs: Definitions,
    values: Mapping[str, Value],
    now: int,
    thresholds: Thresholds,
    timers: list[int],
) -> None:
    """Timers at the instants an aging feature (a recency) crosses one of the thresholds the
    definitions compare it with (once per distinct threshold, whichever segments use it)."""
    get = values.get
    for feature, bound, pct in defs.aging_bounds:
        observed = get(feature)
        if observed.__class__ is not float:
            continue
        if pct is not None:
            bound = thresholds.get((feature, pct))
            if bound is None:
                continue
        if bound >= observed:  # type: ignore[operator]
            # inclusive comparisons flip at the bound, strict ones just after it
            at = now + math.ceil((bound - observed) * DAY)  # type: ignore[operator]
            timers.append(at)
            timers.append(at + 1)
