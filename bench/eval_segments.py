"""Segment quality against the simulator's ground truth, in-process (no broker).

The simulator's population goes through the identity core (stitching, merges), the scorer core
(features and scores, flushed every simulated hour as the loop's tick would) and the
segmenter's shell and core (``services.segmenter.app.Segmenter`` without Kafka: its handler, its
event-time timers from ``tick``, percentile refreshes), and the segment changes are compared
with the ground-truth intervals: per default segment, time-overlap precision and recall and the
median days from the true onset to ``entered``, as ``segflow demo``'s report
(``segflow.demo._segment_quality``) defines them, with one correction: stays are tracked per
customer id and only then united per true customer (the demo's matching lets one id's exit
close another id's stay and counts overlapping stays of two ids twice, so recall can exceed
100 %). Extra columns count customers: how many truly belong at some point, how many were ever
entered, and how many of those truly belong; a second table splits the member-days wrongly in
and wrongly out by the customers' true persona.

No dispatcher runs, so no simulated customer is rescued by an action: the truth is the
open-loop one (the demo's closed loop can differ where actions restore customers).

    .venv/bin/python bench/eval_segments.py                       # 300 customers x 84 days
    .venv/bin/python bench/eval_segments.py --customers 1000 --days 180 --seed 3
    .venv/bin/python bench/eval_segments.py --definitions my.yaml --clean --why AtRisk-60d
    .venv/bin/python bench/eval_segments.py --errors "Silent Decline" --errors AtRisk-60d
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The demo's delivery noise (segflow/demo.py).
from segment_pipeline import DEMO_NOISE, Pipeline  # noqa: E402, F401  (re-exported)

from segflow.demo import Observed, _sizes  # noqa: E402
from segflow.sim.generator import DAY, HOUR, SimConfig, Simulation  # noqa: E402
from segflow.sim.noise import Delivery, NoiseConfig  # noqa: E402
from segflow.sim.truth import SEGMENTS, truth_records  # noqa: E402
from services.scorer.core import ScorerConfig  # noqa: E402
from services.segmenter.app import DEFAULT_DEFINITIONS  # noqa: E402


def run(args: argparse.Namespace) -> dict[str, Any]:
    noise = NoiseConfig() if args.clean else DEMO_NOISE
    config = SimConfig(customers=args.customers, days=args.days, seed=args.seed, noise=noise)
    sim = Simulation(config)
    pipe = Pipeline(Path(args.definitions), ScorerConfig())
    pipe.keep_scores = bool(args.why or args.errors)
    truth_of: dict[str, str] = {}
    started = time.perf_counter()
    next_tick = config.start_ms + HOUR
    n_events = 0
    while not (sim.finished and not sim.pending):
        for item in sim.step(7):
            if type(item) is not Delivery:
                continue  # malformed records never reach the scorer (the DLQ takes them)
            while item.delivered_at >= next_tick:
                pipe.clock_ms = max(pipe.clock_ms, next_tick)
                pipe.tick()
                next_tick += HOUR
            truth_of[item.event["event_id"]] = item.customer
            pipe.event(item.event, item.delivered_at)
            n_events += 1
    # the span's end: the last hours' pending scores, timers up to the end
    while next_tick <= config.end_ms + HOUR:
        pipe.clock_ms = max(pipe.clock_ms, next_tick)
        pipe.tick()
        next_tick += HOUR
    elapsed = time.perf_counter() - started
    truth = truth_records(sim)
    return {
        "sim": sim,
        "pipe": pipe,
        "truth": truth,
        "truth_of": truth_of,
        "events": n_events,
        "seconds": elapsed,
    }


def true_customer_of(obs: Observed, truth_of: dict[str, str]) -> dict[str, str]:
    """Every customer_id (merged ones too) → the true customer most of its events belong to."""
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for event_id, cid in obs.event_owner.items():
        true = truth_of.get(event_id)
        if true is not None:
            votes[obs.final_id(cid)][true] += 1
    final = {cid: v.most_common(1)[0][0] for cid, v in votes.items()}
    return {
        cid: final[obs.final_id(cid)]
        for cid in set(obs.event_owner.values())
        if obs.final_id(cid) in final
    }


def predicted_spans(
    obs: Observed, true_of: dict[str, str], end_ms: int
) -> dict[tuple[str, str], list[list[int]]]:
    """(true customer, segment) → the union of the stays of all its customer ids.

    Stays are tracked per customer id first (a merged-away id and its survivor can both be in
    a segment for a while) and only then mapped to the true customer and united, so one id's
    exit never closes another id's stay and overlapping stays are not counted twice.
    """
    stays: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
    for c in sorted(obs.changes, key=lambda c: c["occurred_at"]):
        spans = stays[(c["customer_id"], c["segment"])]
        if c["transition"] == "entered":
            spans.append([c["occurred_at"], end_ms])
        elif c["transition"] in ("exited", "re_engaged") and spans and spans[-1][1] == end_ms:
            spans[-1][1] = c["occurred_at"]
    united: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
    for (cid, seg), spans in stays.items():
        true = true_of.get(cid)
        if true is not None:
            united[(true, seg)].extend(spans)
    for key, spans in united.items():
        spans.sort()
        merged: list[list[int]] = []
        for b, e in spans:
            if merged and b <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            elif e > b:
                merged.append([b, e])
        united[key] = merged
    return united


def _overlap(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(max(0, min(e1, e2) - max(b1, b2)) for b1, e1 in a for b2, e2 in b)


def quality(
    obs: Observed, truth_of: dict[str, str], truth: list[dict[str, Any]], end_ms: int
) -> dict[str, dict[str, Any]]:
    """Per segment: time-overlap precision and recall, median days from true onset to entered
    (an entry up to 14 days after the true end still counts as a late detection; a stay that
    already covers the onset is 0), and customer-level counts and false time per persona."""
    true_of = true_customer_of(obs, truth_of)
    predicted = predicted_spans(obs, true_of, end_ms)
    out: dict[str, dict[str, Any]] = {}
    for seg in SEGMENTS:
        overlap = pred_total = true_total = 0
        delays: list[float] = []
        false_by_persona: Counter[str] = Counter()
        missed_by_persona: Counter[str] = Counter()
        n_true = n_entered = n_hit = 0
        for t in truth:
            actual = [[b, e if e is not None else end_ms] for b, e in t["segments"][seg]]
            mine = predicted.get((t["customer"], seg), [])
            hit = _overlap(actual, mine)
            overlap += hit
            mine_total = sum(e - b for b, e in mine)
            true_total += sum(e - b for b, e in actual)
            pred_total += mine_total
            if mine_total > hit:
                false_by_persona[t["persona"]] += mine_total - hit
            true_len = sum(e - b for b, e in actual)
            if true_len > hit:
                missed_by_persona[t["persona"]] += true_len - hit
            n_true += bool(actual)
            n_entered += bool(mine)
            n_hit += bool(actual) and bool(mine)
            for b, e in actual:
                entered = [pb for pb, pe in mine if pe > b and pb < e + 14 * DAY]
                if entered:
                    delays.append(max(0, min(entered) - b) / DAY)
        out[seg] = {
            "precision": overlap / pred_total if pred_total else None,
            "recall": overlap / true_total if true_total else None,
            "median_delay_days": statistics.median(delays) if delays else None,
            "true_customers": n_true,
            "entered_customers": n_entered,
            "entered_and_true": n_hit,
            "false_days_by_persona": {
                p: round(ms / DAY, 1) for p, ms in false_by_persona.most_common()
            },
            "missed_days_by_persona": {
                p: round(ms / DAY, 1) for p, ms in missed_by_persona.most_common()
            },
        }
    return out


def fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{x * 100:.1f}%" if pct else f"{x:.1f} d"


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    sim, pipe, truth = out["sim"], out["pipe"], out["truth"]
    obs: Observed = pipe.obs
    end_ms = sim.config.end_ms
    personas = Counter(t["persona"] for t in truth)
    print(
        f"{args.customers} customers x {args.days} days (seed {args.seed}, "
        f"{'no noise' if args.clean else 'demo noise'}), definitions {args.definitions}"
    )
    print("personas: " + ", ".join(f"{p} {n}" for p, n in personas.most_common()))
    print(
        f"{out['events']:,} events, {obs.merges} merges, {pipe.n_scores:,} scores, "
        f"{len(obs.changes):,} segment changes in {out['seconds']:.1f}s"
        + (f"; rejected by the scorer: {dict(obs.dlq)}" if obs.dlq else "")
    )
    rows = quality(obs, out["truth_of"], truth, end_ms)
    final = _sizes(obs.changes)
    print(
        f"{'segment':26} {'precision':>9} {'recall':>7} {'onset→entered':>13} "
        f"{'true cust':>9} {'entered':>7} {'of them true':>12} {'members at end':>14}"
    )
    for seg in SEGMENTS:
        r = rows[seg]
        print(
            f"{seg:26} {fmt(r['precision']):>9} {fmt(r['recall']):>7} "
            f"{fmt(r['median_delay_days'], pct=False):>13} {r['true_customers']:>9} "
            f"{r['entered_customers']:>7} {r['entered_and_true']:>12} {final.get(seg, 0):>14}"
        )
    print("member-days wrongly in (false) and wrongly out (missed), by true persona:")
    for seg in SEGMENTS:
        r = rows[seg]
        false = ", ".join(f"{p} {d:g}" for p, d in list(r["false_days_by_persona"].items())[:4])
        missed = ", ".join(f"{p} {d:g}" for p, d in list(r["missed_days_by_persona"].items())[:4])
        print(f"  {seg:26} false: {false or '-'}; missed: {missed or '-'}")
    other = sorted(s for s in final if s not in SEGMENTS)
    if other:
        print("also at the end: " + ", ".join(f"{s} {final[s]}" for s in other))
    transitions = Counter(c["transition"] for c in obs.changes)
    print("changes: " + ", ".join(f"{k} {v:,}" for k, v in transitions.most_common()))
    if args.why:
        why(args.why, pipe, out["truth_of"], truth, sim.config.start_ms)
    for segment in args.errors or ():
        errors(segment, pipe, out["truth_of"], truth, sim.config, args.examples)


def why(
    segment: str,
    pipe: Pipeline,
    truth_of: dict[str, str],
    truth: list[dict[str, Any]],
    start_ms: int,
    limit: int = 6,
) -> None:
    """For a few true members of ``segment``: the values its conditions use around the onset."""
    obs = pipe.obs
    seg = pipe.segmenter.defs.by_name[segment]
    features = sorted({leaf.feature for leaf in seg.enter.leaves()})
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for event_id, cid in obs.event_owner.items():
        if event_id in truth_of:
            votes[cid][truth_of[event_id]] += 1
    cids_of: dict[str, list[str]] = defaultdict(list)
    for cid, v in votes.items():
        cids_of[v.most_common(1)[0][0]].append(cid)
    members = [t for t in truth if t["segments"][segment]][:limit]
    for t in members:
        onset = t["segments"][segment][0][0]
        print(
            f"\n{t['customer']} ({t['persona']}, {t['value_tier']}): truly in {segment} from "
            f"day {(onset - start_ms) / DAY:.1f}; scores from 7 days before to 21 after:"
        )
        for cid in cids_of.get(t["customer"], []):
            for s in pipe.scores.get(cid, []):
                if onset - 7 * DAY <= s["as_of"] <= onset + 21 * DAY:
                    values = s["values"]
                    print(
                        f"  day {(s['as_of'] - onset) / DAY:+6.1f}: "
                        + ", ".join(f"{f}={values.get(f, 'MISSING')}" for f in features)
                    )


def _values_at(scores: list[dict[str, Any]], at: int) -> tuple[dict[str, Any], int] | None:
    """The latest score at or before ``at``, aged as the segmenter ages it, and its as_of."""
    latest = None
    for s in scores:
        if s["as_of"] <= at and (latest is None or s["as_of"] >= latest["as_of"]):
            latest = s
    if latest is None:
        return None
    values = dict(latest["values"])
    for k, v in latest["values"].items():
        if k.startswith("days_since_") and isinstance(v, float):
            values[k] = v + (at - latest["as_of"]) / DAY
    return values, latest["as_of"]


def _leaf_text(e: Any) -> str:
    observed = e.observed_text if e.observed is None else f"{e.observed:.3g}"
    threshold = e.threshold_text if e.threshold is None else f"{e.threshold:.3g}"
    if e.feature == "weighted_score":
        return f"weighted={observed}>={threshold}"
    return f"{e.feature}={observed} {e.operator} {threshold}"


def _observed(x: dict[str, Any]) -> str:
    """An explanation record's observed value as text."""
    return f"{x['observed']:.3g}" if x["observed"] is not None else str(x["observed_text"])


