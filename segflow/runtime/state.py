"""Changelog-backed key-value state for services on the shared loop.

A :class:`ChangelogStore` keeps its table in memory and mirrors every change to a compacted
topic from the registry. Changes travel as :class:`~segflow.runtime.loop.Output` records in
the same Kafka transaction as the service's other outputs and its consumed offsets, so the
state a restarted service restores is exactly the state that produced its committed outputs.

* ``put``/``delete`` change the table and return the changelog ``Output`` to yield;
* ``restore()`` reads the changelog from the beginning to its end (read_committed) at start;
* pass the store as the loop's ``hooks``: an aborted transaction rolls the table back to the
  last commit, a commit forgets the undo log.

Values are records of the topic's Avro schema (``value: None`` is a tombstone).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from segflow.runtime.loop import Output
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import Topic

log = logging.getLogger("segflow.state")

_MISSING = object()


class ChangelogStore:
    """An in-memory table mirrored to the compacted topic ``topic``."""

    def __init__(self, settings: Settings, topic: Topic, serde: Serde | None = None) -> None:
        if "compact" not in topic.cleanup:
            raise ValueError(f"changelog topic {topic.key_name} must be compacted")
        self.settings = settings
        self.topic = topic
        self.topic_name = topic.name(settings)
        self.serde = serde or Serde.from_settings(settings)
        self.table: dict[str, dict[str, Any]] = {}
        self._undo: dict[str, Any] = {}

    # -- reads ---------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        return self.table.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.table

    def __len__(self) -> int:
        return len(self.table)

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(self.table.items())

    # -- writes --------------------------------------------------------------------------
    def put(self, key: str, value: dict[str, Any]) -> Output:
        """Set ``key``; yield the returned Output from the handler."""
        if key not in self._undo:
            self._undo[key] = self.table.get(key, _MISSING)
        self.table[key] = value
        return Output(self.topic, key, value)

    def delete(self, key: str) -> Output:
        """Remove ``key`` (a tombstone on the changelog)."""
        if key not in self._undo:
            self._undo[key] = self.table.get(key, _MISSING)
        self.table.pop(key, None)
        return Output(self.topic, key, None)

    # -- loop hooks ----------------------------------------------------------------------
    def on_commit(self) -> None:
        self._undo.clear()

    def on_abort(self) -> None:
        """Undo every change since the last commit."""
        for key, old in self._undo.items():
            if old is _MISSING:
                self.table.pop(key, None)
            else:
                self.table[key] = old
        log.warning("state rolled back", extra={"fields": {"keys": len(self._undo)}})
        self._undo.clear()

    def _watermarks(self, consumer: Consumer, partition: int, deadline: float) -> tuple[int, int]:
        """Low and high offsets, retried while the partition has no leader yet (new topics)."""
        delay = 0.1
        while True:
            try:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic_name, partition), timeout=10
                )
                return int(low), int(high)
            except KafkaException as exc:
                if not exc.args[0].retriable() and "LEADER" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- restore -------------------------------------------------------------------------
    def restore(self, timeout: float = 120.0) -> int:
        """Load the table from the changelog (read_committed, to its end); returns records read."""
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
            parts = list(md.topics[self.topic_name].partitions)
            ends: dict[int, int] = {}
            for p in parts:
                low, high = self._watermarks(consumer, p, started + timeout)
                if high > low:
                    ends[p] = high
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
                    if value is None:
                        self.table.pop(key, None)
                    else:
                        self.table[key] = self.serde.decode(self.topic, value)
                    partition, offset = cast(int, msg.partition()), cast(int, msg.offset())
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
        log.info(
            "state restored",
            extra={
                "fields": {
                    "topic": self.topic_name,
                    "records": n,
                    "keys": len(self.table),
                    "seconds": round(time.monotonic() - started, 2),
                }
            },
        )
        return n
