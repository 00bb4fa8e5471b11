"""Consumer-group lag: how many records each service's group still has to read.

Committed offsets are read with a *consumer* of the group (``Consumer.committed``), never with
the Admin API's ``list_consumer_group_offsets``. librdkafka (2.4 through 2.16 at least)
crashes the whole process in its main thread when an Admin ``ListConsumerGroupOffsets``
answer carries an error that asks for a coordinator re-query (``NOT_COORDINATOR``,
``COORDINATOR_LOAD_IN_PROGRESS``): ``rd_kafka_handle_OffsetFetch`` then calls
``rd_kafka_cgrp_op(rk->rk_cgrp, ...)``, and an admin client has no consumer group handle, so
it dereferences NULL (SIGSEGV "at 58", the offset of ``rkcg_ops``). Upstream:
confluentinc/librdkafka#5040 (open), confluentinc/confluent-kafka-python#1982,
confluentinc/confluent-kafka-javascript#374. A freshly formatted broker answers exactly that
while it loads ``__consumer_offsets``, which is how ``segflow demo`` died in its first
simulated week (core dump: rd_kafka_cgrp_op ← rd_kafka_handle_OffsetFetch ←
rd_kafka_ListConsumerGroupOffsetsResponse_parse). A consumer that carries the group id has
that handle, so the same error only makes it look the coordinator up again.

The probe's consumers never subscribe: they fetch committed offsets and high watermarks and
do not join the group they read. One probe serves many checks; close it when done (it is a
context manager).

**What counts as behind.** Lag is what a read_committed consumer of the group could still
read: data records of committed transactions (and plain records) between the group's
committed offset and the partition's last stable offset. Offsets holding only transaction
markers or aborted records are not: a group consumes them without anything to commit, so
after a ``kill -9`` of a producer inside a transaction (aborted by the broker when it times
out) its committed offset stays before the aborted records and the abort marker until a new
record comes, perhaps never. Offsets alone cannot tell these apart, so where the committed
offset is behind the partition's end the probe reads the gap with a read_committed consumer
of its own (no group, no commit): the records it finds are the lag (counted up to
``READ_CAP`` per partition, beyond that estimated from offsets); finding none before the end
means caught up. (Before, a gap of one offset counted as a commit marker and anything more
as lag, so an abort at the end of a partition kept the demo's catch-up wait and
bench/bench_e2e.py waiting until their timeout.)
"""

from __future__ import annotations

import time
import uuid
from types import TracebackType

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from segflow.runtime.settings import Settings

#: Records read per partition to count lag exactly; a longer gap is estimated from offsets
#: (a backlog that size is lag whatever the markers in it; the reader fetches little more).
READ_CAP = 200
Key = tuple[str, int]
_COORDINATOR_MOVING = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    }
)


