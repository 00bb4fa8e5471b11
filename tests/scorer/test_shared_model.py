"""One churn model for N scorer instances: what a scorer sends to the learner is exactly what
it would have learned itself (services/scorer/core.py ``Scorer.sink``, ``learn_from``)."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery
from services.scorer.core import (
    MODEL_INPUTS,
    Scorer,
    ScorerConfig,
    StateWrite,
    adopt,
    learn_from,
)


def replay(
    scorer: Scorer, items: list[tuple[str, dict[str, Any]]], after: Any = lambda: None
) -> list[float]:
    store: dict[str, Any] = {}
    churn: list[float] = []

    def apply(outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite):
                if o.state is None:
                    store.pop(o.customer_id, None)
                else:
                    store[o.customer_id] = o.state
            elif o.score is not None and hasattr(o, "score"):
                churn.append(o.score["churn_probability"])

    for i, (cid, ev) in enumerate(items):
        apply(scorer.on_event(store.get(cid), cid, ev, ev["occurred_at"])[1])
        after()  # (a snapshot taken before the event sent its cluster inputs)
        apply(scorer.settle(store.get, ev["occurred_at"]))
        if i % 500 == 0:
            apply(scorer.flush(store.get, store.items, ev["occurred_at"]))
            after()
    apply(scorer.flush(store.get, store.items, items[-1][1]["occurred_at"]))
    after()
    return churn


def test_a_scorer_learning_through_the_sink_scores_exactly_as_one_learning_itself() -> None:
    sim = Simulation(SimConfig(customers=220, days=95, seed=5))
    items = [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]
    cfg = ScorerConfig()
    alone = Scorer(cfg, defer_scores=True)
    expected = replay(alone, items)

    shared = Scorer(cfg, defer_scores=True)
    learner = pickle.loads(pickle.dumps(shared.model))  # the learner's own copy
    sent: list[str] = []
    queue: list[tuple[str, dict[str, Any]]] = []

    def publish() -> None:
        """The learner learns what was sent and the scorer loads the version it publishes (a
        copy: nothing shared), before the scorer's next call: no propagation delay."""
        if queue:
            for kind, payload in queue:
                sent.append(kind)
                learn_from(learner, kind, payload, cfg)
            queue.clear()
            adopt(shared, pickle.loads(pickle.dumps(learner)))  # noqa: S301

    shared.sink = lambda kind, payload: queue.append((kind, payload))
    got = replay(shared, items, publish)
    assert {"examples", "clusters", "summary"} <= set(sent)
    assert alone.model.n_learned > 500 and learner.n_learned == alone.model.n_learned
    assert learner.bgnbd_day == alone.model.bgnbd_day
    # The same model: the same predictions (to float rounding: a model loaded from its bytes
    # folds its weights again) and the same bookkeeping.
    assert learner.bgnbd == alone.model.bgnbd
    x = np.random.default_rng(1).normal(size=(200, len(MODEL_INPUTS)))
    names = tuple(name for name, _ in MODEL_INPUTS)
    ours = learner.predict_explain_matrix(names, x, 0)[0]
    np.testing.assert_allclose(ours, alone.model.predict_explain_matrix(names, x, 0)[0], atol=1e-9)
    # and the same scores served, but where float rounding flips a threshold (the 0.02
    # churn step that makes a score worth emitting): 1 in 15,000 here
    assert abs(len(got) - len(expected)) <= len(expected) // 2000
    assert abs(np.mean(got) - np.mean(expected)) < 1e-4
