"""Changelog-backed key-value state for services on the shared loop.

A :class:`ChangelogStore` keeps its table in memory and mirrors every change to a compacted
topic from the registry. Changes travel as :class:`~segflow.runtime.loop.Output` records in
the same Kafka transaction as the service's other outputs and its consumed offsets, so the
state a restarted service restores is exactly the state that produced its committed outputs.

* ``put``/``delete`` change the table and return the changelog ``Output`` to yield;
* ``restore()`` reads the changelog from the beginning to its end (read_committed) at start;
* pass the store as the loop's ``hooks``: an aborted transaction rolls the table back to the
  last commit, a commit forgets the undo log.

Partitioned like a Kafka Streams store: the changelog is co-partitioned with the inputs the
service is keyed by. A key's partition is the one librdkafka's default partitioner
(``consistent_random``: CRC-32 of the key modulo the partition count) puts it in, so the
state of customer ``c`` lives in the changelog partition with the number of the input
partition ``c``'s records arrive on. A key that is not a customer (a per-partition
aggregate such as a segment status) is written to an explicit partition with
``put(key, value, partition=p)``; such keys must be unique across partitions. As a loop hook,
the store restores only the partitions the consumer group assigns to this instance
(``on_assign``, before any of their records are fetched) and drops those revoked or lost
(``on_revoke``); ``restore()`` without partitions loads all of them (one instance, tools).

Values are records of the topic's Avro schema (``value: None`` is a tombstone).

>>> partition_for("customer-1", 4)
1
"""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from tenacity import RetryCallState

from segflow.runtime.loop import Output
from segflow.runtime.retry import kafka_retrying
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import Topic

log = logging.getLogger("segflow.state")

_MISSING = object()


