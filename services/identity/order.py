"""The order in which identity's graph writer applies link requests (pure: no I/O, no clock).

With N front instances, the link requests of different input partitions reach the one-partition
links topic interleaved by timing. The graph's decisions depend on the order they are applied
in, so the writer does not apply them in the order it reads them: it applies them in the order
of a key that depends on the input alone, ``(order_time, event_id, source_partition,
source_offset)``, and releases a request once no request with a smaller key can arrive.

* **Front** (:class:`PartitionClocks`): per input partition ``p`` a watermark ``W[p]``, the
  largest ``occurred_at`` read from ``p`` minus the grace ``G`` (and never beyond the front's
  clock minus ``G``). A request's ``order_time`` is its ``occurred_at`` (capped at the front's
  clock: an event stamped in the future is ordered at the time it was read), raised to ``W[p]``
  when it is older (a *late* event: more than ``G`` behind a later event of its partition). So
  every request of ``p`` has ``order_time >= W[p]`` as published before it: the watermark is a
  true lower bound, and ``order_time`` depends only on the partition's own sequence of events.
  An *idle* partition (everything in it read and handled) moves its watermark to the clock
  minus ``G``, so that a quiet partition does not hold the writer back; that is the one
  wall-clock input, and it only affects events that reach a partition after it went idle with
  an event time older than that (live traffic more than ``G`` behind the clock).
* **Writer** (:class:`ReleaseBuffer`): buffers requests in a heap and releases, in key order,
  every request with ``order_time < T``, ``T`` = the minimum of the latest watermark of every
  input partition (a partition that never published one holds everything back). A request
  that arrives with ``order_time < T`` (a front of an earlier release, which sends none) is
  *late*: it is applied on arrival.

>>> clocks = PartitionClocks(grace_ms=10)
>>> [clocks.stamp(0, t, now_ms=1_000) for t in (100, 120, 112, 50)]
[100, 120, 112, 110]
>>> clocks.watermark(0), clocks.late
(110, 1)
>>> buf = ReleaseBuffer(partitions=2)
>>> for key in [(100, "b", 0, 0), (100, "a", 1, 0), (90, "z", 1, 1)]:
...     buf.push(key, key[1])
>>> buf.advance(0, 200), buf.release()  # partition 1 has not published: nothing released
(False, [])
>>> buf.advance(1, 100), [item for _key, item in buf.release()]
(True, ['z'])
>>> buf.advance(1, 101), [item for _key, item in buf.release()]
(True, ['a', 'b'])
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable
from typing import Any

#: (order_time, event_id, source_partition, source_offset)
Key = tuple[int, str, int, int]
#: No watermark yet.
NONE = -(2**62)


class PartitionClocks:
    """The front's per-input-partition watermarks and order times."""

    def __init__(self, grace_ms: int) -> None:
        self.grace_ms = grace_ms
        self.marks: dict[int, int] = {}
        #: the watermarks last committed (what the changelog and the links topic hold)
        self.committed: dict[int, int] = {}
        #: requests raised to their partition's watermark (late events)
        self.late = 0

    def watermark(self, partition: int) -> int:
        return self.marks.get(partition, NONE)

    def stamp(self, partition: int, occurred_at: int, now_ms: int, advance: bool = True) -> int:
        """The order time of a request of ``partition`` (then the partition's watermark moves
        on, unless ``advance`` is False: a forget request's time is the wall clock's)."""
        mark = self.marks.get(partition, NONE)
        at = min(occurred_at, now_ms)
        if at < mark:
            self.late += 1
            order = mark
        else:
            order = at
        if advance and at - self.grace_ms > mark:
            self.marks[partition] = at - self.grace_ms
        return order

    def idle(self, partition: int, now_ms: int) -> None:
        """``partition`` has nothing unread: its watermark follows the clock."""
        if now_ms - self.grace_ms > self.marks.get(partition, NONE):
            self.marks[partition] = now_ms - self.grace_ms

    def changed(self, partitions: Iterable[int]) -> dict[int, int]:
        """The watermarks of ``partitions`` that moved since the last commit."""
        out = {}
        for p in partitions:
            mark = self.marks.get(p)
            if mark is not None and mark != self.committed.get(p):
                out[p] = mark
        return out

    def on_commit(self) -> None:
        self.committed = dict(self.marks)

    def on_abort(self) -> None:
        self.marks = dict(self.committed)

    def load(self, partition: int, mark: int) -> None:
        """A restored watermark (a partition this instance was assigned)."""
        if mark > self.marks.get(partition, NONE):
            self.marks[partition] = mark
        self.committed[partition] = self.marks[partition]

    def drop(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self.marks.pop(p, None)
            self.committed.pop(p, None)


class ReleaseBuffer:
    """The writer's buffer: requests held until every input partition's watermark passed them.

    ``position`` is the links offset after the last request read; :meth:`checkpoint` and
    :meth:`restore` carry the released watermark, the partitions' watermarks and that position
    through a commit (the writer commits the offset of its oldest buffered request, so the
    buffer is rebuilt by reading again from there)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.marks: dict[int, int] = {}
        #: released watermark: every request with order_time < released was applied
        self.released = NONE
        self._heap: list[tuple[Key, int, Any]] = []
        self._offsets: dict[int, int] = {}  # links offset -> buffered count (heap entries)
        #: links offset -> read the last time (a request read again after a rebuild below it
        #: and with a key below ``released`` was applied before the commit: skipped)
        self.replay_until = -1

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, key: Key, item: Any, offset: int = -1) -> None:
        heapq.heappush(self._heap, (key, offset, item))
        self._offsets[offset] = self._offsets.get(offset, 0) + 1

    def is_late(self, order_time: int) -> bool:
        return order_time < self.released

    def advance(self, partition: int, mark: int) -> bool:
        """A watermark of ``partition``; True when the released watermark moved."""
        if mark > self.marks.get(partition, NONE):
            self.marks[partition] = mark
        if any(p not in self.marks for p in range(self.partitions)):
            return False  # a partition that never published one holds everything back
        low = min(self.marks[p] for p in range(self.partitions))
        if low > self.released:
            self.released = low
            return True
        return False

    def release(self) -> list[tuple[Key, Any]]:
        """The buffered requests below the released watermark, in key order."""
        out: list[tuple[Key, Any]] = []
        heap = self._heap
        while heap and heap[0][0][0] < self.released:
            key, offset, item = heapq.heappop(heap)
            n = self._offsets[offset] - 1
            if n:
                self._offsets[offset] = n
            else:
                del self._offsets[offset]
            out.append((key, item))
        return out

    def oldest_offset(self) -> int | None:
        """The links offset of the oldest buffered request (None: nothing buffered)."""
        return min(self._offsets) if self._offsets else None

    def checkpoint(self, position: int) -> str:
        """What the commit of read position ``position`` must remember (offset metadata)."""
        return json.dumps(
            {"r": self.released, "p": position, "w": self.marks}, separators=(",", ":")
        )

    def restore(self, metadata: str | None) -> None:
        """Back to a committed checkpoint (empty buffer; read again from the committed
        offset)."""
        self._heap.clear()
        self._offsets.clear()
        self.marks = {}
        self.released = NONE
        self.replay_until = -1
        if not metadata:
            return
        state = json.loads(metadata)
        self.released = int(state["r"])
        self.replay_until = int(state["p"])
        self.marks = {int(p): int(w) for p, w in state["w"].items()}

    def applied_before(self, key: Key, offset: int) -> bool:
        """A request read again after a restore that the last committed transaction applied."""
        return offset < self.replay_until and key[0] < self.released
