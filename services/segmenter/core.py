"""Segment membership: evaluation of the definitions and the lifecycle of each membership (pure).

Everything here is a function of its arguments; time is event time in epoch milliseconds.

* :func:`evaluate` — a new score for a customer: re-evaluate every segment;
* :func:`advance` — a timer fired (dwell over, cooldown over, a recency crossed its threshold,
  inactivity TTL): re-evaluate on the stored values aged to ``now``;
* :func:`absorb` — an identity merge: the absorbed id's memberships exit with reason ``merged``;
* :func:`track_statuses` / :func:`expire` — segment-level lifecycle: ``deprecated`` after a segment
  had no entry for ``deprecate_after`` (90 days), ``reactivated`` on its next entry;
* :func:`percentile_thresholds` — dynamic thresholds over the current population.

Lifecycle of one membership (customer × segment)::

    (out) --enter holds, exit does not [sustained], cooldown over--> entered
    entered --exit holds, dwell over--> exited, or re_engaged (re_engaged_when, stay long enough)
    entered --no score for ttl--> exited (ttl)

A customer the exit rule would remove is not entered (no entry that the minimum dwell would end
a moment later). Every instant at which membership can change without a new score is a timer
(dwell over, cooldown or sustain over — also right after an exit —, a recency crossing a
threshold, the ttl). A membership never exits at the instant it entered and never re-enters at
the instant it exited, so evaluating the same input twice emits nothing new:

>>> from services.segmenter.dsl import parse
>>> defs = parse('''version: "1"
... segments:
...   - {name: Big, priority: 1, enter: {feature: clv, op: ">=", value: 500},
...      exit: {feature: clv, op: "<", value: 400}}
... ''')
>>> s, changes = evaluate(None, Score("c1", 1000, {"clv": 600.0}), defs)
>>> [(c.segment, c.transition, c.primary_segment) for c in changes]
[('Big', 'entered', 'Big'), ('Big', 'primary_changed', 'Big')]
>>> evaluate(s, Score("c1", 1000, {"clv": 600.0}), defs)[1]
[]
>>> s, changes = evaluate(s, Score("c1", 2000, {"clv": 450.0}), defs)  # hysteresis: stays
>>> changes
[]
>>> s, changes = evaluate(s, Score("c1", 3000, {"clv": 350.0}), defs)
>>> c = changes[0]
>>> c.transition, c.reason, c.explanation[0].margin, c.dwell_ms
('exited', 'condition', 50.0, 2000)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from services.segmenter.dsl import (
    AGING_PREFIX,
    ATTR_PREFIX,
    DAY,
    NO_LOOKUPS,
    Condition,
    Definitions,
    Explanation,
    Lookups,
    Rule,
    Segment,
    Thresholds,
    Value,
    Values,
    first_weighted,
)
from services.segmenter.quantiles import Column, nearest_rank

ENTERED = "entered"
EXITED = "exited"
RE_ENGAGED = "re_engaged"
DEPRECATED = "deprecated"
REACTIVATED = "reactivated"
PRIMARY_CHANGED = "primary_changed"
TRANSITIONS = (ENTERED, EXITED, RE_ENGAGED, DEPRECATED, REACTIVATED, PRIMARY_CHANGED)

EMPTY: Mapping[tuple[str, float], float] = {}
#: Timers of one customer fired before a new score that comes after them (a bound: each firing
#: moves the next timer forward, so a handful is the most seen).
MAX_TIMERS_BEFORE_SCORE = 64
#: ``as_of`` of a customer known only by its attributes (no score yet: not evaluated).
UNSCORED = -1
_NEW: dict[str, Membership] = {}  # not a member yet (immutable, shared)


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


# -- evaluation ---------------------------------------------------------------------------
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


def evaluate(
    state: CustomerState | None,
    score: Score,
    defs: Definitions,
    thresholds: Thresholds = EMPTY,
    lookups: Lookups = NO_LOOKUPS,
) -> tuple[CustomerState, list[Change]]:
    """A new score for a customer: store its values and re-evaluate every segment.

    Out-of-order scores older than the stored one are ignored (the scores topic is a
    per-customer "latest" stream). ``thresholds`` are the current percentile thresholds;
    ``lookups`` the lookup tables (name -> key -> value). The customer's attributes
    (``attr.*``, from :func:`set_attributes`) are kept across scores.
    """
    if state is not None and score.as_of < state.as_of:
        return state, []
    # A timer due before this score fires first, at its own instant with the values it was
    # set for: when the score arrives before the tick fires it (the partition's watermark
    # only passes the timer with this very score), a recency crossing must still enter at
    # the crossing, not at the score (issue #17's oracle: entries late by up to a day, so
    # dwell, cooldown and re_engaged_after were measured from the wrong instant).
    fired: list[Change] = []
    for _ in range(MAX_TIMERS_BEFORE_SCORE):
        if state is None or state.next_timer is None or state.next_timer >= score.as_of:
            break
        state, changes, _persist = fire_timer(state, state.next_timer, defs, thresholds, lookups)
        fired += changes
    used = defs.features
    values = {k: v for k, v in score.values.items() if k in used}
    if state is not None and state.has_attributes:
        for k, v in state.values.items():
            if k.startswith(ATTR_PREFIX):
                values[k] = v
    if state is None:
        state = CustomerState(score.customer_id, score.as_of, values)
    else:
        state = CustomerState(
            state.customer_id,
            score.as_of,
            values,
            state.memberships,
            state.primary,
            state.primary_seq,
            state.re_engaged_at,
            state.next_timer,
        )
    state, changes = _step(state, score.as_of, defs, thresholds, lookups)
    return state, fired + changes if fired else changes


def advance(
    state: CustomerState,
    now: int,
    defs: Definitions,
    thresholds: Thresholds = EMPTY,
    lookups: Lookups = NO_LOOKUPS,
) -> tuple[CustomerState, list[Change]]:
    """Time passed with no new score (a timer fired, a merge, new definitions, a lookup table
    changed): re-evaluate."""
    if not state.scored:
        return state, []
    return _step(state, max(now, state.as_of), defs, thresholds, lookups)


def set_attributes(
    state: CustomerState | None,
    customer_id: str,
    attributes: Mapping[str, str],
    now: int,
    defs: Definitions,
    thresholds: Thresholds = EMPTY,
    lookups: Lookups = NO_LOOKUPS,
) -> tuple[CustomerState, list[Change]]:
    """The customer's attributes changed (a CustomerAttributes record): store them as
    ``attr.<name>`` and re-evaluate at ``now`` (the partition's event time). A customer with no
    score yet keeps them for its first score and is not evaluated before (``as_of`` -1).

    >>> from services.segmenter.dsl import parse
    >>> defs = parse('''version: "1"
    ... segments:
    ...   - {name: Ent, enter: {all: [{feature: clv, op: ">", value: 1},
    ...       {feature: attr.product_tier, op: "==", value: enterprise}]}}
    ... ''')
    >>> s, changes = set_attributes(None, "c1", {"product_tier": "enterprise"}, 5, defs)
    >>> s.scored, changes
    (False, [])
    >>> s, changes = evaluate(s, Score("c1", 10, {"clv": 2.0}), defs)
    >>> [(c.segment, c.transition) for c in changes][:1]
    [('Ent', 'entered')]
    >>> s, changes = set_attributes(s, "c1", {"product_tier": "pro"}, 20, defs)
    >>> c = changes[0]
    >>> c.segment, c.transition, c.explanation[1].feature, c.explanation[1].observed_text
    ('Ent', 'exited', 'attr.product_tier', 'pro')
    """
    attrs = {ATTR_PREFIX + k: str(v) for k, v in attributes.items()}
    if state is None:
        return CustomerState(customer_id, UNSCORED, attrs), []
    values: dict[str, Value] = {
        k: v for k, v in state.values.items() if not k.startswith(ATTR_PREFIX)
    }
    values.update(attrs)
    state = replace(state, values=values)
    if not state.scored:
        return state, []
    return _step(state, max(now, state.as_of), defs, thresholds, lookups)


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


def absorb(
    state: CustomerState,
    survivor_id: str | None,
    now: int,
    defs: Definitions,
    reason: str = "merged",
) -> list[Change]:
    """The customer was merged into ``survivor_id``: every active membership exits ``merged``
    (or, with ``reason="forgotten"`` and no survivor, the customer asked to be forgotten).

    The shell then deletes the state and, after a merge, re-evaluates the survivor with
    :func:`advance`.
    """
    now = max(now, state.as_of)
    changes: list[Change] = []
    for name in state.active():
        m = state.memberships[name]
        changes.append(
            Change(
                state.customer_id,
                name,
                EXITED,
                entry_id(state.customer_id, name, m.seq),
                defs.version,
                now,
                None,
                reason=reason,
                explanation=(
                    Explanation(
                        "merge", "merged_into", "==", None, None, None, True, survivor_id, None
                    ),
                )
                if survivor_id is not None
                else (),
                dwell_ms=now - (m.entered_at or now),
            )
        )
    if state.primary is not None:
        changes.append(
            Change(
                state.customer_id,
                state.primary,
                PRIMARY_CHANGED,
                "",
                defs.version,
                now,
                None,
                reason=reason,
                previous_primary=state.primary,
                seq=state.primary_seq + 1,
            )
        )
    return changes


def _step(
    state: CustomerState,
    now: int,
    defs: Definitions,
    thresholds: Thresholds,
    lookups: Lookups = NO_LOOKUPS,
) -> tuple[CustomerState, list[Change]]:
    cid = state.customer_id
    values = aged_values(state, now)
    if defs.lookups:
        with_lookups(values, defs, lookups)
    mems = dict(state.memberships)
    exits: list[Change] = []
    entries: list[Change] = []
    timers: list[int] = []
    re_engaged_at = state.re_engaged_at
    stale_for = now - state.as_of
    derived_ready = False
    for seg in defs.segments:
        if seg.derived and not derived_ready:
            derived_ready = True
            if re_engaged_at is not None:
                values["days_since_re_engaged"] = (now - re_engaged_at) / DAY
        m = mems.get(seg.name)
        if m is None:
            m = _NEW.get(seg.name)
            if m is None:
                m = _NEW[seg.name] = Membership(seg.name)
        if m.active:
            entered_at = m.entered_at if m.entered_at is not None else now
            if seg.ttl_ms is not None and stale_for >= seg.ttl_ms:
                exits.append(
                    _exit(
                        cid,
                        seg,
                        m,
                        now,
                        defs,
                        EXITED,
                        "ttl",
                        (
                            Explanation(
                                "ttl",
                                "days_since_update",
                                ">=",
                                stale_for / DAY,
                                seg.ttl_ms / DAY,
                                (stale_for - seg.ttl_ms) / DAY,
                                True,
                            ),
                        ),
                    )
                )
                m = mems[seg.name] = Membership(seg.name, False, m.seq, m.entered_at, now, None)
                # falls through: re-entry is checked as for any non-member (needs a new score)
            else:
                leaving = (
                    seg.exit._fn(values, thresholds)
                    if seg.exit is not None
                    else not seg.enter._fn(values, thresholds)
                )
                if not leaving or now <= entered_at or now - entered_at < seg.min_dwell_ms:
                    if leaving:
                        timers.append(max(entered_at + seg.min_dwell_ms, entered_at + 1))
                    if seg.ttl_ms is not None:
                        timers.append(state.as_of + seg.ttl_ms)
                    continue
                rule = seg.exit if seg.exit is not None else seg.enter
                why = rule.explain(values, thresholds)
                transition, reason = EXITED, "condition"
                if (
                    seg.re_engaged_when is not None
                    and now - entered_at >= seg.re_engaged_after_ms
                    and seg.re_engaged_when.test(values, thresholds)
                ):
                    transition, reason = RE_ENGAGED, "re_engaged"
                    why = why + seg.re_engaged_when.explain(values, thresholds)
                    re_engaged_at = now
                exits.append(_exit(cid, seg, m, now, defs, transition, reason, tuple(why)))
                m = mems[seg.name] = Membership(seg.name, False, m.seq, m.entered_at, now, None)
                # falls through: if the customer still qualifies, the cooldown's end (and a
                # ``sustain``'s) is a timer, so re-entry does not wait for the next score
        # not a member
        if seg.ttl_ms is not None and stale_for >= seg.ttl_ms:
            if m.pending_since is not None:
                mems[seg.name] = Membership(seg.name, False, m.seq, m.entered_at, m.exited_at)
            continue  # no entry on stale data
        # A customer qualifies when enter holds and the exit rule does not: one the exit rule
        # would remove (e.g. churned) is not entered only to leave after the minimum dwell.
        if not seg.enter._fn(values, thresholds) or (
            seg.exit is not None and seg.exit._fn(values, thresholds)
        ):
            if m.pending_since is not None:
                mems[seg.name] = Membership(seg.name, False, m.seq, m.entered_at, m.exited_at)
            continue
        pending: int | None = m.pending_since
        if not seg.sustain_ms:
            pending = None  # only ``sustain`` needs to know since when enter has held
        elif pending is None:
            pending = now
            if seg.sustain_since is not None:  # dated back to the event the recency measures
                since = values.get(seg.sustain_since)
                if isinstance(since, float) and since > 0:
                    pending = now - min(int(since * DAY), seg.sustain_ms)
        ready = True
        if pending is not None and now - pending < seg.sustain_ms:
            timers.append(pending + seg.sustain_ms)
            ready = False
        if m.exited_at is not None:
            open_at = max(m.exited_at + seg.cooldown_ms, m.exited_at + 1)
            if now < open_at:
                timers.append(open_at)
                ready = False
        if not ready:
            if pending != m.pending_since:
                mems[seg.name] = Membership(
                    seg.name, False, m.seq, m.entered_at, m.exited_at, pending
                )
            continue
        seq = m.seq + 1
        weighted = first_weighted(seg.enter)
        entries.append(
            Change(
                cid,
                seg.name,
                ENTERED,
                entry_id(cid, seg.name, seq),
                defs.version,
                now,
                None,
                reason="condition",
                score=weighted.score(values, thresholds) if weighted is not None else None,
                explanation=tuple(seg.enter.explain(values, thresholds)),
            )
        )
        mems[seg.name] = Membership(seg.name, True, seq, now, m.exited_at, None)
        if seg.ttl_ms is not None:
            timers.append(state.as_of + seg.ttl_ms)
    if re_engaged_at is not None and not derived_ready:
        values["days_since_re_engaged"] = (now - re_engaged_at) / DAY
    _crossings(defs, values, now, thresholds, timers)
    # Segments no longer defined: their memberships end (the history stays, so entry ids
    # never repeat if the segment comes back).
    for name, m in list(mems.items()):
        if m.active and name not in defs.by_name:
            exits.append(
                Change(
                    cid,
                    name,
                    EXITED,
                    entry_id(cid, name, m.seq),
                    defs.version,
                    now,
                    None,
                    reason="removed",
                    dwell_ms=now - (m.entered_at or now),
                )
            )
            mems[name] = replace(m, active=False, exited_at=now, pending_since=None)
    primary = _primary(mems, defs)
    primary_seq = state.primary_seq
    changes = exits + entries
    if primary != state.primary:
        primary_seq += 1
        prim_entry = entry_id(cid, primary, mems[primary].seq) if primary is not None else ""
        changes.append(
            Change(
                cid,
                primary or (state.primary or ""),
                PRIMARY_CHANGED,
                prim_entry,
                defs.version,
                now,
                None,
                reason="priority",
                previous_primary=state.primary,
                seq=primary_seq,
            )
        )
    if changes:
        changes = [_with_primary(c, primary) for c in changes]
    future = [t for t in timers if t > now]
    new_state = CustomerState(
        state.customer_id,
        state.as_of,
        state.values,
        mems,
        primary,
        primary_seq,
        re_engaged_at,
        min(future) if future else None,
    )
    return new_state, changes


def only_timer_moved(old: CustomerState, new: CustomerState) -> bool:
    """Whether ``new`` differs from ``old`` in its next timer alone (nothing to persist).

    >>> s = CustomerState("c", 0, {"x": 1.0}, {"A": Membership("A", True, 1, 0)}, "A", 1)
    >>> only_timer_moved(s, replace(s, next_timer=5)), only_timer_moved(s, replace(s, as_of=1))
    (True, False)
    """
    return (
        old.as_of == new.as_of
        and old.values == new.values
        and old.primary == new.primary
        and old.primary_seq == new.primary_seq
        and old.re_engaged_at == new.re_engaged_at
        and old.memberships == new.memberships
    )


def fire_timer(
    st: CustomerState,
    due: int,
    defs: Definitions,
    thresholds: Thresholds = EMPTY,
    lookups: Lookups = NO_LOOKUPS,
) -> tuple[CustomerState, list[Change], bool]:
    """A customer's timer firing at event time ``due``: ``(new state, changes, persist)``.

    A timer that changes nothing is cleared so it does not fire again. ``persist`` is False
    when only the next timer moved: the shell keeps the new state in memory without writing
    it (after a restore the stored, earlier timer fires again, evaluates the same stored state
    to the same nothing and finds this next timer; most recency crossings change nothing for
    most customers)."""
    new, changes = advance(st, due, defs, thresholds, lookups)
    if new == st:
        new = replace(st, next_timer=None)
    if not changes and only_timer_moved(st, new):
        return new, [], False
    return new, changes, True


def _with_primary(c: Change, primary: str | None) -> Change:
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


def _exit(
    cid: str,
    seg: Segment,
    m: Membership,
    now: int,
    defs: Definitions,
    transition: str,
    reason: str,
    why: tuple[Explanation, ...],
) -> Change:
    return Change(
        cid,
        seg.name,
        transition,
        entry_id(cid, seg.name, m.seq),
        defs.version,
        now,
        None,
        reason=reason,
        explanation=why,
        dwell_ms=now - (m.entered_at if m.entered_at is not None else now),
    )


def _primary(mems: Mapping[str, Membership], defs: Definitions) -> str | None:
    """Highest priority wins; ties go to the alphabetically first name (deterministic)."""
    best: tuple[int, str] | None = None
    for name, m in mems.items():
        seg = defs.by_name.get(name)
        if m.active and seg is not None:
            key = (-seg.priority, name)
            if best is None or key < best:
                best = key
    return best[1] if best is not None else None


def _crossings(
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


def explain_customer(
    state: CustomerState,
    now: int,
    defs: Definitions,
    thresholds: Thresholds = EMPTY,
    lookups: Lookups = NO_LOOKUPS,
) -> list[dict[str, Any]]:
    """Why a customer is (or is not) in each segment right now, for ``segflow explain``.

    >>> from services.segmenter.dsl import parse
    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: x, op: ">", value: 1}}\\n')
    >>> s, _ = evaluate(None, Score("c", 0, {"x": 3.0}), defs)
    >>> out = explain_customer(s, 0, defs)
    >>> out[0]["segment"], out[0]["member"], out[0]["primary"], out[0]["conditions"][0]["margin"]
    ('A', True, True, 2.0)

    A customer who meets ``enter`` but whom the exit rule would remove is not a member; the
    exit conditions that hold it out are listed too:

    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: x, op: ">", value: 1},\\n'
    ...              '     exit: {feature: stage, op: "==", value: churned}}\\n')
    >>> s, _ = evaluate(None, Score("c", 0, {"x": 3.0, "stage": "churned"}), defs)
    >>> out = explain_customer(s, 0, defs)[0]
    >>> out["member"], out["rule"], [c["feature"] for c in out["conditions"]]
    (False, 'enter, held out by the exit rule', ['x', 'stage'])
    """
    values = aged_values(state, now)
    if defs.lookups:
        with_lookups(values, defs, lookups)
    out: list[dict[str, Any]] = []
    for seg in defs.segments:
        m = state.memberships.get(seg.name) or Membership(seg.name)
        rule: Rule = seg.enter if not m.active or seg.exit is None else seg.exit
        kind = "exit" if m.active and seg.exit is not None else "enter"
        conditions = [e.__dict__ for e in rule.explain(values, thresholds)]
        if (
            not m.active
            and seg.exit is not None
            and seg.enter.test(values, thresholds)
            and seg.exit.test(values, thresholds)
        ):  # qualifies but the exit rule would remove it: show what holds it out
            kind = "enter, held out by the exit rule"
            conditions += [e.__dict__ for e in seg.exit.explain(values, thresholds) if e.passed]
        out.append(
            {
                "segment": seg.name,
                "member": m.active,
                "primary": state.primary == seg.name,
                "entry_id": entry_id(state.customer_id, seg.name, m.seq) if m.active else None,
                "entered_at": m.entered_at if m.active else None,
                "rule": kind,
                "conditions": conditions,
            }
        )
    return out


# -- segment-level lifecycle ---------------------------------------------------------------
@dataclass(frozen=True)
class SegmentStatus:
    """When a segment last gained a member, and whether it is deprecated."""

    segment: str
    first_seen: int
    last_entry_at: int | None = None
    deprecated: bool = False
    deprecations: int = 0


def track_statuses(
    statuses: Mapping[str, SegmentStatus], changes: Iterable[Change], defs: Definitions
) -> tuple[dict[str, SegmentStatus], list[Change]]:
    """Record entries; an entry into a deprecated segment reactivates it.

    >>> from services.segmenter.dsl import parse
    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: x, op: ">", value: 1}}\\n')
    >>> st = {"A": SegmentStatus("A", 0, 0, deprecated=True, deprecations=1)}
    >>> _, out = track_statuses(st, [Change("c", "A", ENTERED, "c|A|1", "v", 5, "A")], defs)
    >>> [(c.transition, c.customer_id, c.change_id) for c in out]
    [('reactivated', 'c', 'A|deprecation|1|reactivated')]
    """
    new = dict(statuses)
    out: list[Change] = []
    for c in changes:
        if c.transition != ENTERED:
            continue
        st = new.get(c.segment) or SegmentStatus(c.segment, c.occurred_at)
        if st.deprecated:
            idle = (c.occurred_at - (st.last_entry_at or st.first_seen)) / DAY
            out.append(
                Change(
                    c.customer_id,
                    c.segment,
                    REACTIVATED,
                    f"{c.segment}|deprecation|{st.deprecations}",
                    defs.version,
                    c.occurred_at,
                    c.primary_segment,
                    reason="qualified",
                    explanation=(
                        Explanation(
                            "deprecation",
                            "days_since_last_entry",
                            ">=",
                            idle,
                            defs.deprecate_after_ms / DAY,
                            None,
                            True,
                        ),
                    ),
                )
            )
        new[c.segment] = replace(
            st, last_entry_at=max(c.occurred_at, st.last_entry_at or 0), deprecated=False
        )
    return new, out


def expire(
    statuses: Mapping[str, SegmentStatus], now: int, defs: Definitions
) -> tuple[dict[str, SegmentStatus], list[Change]]:
    """Segments with no entry for ``deprecate_after`` (event time) become ``deprecated``.

    >>> from services.segmenter.dsl import parse
    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: x, op: ">", value: 1}}\\n')
    >>> st, out = expire({}, 0, defs)           # first seen now
    >>> expire(st, 89 * DAY, defs)[1]
    []
    >>> st, out = expire(st, 90 * DAY, defs)
    >>> [(c.segment, c.transition, c.customer_id) for c in out], expire(st, 200 * DAY, defs)[1]
    ([('A', 'deprecated', '')], [])
    """
    new = dict(statuses)
    out: list[Change] = []
    for seg in defs.segments:
        st = new.get(seg.name)
        if st is None:
            new[seg.name] = SegmentStatus(seg.name, now)
            continue
        last = st.last_entry_at if st.last_entry_at is not None else st.first_seen
        if not st.deprecated and now - last >= defs.deprecate_after_ms:
            n = st.deprecations + 1
            out.append(
                Change(
                    "",
                    seg.name,
                    DEPRECATED,
                    f"{seg.name}|deprecation|{n}",
                    defs.version,
                    now,
                    None,
                    reason="inactive",
                    explanation=(
                        Explanation(
                            "deprecation",
                            "days_since_last_entry",
                            ">=",
                            (now - last) / DAY,
                            defs.deprecate_after_ms / DAY,
                            (now - last - defs.deprecate_after_ms) / DAY,
                            True,
                        ),
                    ),
                )
            )
            new[seg.name] = replace(st, deprecated=True, deprecations=n)
    return new, out


def next_deprecation(statuses: Mapping[str, SegmentStatus], defs: Definitions) -> int | None:
    """The earliest event time at which :func:`expire` would deprecate a segment."""
    due = [
        (st.last_entry_at if st.last_entry_at is not None else st.first_seen)
        + defs.deprecate_after_ms
        for st in statuses.values()
        if not st.deprecated and st.segment in defs.by_name
    ]
    return min(due) if due else None


# -- dynamic thresholds ---------------------------------------------------------------------
def percentile_thresholds(
    defs: Definitions, population: Mapping[str, Column | Iterable[float]]
) -> dict[tuple[str, float], float]:
    """Nearest-rank percentiles of each feature used as ``pNN`` over the current population:
    :class:`~services.segmenter.quantiles.Column` s (the service) or plain values (replay and
    tests), found by selection, not by sorting.

    >>> from services.segmenter.dsl import parse
    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: clv, op: ">=", value: p80}}\\n')
    >>> percentile_thresholds(defs, {"clv": [float(i) for i in range(1, 101)]})
    {('clv', 80.0): 80.0}
    """
    out: dict[tuple[str, float], float] = {}
    for feature, pct in defs.percentiles:
        column = population.get(feature, ())
        if isinstance(column, Column):
            value = column.nearest_rank(pct)
        else:
            value = nearest_rank((v for v in column if not math.isnan(v)), pct)
        if value is not None:
            out[(feature, pct)] = value
    return out


def rank_of(sorted_values: list[float], value: float) -> float:
    """Percentile rank of ``value`` in ``sorted_values`` (for explanations and tests)."""
    if not sorted_values:
        return 0.0
    return 100.0 * bisect.bisect_right(sorted_values, value) / len(sorted_values)


# -- state records (the changelog's Avro shape) ---------------------------------------------
def state_to_record(state: CustomerState) -> dict[str, Any]:
    """CustomerState → SegmenterStateEntry record (kind ``customer``)."""
    return {
        "kind": "customer",
        "customer": {
            "customer_id": state.customer_id,
            "as_of": state.as_of,
            "numbers": {k: v for k, v in state.values.items() if isinstance(v, float)},
            "texts": {k: v for k, v in state.values.items() if isinstance(v, str)},
            "memberships": [
                {
                    "segment": m.segment,
                    "active": m.active,
                    "seq": m.seq,
                    "entered_at": m.entered_at,
                    "exited_at": m.exited_at,
                    "pending_since": m.pending_since,
                }
                for m in state.memberships.values()
            ],
            "primary": state.primary,
            "primary_seq": state.primary_seq,
            "re_engaged_at": state.re_engaged_at,
            "next_timer": state.next_timer,
        },
        "segment": None,
    }


def state_from_record(record: Mapping[str, Any]) -> CustomerState:
    """SegmenterStateEntry record (kind ``customer``) → CustomerState.

    >>> s = CustomerState("c", 5, {"x": 1.0, "lifecycle_stage": "loyal"},
    ...                   {"A": Membership("A", True, 1, 5)}, "A", 1)
    >>> state_from_record(state_to_record(s)) == s
    True
    """
    c = record["customer"]
    values: dict[str, Value] = dict(c["numbers"])
    values.update(c["texts"])
    return CustomerState(
        customer_id=c["customer_id"],
        as_of=c["as_of"],
        values=values,
        memberships={
            m["segment"]: Membership(
                m["segment"],
                m["active"],
                m["seq"],
                m["entered_at"],
                m["exited_at"],
                m["pending_since"],
            )
            for m in c["memberships"]
        },
        primary=c["primary"],
        primary_seq=c["primary_seq"],
        re_engaged_at=c["re_engaged_at"],
        next_timer=c["next_timer"],
    )


def status_to_record(st: SegmentStatus) -> dict[str, Any]:
    return {
        "kind": "segment",
        "customer": None,
        "segment": {
            "segment": st.segment,
            "first_seen": st.first_seen,
            "last_entry_at": st.last_entry_at,
            "deprecated": st.deprecated,
            "deprecations": st.deprecations,
        },
    }


def status_from_record(record: Mapping[str, Any]) -> SegmentStatus:
    """SegmenterStateEntry record (kind ``segment``) → SegmentStatus.

    >>> status_from_record(status_to_record(SegmentStatus("A", 1, 2, True, 1)))
    SegmentStatus(segment='A', first_seen=1, last_entry_at=2, deprecated=True, deprecations=1)
    """
    s = record["segment"]
    return SegmentStatus(
        s["segment"], s["first_seen"], s["last_entry_at"], s["deprecated"], s["deprecations"]
    )


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


__all__ = [
    "Change",
    "Condition",
    "CustomerState",
    "Membership",
    "Score",
    "SegmentStatus",
    "Values",
    "absorb",
    "advance",
    "evaluate",
    "expire",
    "explain_customer",
    "next_deprecation",
    "track_statuses",
    "percentile_thresholds",
]
