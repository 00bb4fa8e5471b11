"""Held input partitions of the shared loop (a mixin of
:class:`~segflow.runtime.loop.ProcessingLoop`): a handler that cannot handle a record yet
(it needs something another input brings later) raises
:class:`~segflow.runtime.records.HoldPartition`, and its partition stops at that record until
a hook releases it, so the partition's records are handled in their order whatever the
timing.

* In the batch: the record gets no outputs; it and the later records of its
  (topic, partition) in the batch are left unhandled and kept in memory, in order (the
  partition's *stash*); the batch's transaction commits the partition's offset up to the
  record (not beyond), with the other partitions' as usual.
* Release: after each record the loop handles while a partition is held, and after each
  poll and batch, it asks the hooks with ``releases() -> Iterable[(topic, partition)]`` (or
  a caller calls :meth:`release`); a held partition among them goes on with its stash, from
  the held record, which is handled again: at once when in a batch (what it waited for came
  in the same batch; the transaction commits both), else first in the next batch. Releasing
  a partition that is not held does nothing.
* After the commit: a partition still held is paused and the consumer seeks it to the
  record after its stash (both drop what librdkafka prefetched of it); a release resumes it
  there. An aborted batch holds nothing: the rewind re-reads it (and the records it handled
  of a stash) and the handler decides again; a stash of an earlier batch's hold stays (its
  partition did not move).
* Rebalance: a held partition that is revoked or lost is resumed (librdkafka would keep an
  application pause across a re-assignment) and forgotten with its stash; its next owner,
  this instance or another, reads it from the committed offset (the held record) and the
  handler decides again. A partition that is assigned is never held.
* Urgent records (:meth:`PartitionHolds._poll`): a batch normally fills for up to
  ``poll_timeout`` (0.2 s) before it is handled, which a hold pays at each hop of its round
  trip (the batch that sends what it waits for, the batch that reads it). So when a hook has
  ``urgent(topic, partition, value) -> bool``, the loop polls in slices of ``SLICE_SECONDS``
  and ends the batch after the slice in which a record the hook calls urgent arrived (the
  scorer: a hand-off, a merge mark whose hand-off another instance or a held partition
  waits for), at the earliest ``URGENT_MIN_SECONDS`` after the poll began (which bounds the
  transactions per second); with a released stash waiting it does not wait at all. Which
  records form a batch depends on timing anyway; handlers must not depend on it.

Measured (session 12, ``bench/bench_e2e.py``, scorer at INFO, its "held record handled"
lines): before the stash and the urgent records, a merge hold of 2 scorers waited p50
~0.8 s (~0.2 s of it the re-read after the release, the poll's timeout), each partition held
~55 % of the time; one scorer behind its input had 3-4 of its 4 partitions held most of the
time, each waiting for a ``customer_merged`` of another partition it owns.

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
    #: Held input partitions (paused, after their stash): key -> the held record's offset.
    held: dict[Key, int]
    #: Held by the batch in hand (paused once its transaction commits).
    _holding: dict[Key, int]
    #: Held partitions' record offset, the time it first held them and why (until handled).
    _held_since: dict[Key, tuple[int, float, str]]
    #: Each held partition's records read, from the held record on, in order.
    _stash: dict[Key, list[Message]]
    #: Stashes released between batches: handled first in the next batch.
    _ready: list[Message]

    def _init_holds(self) -> None:
        self.held = {}
        self._holding = {}
        self._held_since = {}
        self._stash = {}
        self._ready = []
        self._releasers = [
            fn for fn in (getattr(h, "releases", None) for h in self.hooks) if fn is not None
        ]
        self._urgent_hooks = [
            fn for fn in (getattr(h, "urgent", None) for h in self.hooks) if fn is not None
        ]

    def _poll(self) -> list[Message]:
        """The next batch: up to ``batch_size`` records within ``poll_timeout``, ended early
        after an urgent record, at once with a released stash (module docstring)."""
        cfg = self.config
        consume = self.consumer.consume
        if self._ready:
            return consume(cfg.batch_size, 0)
        if not self._urgent_hooks:
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
        topic, part, value = cast(str, msg.topic()), cast(int, msg.partition()), msg.value()
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
        """A record of a partition the batch holds, not handled: into its stash (one of a
        partition held since an earlier batch, paused after its stash, cannot come)."""
        if key in self._holding:
            self._stash[key].append(msg)

    def _release_in_batch(self) -> list[Message]:
        """Ask the hooks (a record was handled while partitions are held): the stashes of
        the held partitions released now, in order, to be handled next in the batch."""
        for releases in self._releasers:
            for key in list(releases()):
                if key in self._holding:
                    del self._holding[key]
                    self._ready.extend(self._stash.pop(key))
                else:
                    self.release([key])
        again, self._ready = self._ready, []
        return again

    def _handled_held(self, key: Key, offset: int) -> None:
        """A record was handled in a partition that held before: the hold is over when it
        is the held record (the wait observed: ``segflow_hold_seconds``)."""
        since = self._held_since.get(key)
        if since is None or since[0] > offset:
            return
        del self._held_since[key]
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
        """The batch committed: its holds take effect (pause, then seek past the stash)."""
        holding, self._holding = self._holding, {}
        for (topic, part), offset in holding.items():
            key = (topic, part)
            after = cast(int, self._stash[key][-1].offset()) + 1
            self.consumer.pause([TopicPartition(topic, part)])
            try:
                self.consumer.seek(TopicPartition(topic, part, after))
            except KafkaException as exc:  # not assigned any more: nothing to hold
                log.warning("seek failed", extra={"fields": {"error": str(exc)}})
                with contextlib.suppress(KafkaException):
                    self.consumer.resume([TopicPartition(topic, part)])
                del self._stash[key]
                continue
            self.held[key] = offset
            metrics.HELD_PARTITIONS.labels(self.config.service, self.instance).set(len(self.held))
            log.info(
                "partition held",
                extra={"fields": {"topic": topic, "partition": part, "offset": offset}},
            )

    def _holds_aborted(self) -> None:
        """The batch was rolled back: what it held is read again (and decided again); so are
        the records it handled of a released stash (the rewind seeks their partitions)."""
        for key in self._holding:
            self._stash.pop(key, None)
            if key not in self.held:
                self._held_since.pop(key, None)
        self._holding.clear()
        self._ready.clear()

    def release(self, partitions: Iterable[Key]) -> None:
        """Resume the held ones of ``partitions``: their stash (from the held record) is
        handled first in the next batch (or next in the batch in hand)."""
        for key in partitions:
            offset = self.held.pop(key, None)
            if offset is None:
                continue
            topic, part = key
            self._ready.extend(self._stash.pop(key, ()))
            with contextlib.suppress(KafkaException):
                self.consumer.resume([TopicPartition(topic, part)])
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
        self._held_since = {k: v for k, v in self._held_since.items() if k[1] not in parts}
        self.release([k for k in self.held if k[1] in parts])
        self._stash = {k: v for k, v in self._stash.items() if k[1] not in parts}
        self._ready = [m for m in self._ready if m.partition() not in parts]
