"""One churn model for N scorer instances, as a function of the data (services/scorer/shared.py,
``Scorer.sink``, ``Scorer.sweep``, ``Scorer.model_for``): the model version of each day and
the scores served do not depend on how the partitions are split over instances or on the
order in which their contributions reach the learner."""

from __future__ import annotations

import pickle
import random
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from segflow.runtime.state import partition_for
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery
from services.scorer.core import MODEL_INPUTS, ScoreEmit, Scorer, ScorerConfig, StateWrite
from services.scorer.shared import SharedLearner

PARTITIONS = 4
NAMES = tuple(name for name, _ in MODEL_INPUTS)
PROBE = np.random.default_rng(1).normal(size=(200, len(MODEL_INPUTS)))
PROBE_CLUSTERS = np.random.default_rng(2).normal(size=(200, 6))


@pytest.fixture(scope="module")
def items() -> list[tuple[str, dict[str, Any]]]:
    sim = Simulation(SimConfig(customers=160, days=80, seed=5))
    return [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]


def fingerprint(model: Any) -> tuple[Any, ...]:
    """What scores read of a model version: churn predictions, nearest centroids, the fit."""
    p = model.predict_explain_matrix(NAMES, PROBE, 0)[0]
    return (
        tuple(np.round(p, 12)),
        tuple(model.cluster_rows(PROBE_CLUSTERS).tolist()),
        model.bgnbd,
        model.n_learned,
        model.n_clustered,
    )


class Run:
    """``instances`` scorer cores owning the range split of 4 partitions, one learner; each
    version goes to every instance as soon as the learner makes it."""

    def __init__(self, instances: int, cfg: ScorerConfig) -> None:
        self.cfg = cfg
        self.learner = SharedLearner(PARTITIONS, cfg)
        self.sent: list[dict[str, Any]] = []
        self.versions: dict[int, tuple[Any, ...]] = {}
        self.scores: dict[str, list[Any]] = defaultdict(list)
        self.stores: list[dict[str, Any]] = [{} for _ in range(instances)]
        self.scorers = []
        for i in range(instances):
            sc = Scorer(cfg, defer_scores=True)
            sc.partition_of = lambda cid: partition_for(cid, PARTITIONS)
            store = self.stores[i]
            sc.partition_states = lambda p, store=store: [
                (c, st) for c, st in store.items() if partition_for(c, PARTITIONS) == p
            ]
            sc.sink = lambda kind, payload: self.sent.append(payload)
            self.scorers.append(sc)
        self.instances = instances

    def owner(self, cid: str) -> int:
        return partition_for(cid, PARTITIONS) * self.instances // PARTITIONS

    def deliver(self) -> None:
        for payload in self.sent:
            for day, blob in self.learner.add(pickle.loads(pickle.dumps(payload))):
                self.versions[day] = fingerprint(pickle.loads(blob))
                for sc in self.scorers:
                    sc.receive(day, pickle.loads(blob))
        self.sent.clear()

    def apply(self, k: int, outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite):
                if o.state is None:
                    self.stores[k].pop(o.customer_id, None)
                else:
                    self.stores[k][o.customer_id] = o.state
            elif isinstance(o, ScoreEmit):
                rec = None if o.score is None else {**o.score, "scored_at": 0}
                self.scores[o.customer_id].append(rec)

    def replay(self, items: list[tuple[str, dict[str, Any]]]) -> Run:
        for cid, ev in items:
            k = self.owner(cid)
            sc, store = self.scorers[k], self.stores[k]
            t = int(ev["occurred_at"])
            self.apply(k, sc.on_event(store.get(cid), cid, ev, t, partition_for(cid, 4))[1])
            self.apply(k, sc.settle(store.get, t))
            self.deliver()
        return self


