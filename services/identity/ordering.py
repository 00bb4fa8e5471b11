"""Shell of identity's input order (:mod:`services.identity.order`): the one-process role's
order buffer over the partitions of ``segflow.events``, whose :meth:`InputOrder.point` is the
loop's ``commit_point`` (never an input offset past an event still waiting for its turn).

Exactly once: the buffer is not written anywhere. The loop commits, per input partition, the
offset of its oldest buffered event, and the graph's changelog holds, in the same
transaction, an ``o:<partition>`` entry per input partition (kind ``order``): the next offset
to apply, the offset after the last record read and the partition's stream time before the
next offset to apply. A new owner (a restart, a rewind after an aborted transaction) reads
again from the committed offset: an event below the next offset to apply was applied and is
skipped, the others are buffered again, and an invalid record below the read offset is not
dead-lettered again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from segflow.runtime.loop import Incoming, Output, ProcessingLoop
from segflow.runtime.state import ChangelogStore
from services.identity.order import NONE, IdleClock, Merge, OrderClock

log = logging.getLogger("segflow.identity.ordering")


def order_key(partition: int) -> str:
    """The graph changelog's key of where the graph stands in input partition ``partition``."""
    return f"o:{partition}"


def order_entry(stream: int, next_offset: int, read: int) -> dict[str, Any]:
    return {
        "kind": "order",
        "created_at": None if stream == NONE else stream,
        "offsets": [next_offset, read],
    }


def caught_up(loop: ProcessingLoop | None, topic: str) -> dict[int, bool]:
    """Per assigned partition of ``topic``: read to its end (lag 0 at the cached high
    watermark)."""
    if loop is None:
        return {}
    return {p: lag == 0 for (t, p), lag in loop.lags().items() if t == topic}


def at_end(loop: ProcessingLoop | None, topic: str, partition: int) -> bool:
    """Whether the consumer has read ``partition`` to its end as the broker says now (not
    the cached high watermark): asked before a partition is called idle."""
    if loop is None:
        return False
    tp = TopicPartition(topic, partition)
    try:
        low, high = loop.consumer.get_watermark_offsets(tp, timeout=5, cached=False)
        [pos] = loop.consumer.position([tp])
    except KafkaException as exc:
        log.warning("high watermark unknown", extra={"fields": {"error": str(exc)}})
        return False
    offset: int | None = pos.offset
    if offset is None or offset < 0:  # nothing read since assignment: the committed offset
        offset = loop.committed_offset((topic, partition), low, high)
    return offset is not None and offset >= high


