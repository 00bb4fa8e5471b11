"""The merged order of a partition's segment changes and identified events (pure,
``services/dispatcher/merge.py``): whatever the interleaving of the two topics' reads, the
records are applied in one order, the order time's (each stream's largest event time so
far; a change before an event at the same time), computed here independently by sorting; a
new owner that starts from the committed offsets and the mark goes on with the same order."""

from __future__ import annotations

import random

from services.dispatcher.merge import CHANGE, EVENT, Kind, Mark, PartitionMerge, Wait

Record = tuple[Kind, int, int]  # (stream, offset, event time)


def streams(rng: random.Random) -> tuple[list[Record], list[Record]]:
    """A changes stream and an events stream of one partition: mostly increasing times with
    late records and ties (the times repeat on a coarse grid)."""

    def one(kind: Kind, n: int) -> list[Record]:
        t, out = 0, []
        for offset in range(n):
            t += rng.choice([0, 1, 1, 2, 3])
            late = rng.random() < 0.15
            out.append((kind, offset, max(0, t - rng.randint(1, 6)) if late else t))
        return out

    return one(CHANGE, rng.randint(0, 12)), one(EVENT, rng.randint(0, 12))


def expected(changes: list[Record], events: list[Record]) -> list[tuple[Kind, int]]:
    """The merged order, by sorting: (order time, change first, offset)."""
    keyed = []
    for records in (changes, events):
        high = -1
        for kind, offset, at in records:
            high = max(high, at)
            keyed.append((high, 0 if kind == CHANGE else 1, offset, kind))
    return [(kind, offset) for _, _, offset, kind in sorted(keyed)]


def interleave(rng: random.Random, changes: list[Record], events: list[Record]) -> list[Record]:
    """A random read order that keeps each topic's own order."""
    a, b, out = list(changes), list(events), []
    while a or b:
        src = a if (a and (not b or rng.random() < 0.5)) else b
        out.append(src.pop(0))
    return out


def drain(m: PartitionMerge, idle: bool = False) -> list[tuple[Kind, int]]:
    out = []
    while True:
        try:
            kind, entry = m.pop(idle, idle)
        except Wait:
            return out
        out.append((kind, entry.offset))


def test_the_same_order_whatever_the_interleaving_of_the_reads() -> None:
    rng = random.Random(15)
    for _ in range(400):
        changes, events = streams(rng)
        want = expected(changes, events)
        for _ in range(5):
            m = PartitionMerge()
            got: list[tuple[Kind, int]] = []
            for kind, offset, at in interleave(rng, changes, events):
                assert m.add(kind, offset, at, None)
                got += drain(m)  # applied as soon as nothing can go before it
            got += drain(m, idle=True)  # both inputs read to their end and quiet
            assert got == want, (changes, events)


def test_a_change_waits_for_the_identified_partition_to_reach_its_time() -> None:
    m = PartitionMerge()
    m.add(CHANGE, 0, 100, None)
    assert drain(m) == []  # the event that caused it may not have been read yet
    m.add(EVENT, 0, 90, None)
    assert drain(m) == [(EVENT, 0)]  # before the change: earlier
    m.add(EVENT, 1, 100, None)  # the identified partition is at 100: nothing earlier comes
    assert drain(m) == [(CHANGE, 0)]
    assert m.clock == 100
    assert drain(m) == []  # the event at 100 waits: a change at 100 may still come
    m.add(CHANGE, 1, 100, None)
    assert drain(m) == [(CHANGE, 1)]
    m.add(CHANGE, 2, 101, None)
    assert drain(m) == [(EVENT, 1)]  # past it now; the change at 101 waits for the events
    assert drain(m, idle=True) == [(CHANGE, 2)]  # unless they are idle