def errors(
    segment: str,
    pipe: Pipeline,
    truth_of: dict[str, str],
    truth: list[dict[str, Any]],
    config: SimConfig,
    limit: int,
) -> None:
    """Why a segment is wrong: every member-day wrongly in or out is sampled once a day (noon)
    and attributed; then a few examples of each.

    * wrongly out (false negative): the enter conditions that fail on the customer's latest
      score at that instant (aged as the segmenter ages recencies), or "exit rule holds" (the
      customer qualifies but the exit rule would remove it), or "waiting" (sustain, cooldown,
      timing);
    * wrongly in (false positive): where the day lies against the truth (no true stay at all,
      before the true onset, after the true end) and the value of each enter condition at entry.
    """
    obs = pipe.obs
    defs = pipe.segmenter.defs
    seg = defs.by_name[segment]
    segmenter = pipe.segmenter
    true_of = true_customer_of(obs, truth_of)
    predicted = predicted_spans(obs, true_of, config.end_ms)
    cids_of: dict[str, list[str]] = defaultdict(list)
    for cid, true in true_of.items():
        cids_of[true].append(cid)
    entries: dict[str, list[dict[str, Any]]] = defaultdict(list)  # true customer -> entered
    for c in obs.changes:
        if c["segment"] == segment and c["transition"] in ("entered", "exited", "re_engaged"):
            true = true_of.get(c["customer_id"])
            if true is not None:
                entries[true].append(c)

    def scores_of(true: str) -> list[dict[str, Any]]:
        # the customer's main profile: the id with the most scores (an id that was never
        # merged, e.g. a device's anonymous sessions, also maps to the true customer)
        ids = cids_of.get(true, [])
        if not ids:
            return []
        return pipe.scores.get(max(ids, key=lambda cid: len(pipe.scores.get(cid, ()))), [])

    def day(ms: int) -> str:
        return f"{(ms - config.start_ms) / DAY:.1f}"

    missed_why: Counter[str] = Counter()
    false_where: Counter[str] = Counter()
    missed_examples: list[str] = []
    false_examples: list[str] = []
    for t in truth:
        actual = [[b, e if e is not None else config.end_ms] for b, e in t["segments"][segment]]
        mine = predicted.get((t["customer"], segment), [])
        main = max(cids_of.get(t["customer"], [""]), key=lambda c: len(pipe.scores.get(c, ())))
        # the final pNN table of the main profile's partition (thresholds are per partition)
        thresholds = segmenter.thresholds_for(segmenter.store.partition_of(main))
        scores = None
        noon = config.start_ms + DAY // 2
        while noon < config.end_ms:
            in_truth = any(b <= noon < e for b, e in actual)
            in_mine = any(b <= noon < e for b, e in mine)
            if in_truth != in_mine:
                if scores is None:
                    scores = scores_of(t["customer"])
                got = _values_at(scores, noon)
                if in_truth:  # wrongly out
                    if got is None:
                        key = "no score yet"
                    else:
                        values, _ = got
                        if not seg.enter.test(values, thresholds):
                            failing = [
                                _leaf_text(e).split("=")[0]
                                for e in seg.enter.explain(values, thresholds)
                                if not e.passed
                            ]
                            key = "enter fails: " + ", ".join(sorted(set(failing)))
                        elif seg.exit is not None and seg.exit.test(values, thresholds):
                            passing = [
                                _leaf_text(e).split("=")[0]
                                for e in seg.exit.explain(values, thresholds)
                                if e.passed
                            ]
                            key = "exit holds: " + ", ".join(sorted(set(passing)))
                        else:
                            key = "enter holds (waiting: sustain, cooldown or next timer)"
                    missed_why[f"{t['persona']}: {key}"] += 1
                    if len(missed_examples) < limit * 3 and got is not None:
                        values, as_of = got
                        missed_examples.append(
                            f"  {t['customer']} ({t['persona']}, {t['value_tier']}) day "
                            f"{day(noon)}, truth {[[day(b), day(e)] for b, e in actual]}, "
                            f"score of day {day(as_of)}: "
                            + "; ".join(
                                ("" if e.passed else "FAIL ") + _leaf_text(e)
                                for e in seg.enter.explain(values, thresholds)
                            )
                        )
                else:  # wrongly in
                    if not actual:
                        where = "never truly in"
                    elif noon < actual[0][0]:
                        where = "before the true onset"
                    elif noon >= actual[-1][1]:
                        where = "after the true end"
                    else:
                        where = "between true stays"
                    false_where[f"{t['persona']}: {where}"] += 1
            noon += DAY
        # false examples: one per customer, the entry that starts the wrong time
        for b, e in mine:
            if _overlap([[b, e]], actual) < (e - b) and len(false_examples) < limit * 3:
                entered = [
                    c
                    for c in entries[t["customer"]]
                    if c["transition"] == "entered" and b <= c["occurred_at"] < e
                ]
                if not entered:
                    continue
                c = entered[0]
                exits = [
                    x
                    for x in entries[t["customer"]]
                    if x["transition"] != "entered" and x["occurred_at"] >= c["occurred_at"]
                ]
                out = (
                    f"left day {day(exits[0]['occurred_at'])} ({exits[0]['reason']}: "
                    + "; ".join(
                        f"{x['feature']}={_observed(x)}"
                        for x in exits[0]["explanation"]
                        if x["passed"]
                    )
                    + ")"
                    if exits
                    else "still in at the end"
                )
                false_examples.append(
                    f"  {t['customer']} ({t['persona']}, {t['value_tier']}) entered day "
                    f"{day(c['occurred_at'])}, {out}; truth "
                    f"{[[day(b2), day(e2)] for b2, e2 in actual] or 'none'}; at entry: "
                    + "; ".join(f"{x['feature']}={_observed(x)}" for x in c["explanation"])
                )
                break
    print(f"\n== {segment}: member-days wrongly out, by persona and cause (sampled at noon)")
    for k, n in missed_why.most_common(12):
        print(f"  {n:5d}  {k}")
    print(f"== {segment}: member-days wrongly in, by persona and where against the truth")
    for k, n in false_where.most_common(12):
        print(f"  {n:5d}  {k}")
    print(f"== {segment}: examples wrongly out")
    for line in missed_examples[:: max(1, len(missed_examples) // limit)][:limit]:
        print(line)
    print(f"== {segment}: examples of stays wrongly in (values at entry)")
    for line in false_examples[:limit]:
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--days", type=int, default=84)
    parser.add_argument("--seed", type=int, default=7, help="the demo's default seed is 7")
    parser.add_argument("--definitions", default=str(DEFAULT_DEFINITIONS))
    parser.add_argument("--clean", action="store_true", help="no delivery noise")
    parser.add_argument(
        "--why",
        metavar="SEGMENT",
        help="print the condition values of a few true members around onset",
    )
    parser.add_argument(
        "--errors",
        metavar="SEGMENT",
        action="append",
        help="attribute every member-day wrongly in or out of SEGMENT and print examples "
        "(repeatable)",
    )
    parser.add_argument("--examples", type=int, default=6, help="examples per --errors list")
    args = parser.parse_args()
    out = run(args)
    report(out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
