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

from collections.abc import Mapping
from dataclasses import replace

from services.segmenter.dsl import (
    ATTR_PREFIX,
    DAY,
    NO_LOOKUPS,
    Condition,
    Definitions,
    Explanation,
    Lookups,
    Segment,
    Thresholds,
    Value,
    Values,
    first_weighted,
)
from services.segmenter.explain import explain_customer  # noqa: F401  (re-exported)
from services.segmenter.model import (  # noqa: F401  (re-exported)
    DEPRECATED,
    EMPTY,
    ENTERED,
    EXITED,
    PRIMARY_CHANGED,
    RE_ENGAGED,
    REACTIVATED,
    TRANSITIONS,
    UNSCORED,
    Change,
    CustomerState,
    Membership,
    Score,
    aged_values,
    crossings,
    entry_id,
    primary_of,
    with_lookups,
    with_primary,
)
from services.segmenter.population import percentile_thresholds, rank_of  # noqa: F401
from services.segmenter.records import state_from_record, state_to_record  # noqa: F401
from services.segmenter.statuses import (  # noqa: F401  (re-exported)
    SegmentStatus,
    expire,
    next_deprecation,
    status_from_record,
    status_to_record,
    track_statuses,
)

#: Timers of one customer fired before a new score that comes after them (a bound: each firing
#: moves the next timer forward, so a handful is the most seen).
MAX_TIMERS_BEFORE_SCORE = 64
_NEW: dict[str, Membership] = {}  # not a member yet (immutable, shared)


# -- evaluation ---------------------------------------------------------------------------
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
    fired: list[Change] = []  # timers due before the score fire first (see _fire_due)
    if state is not None:
        state, fired = _fire_due(state, score.as_of, defs, thresholds, lookups)
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
    changed, a percentile refresh): re-evaluate; timers due before ``now`` fire first (a
    refresh's re-evaluation at the watermark came before the tick fired earlier crossings)."""
    if not state.scored:
        return state, []
    state, fired = _fire_due(state, now, defs, thresholds, lookups)
    state, changes = _step(state, max(now, state.as_of), defs, thresholds, lookups)
    return state, fired + changes if fired else changes


def _fire_due(
    state: CustomerState,
    now: int,
    defs: Definitions,
    thresholds: Thresholds,
    lookups: Lookups,
) -> tuple[CustomerState, list[Change]]:
    """Fire the customer's timers due before ``now``, each at its own instant with the values
    it was set for: when a score or a re-evaluation reaches the customer before the tick fired
    them (the partition's watermark passes them with that very record), a crossing still
    happens when due, not up to a day later (issue #17's oracle), and dwell, cooldown and
    ``re_engaged_after`` are measured from there."""
    fired: list[Change] = []
    for _ in range(MAX_TIMERS_BEFORE_SCORE):
        if state.next_timer is None or state.next_timer >= now:
            break
        state, changes, _persist = fire_timer(state, state.next_timer, defs, thresholds, lookups)
        fired += changes
    return state, fired


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
    crossings(defs, values, now, thresholds, timers)
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
    primary = primary_of(mems, defs)
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
        changes = [with_primary(c, primary) for c in changes]
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
    "ENTERED",
    "EXITED",
    "RE_ENGAGED",
    "state_from_record",
    "state_to_record",
    "status_from_record",
    "status_to_record",
]
