"""What-if replay (pure): recorded history through two versions of the rules, and the difference.

History is a list of :class:`Item` — recorded scores (``segflow.scores``), identity merges and,
optionally, identified events (the dispatcher's outcomes and suppressions) — in event time.
:func:`run_segmenter` evaluates it with the segmenter's own core (timers, dwell, cooldowns,
percentile thresholds, deprecation) and :func:`run_dispatcher` feeds the resulting segment
changes and the events through the dispatcher's core on an event-time clock. Nothing is sent:
a step that would go out is settled at once as ``sent`` by a stand-in that never touches the
network, so caps, cooldowns and "no engagement since" rules see it as the live system would.
:func:`compare` puts two runs side by side.

>>> from services.segmenter.dsl import parse
>>> from services.dispatcher.playbooks import Book
>>> rule = ('version: {v}\\nsegments:\\n'
...         '  - {{name: Big, enter: {{feature: clv, op: ">=", value: {t}}}}}\\n')
>>> old, new = parse(rule.format(v=1, t=500)), parse(rule.format(v=2, t=400))
>>> history = [score_item({"customer_id": "c1", "as_of": 0, "clv": 450.0}),
...            score_item({"customer_id": "c2", "as_of": 0, "clv": 600.0})]
>>> diff = compare(replay(history, old, Book(())), replay(history, new, Book(())))
>>> diff["segments"]["Big"]["final_size"], diff["segments"]["Big"]["would_enter"]
({'old': 1, 'new': 2, 'delta': 1}, ['c1'])
"""

from __future__ import annotations

import heapq
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from services.dispatcher import core as dcore
from services.dispatcher import observing as dobserving
from services.dispatcher.playbooks import Book, Playbook
from services.segmenter import core as segmenting
from services.segmenter.dsl import Definitions
from services.segmenter.population import crossed

HOUR = 3_600_000
SCORE = "score"
MERGE = "merge"
EVENT = "event"
KINDS = (SCORE, MERGE, EVENT)
#: At equal event times: merges first, then events (the dispatcher sees an event before the
#: segment change it causes further down the pipeline), then scores.
_ORDER = {MERGE: 0, EVENT: 1, SCORE: 2}
REPLAY_ENDPOINT = "replay (not sent)"
#: Entry-time differences below this are float rounding of timer instants, not a change.
SHIFT_MS = 1000


# -- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One recorded record: a ``CustomerScore``, an ``IdentityMerge`` or an ``IdentifiedEvent``."""

    at: int  # event time (ms): as_of, occurred_at, event.occurred_at
    kind: str
    record: Mapping[str, Any]


def score_item(record: Mapping[str, Any]) -> Item:
    return Item(int(record["as_of"]), SCORE, record)


def merge_item(record: Mapping[str, Any]) -> Item:
    return Item(int(record["occurred_at"]), MERGE, record)


def event_item(record: Mapping[str, Any]) -> Item:
    return Item(int(record["event"]["occurred_at"]), EVENT, record)


def item_of(record: Mapping[str, Any]) -> Item:
    """The item for a decoded record, recognised by its fields.

    >>> item_of({"customer_id": "c", "as_of": 5}).kind, item_of({"survivor_id": "a",
    ...     "absorbed_ids": ["b"], "occurred_at": 1}).kind
    ('score', 'merge')
    """
    if "survivor_id" in record:
        return merge_item(record)
    if isinstance(record.get("event"), Mapping):
        return event_item(record)
    if "as_of" in record and "customer_id" in record:
        return score_item(record)
    raise ValueError(
        "not a CustomerScore, IdentityMerge or IdentifiedEvent record "
        "(expected customer_id + as_of, survivor_id, or event)"
    )


def ordered(items: Iterable[Item]) -> list[Item]:
    """Event-time order; the recorded order breaks ties (stable)."""
    return sorted(items, key=lambda i: (i.at, _ORDER[i.kind]))