class LagProbe:
    """Lag of consumer groups on their input topics, from committed offsets and high marks."""

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self._groups: dict[str, Consumer] = {}
        self._parts: dict[str, list[TopicPartition]] = {}
        self._reader: Consumer | None = None
        #: Gaps read before and found to hold no record (only markers or aborted records):
        #: while a partition's committed offset and end stay the same, it is not read again
        #: (a catch-up wait asks many times; after every transaction the commit marker is one).
        self._empty: dict[Key, tuple[int, int]] = {}

    def _consumer(self, group: str) -> Consumer:
        if group not in self._groups:
            self._groups[group] = Consumer(
                {
                    **self.settings.kafka_config(),
                    "group.id": group,
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                }
            )
        return self._groups[group]

    def partitions(self, group: str, topic: str) -> list[TopicPartition]:
        if topic not in self._parts:
            md = self._consumer(group).list_topics(topic, timeout=self.timeout)
            meta = md.topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise KafkaException(f"topic {topic!r} has no partitions yet")
            self._parts[topic] = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        return self._parts[topic]

    def committed(self, group: str, parts: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """The group's committed offset per partition (-1 where it has none).

        A broker that is loading the group's coordinator answers "not coordinator" or
        "coordinator load in progress" for a while; asked again until the probe's timeout.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                got = self._consumer(group).committed(parts, timeout=self.timeout)
                return {(tp.topic, tp.partition): tp.offset for tp in got}
            except KafkaException as exc:
                code = exc.args[0].code() if exc.args else None
                if code not in _COORDINATOR_MOVING or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def high(self, group: str, tp: TopicPartition) -> int:
        """The partition's end for a read_committed reader (its last stable offset)."""
        return int(self._consumer(group).get_watermark_offsets(tp, timeout=self.timeout)[1])

    def behind(self, group: str, parts: list[TopicPartition]) -> dict[Key, tuple[int, int]]:
        """Per partition: (records the group can still read, its committed offset or -1).

        Records, not offsets: transaction markers and aborted records do not count (module
        doc), so a group whose committed offset stops before an aborted transaction at the
        end of a partition is caught up.
        """
        done = self.committed(group, parts)
        gaps: dict[Key, tuple[int, int]] = {}
        for tp in parts:
            key = (tp.topic, tp.partition)
            low, end = self._consumer(group).get_watermark_offsets(tp, timeout=self.timeout)
            start = done.get(key, -1)
            start = start if start >= 0 else int(low)
            if end > start:
                gaps[key] = (start, int(end))
        left = self.readable(gaps)
        return {
            (tp.topic, tp.partition): (
                left.get((tp.topic, tp.partition), 0),
                done.get((tp.topic, tp.partition), -1),
            )
            for tp in parts
        }

    def readable(self, gaps: dict[Key, tuple[int, int]]) -> dict[Key, int]:
        """Records a read_committed consumer finds in each partition's ``[start, end)``.

        Counted by reading (markers and aborted records are skipped by the client) up to
        ``READ_CAP`` records per partition; past the cap, or if the broker does not answer
        within the probe's timeout, the rest of the gap counts in full (an estimate that can
        only be too high, never report caught up too early).
        """
        known = {key for key, gap in gaps.items() if self._empty.get(key) == gap}
        gaps = {key: gap for key, gap in gaps.items() if key not in known}
        if not gaps:
            return dict.fromkeys(known, 0)
        reader = self._reader_consumer()
        reader.assign([TopicPartition(t, p, start) for (t, p), (start, _) in gaps.items()])
        count = dict.fromkeys(gaps, 0)
        position = {key: start for key, (start, _) in gaps.items()}
        reading = set(gaps)
        deadline = time.monotonic() + self.timeout
        try:
            while reading and time.monotonic() < deadline:
                for m in reader.consume(500, 0.2):
                    key = (str(m.topic()), int(m.partition() or 0))
                    if key not in reading:
                        continue
                    err = m.error()
                    end = gaps[key][1]
                    if err is None:
                        offset = int(m.offset() or 0)
                        if offset < position[key]:  # not from this read
                            continue
                        if offset < end:
                            count[key] += 1
                        position[key] = offset + 1
                        if position[key] >= end or count[key] >= READ_CAP:
                            reading.discard(key)
                    elif err.code() == KafkaError._PARTITION_EOF:
                        # the reader reached the last stable offset: nothing more to read
                        position[key] = max(position[key], end)
                        reading.discard(key)
                    else:
                        raise KafkaException(err)
        finally:
            reader.unassign()
        left = {key: count[key] + max(0, gaps[key][1] - position[key]) for key in gaps}
        for key, n in left.items():
            if n == 0:
                self._empty[key] = gaps[key]
            else:
                self._empty.pop(key, None)
        return {**left, **dict.fromkeys(known, 0)}

    def lag(self, groups: dict[str, list[str]]) -> dict[str, int]:
        """Records each group can still read on its topics (read_committed), per group."""
        out = {}
        for group, topics in groups.items():
            parts = [tp for name in topics for tp in self.partitions(group, name)]
            out[group] = sum(left for left, _ in self.behind(group, parts).values())
        return out

    def _reader_consumer(self) -> Consumer:
        if self._reader is None:
            self._reader = Consumer(
                {
                    **self.settings.kafka_config(),
                    # assigned partitions only: it never joins this group or commits
                    "group.id": f"segflow-lag-reader-{uuid.uuid4().hex[:12]}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "enable.partition.eof": True,
                    "isolation.level": "read_committed",
                    "fetch.wait.max.ms": 100,
                    # it reads at most READ_CAP records of a partition: no deep prefetch
                    "max.partition.fetch.bytes": 262144,
                    "queued.min.messages": 1000,
                }
            )
        return self._reader

    def close(self) -> None:
        for consumer in self._groups.values():
            consumer.close()
        self._groups.clear()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> LagProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