def test_the_versions_of_each_day_do_not_depend_on_the_order_contributions_arrive_in(
    items: list[tuple[str, dict[str, Any]]],
) -> None:
    """The contributions one run sent, fed to new learners in other orders (each partition's
    own in its order, the partitions interleaved at random, as instances' transactions
    land on the one-partition examples topic): the same model version every day. Learned in
    arrival order (before session 10: each record as it came) the clusters differ."""
    cfg = ScorerConfig()
    run = Run(1, cfg)
    run.deliver = lambda: None  # type: ignore[method-assign]  # collected, learned below
    run.replay(items)
    contributions = list(run.sent)
    assert any(c["complete"] is False for c in contributions)  # partial days
    assert sum(len(c["ex_ids"]) for c in contributions) > 500  # labels matured
    assert sum(bool(c["refit"]) for c in contributions) > 0
    learner, got = SharedLearner(PARTITIONS, cfg, grace_days=10_000), {}
    for c in contributions:
        for day, blob in learner.add(c):
            got[day] = fingerprint(pickle.loads(blob))
    assert len(got) > 40
    rng = random.Random(3)
    for _ in range(2):
        queues = defaultdict(list)
        for c in contributions:
            queues[c["partition"]].append(c)
        learner = SharedLearner(PARTITIONS, cfg, grace_days=10_000)  # (the grace rule: below)
        versions = {}
        while any(queues.values()):
            p = rng.choice([q for q in queues if queues[q]])
            for day, blob in learner.add(queues[p].pop(0)):
                versions[day] = fingerprint(pickle.loads(blob))
        assert versions.keys() == got.keys()
        differ = [(d, i) for d in got for i in range(5) if versions[d][i] != got[d][i]]
        assert not differ, f"versions differ: {differ[:5]}"
        assert learner.dropped == 0 and learner.forced == 0


def test_a_k_means_learned_in_arrival_order_depends_on_the_order() -> None:
    """Why the learner sorts: the same cluster inputs in two orders leave different centroids
    (what the shared model did before, with rows from several instances)."""
    rows = np.random.default_rng(4).gamma(2.0, size=(300, 6))
    from services.scorer.view import _CLUSTER_NAMES, new_model

    a, b = new_model(), new_model()
    for m, order in ((a, range(300)), (b, reversed(range(300)))):
        m.cluster_rows(np.zeros((1, 6)))
        for i in order:
            m.learn_cluster(dict(zip(_CLUSTER_NAMES, rows[i].tolist(), strict=True)))
    assert a.centroids() != b.centroids()


def test_two_instances_serve_the_scores_one_does(items: list[tuple[str, dict[str, Any]]]) -> None:
    """1 vs 2 instances (the range split of 4 partitions): the same versions every day, the
    same score records (churn, cluster, model version), none scored before its version came."""
    cfg = ScorerConfig()
    one = Run(1, cfg).replay(items)
    two = Run(2, cfg).replay(items)
    assert one.versions == two.versions
    assert one.learner.model.n_learned > 500 and one.learner.model.n_clustered > 500
    assert sum(sc.early_scores for sc in one.scorers + two.scorers) == 0
    assert len({r["model_version"] for rs in one.scores.values() for r in rs if r}) > 5
    assert len({r["cluster"] for rs in one.scores.values() for r in rs if r}) > 1
    assert sum(len(v) for v in one.scores.values()) > 3000
    differ = [c for c in one.scores if one.scores[c] != two.scores.get(c)]
    assert not differ, f"{len(differ)} customers' scores differ"


def test_a_learner_resumes_from_its_record(items: list[tuple[str, dict[str, Any]]]) -> None:
    """A new learner from the last one's pickled state (the ``churn.learner`` record) makes
    the versions the first would have made: nothing buffered is lost."""
    cfg = ScorerConfig()
    run = Run(1, cfg)
    run.deliver = lambda: None  # type: ignore[method-assign]
    run.replay(items)
    contributions = list(run.sent)
    whole, versions = SharedLearner(PARTITIONS, cfg), {}
    for c in contributions:
        for day, blob in whole.add(c):
            versions[day] = fingerprint(pickle.loads(blob))
    learner, resumed = SharedLearner(PARTITIONS, cfg), {}
    for i, c in enumerate(contributions):
        if i % 97 == 0:
            learner = SharedLearner.from_bytes(learner.to_bytes())
        for day, blob in learner.add(c):
            resumed[day] = fingerprint(pickle.loads(blob))
    assert resumed == versions