# -- the segmenter ----------------------------------------------------------------------------
@dataclass
class SegmenterRun:
    """What the segmenter would have emitted, and where every customer ended."""

    definitions: Definitions
    changes: list[segmenting.Change] = field(default_factory=list)
    states: dict[str, segmenting.CustomerState] = field(default_factory=dict)
    scores: int = 0
    merges: int = 0
    timers: int = 0
    end: int = 0


def partition_of(customer_id: str, partitions: int) -> int:
    """The scores partition of a customer id: librdkafka's default partitioner, CRC-32 of the
    key modulo the partition count (as ``segflow.runtime.state.partition_for``)."""
    return zlib.crc32(customer_id.encode()) % partitions if partitions > 1 else 0


def run_segmenter(
    items: Sequence[Item],
    defs: Definitions,
    threshold_refresh_ms: int = HOUR,
    partitions: int = 1,
) -> SegmenterRun:
    """Evaluate recorded scores and merges with ``defs``, the way the segmenter service does.

    Percentile thresholds as live: one table per scores partition (``partitions``, the
    scores topic's count; a customer is ranked among its partition's customers), computed when
    a record of the partition reaches the next instant of a grid every
    ``threshold_refresh_ms`` of the partition's event time, after its timers due before that
    instant fired with the old table; the customers between an old and a new threshold are
    re-evaluated at the instant (services/segmenter/README.md). Differences from the live
    service: records are read in event-time order (live: each partition in its own record
    order), and timers fire in event-time order before the next record at or after their due
    time (live: on the next tick after the batch that moved the watermark).
    """
    run = SegmenterRun(defs)
    states = run.states
    statuses: dict[str, segmenting.SegmentStatus] = {}
    timers: list[tuple[int, str]] = []
    features = [f for f, _ in defs.percentiles]
    #: per partition: feature -> customer -> value, and the table in force (grid instant, values)
    population: dict[int, dict[str, dict[str, float]]] = {}
    tables: dict[int, tuple[int, dict[tuple[str, float], float]]] = {}
    watermark: int | None = None

    def part(cid: str) -> int:
        return partition_of(cid, partitions)

    def thresholds_of(cid: str) -> Mapping[tuple[str, float], float]:
        table = tables.get(part(cid))
        return {} if table is None else table[1]

    def index(st: segmenting.CustomerState, remove: bool = False) -> None:
        if not features:
            return
        columns = population.setdefault(part(st.customer_id), {f: {} for f in features})
        for feature, column in columns.items():
            value = st.values.get(feature)
            if remove or not isinstance(value, float):
                column.pop(st.customer_id, None)
            else:
                column[st.customer_id] = value

    def emit(changes: list[segmenting.Change]) -> None:
        nonlocal statuses
        if not changes:
            return
        statuses, extra = segmenting.track_statuses(statuses, changes, defs)
        run.changes.extend(changes)
        run.changes.extend(extra)

    def apply(
        old: segmenting.CustomerState | None,
        new: segmenting.CustomerState,
        changes: list[segmenting.Change],
    ) -> None:
        states[new.customer_id] = new
        index(new)
        if new.next_timer is not None and (old is None or old.next_timer != new.next_timer):
            heapq.heappush(timers, (new.next_timer, new.customer_id))
        emit(changes)

    def fire(until: int, before: bool = False) -> None:
        """Timers due by ``until`` (``before``: due before it), each with its partition's table."""
        while timers and (timers[0][0] < until if before else timers[0][0] <= until):
            due, cid = heapq.heappop(timers)
            st = states.get(cid)
            if st is None or st.next_timer != due:
                continue  # superseded
            run.timers += 1
            new, changes, _persist = segmenting.fire_timer(st, due, defs, thresholds_of(cid))
            apply(st, new, changes)  # (a replay persists nothing either way)

    def grid(p: int, now: int) -> None:
        """Partition ``p``'s record of instant ``now`` reached its next grid instant: timers due
        before it fire with the old table, then the new one, then the crossed customers."""
        step = max(threshold_refresh_ms, 1)
        old = tables.get(p)
        if old is not None and now < old[0] + step:
            return
        instant = now - now % step if old is None else old[0] + step
        if old is not None:
            fire(instant, before=True)
        columns = population.get(p, {})
        values = segmenting.percentile_thresholds(
            defs, {f: column.values() for f, column in columns.items()}
        )
        tables[p] = (now - now % step, values)
        todo = {
            cid
            for feature, lo, hi in crossed({} if old is None else old[1], values)
            for cid, v in columns.get(feature, {}).items()
            if lo <= v <= hi
        }
        for cid in sorted(todo):
            st = states.get(cid)
            if st is not None:
                new, changes = segmenting.advance(st, max(instant, st.as_of), defs, values)
                if new != st:
                    apply(st, new, changes)

    def clock(now: int, cid: str) -> None:
        nonlocal statuses, watermark
        if features:
            grid(part(cid), now)
        fire(now)
        if watermark is None or now > watermark:
            watermark = now
            due = segmenting.next_deprecation(statuses, defs) if statuses else now
            if due is not None and now >= due:
                statuses, deprecations = segmenting.expire(statuses, now, defs)
                emit(deprecations)

    for item in items:
        if item.kind == EVENT:
            continue
        if item.kind == SCORE:
            run.scores += 1
            s = segmenting.Score.from_record(item.record)
            clock(item.at, s.customer_id)
            old = states.get(s.customer_id)
            new, changes = segmenting.evaluate(old, s, defs, thresholds_of(s.customer_id))
            if new != old:
                apply(old, new, changes)
        else:
            run.merges += 1
            survivor = str(item.record["survivor_id"])
            clock(item.at, survivor)
            _merge(item, states, defs, thresholds_of(survivor), index, apply, emit)
    if watermark is not None:
        fire(watermark)
        run.end = watermark
    return run


