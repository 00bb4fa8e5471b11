"""Held partitions on the shared loop, on a real broker (:mod:`segflow.runtime.holds`): a
handler raises ``HoldPartition`` for a record it cannot handle yet; its partition waits at
that record, through aborts and rebalances, until a hook releases it."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from segflow.runtime.loop import LoopConfig, Output, ProcessingLoop
from segflow.runtime.passthrough import copier
from segflow.runtime.settings import Settings
from segflow.runtime.state import partition_for
from segflow.runtime.testing import create_topic, produce_events, read_all, wait_until
from segflow.runtime.topics import TOPICS
from tests.integration.test_loop import decoded, make_events

pytestmark = pytest.mark.broker


class _Aborting:
    """The loop's producer, with the next ``armed`` transaction commits failing as
    abortable (what a fenced or timed-out transaction gives)."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self.armed = 0
        self.aborted = 0

    def commit_transaction(self, *args: Any) -> None:
        from confluent_kafka import KafkaError, KafkaException

        if self.armed:
            self.armed -= 1
            self.aborted += 1
            raise KafkaException(KafkaError(KafkaError._STATE, "injected", txn_requires_abort=True))
        self._producer.commit_transaction(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


class _Gate:
    """A handler that copies events to ``sink`` but holds its partition at event ``at`` until
    the gate opens (then a hook's ``releases()`` resumes it)."""

    def __init__(self, sink: str, source: str, at: str, part: int) -> None:
        self.sink, self.source, self.at, self.part = sink, source, at, part
        self.open = False
        self.held_at: list[int] = []  # offsets of the held record, each time it was read
        self.handled: Counter[str] = Counter()
        self.copy = copier(sink)
        self.on_first_hold: Any = None

    def __call__(self, record: Any) -> Any:
        from segflow.runtime.records import HoldPartition

        if record.value["event_id"] == self.at and not self.open:
            self.held_at.append(record.offset)
            if self.on_first_hold is not None and len(self.held_at) == 1:
                self.on_first_hold()
            raise HoldPartition(self.at)
        self.handled[record.value["event_id"]] += 1
        return self.copy(record)  # type: ignore[operator]

    def releases(self) -> list[tuple[str, int]]:
        return [(self.source, self.part)] if self.open else []

    def on_commit(self) -> None:
        pass

    def on_abort(self) -> None:
        pass


def _group_committed(s: Settings, group: str, topic: str, part: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**s.kafka_config(), "group.id": group, "enable.auto.commit": False})
    try:
        [tp] = c.committed([TopicPartition(topic, part)], timeout=10)
        return int(tp.offset)
    finally:
        c.close()


