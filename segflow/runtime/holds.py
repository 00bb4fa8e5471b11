"""Held input partitions of the shared loop (a mixin of
:class:`~segflow.runtime.loop.ProcessingLoop`): a handler that cannot handle a record yet
(it needs something another input brings later) raises
:class:`~segflow.runtime.records.HoldPartition`, and its partition stops at that record until
a hook releases it, so the partition's records are handled in their order whatever the
timing.

* In the batch: the record gets no outputs; it and the later records of its
  (topic, partition) in the batch are left unhandled; the batch's transaction commits the
  partition's offset up to the record (not beyond), with the other partitions' as usual.
* Released in the batch: after each record it handles while the batch holds a partition,
  the loop asks the hooks' ``releases()``; a partition the batch held that is released then
  (what it waited for came in the same batch: with one instance, a merge's ``customer_merged``
  read from another partition after the merge-causing event) goes on at once with its
  records of the batch, from the held record, in their order (the transaction then commits
  what it waited for with what it held). Before, it was paused at the commit, released after
  it and read again from the broker: about 0.3 s per hold, and with one scorer behind its
  input the partitions took turns holding (measured: 3-4 of 4 held most of the time at
  1,000 events/s offered).
* After the commit: the partition is paused and the consumer seeks it back to the record
  (both drop what librdkafka prefetched of it). An aborted batch holds nothing: the rewind
  re-reads it and the handler decides again.
* Release: after each poll and batch the loop asks the hooks with ``releases() ->
  Iterable[(topic, partition)]`` (or a caller calls :meth:`release`); a held partition among
  them resumes at the record, which is handled again. Releasing a partition that is not held
  does nothing.
* Rebalance: a held partition that is revoked or lost is resumed (librdkafka would keep an
  application pause across a re-assignment) and forgotten; its next owner, this instance or
  another, reads it from the committed offset (the held record) and the handler decides again.
  A partition that is assigned is never held.

* Urgent records (:meth:`PartitionHolds._poll`): a batch normally fills for up to
  ``poll_timeout`` (0.2 s) before it is handled, which a hold pays for each hop of its round
  trip (the other side's batch that sends what it waits for, the batch that reads it, the
  re-read of the released record: about 0.6 s). So when a hook has ``urgent(topic,
  partition, value) -> bool`` or a partition was just released, the loop polls in slices of
  ``SLICE_SECONDS`` and ends the batch after the slice in which an urgent record arrived (at
  the earliest ``URGENT_MIN_SECONDS`` after the poll began, which bounds the transactions
  per second): a record of a released partition, or one a hook calls urgent (the scorer: a
  hand-off, a merge mark whose hand-off another instance waits for). Which records form a
  batch depends on timing anyway; handlers must not depend on it.

Only partitions this mixin paused are resumed by a release: nothing else in the loop pauses
a partition today (a restore runs inside the assignment callback, before any fetch).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from confluent_kafka import KafkaException, TopicPartition
from prometheus_client import Histogram

from segflow.runtime import metrics

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Message

    from segflow.runtime.records import Hooks, LoopConfig

log = logging.getLogger("segflow.loop")

Key = tuple[str, int]

HOLD_SECONDS = Histogram(
    "segflow_hold_seconds",
    "How long a held input partition waited: from the record that held it until that record "
    "was handled (reason: what the handler waited for, HoldPartition's argument)",
    ["service", "instance", "reason"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
#: Polling in slices (urgent records): one slice's wait, and the least a batch waits.
SLICE_SECONDS = 0.01
URGENT_MIN_SECONDS = 0.025


class PartitionHolds:
    """Mixed into :class:`~segflow.runtime.loop.ProcessingLoop`."""

    config: LoopConfig
    consumer: Consumer
    hooks: list[Hooks]
    instance: str
    #: Held input partitions (paused, positioned at the held record): key -> its offset.
    held: dict[Key, int]
    #: Held by the batch in hand (paused once its transaction commits).
    _holding: dict[Key, int]
    #: Held partitions' record offset, the time it first held them and why (until handled).
    _held_since: dict[Key, tuple[int, float, str]]
    #: The batch's records of the partitions it holds (from the held record), in order.
    _stash: dict[Key, list[Message]]

    def _init_holds(self) -> None:
        self.held = {}
        self._holding = {}
        self._held_since = {}
        self._stash = {}
        #: Released partitions whose held record was not read again yet (urgent).
        self._released: set[Key] = set()
        self._releasers = [
            fn for fn in (getattr(h, "releases", None) for h in self.hooks) if fn is not None
        ]
        self._urgent_hooks = [
            fn for fn in (getattr(h, "urgent", None) for h in self.hooks) if fn is not None
        ]

    def _poll(self) -> list[Message]:
        """The next batch: up to ``batch_size`` records within ``poll_timeout``, ended early
        after an urgent record (module docstring)."""
        cfg = self.config
        consume = self.consumer.consume
        if not self._urgent_hooks and not self._released:
            return consume(cfg.batch_size, cfg.poll_timeout)
        start = time.monotonic()
        end = start + cfg.poll_timeout
        cut = False
        msgs: list[Message] = []
        while True:
            now = time.monotonic()
            if now >= end or len(msgs) >= cfg.batch_size:
                return msgs
            got = consume(cfg.batch_size - len(msgs), min(SLICE_SECONDS, end - now))
            msgs.extend(got)
            if not cut and any(self._is_urgent(m) for m in got):
                cut = True
                end = max(time.monotonic(), start + URGENT_MIN_SECONDS)

    def _is_urgent(self, msg: Message) -> bool:
        if msg.error() is not None:
            return False
        topic, part = cast(str, msg.topic()), cast(int, msg.partition())
        if (topic, part) in self._released:
            return True
        value = msg.value()
        return any(urgent(topic, part, value) for urgent in self._urgent_hooks)

    def _is_held(self, key: Key) -> bool:
        return key in self.held or key in self._holding

    def _hold(self, key: Key, offset: int, reason: str, msg: Message) -> None:
        """The handler held ``key`` at ``offset`` (the batch commits up to it)."""
        self._holding[key] = offset
        self._stash[key] = [msg]
        since = self._held_since.get(key)
        if since is None or since[0] != offset:
            self._held_since[key] = (offset, time.monotonic(), reason)

    def _skip(self, key: Key, msg: Message) -> None:
        """A record of a held partition, not handled (kept while the batch holds it)."""
        stash = self._stash.get(key)
        if stash is not None:
            stash.append(msg)

    def _release_in_batch(self) -> list[Message]:
        """Ask the hooks (a record was handled while the batch holds partitions): the records
        of the batch's held partitions released now, in order, to be handled next; the held
        partitions of earlier batches they release are resumed."""
        again: list[Message] = []
        for releases in self._releasers:
            for key in list(releases()):
                if key in self._holding:
                    del self._holding[key]
                    again.extend(self._stash.pop(key, ()))
                else:
                    self.release([key])
        return again

    def _handled_held(self, key: Key, offset: int) -> None:
        """A record was handled in a partition that held before: the hold is over when it
        is the held record (the wait observed: ``segflow_hold_seconds``)."""
        since = self._held_since.get(key)
        if since is None or since[0] > offset:
            return
        del self._held_since[key]
        self._released.discard(key)
        waited = time.monotonic() - since[1]
        HOLD_SECONDS.labels(self.config.service, self.instance, since[2]).observe(waited)
        log.info(
            "held record handled",
            extra={
                "fields": {
                    "topic": key[0],
                    "partition": key[1],
                    "offset": offset,
                    "reason": since[2],
                    "waited_ms": round(waited * 1000),
                }
            },
        )

    def _holds_committed(self) -> None:
        """The batch committed: its holds take effect (pause, then seek back to the record)."""
        holding, self._holding = self._holding, {}
        self._stash.clear()
        for (topic, part), offset in holding.items():
            tp = TopicPartition(topic, part, offset)
            self.consumer.pause([TopicPartition(topic, part)])
            try:
                self.consumer.seek(tp)
            except KafkaException as exc:  # not assigned any more: nothing to hold
                log.warning("seek failed", extra={"fields": {"error": str(exc)}})
                with contextlib.suppress(KafkaException):
                    self.consumer.resume([TopicPartition(topic, part)])
                continue
            self.held[(topic, part)] = offset
            metrics.HELD_PARTITIONS.labels(self.config.service, self.instance).set(len(self.held))
            log.info(
                "partition held",
                extra={"fields": {"topic": topic, "partition": part, "offset": offset}},
            )

    def _holds_aborted(self) -> None:
        """The batch was rolled back: what it held is read again (and decided again)."""
        for key in self._holding:
            if key not in self.held:
                self._held_since.pop(key, None)
        self._holding.clear()
        self._stash.clear()

    def release(self, partitions: Iterable[Key]) -> None:
        """Resume the held ones of ``partitions`` at their held record."""
        for key in partitions:
            offset = self.held.pop(key, None)
            if offset is None:
                continue
            topic, part = key
            with contextlib.suppress(KafkaException):
                self.consumer.resume([TopicPartition(topic, part)])
            self._released.add(key)
            metrics.HELD_PARTITIONS.labels(self.config.service, self.instance).set(len(self.held))
            since = self._held_since.get(key)
            log.info(
                "partition released",
                extra={
                    "fields": {
                        "topic": topic,
                        "partition": part,
                        "offset": offset,
                        "held_ms": None
                        if since is None
                        else round(1000 * (time.monotonic() - since[1])),
                    }
                },
            )

    def _ask_releases(self) -> None:
        if not self.held:
            return
        for releases in self._releasers:
            self.release(list(releases()))

    def _forget_holds(self, parts: set[int]) -> None:
        """Partitions revoked or lost: resumed (while still assigned) and forgotten."""
        self._holding = {k: v for k, v in self._holding.items() if k[1] not in parts}
        self._stash = {k: v for k, v in self._stash.items() if k[1] not in parts}
        self._held_since = {k: v for k, v in self._held_since.items() if k[1] not in parts}
        self._released = {k for k in self._released if k[1] not in parts}
        self.release([k for k in self.held if k[1] in parts])