class InputOrder:
    """The one-process role's buffer: events of ``topic`` applied in the input order (a loop
    hook after the graph's store, whose ``o:`` entries it writes and reads)."""

    def __init__(self, store: ChangelogStore, topic: str, idle_ms: int, pause_at: int) -> None:
        self.store = store
        #: events waiting in one input partition at which it is not fetched any more (until
        #: half of them were applied): a batch's worth
        self.pause_at = max(2, pause_at)
        self.topic = topic
        self.merge = Merge(settle_ms=idle_ms)
        self.clock = OrderClock()
        self.idle = IdleClock(idle_ms)
        self.loop: ProcessingLoop | None = None
        self.partitions: set[int] = set()
        #: an event below it was applied before the last restore (skipped when read again)
        self.applied: dict[int, int] = {}
        #: a record below it was handled before the last restore (not dead-lettered again)
        self.replay: dict[int, int] = {}
        self.read: dict[int, int] = {}
        self.activity: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._paused: set[int] = set()
        #: after a rebalance: records below it were read (a kept partition is read again from
        #: the committed offset)
        self.floor: dict[int, int] = {}

    # -- per record -------------------------------------------------------------------------
    def replayed(self, record: Incoming) -> bool:
        """A record handled before the last restore (do not dead-letter it again)."""
        p = record.partition
        return record.offset < max(self.replay.get(p, -1), self.floor.get(p, -1))

    def receive(
        self, record: Incoming, payload: Any, now_ms: int
    ) -> Iterator[tuple[Incoming, Any]]:
        """Buffer an event; returns the (record, payload) now due, in order."""
        p, offset = record.partition, record.offset
        if offset < self.applied.get(p, -1) or offset < self.floor.get(p, -1):
            # applied before the restore, or read again after a rebalance that kept the
            # partition here (the consumer fetches again from the committed offset)
            return iter(())
        prev = self.clock.get(p)
        t = self.clock.stamp(p, int(record.value["occurred_at"]), now_ms)
        self.merge.push(p, t, offset, (prev, record, payload), now_ms)
        self.read[p] = offset + 1
        self.activity[p] = self.activity.get(p, 0) + 1
        self._dirty.add(p)
        if p not in self._paused and len(self.merge.queues[p]) >= self.pause_at:
            self._pause(p, True)
        return self.due()

    def skipped(self, record: Incoming) -> None:
        """A record that is not an event to apply (dead-lettered): read."""
        self.read[record.partition] = record.offset + 1
        self.activity[record.partition] = self.activity.get(record.partition, 0) + 1
        self._dirty.add(record.partition)

    def due(self) -> Iterator[tuple[Incoming, Any]]:
        for p, _offset, (_prev, record, payload) in self.merge.ready():
            self._dirty.add(p)
            yield record, payload
        for p in [
            p for p in self._paused if len(self.merge.queues.get(p, ())) < self.pause_at // 2
        ]:
            self._pause(p, False)

    def _pause(self, partition: int, pause: bool) -> None:
        """Stop (or resume) fetching a partition with many events waiting: the consumer then
        reads the partitions they wait for (as Kafka Streams' buffered.records.per.partition);
        what it had fetched and not returned is fetched again on resume."""
        if self.loop is None:
            return
        tp = [TopicPartition(self.topic, partition)]
        try:
            (self.loop.consumer.pause if pause else self.loop.consumer.resume)(tp)
        except KafkaException as exc:  # not assigned any more: nothing to pause
            log.warning("pause failed", extra={"fields": {"error": str(exc)}})
            return
        if pause:
            self._paused.add(partition)
        else:
            self._paused.discard(partition)

    def tick(self, now_ms: int) -> Iterator[tuple[Incoming, Any]]:
        """The items due once partitions idle for the idle time are not waited for."""
        for p, done in caught_up(self.loop, self.topic).items():
            if self.idle.observe(p, self.activity.get(p, 0), done, now_ms) and at_end(
                self.loop, self.topic, p
            ):
                self.merge.mark_idle(p, self.clock.get(p), now_ms)
        return self.due()

    # -- commits ----------------------------------------------------------------------------
    def point(self, topic: str, partition: int, offset: int) -> int:
        if topic != self.topic:
            return offset
        head = self.merge.oldest(partition)
        if head is None:
            return offset
        return min(offset, int(head[1].offset))

    def checkpoints(self) -> Iterator[Output]:
        """The ``o:`` entries of the partitions that moved (in the transaction at hand)."""
        for p in sorted(self._dirty):
            if p not in self.read:
                continue
            head = self.merge.oldest(p)
            if head is None:
                entry = order_entry(self.clock.get(p), self.read[p], self.read[p])
            else:
                entry = order_entry(head[0], head[1].offset, self.read[p])
            yield self.store.put(order_key(p), entry)
        self._dirty.clear()

    def before_commit(self) -> Iterator[Output]:
        return self.checkpoints()

    def drain(self, _timeout: float) -> None:
        """A clean stop (SIGTERM, a tool's record limit): the last tick applies every buffered
        event, in order, without waiting for the partitions that have nothing more."""
        for p in set(self.partitions) | set(self.merge.queues):
            self.merge.mark_idle(p, self.clock.get(p))

    def on_commit(self) -> None:
        pass

    def on_abort(self) -> None:
        """The store rolled back (a hook before this one) and the loop reads again from the
        committed offsets: back to the committed entries."""
        self.reload()

    def on_assign(self, partitions: set[int]) -> None:
        self.partitions = set(partitions)
        self.reload()

    def before_revoke(self, partitions: set[int], _timeout: float) -> int:
        """A rebalance: if it gives a partition back unchanged, the consumer reads it again
        from the committed offset: what was read below it is skipped then."""
        for p in partitions:
            if p in self.read:
                self.floor[p] = self.read[p]
        return 0

    def on_revoke(self, partitions: set[int]) -> None:
        self.partitions -= set(partitions)
        self.merge.expect(self.partitions)

    def reload(self) -> None:
        """Start again from the ``o:`` entries of the store (restore, assignment, abort)."""
        for p in list(self._paused):
            self._pause(p, False)
        self._paused.clear()
        self.merge.clear()
        self.merge.expect(self.partitions)
        self.clock = OrderClock()
        self.idle.reset()
        self.applied.clear()
        self.replay.clear()
        self.read.clear()
        self.floor.clear()
        self._dirty.clear()
        for p in self.partitions or range(64):
            entry = self.store.get(order_key(p))
            if entry is None:
                continue
            next_offset, read = (list(entry.get("offsets") or []) + [-1, -1])[:2]
            self.applied[p] = int(next_offset)
            self.replay[p] = int(read)
            if entry.get("created_at") is not None:
                self.clock.load(p, int(entry["created_at"]))
