"""The segment oracle, event by event (issue #17).

The twice-a-day oracle (``oracle_rules.oracle_memberships``) cannot see a stay that begins and
ends between two samples, nor a dwell measured from an intra-day instant. This one steps each
customer id's state machine at every instant at which its membership can change, derived
independently:

* each score of the id (its time, ``as_of``, and its model outputs are read from the scores;
  every other feature the rules read is recomputed *at that instant* from the raw events that
  occurred by then — :func:`point_features`, point queries on the sorted events);
* between scores, the documented semantics: the latest score's values with recencies
  (``days_since_*``) aged; the oracle derives its own timers from them — the instant each
  recency crosses a bound a rule compares it with, the end of ``min_dwell``, ``cooldown``,
  ``sustain`` and ``ttl``;
* each new ``pNN`` table of the id's partition (``oracle_grid.py``: the partition's own
  event-time grid, over its ids' latest scores) for the ids whose value lies between the old
  and the new threshold (nobody else's rule can change there);
* a merge: the absorbed id leaves every segment at the merge's instant.

It imports nothing from ``services``; the rules are read from the YAML here. Output: each
id's stays per segment ``[(entered, exited)]`` (exited ``inf`` when open), the ``re_engaged``
exits, and per score the features that differ from the published ones (for attribution).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from oracle_features import (
    DAY,
    FROM_SCORES,
)
from oracle_grid import grid_refreshes, partition_of
from oracle_point import point_features  # also importable from here
from oracle_rules import (  # noqa: F401
    Compiled,
    Segment,
    compile_rule,
    compile_segments,
    live_id_rows,
)


# -- one id's state machine ----------------------------------------------------------------
@dataclass
class Mem:
    active: bool = False
    entered_at: int | None = None
    exited_at: int | None = None
    pending: int | None = None


@dataclass
class IdState:
    as_of: int | None = None
    base: dict[str, Any] = field(default_factory=dict)
    mems: dict[str, Mem] = field(default_factory=dict)
    re_engaged_at: int | None = None
    stays: dict[str, list[list[float]]] = field(default_factory=lambda: defaultdict(list))
    re_exits: list[tuple[int, str]] = field(default_factory=list)


def step(
    st: IdState,
    now: int,
    segs: list[Compiled],
    bounds: list[tuple[str, float]],
    thresholds: dict[tuple[str, float], float],
) -> int | None:
    """Evaluate every segment at ``now`` (the README's lifecycle); returns the next instant
    at which, with no new score, something can change (the oracle's own timer)."""
    assert st.as_of is not None
    values = dict(st.base)
    elapsed = (now - st.as_of) / DAY
    if elapsed > 0:
        for k, x in st.base.items():
            if k.startswith("days_since_") and isinstance(x, float):
                values[k] = x + elapsed
    stale = now - st.as_of
    timers: list[int] = []
    for cs in segs:
        name = cs.seg.name
        if st.re_engaged_at is not None:
            values["days_since_re_engaged"] = (now - st.re_engaged_at) / DAY
        m = st.mems.setdefault(name, Mem())
        if m.active:
            entered = m.entered_at if m.entered_at is not None else now
            if cs.ttl is not None and stale >= cs.ttl:
                st.stays[name][-1][1] = now
                m.active, m.exited_at = False, now
            else:
                leaving = (
                    cs.exit(values, thresholds)
                    if cs.exit is not None
                    else not cs.enter(values, thresholds)
                )
                if not leaving or now <= entered or now - entered < cs.dwell:
                    if leaving:
                        timers.append(max(entered + cs.dwell, entered + 1))
                    if cs.ttl is not None:
                        timers.append(st.as_of + cs.ttl)
                    continue
                st.stays[name][-1][1] = now
                if cs.rew is not None and now - entered >= cs.after and cs.rew(values, thresholds):
                    st.re_engaged_at = now
                    st.re_exits.append((now, name))
                m.active, m.exited_at, m.pending = False, now, None
        # not a member
        if cs.ttl is not None and stale >= cs.ttl:
            m.pending = None
            continue
        if not cs.enter(values, thresholds) or (
            cs.exit is not None and cs.exit(values, thresholds)
        ):
            m.pending = None
            continue
        ready = True
        if cs.sustain:
            if m.pending is None:
                m.pending = now
                if cs.seg.sustain_since is not None:
                    since = values.get(cs.seg.sustain_since)
                    if isinstance(since, float) and since > 0:
                        m.pending = now - min(int(since * DAY), cs.sustain)
            if now - m.pending < cs.sustain:
                timers.append(m.pending + cs.sustain)
                ready = False
        if m.exited_at is not None:
            open_at = max(m.exited_at + cs.cooldown, m.exited_at + 1)
            if now < open_at:
                timers.append(open_at)
                ready = False
        if not ready:
            continue
        m.active, m.entered_at, m.pending = True, now, None
        st.stays[name].append([now, math.inf])
        if cs.ttl is not None:
            timers.append(st.as_of + cs.ttl)
    if st.re_engaged_at is not None:
        values["days_since_re_engaged"] = (now - st.re_engaged_at) / DAY
    for feat, bound in bounds:
        x = values.get(feat)
        if isinstance(x, float) and bound >= x:
            at = now + math.ceil((bound - x) * DAY)
            timers += [at, at + 1]
    future = [x for x in timers if x > now]
    return min(future) if future else None


def leave_all(st: IdState, now: int) -> None:
    for name, m in st.mems.items():
        if m.active:
            st.stays[name][-1][1] = now
            m.active, m.exited_at = False, now


@dataclass
class IdTimeline:
    """One customer id's inputs: its scores in emission order (as_of, values), each with the
    oracle's features at as_of; the instant it was merged away (or None)."""

    scores: list[tuple[int, int, dict[str, Any]]]  # (as_of, seq: its place in the input, values)
    merged_at: int | None


def run_id(
    tl: IdTimeline,
    segs: list[Compiled],
    bounds: list[tuple[str, float]],
    refreshes: list[tuple[int, int, dict[tuple[str, float], float]]],
    pct_keys: list[tuple[str, float]],
    end: int,
) -> IdState:
    """Step one id through its scores, its own timers and its partition's ``pNN`` tables
    (``refreshes``: (instant, seq, table)), in event time, up to ``end`` or its merge."""
    st = IdState()
    stop = tl.merged_at if tl.merged_at is not None else end
    r_times = [t for t, _, _ in refreshes]
    ri = 0
    current: dict[tuple[str, float], float] = {}
    timer: int | None = None
    si = 0
    scores = tl.scores
    while True:
        t_score = scores[si][0] if si < len(scores) else None
        t_ref = r_times[ri] if ri < len(r_times) else None
        # scores and tables in the partition's order (a score before the one that reached the
        # grid instant was taken in with the table before, one after it with the new table),
        # each at its own instant; the id's timers due before either fire first
        t_next = t_score
        if t_ref is not None and t_score is not None and t_score <= stop:
            if scores[si][1] < refreshes[ri][1]:
                t_ref = None
            else:
                t_next = None
        cands = [x for x in (t_next, t_ref, timer) if x is not None and x <= stop]
        if not cands:
            break
        now = min(cands)
        if t_ref is not None and now == t_ref:
            old = current
            current = refreshes[ri][2]
            ri += 1
            if st.as_of is None:
                continue
            # only an id whose value lies between an old and a new threshold can change here
            hit = False
            for key in pct_keys:
                a, b = old.get(key), current.get(key)
                if a == b:
                    continue
                x = st.base.get(key[0])
                if x is None or isinstance(x, str) or math.isnan(x):
                    continue
                if a is None or b is None or min(a, b) <= x <= max(a, b):
                    hit = True
                    break
            if hit:
                timer = step(st, max(now, st.as_of), segs, bounds, current)
            continue
        if timer is not None and now == timer and (t_next is None or timer < t_next):
            timer = step(st, now, segs, bounds, current)
            continue
        assert t_score is not None
        # a score (a timer due at the same instant is evaluated with it)
        as_of, _at, values = scores[si]
        si += 1
        if st.as_of is not None and as_of < st.as_of:
            continue  # older than the one held: ignored
        st.as_of, st.base = as_of, values
        timer = step(st, max(as_of, now), segs, bounds, current)
    if tl.merged_at is not None:
        leave_all(st, max(tl.merged_at, st.as_of or tl.merged_at))
    return st


def score_values(
    oracle: dict[str, float], score: dict[str, Any], features: set[str]
) -> dict[str, Any]:
    """The values the oracle evaluates at a score: its own features as a score publishes them
    (every feature with 4 decimals, recencies too: a crossing is then timed from the rounded
    value, within 4.3 s of the raw event's), the score's model outputs."""
    v: dict[str, Any] = {k: round(float(oracle[k]), 4) for k in features if k in oracle}
    for k in FROM_SCORES:
        if k in score:
            v[k] = score[k]
    return v


# -- the whole population ---------------------------------------------------------------------
@dataclass
class EventOracle:
    """The event-by-event oracle's result, per true customer (index into the final ids)."""

    stays: dict[tuple[int, str], list[tuple[float, float]]]  # (customer, segment) -> stays
    re_exits: dict[int, list[tuple[int, str]]]  # customer -> [(instant, feeding segment)]
    # customer -> [(as_of, emitted at, features that differ from the score's, why: "late" (an
    # event by as_of delivered after the score), "same millisecond" (one delivered in the
    # score's millisecond) or None)]
    mismatches: dict[int, list[tuple[int, int, tuple[str, ...], str | None]]]
    n_scores: int
    n_mismatched: int
    by_feature: dict[str, int]
    steps_seconds: float
    refreshes: list[tuple[int, int, dict[tuple[str, float], float]]]  # every partition's


def event_memberships(
    segments: list[Segment],
    raw: pd.DataFrame,
    run: dict[str, Any],
    final_index: dict[str, int],
    pct_keys: list[tuple[str, float]],
) -> EventOracle:
    """Every customer id stepped on its own (as the segmenter documents: before a merge the
    anonymous and the identified id each have their events, scores and segments; at the merge
    the absorbed id leaves every segment and the survivor holds the events of both)."""
    import time

    config, pipe = run["config"], run["pipe"]
    obs = pipe.obs
    survivor, merge_at = obs.survivor, pipe.merge_at
    merge_occ = getattr(pipe, "merge_occ", merge_at)
    raw = raw.assign(owner=raw["event_id"].map(obs.event_owner))

    # rows: (live id, [lo, hi) in harness clock between two merges of its customer) holding
    # the events of every id that resolves to it then
    owners = set(raw["owner"].dropna())
    rows, pairs = live_id_rows(owners, final_index, obs.final_id, survivor, merge_at)
    ev = raw.merge(pd.DataFrame(pairs, columns=["owner", "row"]), on="owner")
    ev = ev.drop(columns=["c"]).rename(columns={"row": "c"})
    rows_of: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for r, (live, lo, hi) in enumerate(rows):
        rows_of[live].append((lo, hi, r))

    # every score of every id, with the row that held the id's events when it was emitted
    q_row: list[int] = []
    q_t: list[int] = []
    q_ref: list[tuple[str, int]] = []
    for cid, lst in pipe.scores.items():
        if cid not in rows_of:
            continue
        for k, sc in enumerate(lst):
            at = sc.get("at", sc["as_of"])
            r = next((r for lo, hi, r in rows_of[cid] if lo <= at < hi), rows_of[cid][-1][2])
            q_row.append(r)
            q_t.append(int(sc["as_of"]))
            q_ref.append((cid, k))
    used = set().union(*(s.features for s in segments)) - set(FROM_SCORES)
    used = {
        k for k in used if not k.startswith(("attr.", "lookup.")) and k != "days_since_re_engaged"
    }
    pf = point_features(ev, np.array(q_row), np.array(q_t), frozenset(run["zips"]))
    cols = {k: pf[k] for k in sorted(used)}

    # late: an event of the row that occurred by the score but was delivered after it was
    # emitted (or dead-lettered)
    late_ev = ev[(ev["delivered_at"] > ev["occurred_at"]) | ev["event_id"].isin(pipe.dead)]
    late_of: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for r, o, dl, eid in zip(
        late_ev["c"],
        late_ev["occurred_at"],
        late_ev["delivered_at"],
        late_ev["event_id"],
        strict=True,
    ):
        late_of[int(r)].append((int(o), math.inf if eid in pipe.dead else float(dl)))

    # an event delivered in the very millisecond a score was emitted may have come after it
    same_ms = set(zip(ev["c"].astype(int), ev["delivered_at"].astype(int), strict=True))
    timelines: dict[str, IdTimeline] = {}
    mism: dict[int, list[tuple[int, int, tuple[str, ...], str | None]]] = defaultdict(list)
    by_feature: dict[str, int] = defaultdict(int)
    n_mis = 0
    for i, (cid, k) in enumerate(q_ref):
        sc = pipe.scores[cid][k]
        mine = {f: float(a[i]) for f, a in cols.items()}
        theirs = sc["values"]
        diffs = []
        for f, x in mine.items():
            y = theirs.get(f)
            if y is not None and abs(x - float(y)) > 1e-3 * max(1.0, abs(x)):
                diffs.append(f)
        tl = timelines.get(cid)
        if tl is None:
            tl = timelines[cid] = IdTimeline([], merge_occ.get(cid))
        tl.scores.append((int(sc["as_of"]), int(sc["seq"]), score_values(mine, theirs, set(mine))))
        if diffs:
            n_mis += 1
            for f in diffs:
                by_feature[f] += 1
            at = sc.get("at", sc["as_of"])
            late: str | None = None
            if any(
                o <= sc["as_of"] and dl > at and sc["as_of"] - o < 60 * DAY
                for o, dl in late_of[q_row[i]]
            ):
                late = "late"
            elif (q_row[i], int(at)) in same_ms:
                late = "same millisecond"
            mism[final_index[obs.final_id(cid)]].append(
                (int(sc["as_of"]), int(at), tuple(diffs), late)
            )

    # each partition's pNN tables on its event-time grid (oracle_grid.py)
    grids = grid_refreshes(pipe.scores, pipe.merge_seq, pipe.merge_time, pct_keys, pipe.refresh_ms)
    refreshes = sorted(r for refs in grids.values() for r in refs)  # for the attribution

    segs, bounds = compile_segments(segments)
    end = int(config.end_ms) + DAY
    stays: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    re_exits: dict[int, list[tuple[int, str]]] = defaultdict(list)
    started = time.perf_counter()
    for cid, tl in timelines.items():
        st = run_id(tl, segs, bounds, grids.get(partition_of(cid), []), pct_keys, end)
        c = final_index[obs.final_id(cid)]
        for name, spans in st.stays.items():
            stays[(c, name)] += [(b, e) for b, e in spans]
        re_exits[c] += st.re_exits
    return EventOracle(
        dict(stays),
        dict(re_exits),
        dict(mism),
        len(q_ref),
        n_mis,
        dict(by_feature),
        time.perf_counter() - started,
        refreshes,
    )


# -- whole membership intervals ---------------------------------------------------------------
def _union(spans: Any, end: float) -> list[tuple[float, float]]:
    """Stays united and clipped at ``end``."""
    out: list[list[float]] = []
    for b, e in sorted((b, min(e, end)) for b, e in spans if b < end):
        if out and b <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        elif e > b:
            out.append([b, e])
    return [(b, e) for b, e in out]


def _overlap_union(
    a: list[tuple[float, float]], b: list[tuple[float, float]]
) -> tuple[float, float]:
    """(time in both, time in either) of two sets of disjoint intervals."""
    inter = sum(max(0.0, min(e1, e2) - max(b1, b2)) for b1, e1 in a for b2, e2 in b)
    return inter, sum(e - b_ for b_, e in a) + sum(e - b_ for b_, e in b) - inter


def interval_agreement(
    eo: EventOracle,
    segments: list[Segment],
    closed_or_open: dict[tuple[int, str], list[tuple[float, float]]],
    moves: dict[tuple[int, str], list[int]],
    span_end: float,
) -> dict[str, tuple[float, int, int]]:
    """Whole membership intervals, to the millisecond, per segment: the share of member time
    (either side's) that only one side has, and how many transition instants both made (of
    those either made); ``closed_or_open``/``moves``: the segmenter's stays and transition
    instants per (customer, segment)."""
    intervals: dict[str, tuple[float, int, int]] = {}
    for s in segments:
        only = both = 0.0
        same = total_moves = 0
        keys = {c for (c, seg) in eo.stays if seg == s.name} | {
            c for (c, seg) in moves if seg == s.name
        }
        for c in keys:
            a_ = _union(eo.stays.get((c, s.name), ()), span_end)
            b_ = _union(closed_or_open.get((c, s.name), ()), span_end)
            o, u = _overlap_union(a_, b_)
            only += u - o
            both += u
            ta = {x for sp in a_ for x in sp if x < span_end}
            tb = {x for sp in b_ for x in sp if x < span_end}
            same += len(ta & tb)
            total_moves += len(ta | tb)
        intervals[s.name] = (only / both if both else 0.0, same, total_moves)
    return intervals