def _merge(
    item: Item,
    states: dict[str, segmenting.CustomerState],
    defs: Definitions,
    thresholds: Mapping[tuple[str, float], float],
    index: Any,
    apply: Any,
    emit: Any,
) -> None:
    merge = item.record
    survivor = str(merge["survivor_id"])
    for absorbed in merge.get("absorbed_ids") or []:
        st = states.get(absorbed)
        if absorbed == survivor or st is None:
            continue
        emit(segmenting.absorb(st, survivor, item.at, defs))
        index(st, remove=True)
        del states[absorbed]
    st = states.get(survivor)
    if st is not None:
        new, changes = segmenting.advance(st, item.at, defs, thresholds)
        if new != st:
            apply(st, new, changes)


# -- the dispatcher ---------------------------------------------------------------------------
@dataclass
class DispatcherRun:
    """Every decision the dispatcher would have made (``results``) and what stayed pending."""

    book: Book
    results: list[dcore.Result] = field(default_factory=list)
    pending: list[dcore.Action] = field(default_factory=list)
    changes: int = 0
    events: int = 0
    end: int = 0


def run_dispatcher(
    changes: Sequence[segmenting.Change], items: Sequence[Item], book: Book, end: int | None = None
) -> DispatcherRun:
    """Segment changes and identified events through the dispatcher's core, on event time.

    The clock is the latest event time seen (the dispatcher's ``clock: event`` mode); due
    steps are promoted as it passes them; a step that passes the policy is settled ``sent``
    at once by a stand-in (:data:`REPLAY_ENDPOINT`), never by an adapter. ``end`` runs the
    clock on to that time after the last input (default: the last input's time).
    """
    run = DispatcherRun(book)
    customers: dict[str, dcore.Customer] = {}
    due: list[tuple[int, str]] = []
    now = 0
    inputs: list[tuple[int, int, int, Any]] = [
        (it.at, 0, i, it) for i, it in enumerate(items) if it.kind == EVENT
    ]
    inputs += [(c.occurred_at, 1, i, c) for i, c in enumerate(changes)]
    inputs.sort(key=lambda x: (x[0], x[1], x[2]))

    def keep(old: dcore.Customer | None, new: dcore.Customer, effects: list[dcore.Effect]) -> None:
        new, more = _deliver(new, now, book)
        if new is not old:
            customers[new.customer_id] = new
            nd = dcore.next_due(new)
            if nd is not None:
                heapq.heappush(due, (nd, new.customer_id))
        run.results.extend(e for e in [*effects, *more] if isinstance(e, dcore.Result))

    def promote(until: int) -> None:
        seen: set[str] = set()
        while due and due[0][0] <= until:
            _, cid = heapq.heappop(due)
            c = customers.get(cid)
            if c is None or cid in seen:
                continue
            seen.add(cid)
            new, effects = dcore.promote(c, until, book)
            if new is not c:
                new = dcore.prune(new, until, book)
            keep(c, new, effects)

    for at, kind, _, value in inputs:
        if at > now:
            now = at
        promote(now)
        if kind == 0:
            run.events += 1
            obs = dcore.Observation.from_record(value.record)
            old = customers.get(obs.customer_id)
            maybe, effects = dobserving.observe(old, obs, now, book)
            if maybe is not None:
                keep(old, maybe, effects)
        else:
            run.changes += 1
            change = dcore.SegmentChange.from_record(value.to_record(0))
            old = customers.get(change.customer_id)
            new, effects = dcore.decide(old, change, now, book)
            keep(old, new, effects)
    if end is not None and end > now:
        now = end
    promote(now)
    run.end = now
    run.pending = [a for c in customers.values() for a in c.actions if a.status == "scheduled"]
    return run


