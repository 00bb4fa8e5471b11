"""The scorer's outputs are a function of each customer's events only: not of how the input
was batched, when the ticks came, or which instance owns the customer (issue #15).

Each score is as of the instant its timer was due (a pending score at its latest event, but
not before the interval after the last emission; a refresh at its grid point; an urgent one
at its event), never as of the watermark, and a timer due before a customer's next event
fires first. The model is held fixed here (no training snapshots: nothing learned, clusters
untouched): pinning the learned model to event time is not part of what is checked.
"""

from __future__ import annotations

from typing import Any

from segflow.runtime.state import partition_for
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery
from services.scorer.core import ScoreEmit, Scorer, ScorerConfig, StateWrite

PARTS = 4


def events() -> list[tuple[str, dict[str, Any]]]:
    sim = Simulation(SimConfig(customers=40, days=35, seed=11))
    return [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]


def run(
    items: list[tuple[str, dict[str, Any]]],
    instances: int,
    settle_every: int,
    flush_every: int,
    defer: bool = True,
    store_lookup: bool = False,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Replay ``items`` into ``instances`` scorers, each owning the customers of its share of
    ``PARTS`` partitions (events in the same order per customer), settling and flushing at the
    given cadences (in events seen by that instance); returns each customer's scores and final
    state."""
    cfg = ScorerConfig(max_pending_labels=0)  # no snapshots: the model stays as it is
    store: dict[str, Any] = {}
    scorers = [Scorer(cfg, pack_states=False, defer_scores=defer) for _ in range(instances)]
    for sc in scorers:
        sc.model.snapshot_rate = 0.0  # (it starts at 1 until the first day's snapshots)
        sc.partition_of = lambda cid: partition_for(cid, PARTS)  # a clock per partition
        if store_lookup:  # as the service: timers the watermark passed fire together
            sc.store = store.get
    scores: dict[str, list[dict[str, Any]]] = {}

    def apply(outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite) and o.state is not None:
                store[o.customer_id] = o.state
            elif isinstance(o, ScoreEmit) and o.score is not None:
                rec = {k: v for k, v in o.score.items() if k != "scored_at"}
                scores.setdefault(o.customer_id, []).append(rec)

    seen = [0] * instances
    for cid, e in items:
        part = partition_for(cid, PARTS)
        i = part * instances // PARTS
        sc = scorers[i]
        now = e["occurred_at"]
        apply(sc.on_event(store.get(cid), cid, e, now_ms=now, source=part)[1])
        seen[i] += 1
        if seen[i] % settle_every == 0:
            apply(sc.settle(store.get, now))
        if seen[i] % flush_every == 0:
            apply(sc.flush(store.get, store.items, now))
            apply(sc.seal())
    end = items[-1][1]["occurred_at"]
    for sc in scorers:
        apply(sc.flush(store.get, store.items, end))
        apply(sc.seal())
    return scores, store


def test_batching_ticks_and_instances_do_not_change_a_single_score() -> None:
    items = events()
    base_scores, base_states = run(items, 1, settle_every=1, flush_every=1, defer=False)
    assert sum(len(v) for v in base_scores.values()) > 1000
    refreshes = [s for v in base_scores.values() for s in v if s["as_of"] % 86_400_000 == 0]
    assert len(refreshes) > 100  # time-driven scores, at their grid points
    for instances, settle_every, flush_every, lookup in (
        (1, 50, 50, False),
        (1, 7, 997, False),
        (1, 7, 997, True),
        (2, 13, 301, True),
        (2, 13, 13, True),  # (before session 9's order fix: 2 customers differed)
    ):
        scores, states = run(items, instances, settle_every, flush_every, store_lookup=lookup)
        label = f"{instances} instance(s), settle every {settle_every}, flush every "
        label += f"{flush_every}, {'with' if lookup else 'without'} the store"
        assert set(scores) == set(base_scores), label
        for cid, mine in scores.items():
            theirs = base_scores[cid]
            assert [s["as_of"] for s in mine] == [s["as_of"] for s in theirs], (label, cid)
            assert mine == theirs, (label, cid)
        # the last, batching-dependent flush aside, the states hold the same scoring fields
        assert states.keys() == base_states.keys(), label
        for cid, st in states.items():
            assert st["emitted_as_of"] == base_states[cid]["emitted_as_of"], (label, cid)


# -- states compressed once per batch ----------------------------------------------------------
def test_sealing_once_per_batch_gives_the_same_states_and_scores() -> None:
    sim = Simulation(SimConfig(customers=30, days=50, seed=3))
    items = [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]

    def replay(pack: bool) -> tuple[dict[str, Any], list[Any]]:
        sc = Scorer(ScorerConfig(), pack_states=pack)
        store: dict[str, Any] = {}
        scores: list[Any] = []

        def apply(outs: list[Any]) -> None:
            for o in outs:
                if isinstance(o, StateWrite) and o.state is not None:
                    store[o.customer_id] = o.state
                elif isinstance(o, ScoreEmit) and o.score is not None:
                    scores.append({**o.score, "scored_at": 0})

        for i, (cid, e) in enumerate(items):
            apply(sc.on_event(store.get(cid), cid, e, now_ms=e["occurred_at"])[1])
            if i % 300 == 299:
                apply(sc.flush(store.get, store.items, e["occurred_at"]))
                apply(sc.seal())
        apply(sc.flush(store.get, store.items, items[-1][1]["occurred_at"]))
        apply(sc.seal())
        return store, scores

    (packed, a), (sealed, b) = replay(True), replay(False)
    assert packed == sealed and a == b
    assert len(a) > 100