def held_replay(items: list[tuple[str, dict[str, Any]]], instances: int, seed: int) -> Run:
    """The partitions read at random speeds (each in its order), each instance's
    contributions reaching the learner after random delays (in its order), each version
    reaching each instance after random delays: a record that needs a version its instance
    does not have holds its partition (``version_needed``, ``precomplete``: what the shell
    does with the loop's ``HoldPartition``) until the version arrives."""
    rng = random.Random(seed)
    run = Run(instances, ScorerConfig())
    fifo: list[list[dict[str, Any]]] = [[] for _ in range(instances)]
    inbox: list[list[tuple[int, bytes]]] = [[] for _ in range(instances)]
    for i, sc in enumerate(run.scorers):
        sc.sink = lambda kind, payload, i=i: fifo[i].append(pickle.loads(pickle.dumps(payload)))
    queues: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for cid, ev in items:
        queues[partition_for(cid, PARTITIONS)].append((cid, ev))
    heads = dict.fromkeys(queues, 0)
    held: dict[int, int] = {}
    holds = 0
    while True:
        for p, need in list(held.items()):
            if run.scorers[run.owner(queues[p][0][0])].has_version(need):
                del held[p]
        moves = [("read", p) for p in queues if heads[p] < len(queues[p]) and p not in held]
        moves += [("learn", i) for i in range(instances) if fifo[i]]
        moves += [("version", i) for i in range(instances) if inbox[i]]
        if not moves:
            break
        kind, x = rng.choice(moves)
        if kind == "learn":
            for day, blob in run.learner.add(fifo[x].pop(0)):
                run.versions[day] = fingerprint(pickle.loads(blob))
                for box in inbox:
                    box.append((day, blob))
        elif kind == "version":
            for day, blob in inbox[x][: rng.randint(1, len(inbox[x]))]:
                run.scorers[x].receive(day, pickle.loads(blob))  # noqa: S301
                inbox[x].pop(0)
        else:
            cid, ev = queues[x][heads[x]]
            k = run.owner(cid)
            sc, store = run.scorers[k], run.stores[k]
            t = int(ev["occurred_at"])
            need = sc.version_needed(x, t)
            if need is not None:
                assert sc.partition_states is not None
                blocked = sc.precomplete(x, t, sc.partition_states(x))
                held[x] = need if blocked is None else blocked
                holds += 1
                continue
            heads[x] += 1
            run.apply(k, sc.on_event(store.get(cid), cid, ev, t, x)[1])
            run.apply(k, sc.settle(store.get, t))
    assert all(heads[p] == len(queues[p]) for p in queues), f"stuck, holding {held}"
    assert holds > 10  # the timing did make partitions wait
    assert sum(sc.early_scores for sc in run.scorers) == 0
    return run


def test_with_holds_the_scores_do_not_depend_on_timing_or_instances(
    items: list[tuple[str, dict[str, Any]]],
) -> None:
    """1 instance and 2, each with its own random timing (partitions read at different
    speeds, contributions and versions delayed): identical versions and score records. The
    current learner would have scored with whatever version had arrived."""
    one = held_replay(items, 1, seed=1)
    assert one.learner.model.n_learned > 500
    assert len({r["model_version"] for rs in one.scores.values() for r in rs if r}) > 5
    for instances, seed in ((2, 2), (2, 3), (1, 4)):
        other = held_replay(items, instances, seed)
        assert other.versions == one.versions, (instances, seed)
        differ = [c for c in one.scores if one.scores[c] != other.scores.get(c)]
        assert not differ, f"{instances} instances, seed {seed}: {len(differ)} differ"
