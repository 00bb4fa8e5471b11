"""The demo's evaluation against the simulator's ground truth: stitching, segments, churn AUC,
latencies, capacity. Pure functions over what the demo observed."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from typing import Any

from segflow.demo.reading import (
    DAY_MS,
    RECORD_TS,
    Observed,
)
from segflow.stats import latency_summary


# -- the report ----------------------------------------------------------------------------
def _pairwise(owner: dict[str, str], truth_of: dict[str, str]) -> tuple[float, float]:
    """Pairwise precision and recall of event → customer stitching against the truth."""
    cells: Counter[tuple[str, str]] = Counter()
    for event_id, cid in owner.items():
        true = truth_of.get(event_id)
        if true is not None:
            cells[(cid, true)] += 1

    def pairs(counts: Any) -> int:
        return sum(n * (n - 1) // 2 for n in counts)

    by_pred: Counter[str] = Counter()
    by_true: Counter[str] = Counter()
    for (cid, true), n in cells.items():
        by_pred[cid] += n
        by_true[true] += n
    tp = pairs(cells.values())
    pred, true_pairs = pairs(by_pred.values()), pairs(by_true.values())
    return (tp / pred if pred else 1.0), (tp / true_pairs if true_pairs else 1.0)


def _segment_quality(
    obs: Observed, produced: dict[str, Any], truth: list[dict[str, Any]], end_ms: int
) -> list[tuple[str, float | None, float | None, float | None, int]]:
    """Per segment: time-overlap precision and recall vs the truth, median onset → entered."""
    owner_votes: dict[str, Counter[str]] = defaultdict(Counter)
    for event_id, cid in obs.event_owner.items():
        true = produced["truth_of"].get(event_id)
        if true is not None:
            owner_votes[obs.final_id(cid)][true] += 1
    true_of_cid = {cid: votes.most_common(1)[0][0] for cid, votes in owner_votes.items()}
    # Stays per customer id first (a merged-away id and its survivor can both be in a segment
    # for a while), then united per true customer: one id's exit never closes another id's
    # stay, and overlapping stays are not counted twice.
    stays: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
    for c in sorted(obs.changes, key=lambda c: c["occurred_at"]):
        spans = stays[(c["customer_id"], c["segment"])]
        if c["transition"] == "entered":
            spans.append([c["occurred_at"], end_ms])
        elif c["transition"] in ("exited", "re_engaged") and spans and spans[-1][1] == end_ms:
            spans[-1][1] = c["occurred_at"]
    predicted: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
    for (cid, seg), spans in stays.items():
        true = true_of_cid.get(obs.final_id(cid))
        if true is not None:
            predicted[(true, seg)].extend(spans)
    for key, spans in predicted.items():
        spans.sort()
        united: list[list[int]] = []
        for b, e in spans:
            if united and b <= united[-1][1]:
                united[-1][1] = max(united[-1][1], e)
            elif e > b:
                united.append([b, e])
        predicted[key] = united
    actual: dict[tuple[str, str], list[list[int]]] = {}
    for t in truth:
        for seg, spans in t["segments"].items():
            actual[(t["customer"], seg)] = [[s, e if e is not None else end_ms] for s, e in spans]
    rows = []
    for seg in sorted({s for (_c, s) in actual}):
        overlap = pred_total = true_total = 0
        delays: list[float] = []
        for (cust, s), spans in actual.items():
            if s != seg:
                continue
            mine = predicted.get((cust, seg), [])
            true_total += sum(e - b for b, e in spans)
            for b, e in spans:
                for pb, pe in mine:
                    overlap += max(0, min(e, pe) - max(b, pb))
                entered = [pb for pb, pe in mine if pe > b and pb < e + 14 * DAY_MS]
                if entered:
                    delays.append(max(0, min(entered) - b) / DAY_MS)
        for (_cust, s), mine in predicted.items():
            if s == seg:
                pred_total += sum(e - b for b, e in mine)
        precision = overlap / pred_total if pred_total else None
        recall = overlap / true_total if true_total else None
        median = statistics.median(delays) if delays else None
        rows.append((seg, precision, recall, median, sum(1 for k in predicted if k[1] == seg)))
    return rows


def _capacity(obs: Observed, produced: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Records each service consumed and the CPU seconds it spent on them (start-up, the
    broker client and idle polling included, so this is a floor on what it can do)."""
    merges = obs.merges
    records = {
        "identity": produced["events"] + produced["malformed"],
        "scorer": len(obs.event_owner) + merges,
        "segmenter": produced.get("scores", 0) + merges,
        "dispatcher": len(obs.changes) + len(obs.event_owner),
    }
    out = {}
    for name, cpu in produced.get("cpu", {}).items():
        if name in records and cpu > 0:
            out[name] = {
                "records": records[name],
                "cpu_seconds": cpu,
                "records_per_cpu_second": records[name] / cpu,
                "restarted": name in produced.get("restarts", {}),
            }
    return out


def _undecided(obs: Observed) -> list[dict[str, Any]]:
    """Changes a default playbook triggers on (its segment, one of its transitions) that got no
    DispatchResult of that playbook for their stay: an action decided late is still decided;
    one never decided is lost."""
    from services.dispatcher.playbooks import DEFAULT_DIR, load_book

    book = load_book([DEFAULT_DIR])
    decided = {(r["entry_id"], r["playbook"]) for r in obs.results}
    return [
        c
        for c in obs.changes
        for pb in book.for_segment(c["segment"])
        if c["transition"] in pb.triggers and (c["entry_id"], pb.name) not in decided
    ]


def _latencies(obs: Observed) -> dict[str, dict[str, float] | None]:
    """Processing-time latencies between the stages the demo can join, in seconds.

    * score → segment change: a change caused by a score carries the score's ``as_of`` as its
      ``occurred_at``; ``emitted_at`` minus that score's ``scored_at`` (timer-driven changes
      have no score and are left out);
    * segment change → dispatch decision: when the first DispatchResult of a stay
      (``entry_id``) was produced minus the ``entered`` change's ``emitted_at`` (a delayed step
      is decided at once and reported ``scheduled``, so this is the dispatcher's reaction, not
      the playbook's delay; ``decided_at`` itself is pipeline time, not processing time);
    * drain: from the last event of a simulated week produced to every service caught up.

    The demo produces a simulated week at once, so these include queueing behind that burst;
    event → segment change at a steady rate is ``bench/bench_e2e.py``'s measurement.
    """
    to_change = [
        (c["emitted_at"] - obs.scored_at[key]) / 1000
        for c in obs.changes
        if (key := (c["customer_id"], c["occurred_at"])) in obs.scored_at
    ]
    entered = {c["entry_id"]: c["emitted_at"] for c in obs.changes if c["transition"] == "entered"}
    first: dict[str, int] = {}
    for r in obs.results:
        if r["entry_id"] in entered:
            t = r[RECORD_TS]
            first[r["entry_id"]] = min(first.get(r["entry_id"], t), t)
    to_decision = [(t - entered[e]) / 1000 for e, t in first.items()]
    return {
        "score_to_change_s": latency_summary(to_change),
        "change_to_decision_s": latency_summary(to_decision),
        "week_drain_s": latency_summary(obs.drain_seconds),
    }