def _per_key_in_order(s: Settings, records: list[Any]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = defaultdict(list)
    for ev in decoded(s, records):
        seqs[ev["user_id"]].append(int(ev["event_id"][1:]))
    return seqs


def _held_setup(
    s: Settings,
) -> tuple[str, str, str, int, str, set[str], list[dict[str, Any]]]:
    """Source and sink topics (4 partitions), the group, the partition held, the event it is
    held at (mid-partition), the events from there on, and the 400 events (produced)."""
    source = create_topic(s, s.topic_prefix + "held-in", TOPICS.events, partitions=4)
    sink = create_topic(s, s.topic_prefix + "held-out", TOPICS.events, partitions=4)
    events = make_events(400, keys=20)
    part = partition_for("u3", 4)
    mine = [e for e in events if partition_for(e["user_id"], 4) == part]
    at = mine[len(mine) // 2]["event_id"]
    after = {e["event_id"] for e in mine[len(mine) // 2 :]}
    produce_events(s, source, events)
    return source, sink, s.topic_prefix + "g", part, at, after, events


def test_a_held_partition_waits_at_its_record_until_released_through_aborts(
    kafka_settings: Settings,
) -> None:
    """A handler holds one partition at a record (HoldPartition): the other partitions go
    on, the held one's later records are not handled, the group's committed offset for it is
    the held record's; an abort of the batch that holds it and of a later batch change
    nothing of that; released, the partition resumes at the record and every event reaches
    the sink exactly once, in order per key (read_committed)."""
    s = kafka_settings
    source, sink, group, part, at, after, events = _held_setup(s)

    gate = _Gate(sink, source, at, part)
    loop, aborting = _aborting_loop(s, gate, group, source, batch_size=37, tx="tx")

    def arm() -> None:  # the batch that holds the partition aborts
        aborting.armed = 1

    gate.on_first_hold = arm
    runner = threading.Thread(target=loop.run)
    runner.start()
    try:
        others = {e["event_id"] for e in events} - after
        wait_until(lambda: others <= set(gate.handled), 60, what="the other partitions")
        wait_until(lambda: (source, part) in loop.held, 30, what="the hold")
        assert not after & set(gate.handled)  # nothing of the held partition from the record on
        held_offset = loop.held[(source, part)]
        assert len(gate.held_at) >= 2 and set(gate.held_at) == {held_offset}  # read again
        assert _group_committed(s, group, source, part) == held_offset
        # an abort while held: the rewind does not resume the held partition
        aborting.armed = 1
        more = make_events(40, keys=20, start=400)
        more = [e for e in more if partition_for(e["user_id"], 4) != part]
        produce_events(s, source, more)
        extra = {e["event_id"] for e in more}

        def committed_ids() -> set[str]:
            return {e["event_id"] for e in decoded(s, read_all(s, sink))}

        wait_until(lambda: extra <= committed_ids(), 60, what="records after the abort")
        assert aborting.aborted == 2
        assert (source, part) in loop.held and not after & set(gate.handled)
        assert _group_committed(s, group, source, part) == held_offset
        gate.open = True
        wait_until(lambda: after <= set(gate.handled), 60, what="the released partition")
    finally:
        loop.stop()
        runner.join(60)
    assert not runner.is_alive()
    assert not loop.held
    out = read_all(s, sink, expected=len(events) + len(extra))
    ids = Counter(e["event_id"] for e in decoded(s, out))
    assert set(ids) == {e["event_id"] for e in events} | extra
    assert max(ids.values()) == 1  # exactly once, through both aborts
    for seq in _per_key_in_order(s, out).values():
        assert seq == sorted(seq)


def test_a_held_partition_is_forgotten_at_a_rebalance_and_its_new_owner_holds_it_again(
    kafka_settings: Settings,
) -> None:
    """A second member joins while a partition is held: the (eager) rebalance takes every
    partition away; whoever owns the held one afterwards reads it from the held record,
    holds it again, and resumes it once released; every event once, in order per key."""
    s = kafka_settings
    source, sink, group, part, at, after, events = _held_setup(s)

    gates, loops, runners = [], [], []

    def start(i: int) -> None:
        gate = _Gate(sink, source, at, part)
        config = LoopConfig(
            service="holder",
            group_id=group,
            sources={source: TOPICS.events},
            batch_size=37,
            transactional_id=f"{s.topic_prefix}tx{i}",
        )
        loop = ProcessingLoop(s, config, gate, hooks=[gate])
        runner = threading.Thread(target=loop.run)
        runner.start()
        gates.append(gate)
        loops.append(loop)
        runners.append(runner)

    def handled() -> set[str]:
        return {k for g in gates for k in g.handled}

    try:
        start(0)
        others = {e["event_id"] for e in events} - after
        wait_until(lambda: others <= handled(), 60, what="the other partitions")
        wait_until(lambda: loops[0].held, 30, what="the hold")
        reads = len(gates[0].held_at)
        start(1)
        # after the rebalance the owner of the held partition holds it again
        wait_until(lambda: loops[1].assigned, 60, what="the joiner's assignment")
        owner = wait_until(
            lambda: [
                i
                for i, lp in enumerate(loops)
                if part in lp.assigned and lp.held and len(gates[i].held_at) > (i == 0) * reads
            ],
            60,
            what="the held partition read again from the held record and held by its owner",
        )[0]
        assert not after & handled()
        assert all(part not in lp.assigned for i, lp in enumerate(loops) if i != owner)
        for g in gates:
            g.open = True
        wait_until(lambda: after <= handled(), 60, what="the released partition")
    finally:
        for lp in loops:
            lp.stop()
        for r in runners:
            r.join(60)
    assert not any(r.is_alive() for r in runners)
    out = read_all(s, sink, expected=len(events))
    ids = Counter(e["event_id"] for e in decoded(s, out))
    assert set(ids) == {e["event_id"] for e in events}
    assert max(ids.values()) == 1
    for seq in _per_key_in_order(s, out).values():
        assert seq == sorted(seq)


def _aborting_loop(
    s: Settings, gate: _Gate, group: str, source: str, batch_size: int, tx: str
) -> tuple[ProcessingLoop, _Aborting]:
    """A loop reading ``source`` through ``gate``, its producer wrapped so that armed commits
    fail as abortable."""
    config = LoopConfig(
        service="holder",
        group_id=group,
        sources={source: TOPICS.events},
        batch_size=batch_size,
        transactional_id=s.topic_prefix + tx,
    )
    loop = ProcessingLoop(s, config, gate, hooks=[gate])
    aborting = _Aborting(loop.producer)
    loop.producer = aborting  # type: ignore[assignment]
    return loop, aborting


class _Awaiting(_Gate):
    """A gate that opens once the event ``key`` (of another partition) was handled, and logs
    what it handles and each commit, in order."""

    def __init__(self, sink: str, source: str, at: str, part: int, key: str) -> None:
        super().__init__(sink, source, at, part)
        self.key = key
        self.log: list[str] = []

    def __call__(self, record: Any) -> Any:
        out = super().__call__(record)
        self.log.append(record.value["event_id"])
        if record.value["event_id"] == self.key:
            self.open = True
        return out

    def on_commit(self) -> None:
        self.log.append("commit")

    def on_abort(self) -> None:
        self.log.append("abort")


def _committed_after_abort(log: list[str]) -> set[str]:
    """The events a gate's ``log`` shows handled after its first abort, in batches that then
    committed."""
    if "abort" not in log:
        return set()
    tail = log[log.index("abort") :]
    if "commit" not in tail:
        return set()
    return set(tail[: len(tail) - tail[::-1].index("commit")]) - {"commit", "abort"}


def test_a_partition_released_by_a_record_goes_on_in_that_batch_from_its_kept_records(
    kafka_settings: Settings,
) -> None:
    """A partition held since an earlier batch, released by a record of another partition,
    goes on in the batch of that record with the records the loop kept of it (no commit in
    between, no wait for a fetch); when that batch aborts, the held record is read again from
    the broker and decided again: every event once, in order per key."""
    s = kafka_settings
    source, sink, group, part, at, after, events = _held_setup(s)
    other = next(p for p in range(4) if p != part)
    gate = _Awaiting(sink, source, at, part, key="e400")
    loop, aborting = _aborting_loop(s, gate, group, source, batch_size=1000, tx="tx-kept")
    runner = threading.Thread(target=loop.run)
    runner.start()
    try:
        others = {e["event_id"] for e in events} - after
        wait_until(lambda: others <= set(gate.handled), 60, what="the other partitions")
        wait_until(lambda: (source, part) in loop.held, 30, what="the hold")
        assert gate.log.count("commit") >= 1 and not after & set(gate.handled)
        # the releasing event, in another partition; the batch that reads it aborts once
        user = next(f"k{i}" for i in range(100) if partition_for(f"k{i}", 4) == other)
        key = {**make_events(1, keys=1, start=400)[0], "user_id": user}
        aborting.armed = 1
        produce_events(s, source, [key])
        # handled again after the abort and committed (the aborted batch handled them once
        # already: stopping then would leave them unread, not lost)
        wait_until(
            lambda: _committed_after_abort(gate.log) >= after | {"e400"},
            60,
            what="the released partition read again and committed",
        )
    finally:
        loop.stop()
        runner.join(60)
    assert not runner.is_alive()
    assert aborting.aborted == 1 and not loop.held
    # the first time the key was handled (the batch that aborts), the held event came right
    # after it, from the records kept, before any commit
    first = gate.log.index("e400")
    assert gate.log[first + 1] == at
    assert "commit" not in gate.log[first : gate.log.index("abort")]
    assert gate.held_at == [gate.held_at[0]]  # held once: read again after the abort, not held
    out = read_all(s, sink, expected=len(events) + 1)
    ids = Counter(e["event_id"] for e in decoded(s, out))
    assert set(ids) == {e["event_id"] for e in events} | {"e400"}
    assert max(ids.values()) == 1
    for seq in _per_key_in_order(s, out).values():
        assert seq == sorted(seq)


def test_the_commit_point_hook_sets_the_committed_offsets_in_batches_and_ticks(
    kafka_settings: Settings,
) -> None:
    """A service that buffers records past a batch (identity's input order) passes
    ``commit_point``: the group's committed offset of each partition is what it returns for
    the offset after the records read, in a batch's transaction and, once the input is all
    read, in a tick's transaction (computed after the tick's outputs were made)."""
    s = kafka_settings
    source, sink, group, part, _at, _after, events = _held_setup(s)
    ends = Counter(partition_for(e["user_id"], 4) for e in events)
    cap = {part: 5}  # "the oldest record still buffered" of one partition
    asked: list[tuple[str, int, int]] = []
    applied = threading.Event()  # the test tells the tick to "apply" buffered records

    def point(topic: str, partition: int, offset: int) -> int:
        asked.append((topic, partition, offset))
        return min(offset, cap.get(partition, offset))

    def tick() -> Iterator[Output]:
        if not applied.is_set() or cap[part] == 9:
            return
        marker = make_events(1, keys=1, start=10_000)[0]
        yield Output(TOPICS.events, marker["user_id"], marker, topic_name=sink)
        cap[part] = 9  # applied while making its outputs: the offsets sent after them see it

    def committed() -> dict[int, int]:
        from confluent_kafka import KafkaException

        try:
            return {p: _group_committed(s, group, source, p) for p in ends}
        except KafkaException:  # the group's coordinator still loading: ask again
            return {}

    config = LoopConfig(
        service="pointer",
        group_id=group,
        sources={source: TOPICS.events},
        batch_size=50,
        transactional_id=s.topic_prefix + "tx-point",
        tick_interval=0.2,
    )
    loop = ProcessingLoop(s, config, copier(sink), commit_point=point, tick=tick)  # type: ignore[arg-type]
    runner = threading.Thread(target=loop.run)
    runner.start()
    try:
        batches = {p: (5 if p == part else n) for p, n in ends.items()}
        wait_until(lambda: committed() == batches, 60, what="the batches' offsets")
        assert (source, part, ends[part]) in asked  # asked with the offset after the last read
        applied.set()  # no input any more: only a tick's transaction can move them now
        wait_until(lambda: committed() == {**batches, part: 9}, 60, what="the tick's offsets")
    finally:
        loop.stop()
        runner.join(60)
    assert not runner.is_alive()
    assert len(read_all(s, sink, expected=len(events) + 1)) == len(events) + 1
