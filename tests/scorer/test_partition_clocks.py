"""Every identified partition has its own event-time clock, a function of that partition's
records in order (issue #15): a customer's timers fire by its own partition's watermark, an
event is too late by its own partition's final watermark, and the clock is in the
partition's changelog, so a new owner continues where the old one committed.

So the score records do not depend on which instance holds which partitions, in which
interleaving the partitions are read, or on a partition read days behind the others (as
after a takeover). With one clock per instance (the minimum over its partitions, moved on by
the others while one was behind) a partition read after the others had every timer of its
customers fire before their events, and its events were dead-lettered as too late.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from segflow.errors import InvalidRecord
from segflow.runtime.loop import Output
from segflow.runtime.records import Incoming
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import partition_for
from segflow.runtime.topics import TOPICS
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery, NoiseConfig
from services.scorer.app import CLOCK_KEY, ScorerService, clock_of, clock_record
from services.scorer.core import ScoreEmit, Scorer, ScorerConfig, StateWrite
from services.scorer.features import DAY, HOUR, MINUTE
from services.scorer.settings import ScorerSettings

PARTS = 4
SETTINGS = Settings(bootstrap_servers="127.0.0.1:1")
SERDE = Serde.from_settings(SETTINGS)
Item = tuple[str, dict[str, Any]]


def partitions() -> tuple[dict[int, list[Item]], list[int]]:
    """Each partition's records in delivery order (late and out-of-order deliveries: some
    events arrive a day and more after newer ones of the same partition), and the partition
    of every record in the order they were delivered."""
    noise = NoiseConfig(late=0.05, out_of_order=0.05)
    sim = Simulation(SimConfig(customers=40, days=35, seed=11, noise=noise))
    out: dict[int, list[Item]] = {p: [] for p in range(PARTS)}
    order = []
    for d in sim.run():
        if isinstance(d, Delivery):
            p = partition_for(d.customer, PARTS)
            out[p].append((d.customer, d.event))
            order.append(p)
    return out, order


PARTITIONS, DELIVERED = partitions()
END = max(e["occurred_at"] for items in PARTITIONS.values() for _, e in items)


class Reader:
    """Scorers that each own some partitions, fed records as the shell would."""

    def __init__(self, owners: list[set[int]], settle_every: int, flush_every: int) -> None:
        cfg = ScorerConfig(max_pending_labels=0)  # no snapshots: the model stays as it is
        self.store: dict[str, Any] = {}
        self.scorers = [Scorer(cfg, pack_states=False, defer_scores=True) for _ in owners]
        for sc in self.scorers:
            sc.model.snapshot_rate = 0.0
            sc.store = self.store.get
            sc.partition_of = lambda cid: partition_for(cid, PARTS)
        self.owner = {p: i for i, parts in enumerate(owners) for p in parts}
        self.cursor = dict.fromkeys(PARTITIONS, 0)
        self.seen = [0] * len(owners)
        self.settle_every, self.flush_every = settle_every, flush_every
        self.scores: dict[str, list[dict[str, Any]]] = {}
        self.late: set[str] = set()

    def apply(self, outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite) and o.state is not None:
                self.store[o.customer_id] = o.state
            elif isinstance(o, ScoreEmit) and o.score is not None:
                rec = {k: v for k, v in o.score.items() if k != "scored_at"}
                self.scores.setdefault(o.customer_id, []).append(rec)

    def read(self, p: int) -> None:
        """The next record of partition ``p``."""
        cid, e = PARTITIONS[p][self.cursor[p]]
        self.cursor[p] += 1
        i = self.owner[p]
        sc, now = self.scorers[i], END + 3_600_000
        try:
            self.apply(sc.on_event(self.store.get(cid), cid, e, now_ms=now, source=p)[1])
        except InvalidRecord:
            self.late.add(e["event_id"])
        self.seen[i] += 1
        if self.seen[i] % self.settle_every == 0:
            self.apply(sc.settle(self.store.get, now))
            self.apply(sc.seal())
        if self.seen[i] % self.flush_every == 0:
            self.apply(sc.flush(self.store.get, lambda: iter(self.store.items()), now))
            self.apply(sc.seal())

    def finish(self) -> dict[str, list[dict[str, Any]]]:
        for sc in self.scorers:
            self.apply(sc.settle(self.store.get, END))
            self.apply(sc.flush(self.store.get, lambda: iter(self.store.items()), END))
            self.apply(sc.seal())
        return self.scores


def read_all(reader: Reader, order: Iterator[int] | list[int]) -> dict[str, list[Any]]:
    for p in order:
        reader.read(p)
    assert all(reader.cursor[p] == len(PARTITIONS[p]) for p in PARTITIONS)
    return reader.finish()


def rounds(parts: list[int], chunk: int) -> list[int]:
    """Partitions read in rounds of ``chunk`` records each, in the order ``parts``."""
    left, order = {p: len(PARTITIONS[p]) for p in parts}, []
    while any(left.values()):
        for p in parts:
            n = min(chunk, left[p])
            left[p] -= n
            order += [p] * n
    return order


def test_partitions_read_in_any_interleaving_by_any_instances_give_the_same_scores() -> None:
    reference = Reader([set(range(PARTS))], settle_every=1, flush_every=1)
    base = read_all(reference, DELIVERED)
    assert sum(len(v) for v in base.values()) > 1000
    refreshes = [s for v in base.values() for s in v if s["as_of"] % 86_400_000 == 0]
    assert len(refreshes) > 100  # time-driven scores, at their grid points
    every = list(range(PARTS))
    variants = [
        ("1 instance, rounds of 97 records", [set(every)], 7, 53, rounds([3, 1, 0, 2], 97)),
        # partition 3 read only after the others were read to their ends: weeks behind
        # their clocks (its owner's other partition's), as a partition taken over after a kill
        ("2 instances, partition 3 last", [{0, 1}, {2, 3}], 13, 301, rounds([0, 1, 2], 10**6)),
        ("2 instances, partition 3 first", [{0, 3}, {1, 2}], 50, 11, rounds([3, 0, 1, 2], 10**6)),
    ]
    for label, owners, settle_every, flush_every, order in variants:
        if label.endswith("last"):
            order = [*order, *rounds([3], 10**6)]
        reader = Reader(owners, settle_every, flush_every)
        scores = read_all(reader, order)
        assert reader.late == reference.late, label
        assert set(scores) == set(base), label
        for cid, mine in scores.items():
            assert [s["as_of"] for s in mine] == [s["as_of"] for s in base[cid]], (label, cid)
            assert mine == base[cid], (label, cid)


# -- the clocks in the changelog (the service, in process) -----------------------------------
def incoming(p: int, cid: str, event: dict[str, Any]) -> Incoming:
    value = {"customer_id": cid, "event": event, "email_hash": None, "identified_at": 0}
    raw = SERDE.encode(TOPICS.identified, {**value, "merge": None})
    value = SERDE.decode(TOPICS.identified, raw)
    return Incoming(TOPICS.identified, "identified", p, 0, cid, value, None, [], raw)


def records() -> list[Incoming]:
    cursor = dict.fromkeys(PARTITIONS, 0)
    out = []
    for p in DELIVERED:
        out.append(incoming(p, *PARTITIONS[p][cursor[p]]))
        cursor[p] += 1
    return out


def service() -> ScorerService:
    svc = ScorerService(
        SETTINGS, ScorerSettings(shared_model=False), clock=lambda: (END + 3_600_000) / 1000
    )
    svc.scorer.model.snapshot_rate = 0.0
    svc.scorer.config = ScorerConfig(**{**svc.scorer.config.__dict__, "max_pending_labels": 0})
    return svc


def scores_of(outputs: list[Output]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for o in outputs:
        if o.topic is TOPICS.scores and o.value is not None:
            out.setdefault(str(o.key), []).append(
                {k: v for k, v in o.value.items() if k != "scored_at"}
            )
    return out


def feed(svc: ScorerService, items: list[Incoming], batch: int) -> list[Output]:
    """Read ``items``, committing every ``batch`` records (and ticking)."""
    out: list[Output] = []
    for i, record in enumerate(items):
        out += svc.handle(record)
        if (i + 1) % batch == 0 or i + 1 == len(items):
            out += [*svc.before_commit(), *svc.tick()]
            svc.states.on_commit()
    return out


def test_a_new_owner_continues_with_the_clock_its_predecessor_committed() -> None:
    items = records()
    reference = feed(service(), items, batch=50)
    half = len(items) // 2
    old = service()
    committed = feed(old, items[:half], batch=50)
    stored = {k: v for k, v in old.states.table.items() if k.startswith(CLOCK_KEY)}
    assert sorted(stored) == [f"{CLOCK_KEY}{p}" for p in range(PARTS)]
    for key, st in stored.items():  # each in its own partition, a valid ScorerState
        p = int(key[len(CLOCK_KEY) :])
        assert old.states.partition_of(key) == p
        wire = SERDE.decode(TOPICS.scorer_state, SERDE.encode(TOPICS.scorer_state, st))
        assert (
            clock_of(wire)
            == old.scorer.clocks[p]
            == clock_of(clock_record(p, old.scorer.clocks[p]))
        )
    # an abort rolls the clocks back to what was committed
    before = {p: clock_of(clock_record(p, c)) for p, c in old.scorer.clocks.items()}
    for record in items[half : half + 30]:
        list(old.handle(record))
    assert old.scorer.clocks != before
    old.states.on_abort()
    old.on_abort()
    assert old.scorer.clocks == before
    # the partitions move to a new owner (kill -9: what the old one had not committed is lost)
    new = service()
    new.states.load_snapshot(old.states.snapshot())
    new.on_assign(set(range(PARTS)))
    assert new.scorer.clocks == before
    committed += feed(new, items[half:], batch=50)
    assert scores_of(committed) == scores_of(reference)


def test_a_partition_behind_its_new_owners_other_partition_is_not_late_for_it() -> None:
    items = records()
    late = [r for r in items if r.partition == 3]
    ahead = [r for r in items if r.partition == 2]
    svc = service()
    svc.states.assigned = {2, 3}
    out = feed(svc, ahead, batch=200)  # partition 2 to its end, weeks ahead of partition 3
    out += feed(svc, late, batch=200)
    reference = feed(service(), items, batch=50)
    mine = scores_of(out)
    assert set(mine) == {str(r.key) for r in ahead + late if str(r.key) in scores_of(reference)}
    assert mine == {k: v for k, v in scores_of(reference).items() if k in mine}


# -- one partition's clock -----------------------------------------------------------------------
T0 = 1_704_067_200_000


def ev(kind: str, t: int) -> dict[str, Any]:
    return {"event_type": kind, "occurred_at": t}


def test_each_partition_has_its_own_clock() -> None:
    sc = Scorer(ScorerConfig(), partition_of=lambda cid: int(cid[1:]) % 2)
    store: dict[str, Any] = {}
    store["c2"], _ = sc.on_event(None, "c2", ev("login", T0 + HOUR), now_ms=T0, source=0)
    for i in range(3):  # a week of partition 0
        t = T0 + i * 3 * DAY
        store["c0"], _ = sc.on_event(store.get("c0"), "c0", ev("login", t), now_ms=t, source=0)
    assert sc.watermark_of(0) == T0 + 6 * DAY - 5 * MINUTE and sc.watermark_of(1) is None
    t = T0 + HOUR  # six days older than partition 0's newest: partition 1's own time
    store["c1"], _ = sc.on_event(store.get("c1"), "c1", ev("login", t), now_ms=t, source=1)
    assert sc.watermark_of(1) == T0 + HOUR - 5 * MINUTE
    assert sc.max_event_ms == T0 + HOUR  # the instance's clock: the minimum over its own
    # partition 1's customer is not scored by partition 0's time: its refresh at T0 + 1 day
    # waits for its own partition
    apply = [o for o in sc.flush(store.get, store.items, now_ms=T0 + 7 * DAY)]
    store.update((o.customer_id, o.state) for o in apply if isinstance(o, StateWrite))
    assert store["c1"]["scored_as_of"] == T0 + HOUR  # (its first event was urgent)
    assert store["c2"]["scored_as_of"] == T0 + 5 * DAY  # refreshed by partition 0's time


def test_runs_of_days_that_start_over_within_a_partition_are_not_late() -> None:
    # what the identity service writes for a burst: one group of customers' week, then the
    # next group's from its first day again, all on the same partition
    sc = Scorer(ScorerConfig())
    days = [d for _ in range(2) for d in range(7)]
    now = T0 + 7 * DAY
    for i, d in enumerate(days):  # day 0 after day 6 is 6 days late for a 48 h lateness
        sc.on_event(None, f"c{i}", ev("login", T0 + d * DAY), now_ms=now, source=0)
    assert sc.max_event_ms == T0 + 6 * DAY
    assert sc.final_watermark_of(0) == T0 - 2 * DAY  # the reorder floor: the runs' oldest


def test_a_partition_too_far_behind_its_own_floor_dead_letters_the_event() -> None:
    sc = Scorer(ScorerConfig(reorder_records=4))  # the floor: the last 2 to 4 records
    for d in range(10):
        sc.on_event(None, f"c{d}", ev("login", T0 + d * DAY), now_ms=T0 + 10 * DAY, source=0)
    # the oldest of the last 2 to 4 records (day 6), less 48 h
    assert sc.final_watermark_of(0) == T0 + 4 * DAY
    sc.on_event(None, "late", ev("login", T0 + 4 * DAY), now_ms=T0 + 10 * DAY, source=0)
    with pytest.raises(InvalidRecord) as exc:
        sc.on_event(None, "later", ev("login", T0 + 3 * DAY), now_ms=T0 + 10 * DAY, source=0)
    assert exc.value.reason == "too_late"
