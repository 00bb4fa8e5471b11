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
"""

from __future__ import annotations

from types import TracebackType

from confluent_kafka import Consumer, KafkaException, TopicPartition

from segflow.runtime.settings import Settings


class LagProbe:
    """Lag of consumer groups on their input topics, from committed offsets and high marks."""

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self._groups: dict[str, Consumer] = {}
        self._parts: dict[str, list[TopicPartition]] = {}

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
        """The group's committed offset per partition (-1 where it has none)."""
        got = self._consumer(group).committed(parts, timeout=self.timeout)
        return {(tp.topic, tp.partition): tp.offset for tp in got}

    def high(self, group: str, tp: TopicPartition) -> int:
        return int(self._consumer(group).get_watermark_offsets(tp, timeout=self.timeout)[1])

    def lag(self, groups: dict[str, list[str]]) -> dict[str, int]:
        """Records each group still has to read on its topics, per group.

        A transactional topic's last offset is a commit marker that no consumer ever
        "reads": one record behind on a partition counts as caught up.
        """
        out = {}
        for group, topics in groups.items():
            parts = [tp for name in topics for tp in self.partitions(group, name)]
            done = self.committed(group, parts)
            behind = 0
            for tp in parts:
                left = max(0, self.high(group, tp) - max(done.get((tp.topic, tp.partition), -1), 0))
                behind += left if left > 1 else 0
            out[group] = behind
        return out

    def close(self) -> None:
        for consumer in self._groups.values():
            consumer.close()
        self._groups.clear()

    def __enter__(self) -> LagProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