def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition librdkafka's default partitioner (``consistent_random``) gives ``key``:
    CRC-32 of its bytes modulo the partition count (it spreads an empty key at random, like a
    missing one: state keys are never empty)."""
    raw = key.encode() if isinstance(key, str) else key
    return zlib.crc32(raw) % partitions


class ChangelogStore:
    """An in-memory table mirrored to the compacted topic ``topic``."""

    def __init__(
        self,
        settings: Settings,
        topic: Topic,
        serde: Serde | None = None,
        partitioned: bool | None = None,
        encoded: bool = False,
    ) -> None:
        if "compact" not in topic.cleanup:
            raise ValueError(f"changelog topic {topic.key_name} must be compacted")
        self.settings = settings
        self.topic = topic
        self.topic_name = topic.name(settings)
        self.serde = serde or Serde.from_settings(settings)
        #: key -> record, or with ``encoded`` the record's wire bytes (decoded by ``get``): a
        #: service that keeps its own decoded objects holds each customer once, not twice,
        #: and a restore does not decode what the service decodes again anyway.
        self.table: dict[str, Any] = {}
        self.encoded = encoded
        self._undo: dict[str, Any] = {}
        #: Partitions of the changelog (the topic's actual count once restored).
        self.partitions = topic.partitions
        #: Partitions this instance holds; None: all of them (one instance, or a tool).
        self.assigned: set[int] | None = None
        #: Keys written to an explicit partition (not their hash's), e.g. per-partition
        #: aggregates: key -> partition.
        self._pinned: dict[str, int] = {}
        #: Pinned keys deleted in the open transaction: their partition is forgotten at the
        #: commit (an abort may bring the key back), or a store whose keys come and go (time
        #: chunks) would keep one entry per key it ever wrote.
        self._unpinned: set[str] = set()
        #: Whether the store follows the consumer group's assignment (on_assign/on_revoke);
        #: False: one global table restored in full at start (single-partition topics, and
        #: services that are not partition-aware yet).
        self.partitioned = topic.partitions > 1 if partitioned is None else partitioned
        #: Seconds the last restore took, and records it read (for metrics and benches).
        self.last_restore_seconds = 0.0
        #: Told of every change that became committed state: at each commit the keys written
        #: since the previous one, after a restore or a drop ``None`` (anything may have
        #: changed). How a service publishes what its queries read (runtime/snapshot.py).
        self.on_committed: Callable[[Iterable[str] | None], None] | None = None

    # -- reads ---------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        value = self.table.get(key)
        if self.encoded and value is not None:
            return self.serde.decode(self.topic, value)
        return cast("dict[str, Any] | None", value)

    def __contains__(self, key: str) -> bool:
        return key in self.table

    def __len__(self) -> int:
        return len(self.table)

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.encoded:
            decode, topic = self.serde.decode, self.topic
            return ((k, decode(topic, v)) for k, v in list(self.table.items()))
        return iter(self.table.items())

    def keys(self) -> Iterator[str]:
        return iter(self.table)

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def partition_of(self, key: str) -> int:
        """The changelog partition ``key`` lives in."""
        pinned = self._pinned.get(key)
        return pinned if pinned is not None else partition_for(key, self.partitions)

    def snapshot(self) -> dict[str, tuple[int, Any]]:
        """Every key with its partition and stored value (what a restore of all partitions
        would load; for tools and tests)."""
        return {k: (self.partition_of(k), v) for k, v in self.table.items()}

    def load_snapshot(self, snapshot: dict[str, tuple[int, Any]]) -> None:
        """Load a :meth:`snapshot` as a restore would (keys keep their partitions)."""
        for key, (part, value) in snapshot.items():
            self.table[key] = value
            if part != partition_for(key, self.partitions):
                self._pinned[key] = part
        if self.on_committed is not None:
            self.on_committed(None)

    def owns(self, key: str) -> bool:
        """Whether this instance holds ``key``'s partition."""
        return self.assigned is None or self.partition_of(key) in self.assigned

    # -- writes --------------------------------------------------------------------------
    def put(self, key: str, value: dict[str, Any] | bytes, partition: int | None = None) -> Output:
        """Set ``key`` (in ``partition`` if given, else its hash's); yield the returned Output
        from the handler."""
        part = self._place(key, partition)
        if key not in self._undo:
            self._undo[key] = self.table.get(key, _MISSING)
        stored: Any = value
        if self.encoded and not isinstance(value, bytes):
            stored = self.serde.encode(self.topic, value)  # once: the Output carries the bytes
        self.table[key] = stored
        return Output(self.topic, key, stored, partition=self._explicit(part, partition))

    def delete(self, key: str) -> Output:
        """Remove ``key`` (a tombstone on the changelog)."""
        part = self.partition_of(key)
        if key not in self._undo:
            self._undo[key] = self.table.get(key, _MISSING)
        self.table.pop(key, None)
        if key in self._pinned:
            self._unpinned.add(key)
        return Output(self.topic, key, None, partition=self._explicit(part, None))

    def _explicit(self, part: int, asked: int | None) -> int | None:
        """The partition to produce to: explicit for a partitioned store (or when asked),
        else the producer's (a global store on a topic of any partition count)."""
        return part if self.partitioned or asked is not None else None

    def _place(self, key: str, partition: int | None) -> int:
        if partition is None:
            return self.partition_of(key)
        if partition != partition_for(key, self.partitions):
            old = self._pinned.setdefault(key, partition)
            if old != partition:
                raise ValueError(
                    f"{self.topic_name}: key {key!r} is already in partition {old}; keys "
                    "written to an explicit partition must be unique across partitions"
                )
        return partition

    # -- partitions (loop hooks for a consumer group) ---------------------------------------
    def on_assign(self, partitions: set[int]) -> None:
        """Restore the newly assigned partitions before their records are processed."""
        if not self.partitioned:
            return
        new = set(partitions) - (self.assigned or set())
        if self.assigned is None:
            self.assigned = set()
            self.table.clear()
            self._pinned.clear()
        self.assigned |= set(partitions)
        if new:
            self.restore(partitions=new)

    def on_revoke(self, partitions: set[int]) -> None:
        """Drop the revoked (or lost) partitions' keys: another instance owns them now."""
        if not self.partitioned:
            return
        gone = set(partitions)
        if self.assigned is None:
            self.assigned = set(range(self.partitions)) - gone
        else:
            self.assigned -= gone
        self.drop(gone)

    def drop(self, partitions: Iterable[int]) -> int:
        """Forget every key of ``partitions`` (memory only); returns the keys dropped."""
        gone = set(partitions)
        if not gone:
            return 0
        keys = [k for k in self.table if self.partition_of(k) in gone]
        for k in keys:
            del self.table[k]
            self._undo.pop(k, None)
        for k in [k for k, p in self._pinned.items() if p in gone]:
            del self._pinned[k]
        if self.on_committed is not None and keys:
            self.on_committed(None)
        return len(keys)

    # -- loop hooks ----------------------------------------------------------------------
    def on_commit(self) -> None:
        if self.on_committed is not None:
            self.on_committed(self._undo.keys())
        self._undo.clear()
        for key in self._unpinned:
            if key not in self.table:
                self._pinned.pop(key, None)
        self._unpinned.clear()

    def on_abort(self) -> None:
        """Undo every change since the last commit."""
        for key, old in self._undo.items():
            if old is _MISSING:
                self.table.pop(key, None)
            else:
                self.table[key] = old
        log.warning("state rolled back", extra={"fields": {"keys": len(self._undo)}})
        self._undo.clear()
        self._unpinned.clear()

    def _watermarks(self, consumer: Consumer, partition: int, deadline: float) -> tuple[int, int]:
        """Low and high offsets, retried while the partition has no leader yet (new topics)."""

        def no_leader_yet(exc: BaseException) -> bool:
            return isinstance(exc, KafkaException) and (
                exc.args[0].retriable() or "LEADER" in str(exc)
            )

        def past_deadline(_state: RetryCallState) -> bool:
            return time.monotonic() > deadline

        for attempt in kafka_retrying(
            "changelog watermarks", when=no_leader_yet, stop=past_deadline, first=0.1
        ):
            with attempt:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic_name, partition), timeout=10
                )
        return int(low), int(high)

    def _stable_ends(self, consumer: Consumer, parts: list[int], deadline: float) -> dict[int, int]:
        """Each partition's end to restore to (only non-empty ones): its last stable offset,
        once no transaction is open on it any more (read_committed end == end).

        A transaction left open by an instance killed with ``kill -9`` pins the last stable
        offset until the broker aborts it (the transaction timeout, plus the broker's check
        interval). Restoring up to the pinned offset would miss what another instance commits
        after it meanwhile (e.g. a tick's timers fired by an owner in between), and the new
        owner would fire them again; so the restore waits for the abort, as Kafka Streams'
        tasks wait on the pending offsets (KIP-447). Only the owner writes a changelog
        partition, so on assignment an open transaction there is a dead owner's (this
        instance's own earlier incarnation was aborted by ``init_transactions``)."""
        wait_until = time.monotonic() + self.settings.transaction_timeout_ms / 1000 + 15.0
        raw = Consumer(
            {
                **self.settings.kafka_config(),
                "group.id": f"restore-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_uncommitted",
            }
        )
        try:
            pending = set(parts)
            ends: dict[int, int] = {}
            while True:
                for p in sorted(pending):
                    low, stable = self._watermarks(consumer, p, deadline)
                    _, end = self._watermarks(raw, p, deadline)
                    if stable >= end:
                        pending.discard(p)
                        if stable > low:
                            ends[p] = stable
                if not pending:
                    return ends
                if time.monotonic() > wait_until:
                    log.warning(
                        "restoring past a transaction still open",
                        extra={"fields": {"topic": self.topic_name, "partitions": sorted(pending)}},
                    )
                    for p in pending:
                        low, stable = self._watermarks(consumer, p, deadline)
                        if stable > low:
                            ends[p] = stable
                    return ends
                time.sleep(0.2)
        finally:
            raw.close()

    # -- restore -------------------------------------------------------------------------
    def restore(self, timeout: float = 120.0, partitions: Iterable[int] | None = None) -> int:
        """Load the table from the changelog (read_committed, to its end); returns records read.

        ``partitions``: only those (the rest of the table is left alone); None: all."""
        started = time.monotonic()
        consumer = Consumer(
            {
                **self.settings.kafka_config(),
                "group.id": f"restore-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        try:
            md = consumer.list_topics(self.topic_name, timeout=10)
            everything = list(md.topics[self.topic_name].partitions)
            if everything:
                self.partitions = len(everything)
            parts = everything if partitions is None else sorted(set(partitions))
            if partitions is None:  # at start: the one writer is this process (restarted)
                ends = {}
                for p in parts:
                    low, high = self._watermarks(consumer, p, started + timeout)
                    if high > low:
                        ends[p] = high
            else:  # taken over in a rebalance: a dead owner's transaction may still be open
                ends = self._stable_ends(consumer, parts, started + timeout)
            consumer.assign([TopicPartition(self.topic_name, p, OFFSET_BEGINNING) for p in ends])
            n = 0
            deadline = time.monotonic() + timeout
            while ends:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"restoring {self.topic_name} took over {timeout}s")
                for msg in consumer.consume(5000, 0.5):
                    if msg.error():
                        continue
                    n += 1
                    raw = msg.key()
                    key = raw.decode() if raw is not None else ""
                    value = msg.value()
                    partition, offset = cast(int, msg.partition()), cast(int, msg.offset())
                    if value is None:
                        self.table.pop(key, None)
                        self._pinned.pop(key, None)
                    else:
                        self.table[key] = (
                            value if self.encoded else self.serde.decode(self.topic, value)
                        )
                        if partition != partition_for(key, self.partitions):
                            self._pinned[key] = partition
                    if offset + 1 >= ends.get(partition, 0):
                        ends.pop(partition, None)
                # Transaction markers occupy offsets too: compare positions, not messages.
                if ends:
                    for tp in consumer.position(
                        [TopicPartition(self.topic_name, p) for p in list(ends)]
                    ):
                        if tp.offset >= ends[tp.partition]:
                            ends.pop(tp.partition, None)
        finally:
            consumer.close()
        self._undo.clear()
        if self.on_committed is not None:
            self.on_committed(None)
        self.last_restore_seconds = time.monotonic() - started
        log.info(
            "state restored",
            extra={
                "fields": {
                    "topic": self.topic_name,
                    "partitions": parts,
                    "records": n,
                    "keys": len(self.table),
                    "seconds": round(time.monotonic() - started, 2),
                }
            },
        )
        return n