def _deliver(c: dcore.Customer, now: int, book: Book) -> tuple[dcore.Customer, list[dcore.Effect]]:
    """Settle every in-flight action as sent, without sending anything."""
    out: list[dcore.Effect] = []
    for a in dcore.in_flight(c):
        outcome = dcore.Outcome("sent", None, REPLAY_ENDPOINT, dispatched_at=now)
        c, effects = dcore.record_outcome(c, a.key, outcome, now, book)
        out += effects
    return c, out


# -- both, and the difference ---------------------------------------------------------------
@dataclass
class Replay:
    segmenter: SegmenterRun
    dispatcher: DispatcherRun


def replay(
    items: Iterable[Item],
    defs: Definitions,
    book: Book,
    threshold_refresh_ms: int = HOUR,
    segmenter: SegmenterRun | None = None,
    partitions: int = 1,
) -> Replay:
    """History through the segmenter and then the dispatcher (``segmenter``: reuse a run of
    the same definitions, when only the playbooks differ; ``partitions``: the scores topic's,
    one percentile table each)."""
    history = ordered(items)
    seg = (
        segmenter
        if segmenter is not None
        else run_segmenter(history, defs, threshold_refresh_ms, partitions)
    )
    return Replay(seg, run_dispatcher(seg.changes, history, book, end=seg.end))


@dataclass
class _Segment:
    entries: int = 0
    exits: int = 0
    re_engaged: int = 0
    ever: set[str] = field(default_factory=set)
    final: set[str] = field(default_factory=set)
    first: dict[str, int] = field(default_factory=dict)  # customer → first entry (event time)
    count: Counter[str] = field(default_factory=Counter)  # customer → entries


def _segments(run: SegmenterRun) -> dict[str, _Segment]:
    out: dict[str, _Segment] = {s.name: _Segment() for s in run.definitions.segments}
    for c in run.changes:
        if not c.customer_id:
            continue
        seg = out.setdefault(c.segment, _Segment())
        if c.transition == segmenting.ENTERED:
            seg.entries += 1
            seg.ever.add(c.customer_id)
            seg.first.setdefault(c.customer_id, c.occurred_at)
            seg.count[c.customer_id] += 1
        elif c.transition == segmenting.EXITED:
            seg.exits += 1
        elif c.transition == segmenting.RE_ENGAGED:
            seg.exits += 1
            seg.re_engaged += 1
    for st in run.states.values():
        for name in st.active():
            out.setdefault(name, _Segment()).final.add(st.customer_id)
    return out


