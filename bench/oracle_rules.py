"""The segment oracle's rules (issue #17): the YAML read and evaluated here, not by
``services.segmenter.dsl``, and the membership state machine (hysteresis, ``min_dwell``,
``cooldown``, ``sustain``, ``ttl``, ``re_engaged``) stepped over the sampled instants, per
customer or per live customer id. Split out of ``segment_oracle.py`` (issue #14's 600-line
limit); see that file.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from oracle_features import DAY, FROM_SCORES, NEVER, oracle_features


# -- rules: the YAML read and evaluated here (not services.segmenter.dsl) ---------------------
@dataclass
class Segment:
    name: str
    priority: int
    enter: Any
    exit: Any = None
    re_engaged_when: Any = None
    re_engaged_after: float = 0.0
    min_dwell: float = 0.0
    cooldown: float = 0.0
    sustain: float = 0.0
    sustain_since: str | None = None
    ttl: float | None = None
    features: set[str] = field(default_factory=set)


def _days(v: Any) -> float:
    if v is None:
        return 0.0
    s = str(v)
    unit = {"d": 1.0, "h": 1 / 24, "m": 1 / 1440, "s": 1 / 86400}[s[-1]]
    return float(s[:-1]) * unit


def _features_of(rule: Any, out: set[str]) -> None:
    if rule is None:
        return
    if "feature" in rule:
        out.add(rule["feature"])
    for key in ("all", "any"):
        for r in rule.get(key, ()):
            _features_of(r, out)
    if "not" in rule:
        _features_of(rule["not"], out)
    if "weighted" in rule:
        for item in rule["weighted"]:
            _features_of(item["when"], out)


def load_segments(path: Path) -> list[Segment]:
    doc = yaml.safe_load(path.read_text())
    out = []
    for s in doc["segments"]:
        seg = Segment(
            s["name"],
            int(s.get("priority", 0)),
            s["enter"],
            s.get("exit"),
            s.get("re_engaged_when"),
            _days(s.get("re_engaged_after")),
            _days(s.get("min_dwell")),
            _days(s.get("cooldown")),
            _days(s.get("sustain")),
            s.get("sustain_since"),
            _days(s["ttl"]) if s.get("ttl") else None,
        )
        for r in (seg.enter, seg.exit, seg.re_engaged_when):
            _features_of(r, seg.features)
        out.append(seg)
    return out


def is_pct(value: Any) -> bool:
    return isinstance(value, str) and value[:1] == "p" and value[1:].replace(".", "").isdigit()


def evaluate(rule: Any, v: dict[str, np.ndarray], pct: dict[tuple[str, float], np.ndarray]):
    """A rule over arrays (one value per customer), as SPEC §3 / the segmenter README define
    it; a missing feature (NaN / None) is false."""
    if "all" in rule:
        res = np.ones(len(next(iter(v.values()))), dtype=bool)
        for r in rule["all"]:
            res &= evaluate(r, v, pct)
        return res
    if "any" in rule:
        res = np.zeros(len(next(iter(v.values()))), dtype=bool)
        for r in rule["any"]:
            res |= evaluate(r, v, pct)
        return res
    if "not" in rule:
        return ~evaluate(rule["not"], v, pct)
    if "weighted" in rule:
        total = sum(item["weight"] * evaluate(item["when"], v, pct) for item in rule["weighted"])
        return total >= rule["threshold"] - 1e-9
    if rule["feature"].startswith(("attr.", "lookup.")):
        # customer attributes and lookup tables (issue 19): the simulated pipeline this oracle
        # checks loads none, so such a condition is false for everyone, as a missing feature is
        return np.zeros(len(next(iter(v.values()))), dtype=bool)
    x = v[rule["feature"]]
    op, value = rule["op"], rule["value"]
    if is_pct(value):
        value = pct.get((rule["feature"], float(value[1:])), math.nan)  # none yet: false
    if x.dtype == object:  # lifecycle_stage
        present = np.array([s is not None for s in x])
        if op == "==":
            return present & (x == value)
        if op == "!=":
            return present & (x != value)
        if op == "in":
            return present & np.isin(x, value)
        raise ValueError(f"operator {op} on a category")
    present = ~np.isnan(x)
    with np.errstate(invalid="ignore"):
        if op == ">":
            r = x > value
        elif op == ">=":
            r = x >= value
        elif op == "<":
            r = x < value
        elif op == "<=":
            r = x <= value
        elif op == "==":
            r = x == value
        elif op == "!=":
            r = x != value
        elif op == "between":
            r = (x >= value[0]) & (x <= value[1])
        elif op == "in":
            r = np.isin(x, value)
        else:
            raise ValueError(f"unknown operator {op}")
    return present & r


def percentiles(
    segments: list[Segment], v: dict[str, np.ndarray], known: np.ndarray, keys: bool = False
):
    """Nearest-rank pNN of each feature used as a percentile, over the customers known
    (``keys``: only which (feature, pNN) the rules read, valued NaN)."""
    out: dict[tuple[str, float], float] = {}

    def walk(rule: Any) -> None:
        if rule is None:
            return
        if "feature" in rule:
            val = rule["value"]
            if is_pct(val) and keys:
                out[(rule["feature"], float(val[1:]))] = math.nan
            elif is_pct(val):
                p = float(val[1:])
                data = np.sort(v[rule["feature"]][known & ~np.isnan(v[rule["feature"]])])
                if len(data):
                    rank = max(1, math.ceil(p / 100 * len(data)))
                    out[(rule["feature"], p)] = float(data[min(rank, len(data)) - 1])
                else:
                    out[(rule["feature"], p)] = math.inf
        for key in ("all", "any"):
            for r in rule.get(key, ()):
                walk(r)
        if "not" in rule:
            walk(rule["not"])
        if "weighted" in rule:
            for item in rule["weighted"]:
                walk(item["when"])

    for s in segments:
        for r in (s.enter, s.exit, s.re_engaged_when):
            walk(r)
    return out


def oracle_memberships(
    segments: list[Segment],
    feats: dict[str, np.ndarray],
    known: np.ndarray,
    last_score_day: np.ndarray,
    pct_log: list[dict[tuple[str, float], float]] | None = None,
    re_log: list[tuple[int, float, str]] | None = None,
    thresholds_at: Any = None,
) -> dict[str, np.ndarray]:
    """[customer, instant] membership of each segment, stepping the state machine through the
    instants (two a day: midnight, when the scorer refreshes every customer, and the day's
    last millisecond; column 2d and 2d + 1 for day d; ``last_score_day``: time of the
    customer's latest score, in days since the first day)."""
    n_cust, n_days = known.shape
    member = {s.name: np.zeros((n_cust, n_days), dtype=bool) for s in segments}
    inside = {s.name: np.zeros(n_cust, dtype=bool) for s in segments}
    entered_at = {s.name: np.full(n_cust, -np.inf) for s in segments}
    exited_at = {s.name: np.full(n_cust, -np.inf) for s in segments}
    pending = {s.name: np.full(n_cust, np.nan) for s in segments}
    re_engaged_at = np.full(n_cust, np.nan)
    for d in range(n_days):
        now = d // 2 + (d % 2) * (1.0 - 1.0 / DAY)  # days since day0
        v = {k: a[:, d] for k, a in feats.items()}
        pct = percentiles(segments, v, known[:, d]) if thresholds_at is None else thresholds_at(d)
        if pct_log is not None:
            pct_log.append(pct)
        stale = now - last_score_day[:, d]
        for s in segments:
            if s.name == "Re-engaged" or "days_since_re_engaged" in s.features:
                v["days_since_re_engaged"] = np.where(
                    np.isnan(re_engaged_at), np.nan, now - re_engaged_at
                )
            n = s.name
            enter = evaluate(s.enter, v, pct)
            leave = evaluate(s.exit, v, pct) if s.exit is not None else ~enter
            ttl_out = (stale >= s.ttl) if s.ttl is not None else np.zeros(n_cust, dtype=bool)
            ins = inside[n] & known[:, d]  # an id merged away leaves every segment (merged)
            # members: ttl, else exit after the dwell
            out_ttl = ins & ttl_out
            can_leave = ins & ~ttl_out & leave & (now - entered_at[n] >= s.min_dwell - 1e-9)
            if s.re_engaged_when is not None:
                rew = evaluate(s.re_engaged_when, v, pct)
                rex = can_leave & rew & (now - entered_at[n] >= s.re_engaged_after - 1e-9)
                re_engaged_at[rex] = now
                if re_log is not None:
                    re_log.extend((int(c), now, n) for c in np.nonzero(rex)[0])
            gone = out_ttl | can_leave
            exited_at[n][gone] = now
            ins = ins & ~gone
            # non-members: qualify, sustain, cooldown
            qual = known[:, d] & ~ins & ~ttl_out & enter & ~leave
            pend = pending[n]
            pend[~qual] = np.nan
            if s.sustain:
                start = np.isnan(pend) & qual
                back = np.zeros(n_cust)
                if s.sustain_since is not None:
                    since = v[s.sustain_since]
                    back = np.where((since > 0) & (since < NEVER), np.minimum(since, s.sustain), 0)
                pend[start] = now - back[start]
                ready = qual & (now - pend >= s.sustain - 1e-9)
            else:
                ready = qual
            ready &= (now - exited_at[n] >= s.cooldown - 1e-9) & ~gone
            entered_at[n][ready] = now
            pend[ready] = np.nan
            ins = ins | ready
            inside[n] = ins
            member[n][:, d] = ins
    return member


def live_id_memberships(
    segments: list[Segment],
    raw: pd.DataFrame,
    run: dict[str, Any],
    final_index: dict[str, int],
    n_cust: int,
    instants: np.ndarray,
    refresh: bool,
    pct_log: list[dict[tuple[str, float], float]],
    re_log: list[tuple[int, float, str]],
) -> dict[str, np.ndarray]:
    """Memberships [true customer, instant] with every customer id evaluated on its own, as
    the segmenter README documents it: before a merge the anonymous and the identified id each
    have their features (from their own events), their scores and their segments; at the
    merge the absorbed id leaves every segment and the survivor holds the events of both. A
    true customer is a member when any of its live ids is. ``refresh``: ``pNN`` thresholds as
    the service computes them — per partition of the scores topic, on the partition's
    event-time grid (``oracle_grid.py``) — instead of at each instant over every id."""
    config, pipe = run["config"], run["pipe"]
    obs = pipe.obs
    day0 = config.start_ms // DAY
    n_days = len(instants) // 2
    survivor, merge_at = obs.survivor, pipe.merge_at
    owner = raw["event_id"].map(obs.event_owner)
    raw = raw.assign(owner=owner)

    rows, pairs = live_id_rows(set(owner), final_index, obs.final_id, survivor, merge_at)
    expanded = raw.merge(pd.DataFrame(pairs, columns=["owner", "row"]), on="owner")
    expanded = expanded.drop(columns=["c"]).rename(columns={"row": "c"})
    n_rows = len(rows)
    zips = frozenset(run["zips"])
    at_end = oracle_features(expanded, n_rows, day0, n_days, zips)
    at_start = oracle_features(expanded, n_rows, day0, n_days, zips, start=True)
    first_row = expanded.groupby("c")["occurred_at"].min().reindex(range(n_rows)).to_numpy()

    ids = sorted({live for live, _, _ in rows})
    id_index = {cid: i for i, cid in enumerate(ids)}
    n_ids = len(ids)
    row_of = np.full((n_ids, len(instants)), -1, dtype=np.int64)
    for r, (live, lo, hi) in enumerate(rows):
        row_of[id_index[live], (instants >= lo) & (instants < hi)] = r
    live = row_of >= 0
    safe = np.maximum(row_of, 0)
    cols = np.arange(len(instants))[None, :]
    feats: dict[str, np.ndarray] = {}
    for k, a in at_end.items():
        both = np.empty((n_rows, len(instants)))
        both[:, 0::2], both[:, 1::2] = at_start[k], a
        feats[k] = np.where(live, both[safe, cols], np.nan)
    known = live & (first_row[safe] <= instants[None, :])

    # model outputs: each id's own scores
    last_score_day = np.full((n_ids, len(instants)), -np.inf)
    model = {k: np.full((n_ids, len(instants)), np.nan, dtype=object) for k in FROM_SCORES}
    pct_features = sorted({f for f, _ in percentiles(segments, {}, np.zeros(0, bool), True)})
    assert set(pct_features) <= {"churn_probability", "clv", "engagement_score"}, pct_features
    for cid, lst in pipe.scores.items():
        i = id_index.get(cid)
        if i is None:
            continue
        for sc in lst:
            as_of, values = sc["as_of"], sc["values"]
            d = int(as_of // DAY) - day0
            if not 0 <= d < n_days:
                continue
            j = 2 * d + (as_of % DAY != 0)
            last_score_day[i, j] = max(last_score_day[i, j], (as_of - day0 * DAY) / DAY)
            for k in FROM_SCORES:
                if k in values:
                    model[k][i, j] = values[k]
    last_score_day = np.maximum.accumulate(last_score_day, axis=1)
    for k in FROM_SCORES:
        frame = pd.DataFrame(model[k]).ffill(axis=1).to_numpy()
        if k == "lifecycle_stage":
            feats[k] = np.where(pd.isna(frame) | ~live, None, frame).astype(object)
        else:
            feats[k] = np.where(live, pd.DataFrame(frame).astype(float).to_numpy(), np.nan)

    thresholds_at = None
    if refresh:
        # each id's partition's pNN table at the instant (oracle_grid.py; per id: an array)
        from oracle_grid import grid_refreshes, partition_of

        pct_keys = list(percentiles(segments, {}, np.zeros(0, bool), True))
        grids = grid_refreshes(
            pipe.scores, pipe.merge_seq, pipe.merge_time, pct_keys, pipe.refresh_ms
        )
        part_of_id = np.array([partition_of(cid) for cid in ids])

        def thresholds_at(j: int) -> dict[tuple[str, float], Any]:
            out = {k: np.full(n_ids, np.nan) for k in pct_keys}
            for p, refs in grids.items():
                i = bisect.bisect_right([r[0] for r in refs], instants[j]) - 1
                for k, v in (refs[i][2] if i >= 0 else {}).items():
                    out[k][part_of_id == p] = v
            return out

    re_ids: list[tuple[int, float, str]] = []
    member_ids = oracle_memberships(
        segments, feats, known, last_score_day, pct_log, re_ids, thresholds_at
    )
    final_of = np.array([final_index[obs.final_id(cid)] for cid in ids], dtype=np.int64)
    re_log.extend((int(final_of[i]), now, seg) for i, now, seg in re_ids)
    out_m: dict[str, np.ndarray] = {}
    for name, m in member_ids.items():
        agg = np.zeros((n_cust, len(instants)), dtype=bool)
        np.logical_or.at(agg, final_of, m)
        out_m[name] = agg
    return out_m


# -- rules as closures over one customer's values (for the event-by-event oracle) ------------
Rule = Callable[[dict[str, Any], dict[tuple[str, float], float]], bool]


def compile_rule(rule: Any) -> Rule:
    """A rule of the YAML as a function of (values, thresholds); a missing feature or a
    percentile with no threshold yet is false (``not`` of it true)."""
    if "all" in rule:
        parts = [compile_rule(r) for r in rule["all"]]
        return lambda v, p: all(f(v, p) for f in parts)
    if "any" in rule:
        parts = [compile_rule(r) for r in rule["any"]]
        return lambda v, p: any(f(v, p) for f in parts)
    if "not" in rule:
        inner = compile_rule(rule["not"])
        return lambda v, p: not inner(v, p)
    if "weighted" in rule:
        items = [(float(i["weight"]), compile_rule(i["when"])) for i in rule["weighted"]]
        need = float(rule["threshold"]) - 1e-9
        return lambda v, p: sum(w for w, f in items if f(v, p)) >= need
    feat, op, value = rule["feature"], rule["op"], rule["value"]
    if feat.startswith(("attr.", "lookup.")):
        return lambda v, p: False  # the simulated pipeline loads no attributes or lookups
    key = (feat, float(value[1:])) if is_pct(value) else None

    def test(v: dict[str, Any], p: dict[tuple[str, float], float]) -> bool:
        x = v.get(feat)
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return False
        b = p.get(key) if key is not None else value
        if b is None:
            return False
        if op == ">":
            return x > b
        if op == ">=":
            return x >= b
        if op == "<":
            return x < b
        if op == "<=":
            return x <= b
        if op == "==":
            return x == b
        if op == "!=":
            return x != b
        if op == "in":
            return x in b
        if op == "between":
            return b[0] <= x <= b[1]
        raise ValueError(f"unknown operator {op}")

    return test


def aging_bounds(rule: Any, out: set[tuple[str, float]]) -> None:
    """(recency feature, numeric bound) pairs a rule compares: where a crossing can flip it."""
    if rule is None:
        return
    if "feature" in rule:
        if rule["feature"].startswith("days_since_") and not is_pct(rule["value"]):
            vals = rule["value"] if isinstance(rule["value"], list) else [rule["value"]]
            out.update((rule["feature"], float(x)) for x in vals)
        return
    for key in ("all", "any"):
        for r in rule.get(key, ()):
            aging_bounds(r, out)
    if "not" in rule:
        aging_bounds(rule["not"], out)
    for item in rule.get("weighted", ()):
        aging_bounds(item["when"], out)


@dataclass
class Compiled:
    seg: Segment
    enter: Rule
    exit: Rule | None
    rew: Rule | None
    dwell: int
    cooldown: int
    sustain: int
    ttl: int | None
    after: int


def compile_segments(segments: list[Segment]) -> tuple[list[Compiled], list[tuple[str, float]]]:
    """The segments in evaluation order: those reading ``days_since_re_engaged`` (Re-engaged)
    after the others, so a ``re_engaged`` exit counts at its own instant (not at the next)."""
    out = []
    bounds: set[tuple[str, float]] = set()
    order = sorted(segments, key=lambda s: "days_since_re_engaged" in s.features)
    for s in order:
        for r in (s.enter, s.exit, s.re_engaged_when):
            aging_bounds(r, bounds)

        def ms(days: float) -> int:
            return int(round(days * DAY))

        out.append(
            Compiled(
                s,
                compile_rule(s.enter),
                compile_rule(s.exit) if s.exit is not None else None,
                compile_rule(s.re_engaged_when) if s.re_engaged_when is not None else None,
                ms(s.min_dwell),
                ms(s.cooldown),
                ms(s.sustain),
                ms(s.ttl) if s.ttl is not None else None,
                ms(s.re_engaged_after),
            )
        )
    return out, sorted(bounds)


def live_id_rows(
    owners: set[str],
    final_index: dict[str, int],
    final_id: Any,
    survivor: dict[str, str],
    merge_at: dict[str, Any],
) -> tuple[list[tuple[str, float, float]], list[tuple[str, int]]]:
    """One row per (live id, interval between two merges of its customer) holding the events
    of every id that resolves to it during the interval: ``(rows, pairs)``, rows as
    ``(live id, lo, hi)``, pairs as ``(owner id, row)`` (every id of a customer in every row
    it resolves to)."""

    def resolve(cid: str, t: float) -> str:
        while cid in survivor and merge_at.get(cid, 1 << 62) <= t:
            cid = survivor[cid]
        return cid

    ids_of: dict[int, set[str]] = defaultdict(set)
    for cid in owners:
        c = final_index[final_id(cid)]
        while True:
            ids_of[c].add(cid)
            if cid not in survivor:
                break
            cid = survivor[cid]
    rows: list[tuple[str, float, float]] = []
    pairs: list[tuple[str, int]] = []
    for _c, ids in sorted(ids_of.items()):
        times = sorted({merge_at[x] for x in ids if x in merge_at})
        bounds = [-math.inf, *times, math.inf]
        for k in range(len(bounds) - 1):
            groups: dict[str, list[str]] = defaultdict(list)
            for x in sorted(ids):
                groups[resolve(x, bounds[k])].append(x)
            for live, members in sorted(groups.items()):
                pairs += [(x, len(rows)) for x in members]
                rows.append((live, bounds[k], bounds[k + 1]))
    return rows, pairs
