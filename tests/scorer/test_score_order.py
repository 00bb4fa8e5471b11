"""The order of the score records within each scores partition is a function of the input
records, not of where batches ended, when the ticks came or how many instances read them
(issue #15).

The segmenter computes a scores partition's percentile tables when that partition's records
first reach an hourly grid instant, from its customers' latest values at that point: so the
*cross-customer* order of the records of one scores partition counts, not only each
customer's own sequence (``test_determinism.py``, ``test_partition_clocks.py``). Every
score is produced in the transaction of the input record that made it due, at that record's
place: an urgent score at its event, a timer (a pending score, a refresh grid point) at the
record of its partition that moved the partition's watermark past it. Before, urgent scores
came after every other output of their batch, and timers the watermark passed in a batch
fired at the next tick (or before their customer's next event): the order depended on the
batch sizes and the tick cadence.
"""

from __future__ import annotations

from typing import Any

from segflow.runtime.loop import Output
from segflow.runtime.records import Incoming
from segflow.runtime.state import partition_for
from segflow.runtime.topics import TOPICS
from tests.scorer.test_partition_clocks import PARTS, records, service

Sequence = dict[int, list[tuple[str, Any]]]


def sequences(outputs: list[Output]) -> Sequence:
    """Each scores partition's records in the order produced: (key, record bar
    ``scored_at``; None for a tombstone)."""
    out: Sequence = {}
    for o in outputs:
        if o.topic is TOPICS.scores:
            value = (
                None if o.value is None else {k: v for k, v in o.value.items() if k != "scored_at"}
            )
            out.setdefault(partition_for(str(o.key), PARTS), []).append((str(o.key), value))
    return out


def feed(owners: list[set[int]], items: list[Incoming], batch: int, tick_every: int) -> Sequence:
    """Read ``items`` with one service per set of partitions in ``owners``, each committing
    every ``batch`` of its records and ticking after every ``tick_every`` commits."""
    services = []
    for parts in owners:
        svc = service()
        svc.states.assigned = set(parts)
        services.append(svc)
    owner = {p: i for i, parts in enumerate(owners) for p in parts}
    out: list[Output] = []
    seen, commits = [0] * len(services), [0] * len(services)

    def commit(i: int) -> None:
        svc = services[i]
        out.extend(svc.before_commit())
        svc.states.on_commit()
        commits[i] += 1
        if commits[i] % tick_every == 0:
            out.extend(svc.tick())
            svc.states.on_commit()

    for record in items:
        i = owner[record.partition]
        out.extend(services[i].handle(record))
        seen[i] += 1
        if seen[i] % batch == 0:
            commit(i)
    for i, svc in enumerate(services):
        commit(i)
        out.extend(svc.tick())
    return sequences(out)


def test_each_scores_partition_gets_the_same_sequence_whatever_the_batching() -> None:
    items = records()
    every = set(range(PARTS))
    base = feed([every], items, batch=1, tick_every=1)
    assert set(base) == every
    assert all(len(seq) > 100 for seq in base.values())
    kinds = [v for seq in base.values() for _, v in seq if v is not None]
    assert sum(v["as_of"] % 86_400_000 == 0 for v in kinds) > 100  # refresh grid points
    assert len({k for seq in base.values() for k, _ in seq}) > 30  # several customers each
    variants = [
        ("1 instance, batches of 7, a tick every 3", [every], 7, 3),
        ("1 instance, batches of 500, a tick every batch", [every], 500, 1),
        ("2 instances, batches of 7, a tick every 5", [{0, 1}, {2, 3}], 7, 5),
        ("2 instances, batches of 500, a tick every 2", [{0, 2}, {1, 3}], 500, 2),
        ("2 instances, batches of 1, a tick every 100", [{0, 3}, {1, 2}], 1, 100),
    ]
    for label, owners, batch, tick_every in variants:
        mine = feed(owners, items, batch, tick_every)
        assert set(mine) == set(base), label
        for p, seq in base.items():
            # the same records per customer (test_partition_clocks), and here also in the same
            # order across the partition's customers
            assert sorted(mine[p], key=repr) == sorted(seq, key=repr), (label, p)
            assert mine[p] == seq, (label, p)


def test_a_merge_waiting_for_its_hand_off_does_not_reorder_its_scores_partition() -> None:
    """The survivor's partition reaches the merge-causing event before, or after, the
    absorbed id's partition reached its ``customer_merged`` record, whatever the batches: the
    survivor's scores partition, where another customer scores meanwhile, gets the same
    records in the same order. Before, only the survivor was
    parked and the other customer's scores moved ahead of the survivor's by timing."""
    from tests.scorer import test_merge_marks as mm
    from tests.scorer.holding import HeldReader

    def by_partition(order: list[Incoming], batch: int) -> Sequence:
        reader = HeldReader(mm.service(), batch)
        for record in order:
            reader.read(record)
        return sequences(reader.finish())

    assert partition_for("s", PARTS) == partition_for("x", PARTS) != partition_for("b", PARTS)
    survivors = sorted(mm.SURVIVOR + mm.OTHER, key=lambda r: r.value["event"]["occurred_at"])
    base = by_partition(mm.in_time_order(), 1)
    mine = base[partition_for("s", PARTS)]
    assert {k for k, _ in mine} == {"s", "x"} and len(mine) > 30
    for batch in (1, 7, 500):
        for label, order in [
            ("in event-time order", mm.in_time_order()),
            ("absorbed id's partition first", mm.ABSORBED + survivors),
            ("absorbed id's partition last", survivors + mm.ABSORBED),
            ("absorbed id's partition midway", survivors[:20] + mm.ABSORBED + survivors[20:]),
        ]:
            assert by_partition(order, batch) == base, (label, batch)
