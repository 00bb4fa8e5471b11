"""The order in which the dispatcher applies its two timed inputs of one partition (pure).

Segment changes and identified events of a customer arrive on two co-partitioned topics
(same partition count, keyed by customer id). The consumer interleaves them by timing: one
instance, two, and a new owner after ``kill -9`` read them differently, and with
``clock: event`` what a change, an event or a timer decides depends on what was applied
before it (quiet hours at the decision time, ``engaged`` since a step, a suppression). So
they are applied in an order of the input, not of the reads, as Kafka Streams synchronises
a task's partitions by timestamp (KIP-353, ``max.task.idle.ms``):

* **order time**: per stream, the largest event time read from it so far (a late record is
  placed at its stream's latest time; order times never decrease along a stream);
* **merge**: the stream whose head has the smaller order time goes first, a change before
  an event at equal times; a head is applied once the other stream cannot bring anything that
  goes before it: the other stream has a record waiting, or its order time is past the head
  (the events' at or past a change: the event that caused a change was written to the
  identified topic before the change, so a change waits for the identified partition to be
  read up to its time), or the other stream is **idle** (read to its end, nothing new for
  the idle time: the shell says so; what arrives after that, older than what was applied, is
  applied at the partition's clock);
* **clock**: the partition's event time, the order time of the last record applied, or the
  time no unapplied record can go before (both streams' heads, or their order times when
  nothing waits): a customer's step due at ``d`` fires once the clock reaches ``d``, before
  any record at ``d`` (each at its due time, ``core.fire_due``).

The shell (``services.dispatcher.ordering``) keeps one :class:`PartitionMerge` per partition,
applies what :meth:`PartitionMerge.pop` gives, writes the events still waiting
(:meth:`PartitionMerge.pending`) and :meth:`PartitionMerge.mark` (the applied order times and
next offsets, and the clock) with the state it changed, and commits the changes' offsets only
up to the first change not applied (:meth:`PartitionMerge.commit_offset`), so a new owner
(:meth:`PartitionMerge.restore`) goes on in the same order and skips what was applied.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["change", "event"]
CHANGE: Kind = "change"
EVENT: Kind = "event"
KINDS: tuple[Kind, Kind] = (CHANGE, EVENT)
NEVER = -(2**62)


@dataclass(frozen=True, slots=True)
class Entry:
    """One record read and not yet committed as applied."""

    offset: int
    time: int  # its own event time
    order: int  # its order time: its stream's largest event time up to it
    item: Any  # what the shell applies


@dataclass(frozen=True, slots=True)
class Mark:
    """What a partition's next owner needs, written with the state: per stream the order
    time of the last record applied and the offset after it (None: nothing applied yet),
    and the clock."""

    times: tuple[int, int] = (NEVER, NEVER)  # (changes, events)
    nexts: tuple[int | None, int | None] = (None, None)
    clock: int = 0


@dataclass
class _Stream:
    read_time: int  # largest event time read (the next record's order time is at least this)
    next_read: int | None  # offset after the last record read (re-reads are skipped)
    applied_time: int
    applied_next: int | None
    skip_below: int | None  # records below it were read before (a re-read may come)
    waiting: deque[Entry] = field(default_factory=deque)
    done: int = 0  # waiting[:done] applied since the last commit


class PartitionMerge:
    """The two streams of one partition, merged by order time."""

    def __init__(self, mark: Mark | None = None) -> None:
        m = mark or Mark()
        self._streams = {
            kind: _Stream(m.times[i], m.nexts[i], m.times[i], m.nexts[i], m.nexts[i])
            for i, kind in enumerate(KINDS)
        }
        self.clock = m.clock
        self._committed = m

    # -- reading -------------------------------------------------------------------------
    def add(self, kind: Kind, offset: int, time: int, item: Any) -> bool:
        """A record read from ``kind``'s stream; False when it was read (or applied) before
        (a rewind, a rebalance that kept the partition, a new owner reading again from the
        committed offset: see :meth:`rereads`)."""
        s = self._streams[kind]
        if s.skip_below is not None and offset < s.skip_below:
            return False
        s.read_time = max(s.read_time, time)
        s.next_read = offset + 1
        s.waiting.append(Entry(offset, time, s.read_time, item))
        return True

    def restore(self, kind: Kind, entries: list[Entry]) -> None:
        """Records a previous owner read and wrote to the changelog as waiting (in their
        order): they wait here again; the consumer reads on after them."""
        s = self._streams[kind]
        for e in entries:
            s.waiting.append(e)
            s.read_time = max(s.read_time, e.order)
            s.next_read = s.skip_below = e.offset + 1

    def pending(self, kind: Kind) -> list[Entry]:
        """``kind``'s records read and not applied, in order."""
        s = self._streams[kind]
        return list(s.waiting)[s.done :]

    def rereads(self) -> None:
        """The consumer will read the partition again from its committed offsets (a rewind,
        a rebalance that keeps it): the records read so far are skipped then."""
        for s in self._streams.values():
            s.skip_below = s.next_read

    def waiting(self, kind: Kind) -> int:
        """Records of ``kind`` read and not applied."""
        s = self._streams[kind]
        return len(s.waiting) - s.done

    def _head(self, kind: Kind) -> Entry | None:
        s = self._streams[kind]
        return s.waiting[s.done] if s.done < len(s.waiting) else None

    def _bound(self, kind: Kind, idle: bool) -> int | None:
        """The least order time ``kind`` can still bring (None: nothing, it is idle)."""
        head = self._head(kind)
        if head is not None:
            return head.order
        return None if idle else self._streams[kind].read_time

    # -- the merge -----------------------------------------------------------------------
    def pop(self, idle_changes: bool = False, idle_events: bool = False) -> tuple[Kind, Entry]:
        """The next record to apply, in the merged order; raises :class:`Wait` when none can
        go yet. ``idle_*``: that stream was read to its end and stayed quiet for the idle
        time (the shell's rule), so it is not waited for."""
        change, event = self._head(CHANGE), self._head(EVENT)
        nxt: Kind | None = None
        if change is not None and event is not None:
            nxt = EVENT if event.order < change.order else CHANGE
        elif change is not None:
            if idle_events or self._streams[EVENT].read_time >= change.order:
                nxt = CHANGE
        elif event is not None and (idle_changes or self._streams[CHANGE].read_time > event.order):
            nxt = EVENT
        if nxt is None:
            raise Wait
        s = self._streams[nxt]
        entry = s.waiting[s.done]
        s.done += 1
        s.applied_time = max(s.applied_time, entry.order)
        s.applied_next = entry.offset + 1
        self.clock = max(self.clock, entry.order)
        return nxt, entry

    def advance(self, idle_changes: bool = False, idle_events: bool = False) -> int:
        """Move the clock to the time no record not yet applied can go before (a step due
        by then fires before any record at its time); returns the clock."""
        c, e = self._bound(CHANGE, idle_changes), self._bound(EVENT, idle_events)
        if c is None and e is None:  # both idle: up to the latest time read
            safe = max(s.read_time for s in self._streams.values())
        else:
            safe = min(t for t in (c, e) if t is not None)
        self.clock = max(self.clock, safe)
        return self.clock

    # -- transactions --------------------------------------------------------------------
    def commit_offset(self, kind: Kind, after_read: int) -> int:
        """The offset to commit for ``kind``'s partition: the first record not applied (a new
        owner reads it again), else the offset after the records read."""
        head = self._head(kind)
        return min(after_read, head.offset) if head is not None else after_read

    def mark(self) -> Mark:
        """The applied order times, next offsets and the clock (to write with the state)."""
        st = [self._streams[k] for k in KINDS]
        return Mark(
            (st[0].applied_time, st[1].applied_time),
            (st[0].applied_next, st[1].applied_next),
            self.clock,
        )

    def committed(self) -> None:
        """The transaction with what was applied committed: forget those records."""
        for s in self._streams.values():
            for _ in range(s.done):
                s.waiting.popleft()
            s.done = 0
        self._committed = self.mark()

    def aborted(self) -> None:
        """The transaction aborted (the state rolled back): what it applied waits again;
        the records read stay (a rewind reads them again: skipped)."""
        m = self._committed
        for i, kind in enumerate(KINDS):
            s = self._streams[kind]
            s.done = 0
            s.applied_time, s.applied_next = m.times[i], m.nexts[i]
        self.clock = m.clock
        self.rereads()


class Wait(Exception):  # noqa: N818 (control flow: nothing can be applied yet)
    """No record of the partition can be applied yet."""