def _actions(run: DispatcherRun) -> tuple[Counter[tuple[str, str, str]], dict[str, set[str]]]:
    """Counts per (playbook, channel, outcome) and who would be contacted per playbook."""
    counts: Counter[tuple[str, str, str]] = Counter()
    contacted: dict[str, set[str]] = {}
    for r in run.results:
        a = r.action
        if r.status == "scheduled":
            continue  # an interim decision; the final one is counted
        outcome = r.status if r.status != "suppressed" else f"suppressed:{r.reason}"
        counts[(a.playbook, a.channel, outcome)] += 1
        if r.status == "sent":
            contacted.setdefault(a.playbook, set()).add(a.customer_id)
    for a in run.pending:
        counts[(a.playbook, a.channel, "pending")] += 1
    return counts, contacted


def _pair(old: int, new: int) -> dict[str, int]:
    return {"old": old, "new": new, "delta": new - old}


def compare(old: Replay, new: Replay, show: int | None = None) -> dict[str, Any]:
    """The difference between two replays of the same history, as plain data (JSON-ready).

    Per segment: entries, exits (``re_engaged`` included), final size, customers who would
    enter (entered with the new rules, never with the old) and would no longer enter, and
    final members gained and lost. Per playbook × channel: outcome counts (``sent``,
    ``holdout``, ``failed``, ``suppressed:<reason>``, ``pending`` at the end) and customers
    who would be contacted or no longer contacted. Only what differs is listed; ``show``
    limits each customer list (the counts stay complete).
    """
    so, sn = _segments(old.segmenter), _segments(new.segmenter)
    segments: dict[str, Any] = {}
    for name in sorted(set(so) | set(sn)):
        a, b = so.get(name, _Segment()), sn.get(name, _Segment())
        row: dict[str, Any] = {
            "entries": _pair(a.entries, b.entries),
            "exits": _pair(a.exits, b.exits),
            "final_size": _pair(len(a.final), len(b.final)),
            "would_enter": sorted(b.ever - a.ever),
            "would_not_enter": sorted(a.ever - b.ever),
            "members_gained": sorted(b.final - a.final),
            "members_lost": sorted(a.final - b.final),
            "entered_more_often": sorted(c for c in a.ever & b.ever if b.count[c] > a.count[c]),
            "entered_less_often": sorted(c for c in a.ever & b.ever if b.count[c] < a.count[c]),
            "first_entry": _shifts(a.first, b.first),
        }
        shift = row["first_entry"]
        same = (a.entries, a.exits, a.final, a.count) == (b.entries, b.exits, b.final, b.count)
        if not same or shift["earlier"] or shift["later"]:
            segments[name] = _limit(row, show)
    co, contacted_o = _actions(old.dispatcher)
    cn, contacted_n = _actions(new.dispatcher)
    actions: list[dict[str, Any]] = []
    for key in sorted(set(co) | set(cn)):
        if co[key] != cn[key]:
            playbook, channel, outcome = key
            actions.append(
                {
                    "playbook": playbook,
                    "channel": channel,
                    "outcome": outcome,
                    **_pair(co[key], cn[key]),
                }
            )
    contacts: dict[str, Any] = {}
    for pb in sorted(set(contacted_o) | set(contacted_n)):
        a_set, b_set = contacted_o.get(pb, set()), contacted_n.get(pb, set())
        if a_set != b_set:
            contacts[pb] = _limit(
                {
                    "customers": _pair(len(a_set), len(b_set)),
                    "newly_contacted": sorted(b_set - a_set),
                    "no_longer_contacted": sorted(a_set - b_set),
                },
                show,
            )
    return {
        "history": {
            "scores": new.segmenter.scores,
            "merges": new.segmenter.merges,
            "events": new.dispatcher.events,
            "end": new.dispatcher.end,
        },
        "definitions": {
            "old": old.segmenter.definitions.version,
            "new": new.segmenter.definitions.version,
            **definition_changes(old.segmenter.definitions, new.segmenter.definitions),
        },
        "playbooks": playbook_changes(old.dispatcher.book, new.dispatcher.book),
        "totals": {
            "segment_changes": _pair(len(old.segmenter.changes), len(new.segmenter.changes)),
            "sent": _pair(
                sum(n for k, n in co.items() if k[2] == "sent"),
                sum(n for k, n in cn.items() if k[2] == "sent"),
            ),
        },
        "segments": segments,
        "actions": actions,
        "contacts": contacts,
        "identical": not segments and not actions and not contacts,
    }


