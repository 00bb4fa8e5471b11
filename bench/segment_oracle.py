"""An independent batch oracle for the default segments (issue #17).

The simulator's events go through identity, scorer and segmenter in one process (the harness,
``oracle_harness.py``: the service cores, no broker). Separately, from the *raw* delivered
events alone (deduplicated by ``event_id``; each customer id on its own until identity merges
it, as the segmenter documents — a customer, named by its final id, is a member when any of its
live ids is), the oracle recomputes every feature the default rules read (``oracle_features``:
daily; ``oracle_point``: at any instant), reads the YAML itself and steps its own state machine
(hysteresis, ``min_dwell``, ``cooldown``, ``sustain`` with ``sustain_since``, ``ttl``,
``re_engaged``). Model outputs (``churn_probability``, ``clv``, ``lifecycle_stage``) and the
score instants come from the emitted scores; percentiles are per scores partition, on its
event-time grid (``oracle_grid.py``). The oracle side imports nothing from ``services``.

``--mode events`` (default, ``oracle_events.py``): each id stepped at every score (features
recomputed at the score's instant), at its own timers (recency crossings, dwell, cooldown,
sustain, ttl), at its partition's new pNN tables and at merges; compared per customer-day at
the day's last millisecond ``t_d`` and as whole intervals. ``--mode samples`` (sessions 5–6,
``oracle_rules.py``): stepped at midnight and ``t_d`` only.

The segmenter's membership of a customer at ``t_d`` is the union over its ids of the stays the
emitted ``SegmentChange`` records open and close. Each disagreeing customer-day gets one
reason: ``late`` (an event by ``t_d`` delivered after it or dead-lettered; or, event by event,
one the score at the decisive instant — the latest transition only one side made — had not
received), ``input`` (a feature the rule reads differs), Re-engaged following a feeding
segment's disagreement or exit kind, ``percentile`` (thresholds on both sides of the value, or
a refresh near the decisive instant applied in processing order), ``follows an earlier
transition`` (dwell/cooldown carried from an earlier difference, with its reason),
``intra-day path`` (samples mode only), ``state`` for the rest.

    .venv/bin/python bench/segment_oracle.py                           # 300 x 84, seed 7
    .venv/bin/python bench/segment_oracle.py --customers 3000 --days 180
    .venv/bin/python bench/segment_oracle.py --examples 5              # print cases per class
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


from oracle_events import event_memberships, interval_agreement  # noqa: E402
from oracle_features import (  # noqa: E402
    DAY,
    FROM_SCORES,
    NEVER,
    last_time,
    oracle_features,
)
from oracle_harness import DEFAULT_DEFINITIONS, run_pipeline  # noqa: E402
from oracle_rules import (  # noqa: E402
    Segment,
    evaluate,
    live_id_memberships,
    load_segments,
    oracle_memberships,
    percentiles,
)

# the oracle's parts, importable from here as before the split (tests, notebooks)
__all__ = [
    "DAY",
    "IDENTITY",
    "NEVER",
    "Comparison",
    "Segment",
    "compare",
    "evaluate",
    "load_segments",
    "oracle_features",
    "oracle_memberships",
    "percentiles",
    "run_pipeline",
]

IDENTITY = "identity (events on >1 live id)"


@dataclass
class Comparison:
    days: int
    customer_days: int
    agree: dict[str, int]
    reasons: dict[str, Counter[str]]
    examples: dict[tuple[str, str], list[str]]
    oracle_days: dict[str, int]
    segmenter_days: dict[str, int]
    events: Any = None  # the event-by-event oracle's result (mode "events")
    # segment -> (share of member time on one side only, transitions at the same instant,
    # transitions in all), from whole intervals (mode "events")
    intervals: dict[str, tuple[float, int, int]] | None = None


def compare(
    run: dict[str, Any],
    n_examples: int = 0,
    group_by: str = "live-id",
    refresh: bool = True,
    mode: str = "events",
) -> Comparison:
    """Oracle vs segmenter per customer-day and segment. ``group_by``: ``final-id`` groups the
    raw events by the customer id the identity service finally gave them (after every merge:
    the segments are then judged on the customers segflow knows), ``truth`` by the simulator's
    true customer (identity stitching is judged too: a customer split over ids that are never
    merged disagrees wherever its ids' segments differ), ``live-id`` (default) as ``final-id``
    but every customer id evaluated on its own until it is merged, as the service does
    (:func:`live_id_memberships`). ``refresh`` (live-id only): ``pNN`` thresholds recomputed at
    each partition's event-time grid over its ids' latest scores, as documented, instead of
    at every instant over the oracle's values."""
    config, pipe, events = run["config"], run["pipe"], run["events"]
    obs = pipe.obs
    segments = load_segments(DEFAULT_DEFINITIONS)
    day0 = config.start_ms // DAY
    n_days = int((config.end_ms - config.start_ms) // DAY)
    ends = (np.arange(n_days) + day0 + 1) * DAY - 1

    # -- the oracle: raw events, deduplicated, by true customer ---------------------------
    raw = events.drop_duplicates("event_id").reset_index(drop=True)
    if group_by in ("final-id", "live-id"):
        final = {eid: obs.final_id(cid) for eid, cid in obs.event_owner.items()}
        raw["customer"] = raw["event_id"].map(final)
        raw = raw[raw["customer"].notna()].reset_index(drop=True)
    names = sorted(raw["customer"].unique())
    index = {c: i for i, c in enumerate(names)}
    raw["c"] = raw["customer"].map(index)
    n_cust = len(names)
    zips = frozenset(run["zips"])
    at_end = oracle_features(raw, n_cust, day0, n_days, zips)
    at_start = oracle_features(raw, n_cust, day0, n_days, zips, start=True)
    feats = {}  # [customer, instant]: midnight and end of each day
    for k, a in at_end.items():
        both = np.empty((n_cust, 2 * n_days))
        both[:, 0::2], both[:, 1::2] = at_start[k], a
        feats[k] = both
    first = raw.groupby("c")["occurred_at"].min().reindex(range(n_cust)).to_numpy()
    instants = np.empty(2 * n_days, dtype=np.int64)
    instants[0::2], instants[1::2] = ends + 1 - DAY, ends
    known2 = first[:, None] <= instants[None, :]
    known = known2[:, 1::2]

    # ids of each true customer (the identity service's view, only to read the segmenter)
    owner = obs.event_owner
    true_of_event = dict(zip(raw["event_id"], raw["c"], strict=True))
    ids_of: dict[int, Counter[str]] = defaultdict(Counter)
    for eid, cid in owner.items():
        c = true_of_event.get(eid)
        if c is not None:
            ids_of[c][cid] += 1
    id_true: dict[str, int] = {}
    for c, ctr in ids_of.items():
        for cid in ctr:
            if cid not in id_true or ids_of[id_true[cid]][cid] < ctr[cid]:
                id_true[cid] = c

    # model outputs and the segmenter's inputs: the latest score of any of the customer's ids
    score_rows = []
    for cid, lst in pipe.scores.items():
        c = id_true.get(obs.final_id(cid), id_true.get(cid))
        if c is None:
            continue
        for s in lst:
            score_rows.append((c, cid, s["as_of"], s["values"]))
    score_rows.sort(key=lambda r: r[2])
    last_score_day = np.full((n_cust, 2 * n_days), -np.inf)
    model = {k: np.full((n_cust, 2 * n_days), np.nan, dtype=object) for k in FROM_SCORES}
    seg_in: dict[tuple[int, int], tuple[int, dict[str, Any]]] = {}
    for c, _cid, as_of, values in score_rows:
        d = int(as_of // DAY) - day0
        if not 0 <= d < n_days:
            continue
        i = 2 * d + (as_of % DAY != 0)  # a midnight score is there at the midnight instant
        last_score_day[c, i] = max(last_score_day[c, i], (as_of - day0 * DAY) / DAY)
        for k in FROM_SCORES:
            if k in values:
                model[k][c, i] = values[k]
        seg_in[(c, d)] = (as_of, values)
    last_score_day = np.maximum.accumulate(last_score_day, axis=1)
    for k in FROM_SCORES:
        frame = pd.DataFrame(model[k]).ffill(axis=1).to_numpy()
        if k == "lifecycle_stage":
            feats[k] = np.where(pd.isna(frame), None, frame).astype(object)
        else:
            feats[k] = pd.DataFrame(frame).astype(float).to_numpy()
    # latest score per (customer, day), carried forward: the segmenter's inputs at t_d
    held: dict[int, list[tuple[int, dict[str, Any]] | None]] = {}
    for c in range(n_cust):
        row: list[tuple[int, dict[str, Any]] | None] = []
        cur = None
        for d in range(n_days):
            cur = seg_in.get((c, d), cur)
            row.append(cur)
        held[c] = row

    pct_days: list[dict[tuple[str, float], float]] = []
    re_log: list[tuple[int, float, str]] = []
    if group_by == "live-id":
        member2 = live_id_memberships(
            segments, raw, run, index, n_cust, instants, refresh, pct_days, re_log
        )
    else:
        member2 = oracle_memberships(segments, feats, known2, last_score_day, pct_days, re_log)
    oracle_re: dict[int, set[int]] = defaultdict(set)  # days with a re_engaged exit
    eo = None
    if mode == "events" and group_by == "live-id":
        # the event-by-event oracle: stays at every score, timer, refresh and merge instant
        pct_keys = list(percentiles(segments, {}, np.zeros(0, bool), True))
        eo = event_memberships(segments, raw, run, index, pct_keys)
        for name in list(member2):
            m = np.zeros((n_cust, n_days), dtype=bool)
            for (c, seg), spans in eo.stays.items():
                if seg != name:
                    continue
                for b, e in spans:
                    lo = int(np.searchsorted(ends, b, side="left"))
                    hi = int(np.searchsorted(ends, e, side="left")) if e != math.inf else n_days
                    m[c, lo:hi] = True
            member2[name] = np.repeat(m, 2, axis=1)  # only the day ends (odd columns) are read
        for c, lst in eo.re_exits.items():
            for now_ms, _seg in lst:
                oracle_re[c].add(int(now_ms // DAY - day0))
    else:
        for c, now, _seg in re_log:
            oracle_re[c].add(int(now - 1e-6))
    segm_re: dict[int, set[int]] = defaultdict(set)
    for ch in obs.changes:
        c = id_true.get(ch.get("customer_id") or "")
        if c is not None and ch["transition"] == "re_engaged":
            segm_re[c].add(int(ch["occurred_at"] // DAY - day0))
    member = {k: a[:, 1::2] for k, a in member2.items()}
    pct_all, feats_all = pct_days, feats
    feats = {k: a[:, 1::2] for k, a in feats.items()}
    refresh_at = [t for t, _ in pipe.thresholds]

    def seg_thresholds(t: int) -> dict[tuple[str, float], float]:  # any partition's, latest
        i = int(np.searchsorted(refresh_at, t, side="right")) - 1
        return pipe.thresholds[i][1] if i >= 0 else {}

    def between_thresholds(s: Segment, c: int, d: int, as_of: int) -> str | None:
        """A pNN condition whose thresholds (the oracle's and the segmenter's at the same
        instant, or the segmenter's at the customer's last score) lie on both sides of the
        customer's value, at t_d or at an instant of the 14 days before (hysteresis keeps
        what the threshold decided then: `clv >= p80` enters, only `< p70` leaves)."""
        for i in range(max(0, 2 * d - 28), 2 * d + 2):
            for (feat, p), mine in pct_all[i].items():
                if feat not in s.features:
                    continue
                x = feats_all[feat][c, i]
                for theirs in (
                    seg_thresholds(as_of).get((feat, p)),
                    seg_thresholds(int(instants[i])).get((feat, p)),
                ):
                    for m in np.atleast_1d(mine):  # per id (any partition's) in live-id mode
                        if theirs is not None and min(m, theirs) <= x <= max(m, theirs):
                            return f"{feat} p{p:g}"
        return None

    # -- the segmenter's memberships at t_d, united per true customer ---------------------
    seg_member = {s.name: np.zeros((n_cust, n_days), dtype=bool) for s in segments}
    stays: dict[tuple[str, str], list[list[float]]] = defaultdict(list)
    for ch in sorted(obs.changes, key=lambda ch: ch["occurred_at"]):
        if not ch.get("customer_id"):
            continue
        spans = stays[(ch["customer_id"], ch["segment"])]
        if ch["transition"] == "entered":
            spans.append([ch["occurred_at"], math.inf])
        elif ch["transition"] in ("exited", "re_engaged") and spans and spans[-1][1] == math.inf:
            spans[-1][1] = ch["occurred_at"]
    closed_or_open: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    moves: dict[tuple[int, str], list[int]] = defaultdict(list)  # transition times
    closed: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)  # stays
    for (cid, seg), spans in stays.items():
        c = id_true.get(cid)
        if c is None or seg not in seg_member:
            continue
        for b, e in spans:
            closed_or_open[(c, seg)].append((b, e))
            moves[(c, seg)] += [int(b)] + ([int(e)] if e != math.inf else [])
            if e != math.inf:
                closed[(c, seg)].append((b, e))
        for b, e in spans:
            # member at t_d when b <= t_d < e
            lo = int(np.searchsorted(ends, b, side="left"))
            hi = int(np.searchsorted(ends, e, side="left")) if e != math.inf else n_days
            seg_member[seg][c, lo:hi] = True

    # -- attribution ----------------------------------------------------------------------
    live_ids: dict[int, list[tuple[str, int, int]]] = defaultdict(list)  # (cid, first, merged)
    occ = dict(zip(raw["event_id"], raw["occurred_at"], strict=True))
    first_of_id: dict[tuple[int, str], int] = {}
    for eid, cid in owner.items():
        c = true_of_event.get(eid)
        if c is None:
            continue
        key = (c, cid)
        first_of_id[key] = min(first_of_id.get(key, 1 << 62), occ[eid])
    for (c, cid), t in first_of_id.items():
        live_ids[c].append((cid, t, pipe.merge_at.get(cid, 1 << 62)))
    late = raw[(raw["delivered_at"] > raw["occurred_at"]) | raw["event_id"].isin(pipe.dead)]
    late_rows = defaultdict(list)
    for c, o, dl, eid in zip(
        late["c"], late["occurred_at"], late["delivered_at"], late["event_id"], strict=True
    ):
        late_rows[c].append((o, 1 << 62 if eid in pipe.dead else dl))
    last_event = last_time(
        raw.assign(d=raw["occurred_at"] // DAY, t=raw["occurred_at"]), n_cust, n_days, day0
    )

    feeding = [s.name for s in segments if s.re_engaged_when is not None]

    def decisive(c: int, seg: str, t: int) -> int | None:
        """The latest transition at or before t that one side made and the other did not."""
        if eo is None:
            return None
        mine = {x for b, e in eo.stays.get((c, seg), ()) for x in (b, e) if x != math.inf}
        theirs = set(moves.get((c, seg), ()))
        cands = [x for x in mine ^ theirs if x <= t]
        return int(max(cands)) if cands else None

    scores_of: dict[int, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for c_, _cid, as_of_, values_ in score_rows:
        scores_of[c_].append((as_of_, values_))

    def refresh_near(c: int, s: Segment, t: int) -> str | None:
        """A percentile refresh within a day of the decisive instant moved a threshold the
        segment reads across the customer's value: the service applies a refresh in processing
        order (a timer due before the refresh's watermark but fired after the refresh reads
        the new threshold), the oracle at the watermark."""
        assert eo is not None
        tau = decisive(c, s.name, t)
        if tau is None:
            return None
        held_ = [v for a_, v in scores_of.get(c, ()) if a_ <= tau]
        if not held_:
            return None
        values_ = held_[-1]
        near = [tb for wm, _clock, tb in eo.refreshes if abs(wm - tau) <= DAY]
        for feat, p in {k for tb in near for k in tb}:
            x = values_.get(feat)
            if feat not in s.features or x is None:
                continue
            ths = [tb[(feat, p)] for tb in near if (feat, p) in tb]
            if ths and min(ths) <= float(x) <= max(ths):
                return (
                    f"percentile ({feat} p{p:g}: a refresh within a day of the decisive "
                    "instant moved it across the value; applied in processing order)"
                )
        return None

    def earlier_cause(c: int, s: Segment, t: int) -> str | None:
        """Membership carries history (dwell, cooldown, the stay a ``re_engaged`` exit needs):
        an earlier transition of the segment made at a different instant by the two sides,
        within that history, and what explains it."""
        assert eo is not None
        span = (1.0 + max(s.min_dwell, s.cooldown, s.re_engaged_after, s.sustain, 1.0)) * DAY
        mine = {x for b, e in eo.stays.get((c, s.name), ()) for x in (b, e) if x != math.inf}
        theirs = set(moves.get((c, s.name), ()))
        tau = decisive(c, s.name, t)
        if tau is None:
            return None
        earlier = sorted((x for x in mine ^ theirs if tau - span <= x < tau), reverse=True)
        for x in earlier:
            r = input_at(c, int(x))
            if r is None and any(o <= x < dl for o, dl in late_rows[c]):
                r = "late"
            if r is not None:
                return f"follows an earlier transition of this segment ({r.split(' (')[0]})"
        if earlier:
            return "follows an earlier transition of this segment (unexplained)"
        return None

    def input_at(c: int, tau: int) -> str | None:
        """A score of the customer's around the decisive instant whose published features
        differ from the oracle's (recomputed at the score's instant from the raw events)."""
        assert eo is not None
        hits = [m for m in eo.mismatches.get(c, ()) if tau - 2 * DAY <= m[0] <= tau]
        if not hits:
            return None
        as_of, _at, feats_, late = hits[-1]
        if late == "late":
            return "late (the score missed an event delivered after it)"
        if late is not None:
            return "same millisecond (an event delivered as the score was emitted, after it)"
        return "input at the decisive score: " + ",".join(feats_[:2])

    disagree_days: dict[str, np.ndarray] = {}
    agree: dict[str, int] = {}
    reasons: dict[str, Counter[str]] = {}
    examples: dict[tuple[str, str], list[str]] = defaultdict(list)
    total = int(known.sum())
    for s in segments:
        a, b = member[s.name], seg_member[s.name]
        diff = known & (a != b)
        disagree_days[s.name] = diff
        agree[s.name] = total - int(diff.sum())
        ctr: Counter[str] = Counter()
        for c, d in zip(*np.nonzero(diff), strict=True):
            t = ends[d]
            n_live = sum(1 for _cid, f0, m in live_ids[c] if f0 <= t and m > t)
            if n_live > 1 and group_by != "live-id":  # live-id: the oracle models split ids
                why = IDENTITY
            elif any(o <= t < dl for o, dl in late_rows[c]):
                why = "late (an event by t_d delivered after it or dead-lettered)"
            elif "days_since_re_engaged" in s.features and any(
                disagree_days[f][c, max(0, d - 30) : d + 1].any()
                for f in feeding
                if f in disagree_days
            ):
                why = "follows another segment's disagreement (its re_engaged exits)"
            elif "days_since_re_engaged" in s.features and {
                x for x in oracle_re[c] if d - 30 <= x <= d
            } != {x for x in segm_re[c] if d - 30 <= x <= d}:
                why = "a feeding segment's exit is re_engaged in one, plain in the other"
                if eo is None and any(  # a stay within the samples' resolution of re_engaged_after
                    abs((e - b) / DAY - f.re_engaged_after) <= 1.0
                    and d - 30 <= e / DAY - day0 <= d + 1
                    for f in segments
                    if f.re_engaged_when is not None
                    for b, e in closed.get((c, f.name), ())
                ):
                    why = (
                        "intra-day path (a feeding stay as long as re_engaged_after within the "
                        "samples' resolution: re_engaged in one, plain in the other)"
                    )
            elif eo is None and any(
                0 <= t - m < DAY + max(s.min_dwell, s.cooldown, 1.0) * DAY and m % DAY != 0
                for m in moves.get((c, s.name), ())
            ):
                why = "intra-day path (a transition between two samples; dwell/cooldown from it)"
            elif (
                eo is not None
                and (tau := decisive(c, s.name, t)) is not None
                and (inp := input_at(c, tau))
            ):
                why = inp
            else:
                h = held[c][d]
                why = "state (same inputs)"
                if h is None:
                    why = "no score yet"
                else:
                    as_of, values = h
                    diffs = []
                    for k in sorted(s.features):
                        if k in FROM_SCORES or k == "days_since_re_engaged":
                            continue
                        if k.startswith(("attr.", "lookup.")):
                            continue  # not loaded in the simulated pipeline (see evaluate)
                        mine = feats[k][c, d]
                        theirs = values.get(k)
                        if theirs is None:
                            continue
                        if k.startswith("days_since_") and theirs < NEVER:
                            theirs = theirs + (t - as_of) / DAY
                        if abs(float(mine) - float(theirs)) > 1e-3 * max(1.0, abs(float(mine))):
                            diffs.append(k)
                    if diffs:
                        stale = as_of < (last_event[c, d] if not np.isnan(last_event[c, d]) else 0)
                        stale |= as_of < (day0 + d) * DAY
                        why = ("stale score: " if stale else "input: ") + ",".join(diffs[:2])
                    else:
                        moved = between_thresholds(s, c, d, as_of)
                        if moved is not None:
                            why = f"percentile ({moved}: thresholds differ / moved since)"
                if why == "state (same inputs)" and eo is not None:
                    carried = earlier_cause(c, s, int(t))
                    if carried is not None:
                        why = carried
                    elif (near := refresh_near(c, s, int(t))) is not None:
                        why = near
            ctr[why] += 1
            if len(examples[(s.name, why)]) < n_examples:
                tau_ = decisive(c, s.name, int(t)) if eo is not None else None
                examples[(s.name, why)].append(
                    f"{names[c]} day {d}: oracle {'in' if a[c, d] else 'out'}, "
                    f"segmenter {'in' if b[c, d] else 'out'}"
                    + (
                        f" (decisive instant day {(tau_ / DAY - day0):.4f})"
                        if tau_ is not None
                        else ""
                    )
                )
        reasons[s.name] = ctr
    intervals = (
        interval_agreement(eo, segments, closed_or_open, moves, float(ends[-1]))
        if eo is not None
        else {}
    )
    return Comparison(
        n_days,
        total,
        agree,
        reasons,
        examples,
        {s.name: int((member[s.name] & known).sum()) for s in segments},
        {s.name: int((seg_member[s.name] & known).sum()) for s in segments},
        eo,
        intervals,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--customers", type=int, default=300)
    p.add_argument("--days", type=int, default=84)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--examples", type=int, default=0)
    p.add_argument("--cache", help="pickle of the pipeline run (reused when it exists)")
    p.add_argument("--group-by", choices=["live-id", "final-id", "truth"], default="live-id")
    p.add_argument(
        "--mode",
        choices=["events", "samples"],
        default="events",
        help="events: step at every score, timer, refresh and merge instant (live-id only); "
        "samples: twice a day (sessions 5-6)",
    )
    p.add_argument(
        "--instant-percentiles",
        action="store_true",
        help="pNN over every id at each instant (not per partition on its hourly grid)",
    )
    args = p.parse_args()
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        run = pickle.loads(cache.read_bytes())
    else:
        run = run_pipeline(args.customers, args.days, args.seed)
        if cache is not None:
            cache.write_bytes(pickle.dumps(run))
    t0 = time.perf_counter()
    cmp = compare(
        run, args.examples, args.group_by, refresh=not args.instant_percentiles, mode=args.mode
    )
    print(
        f"{run['config'].customers} customers x {run['config'].days} days (seed "
        f"{run['config'].seed}, demo noise, "
        f"customers by {args.group_by}, "
        f"{'instant' if args.instant_percentiles else 'refreshed'} percentiles): "
        f"pipeline {run['seconds']:.0f} s, oracle + comparison {time.perf_counter() - t0:.0f} s; "
        f"{cmp.customer_days:,} customer-days"
    )
    if cmp.events is not None:
        eo = cmp.events
        by_feature = sorted(eo.by_feature.items(), key=lambda x: -x[1])
        n_why = Counter(m[3] for ms in eo.mismatches.values() for m in ms)
        print(
            f"event by event: {eo.n_scores:,} scores re-derived from the raw events, "
            f"{eo.n_mismatched:,} with a feature the rules read that differs from the published "
            f"one ({', '.join(f'{k} {n:,}' for k, n in by_feature)}"
            f"); {n_why['late']:,} of them missed a late event, {n_why['same millisecond']:,} "
            f"one delivered in their millisecond, {n_why[None]:,} unexplained; state machines "
            "stepped in "
            f"{eo.steps_seconds:.0f} s"
        )
    print(
        f"{'segment':28} {'agree':>8} {'1 id':>8} {'oracle d':>9} {'segm. d':>8}  "
        "disagreements by reason ('1 id': agreement when the days of customers whose events "
        "are still on more than one id count as agreeing)"
    )
    all_agree = all_total = all_one = 0
    for name, ok in cmp.agree.items():
        one = ok + cmp.reasons[name][IDENTITY]
        all_agree += ok
        all_one += one
        all_total += cmp.customer_days
        why = "; ".join(f"{r} {n}" for r, n in cmp.reasons[name].most_common())
        print(
            f"{name:28} {100 * ok / cmp.customer_days:7.3f}% "
            f"{100 * one / cmp.customer_days:7.3f}% {cmp.oracle_days[name]:9,} "
            f"{cmp.segmenter_days[name]:8,}  {why}"
        )
    if cmp.intervals:
        print(
            "whole intervals (to the millisecond): member time on one side only / in either; "
            "transition instants made by both / by either"
        )
        for name, (only, same, total) in cmp.intervals.items():
            print(f"  {name:28} {100 * only:7.3f}%   {same:,} / {total:,}")
    print(
        f"{'all segments':28} {100 * all_agree / all_total:7.3f}% {100 * all_one / all_total:7.3f}%"
    )
    for (seg, why), ex in sorted(cmp.examples.items()):
        print(f"  {seg} / {why}:")
        for line in ex:
            print(f"    {line}")


if __name__ == "__main__":
    main()
