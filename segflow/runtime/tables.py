"""A global table: a small compacted topic that every instance of a service reads whole.

Partitioned state (:mod:`segflow.runtime.state`) belongs to the instance that owns a
partition; a *global* table (Kafka Streams' ``GlobalKTable``) is read by every instance from
every partition, with no consumer group, and followed for changes while the service runs. The
lookup tables (``segflow.lookups``: zip -> income tier, …) are one: a rule reads any table for
any customer, so each instance holds all of them (STYLE: "nothing global lives in one
instance's memory unless it is rebuilt from a topic every instance reads").

``poll()`` returns what changed since the last call (key -> record, None for a tombstone), so
the service can re-evaluate what a change touches; ``catch_up()`` reads to the end first.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from segflow.errors import BrokerError
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import Topic

log = logging.getLogger("segflow.tables")


class GlobalTable:
    """Every record of ``topic``, latest per key, decoded; followed by :meth:`poll`."""

    def __init__(
        self, settings: Settings, topic: Topic, serde: Serde | None = None, name: str | None = None
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.topic_name = name or topic.name(settings)
        self.serde = serde or Serde.from_settings(settings)
        self.table: dict[str, dict[str, Any]] = {}
        self._consumer: Consumer | None = None
        self.undecodable = 0

    def _open(self) -> Consumer:
        if self._consumer is None:
            consumer = Consumer(
                {
                    **self.settings.kafka_config(),
                    "group.id": f"table-{uuid.uuid4().hex[:8]}",  # never joins: assign()
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    # a change is seen within a tick, not after librdkafka's 500 ms fetch wait
                    "fetch.wait.max.ms": 100,
                }
            )
            try:
                md = consumer.list_topics(self.topic_name, timeout=10)
            except KafkaException as exc:
                consumer.close()
                raise BrokerError(f"cannot read {self.topic_name}: {exc}") from exc
            parts = md.topics[self.topic_name].partitions
            consumer.assign(
                [TopicPartition(self.topic_name, p, OFFSET_BEGINNING) for p in sorted(parts)]
            )
            self._consumer = consumer
        return self._consumer

    def poll(
        self, timeout: float = 0.0, max_records: int = 1000
    ) -> dict[str, dict[str, Any] | None]:
        """Apply what arrived since the last call; returns the changed keys' new records."""
        consumer = self._open()
        changed: dict[str, dict[str, Any] | None] = {}
        for msg in consumer.consume(max_records, timeout):
            if msg.error():
                continue
            raw = msg.key()
            key = raw.decode() if raw is not None else ""
            value = msg.value()
            if value is None:
                self.table.pop(key, None)
                changed[key] = None
                continue
            try:
                record = self.serde.decode(self.topic, value)
            except Exception as exc:  # a bad record must not stop the service
                self.undecodable += 1
                log.error(
                    "undecodable table record",
                    extra={"fields": {"topic": self.topic_name, "key": key, "error": str(exc)}},
                )
                continue
            self.table[key] = record
            changed[key] = record
        return changed

    def catch_up(self, timeout: float = 30.0) -> dict[str, dict[str, Any] | None]:
        """Read to the end of every partition (at start, before the first evaluation)."""
        consumer = self._open()
        deadline = time.monotonic() + timeout
        changed: dict[str, dict[str, Any] | None] = {}
        while True:
            changed.update(self.poll(0.2))
            behind = False
            for tp in consumer.assignment():
                try:
                    _low, high = consumer.get_watermark_offsets(tp, timeout=5)
                except KafkaException as exc:  # a new topic has no leader for a moment
                    if time.monotonic() > deadline:
                        raise BrokerError(f"cannot read {self.topic_name}: {exc}") from exc
                    behind = True
                    continue
                pos = consumer.position([tp])[0].offset
                if high > 0 and (pos < 0 or pos < high):
                    behind = True
            if not behind:
                return changed
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {self.topic_name} to its end took over {timeout}s")

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