def _shifts(old: Mapping[str, int], new: Mapping[str, int]) -> dict[str, Any]:
    """Customers who first enter under both versions: how many earlier or later with the new
    one (by at least :data:`SHIFT_MS`), and the median shift in hours (negative: earlier).

    >>> _shifts({"a": 0, "b": 0, "c": 0}, {"a": -2 * HOUR, "b": 0, "c": 5 * HOUR})
    {'earlier': 1, 'later': 1, 'median_shift_hours': 1.5}
    """
    moved = sorted(
        new[c] - old[c] for c in old.keys() & new.keys() if abs(new[c] - old[c]) >= SHIFT_MS
    )
    median = None
    if moved:
        mid = len(moved) // 2
        median = moved[mid] if len(moved) % 2 else (moved[mid - 1] + moved[mid]) / 2
        median = round(median / HOUR, 2)
    return {
        "earlier": sum(1 for d in moved if d < 0),
        "later": sum(1 for d in moved if d > 0),
        "median_shift_hours": median,
    }


def _limit(row: dict[str, Any], show: int | None) -> dict[str, Any]:
    if show is None:
        return row
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, list):
            out[k] = v[:show]
            out[f"{k}_count"] = len(v)
        else:
            out[k] = v
    return out


def definition_changes(old: Definitions, new: Definitions) -> dict[str, list[str]]:
    """Segments added, removed and changed (ignoring where they sit in the file).

    >>> from services.segmenter.dsl import parse
    >>> seg = '  - {name: %s, enter: {feature: x, op: ">", value: 1}}\\n'
    >>> a = parse('version: 1\\nsegments:\\n' + seg % "A")
    >>> b = parse('version: 1\\nsegments:\\n\\n' + seg % "A" + seg % "B")  # A moved down a line
    >>> definition_changes(a, b)
    {'added': ['B'], 'removed': [], 'changed': []}
    """
    a, b = old.by_name, new.by_name
    changed = [n for n in a if n in b and replace(a[n], line=0) != replace(b[n], line=0)]
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "changed": sorted(changed),
    }


def playbook_changes(old: Book, new: Book) -> dict[str, Any]:
    """Playbooks added, removed and changed, and whether the contact policy changed."""

    def norm(p: Playbook) -> Playbook:
        return replace(p, source="")

    a = {p.name: norm(p) for p in old.playbooks}
    b = {p.name: norm(p) for p in new.playbooks}
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "changed": sorted(n for n in a if n in b and a[n] != b[n]),
        "policy_changed": old.policy != new.policy,
    }


def overlay(current: Book, extra: Book, extra_has_policy: bool) -> Book:
    """``current`` with ``extra``'s playbooks replacing those of the same name (others added),
    and ``extra``'s policy if it has one."""
    names = {p.name for p in extra.playbooks}
    kept = tuple(p for p in current.playbooks if p.name not in names)
    return Book(kept + extra.playbooks, extra.policy if extra_has_policy else current.policy)


def unknown_segments(book: Book, defs: Definitions) -> list[str]:
    """Playbooks that react to a segment the definitions do not have (they can never start)."""
    return sorted(
        f"{p.name} -> {p.segment!r}" for p in book.playbooks if p.segment not in defs.by_name
    )


__all__ = [
    "DispatcherRun",
    "Item",
    "Replay",
    "SegmenterRun",
    "compare",
    "definition_changes",
    "event_item",
    "item_of",
    "merge_item",
    "ordered",
    "overlay",
    "playbook_changes",
    "replay",
    "run_dispatcher",
    "run_segmenter",
    "score_item",
    "unknown_segments",
]
