"""The order in which identity applies the events of its input partitions (pure: no I/O, no
clock or environment reads).

The graph's decisions depend on the order of events (a device shared by two customers, a
conflict between strong identifiers), and the order in which a consumer interleaves the
partitions of ``segflow.events`` (or in which N fronts' link requests land in the links
topic) depends on timing. So identity applies them in an order that depends on the input
alone, as Kafka Streams synchronises its inputs by timestamp:

* **order time** (:class:`OrderClock`): per input partition, the largest ``occurred_at`` read
  from it so far (capped at the reader's clock: an event stamped in the future is ordered at
  the time it was read), its *stream time*. An event's order time is its partition's stream
  time after it, so a late event is ordered at the latest time of its partition, and order
  times never decrease along a partition.
* **merge** (:class:`Merge`): events are applied in the order of ``(order time, partition,
  offset)``. An event is released once no event with a smaller key can still arrive: every
  other input partition has a buffered event after it, or its stream time (a lower bound of
  its later events' order times) is past it, or it is *idle*.
* **idle** (:class:`IdleClock`): a partition read to its end with nothing new for
  ``SEGFLOW_IDENTITY_ORDER_IDLE_MS`` is not waited for by the events read before it was found
  idle (Kafka Streams' ``max.task.idle.ms``); it is found idle again every idle time while it
  stays so. This is the only input from the clock: events already on the broker are applied
  in the same order whatever the timing; an event produced more than the idle time after its
  partition went quiet, and older than the events then waiting, is applied after them. An
  idle mark covers only the events read at least the idle time before the partition was
  found at its end (read times: the reader's clock; with fronts, each front's): new events
  produced to several partitions at once do not become visible to their readers at the same
  instant, and a mark taken in that gap would let one partition's new events pass the
  other's (seen about one pipeline run in four before this rule).

>>> clock = OrderClock()
>>> [clock.stamp(0, t, now_ms=1_000) for t in (100, 120, 112, 5_000)]
[100, 120, 120, 1000]
>>> m = Merge()
>>> m.expect({0, 1})
>>> m.push(0, 100, 7, "a"); m.push(0, 130, 8, "b")
>>> list(m.ready())  # partition 1 has not been heard of: it may have an earlier event
[]
>>> m.push(1, 120, 3, "c")
>>> [item for _p, _o, item in m.ready()]  # "b" waits: partition 1's next event may be < 130
['a', 'c']
>>> m.mark_idle(1, 120)
>>> m.push(0, 140, 9, "d")  # read after partition 1 was found idle: waits for it again
>>> [item for _p, _o, item in m.ready()]
['b']
>>> m.mark_idle(1, 120); [item for _p, _o, item in m.ready()]
['d']
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

#: No stream time yet.
NONE = -(2**62)


class OrderClock:
    """Stream time per input partition: the order times of its events."""

    def __init__(self) -> None:
        self.times: dict[int, int] = {}

    def get(self, partition: int) -> int:
        return self.times.get(partition, NONE)

    def stamp(self, partition: int, occurred_at: int, now_ms: int) -> int:
        """The order time of the next event of ``partition`` (its stream time moves on)."""
        at = min(occurred_at, now_ms)
        t = self.times.get(partition, NONE)
        if at > t:
            self.times[partition] = t = at
        return t

    def load(self, partition: int, time: int) -> None:
        self.times[partition] = time


class Merge:
    """Events of several input partitions, released in ``(order time, partition, offset)``
    order once no smaller one can arrive."""

    def __init__(self, settle_ms: int = 0) -> None:
        #: an idle mark covers the events read at least this long before it (by read times)
        self.settle_ms = settle_ms
        #: the input partitions to wait for
        self.partitions: frozenset[int] = frozenset()
        #: per partition: (order time, offset, item, arrival number, read time or None)
        self.queues: dict[int, deque[tuple[int, int, Any, int, int | None]]] = {}
        #: per partition, the order time of its last event (or idle mark) read: a lower bound
        #: of its later events' order times
        self.bound: dict[int, int] = {}
        #: idle partitions: not waited for by the events read before they were found idle
        #: (partition -> arrival number of the first event read after that, and the latest
        #: read time it covers: None, any)
        self.idle: dict[int, tuple[int, int | None]] = {}
        self._size = 0
        self._arrivals = 0

    def __len__(self) -> int:
        return self._size

    def expect(self, partitions: Iterable[int]) -> None:
        self.partitions = frozenset(partitions)

    def clear(self) -> None:
        self.queues.clear()
        self.bound.clear()
        self.idle.clear()
        self._size = 0
        self._arrivals = 0

    def push(
        self, partition: int, order_time: int, offset: int, item: Any, read_at: int | None = None
    ) -> None:
        """An event of ``partition`` (order times never decrease along a partition), read
        (by whoever read the input partition) at ``read_at``."""
        queue = self.queues.get(partition)
        if queue is None:
            queue = self.queues[partition] = deque()
        queue.append((order_time, offset, item, self._arrivals, read_at))
        self._arrivals += 1
        self._size += 1
        if order_time > self.bound.get(partition, NONE):
            self.bound[partition] = order_time
        self.idle.pop(partition, None)

    def mark_idle(self, partition: int, order_time: int, read_at: int | None = None) -> None:
        """``partition`` has nothing new now (found at its end at ``read_at``): the events
        read so far, and at least ``settle_ms`` before ``read_at``, do not wait for it (the
        others do, until its next event or its next idle mark: it may have had new events
        by then; an event of another partition produced as the mark was taken, with one of
        this partition's produced beside it, is read after the mark or within ``settle_ms``
        before it). Without ``read_at`` (a clean stop): every event read so far."""
        if order_time > self.bound.get(partition, NONE):
            self.bound[partition] = order_time
        self.idle[partition] = (
            self._arrivals,
            None if read_at is None else read_at - self.settle_ms,
        )

    def ready(self) -> Iterator[tuple[int, int, Any]]:
        """Release (partition, offset, item) in key order while nothing smaller can arrive."""
        queues = self.queues
        while self._size:
            best: tuple[int, int] | None = None
            for p, queue in queues.items():
                if queue:
                    key = (queue[0][0], p)
                    if best is None or key < best:
                        best = key
            assert best is not None
            _t, _o, _i, arrival, read_at = queues[best[1]][0]
            idle = self.idle
            for p in self.partitions:
                if p == best[1] or queues.get(p):
                    continue  # a buffered head is after ``best`` (it was not the smallest)
                mark = idle.get(p)
                if (
                    mark is not None
                    and arrival < mark[0]
                    and (mark[1] is None or read_at is None or read_at <= mark[1])
                ):
                    continue  # idle when ``best`` had been read (and settled)
                bound = self.bound.get(p)
                if bound is None or (bound, p) < best:
                    return  # p's next event may come before ``best``
            offset, item = queues[best[1]].popleft()[1:3]
            self._size -= 1
            yield best[1], offset, item

    def oldest(self, partition: int) -> Any | None:
        """The item at the head of ``partition``'s queue (None: nothing buffered)."""
        queue = self.queues.get(partition)
        return queue[0][2] if queue else None

    def heads(self) -> Iterator[Any]:
        for queue in self.queues.values():
            if queue:
                yield queue[0][2]


class IdleClock:
    """When a partition read to its end has had nothing new for ``idle_ms``: ``activity`` is
    any count that moves when a record of it is read. Reported again every ``idle_ms`` while
    it stays idle (a writer that restarted learns it again)."""

    def __init__(self, idle_ms: int) -> None:
        self.idle_ms = idle_ms
        self._since: dict[int, tuple[int, int]] = {}  # partition -> (activity, since ms)

    def observe(self, partition: int, activity: int, caught_up: bool, now_ms: int) -> bool:
        """True when ``partition`` has been idle at ``activity`` for ``idle_ms`` (again).

        >>> idle = IdleClock(100)
        >>> [idle.observe(0, 5, True, t) for t in (0, 50, 100, 150, 200)]
        [False, False, True, False, True]
        >>> idle.observe(0, 6, True, 250), idle.observe(0, 6, True, 350)
        (False, True)
        """
        if not caught_up:
            self._since.pop(partition, None)
            return False
        since = self._since.get(partition)
        if since is None or since[0] != activity:
            since = self._since[partition] = (activity, now_ms)
        if now_ms - since[1] >= self.idle_ms:
            self._since[partition] = (activity, now_ms)
            return True
        return False

    def reset(self) -> None:
        self._since.clear()