def test_the_clock_reaches_what_no_waiting_record_can_go_before() -> None:
    m = PartitionMerge()
    m.add(CHANGE, 0, 50, None)
    m.add(EVENT, 0, 40, None)
    drain(m)
    assert m.advance() == 40  # an event between 40 and 50 may still come before the change
    m.add(EVENT, 1, 70, None)
    drain(m)
    assert m.clock == 50  # the change at 50 went; the event at 70 waits for the changes
    assert m.advance() == 50
    assert m.advance(idle_changes=True) == 70  # the changes are idle: up to the events


def _read_up_to_a_cut(
    rng: random.Random,
) -> tuple[list[Record], list[Record], list[Record], int, PartitionMerge, list[tuple[Kind, int]]]:
    """Random streams, a random interleaving of their reads and a random cut: what one owner
    read (and applied) up to the cut before a new owner takes over."""
    changes, events = streams(rng)
    reads = interleave(rng, changes, events)
    cut = rng.randint(0, len(reads))
    m = PartitionMerge()
    done: list[tuple[Kind, int]] = []
    for kind, offset, at in reads[:cut]:
        m.add(kind, offset, at, None)
        done += drain(m)
    return changes, events, reads, cut, m, done


def test_a_new_owner_from_the_committed_offsets_and_the_mark_goes_on_alike() -> None:
    rng = random.Random(7)
    for _ in range(300):
        changes, events, reads, cut, m, done = _read_up_to_a_cut(rng)
        want = expected(changes, events)
        # the transaction commits: offsets up to the first record not applied, and the mark
        after = {CHANGE: 0, EVENT: 0}
        for kind, offset, _ in reads[:cut]:
            after[kind] = offset + 1
        resume = {k: m.commit_offset(k, after[k]) for k in (CHANGE, EVENT)}
        mark = m.mark()
        m.committed()
        # kill -9: a new owner reads each topic again from its committed offset
        new = PartitionMerge(Mark(mark.times, mark.nexts, mark.clock))
        rest = [r for r in interleave(rng, changes, events) if r[1] >= resume[r[0]]]
        for kind, offset, at in rest:
            new.add(kind, offset, at, None)  # what was applied is skipped
            done += drain(new)
        done += drain(new, idle=True)
        assert done == want


def test_an_aborted_transaction_applies_its_records_again_in_the_same_order() -> None:
    m = PartitionMerge()
    for offset, at in enumerate([10, 20, 30]):
        m.add(CHANGE, offset, at, None)
        m.add(EVENT, offset, at + 5, None)
    first = drain(m)
    assert first == [(CHANGE, 0), (EVENT, 0), (CHANGE, 1), (EVENT, 1), (CHANGE, 2)]
    m.aborted()
    assert not m.add(CHANGE, 1, 20, None)  # the rewind reads them again: skipped
    assert drain(m) == first
    assert m.commit_offset(EVENT, 3) == 2  # the event at 35 was not applied
    m.committed()
    assert m.commit_offset(CHANGE, 3) == 3


def test_a_new_owner_with_the_events_that_waited_restored_goes_on_alike() -> None:
    # The shell writes the events still waiting to the changelog and commits the identified
    # topic's offset past them; a new owner restores them, then reads on.
    rng = random.Random(11)
    for _ in range(300):
        changes, events, reads, cut, m, done = _read_up_to_a_cut(rng)
        want = expected(changes, events)
        read_events = [r for r in reads[:cut] if r[0] == EVENT]
        resume = {
            CHANGE: m.commit_offset(
                CHANGE, 1 + max([-1] + [o for k, o, _ in reads[:cut] if k == CHANGE])
            ),
            EVENT: 1 + max([-1] + [o for _, o, _ in read_events]),
        }
        waiting, mark = m.pending(EVENT), m.mark()
        new = PartitionMerge(mark)
        new.restore(EVENT, waiting)
        rest = [r for r in interleave(rng, changes, events) if r[1] >= resume[r[0]]]
        for kind, offset, at in rest:
            new.add(kind, offset, at, None)
            done += drain(new)
        done += drain(new, idle=True)
        assert done == want
