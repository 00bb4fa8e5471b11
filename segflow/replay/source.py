"""Where replayed history comes from: segflow's topics on a broker, or a JSON-lines export.

From the broker, ``segflow.scores`` and ``segflow.identity.merges`` (and, unless turned off,
``segflow.events.identified`` for the dispatcher's outcomes and suppressions) are read from the
beginning with ``read_committed``, without a consumer group (nothing is committed), up to the
end they had when the read started. ``segflow.scores`` is compacted: once the broker has
compacted it, only each customer's latest score is left and the replay sees less history.

A JSON-lines file holds one decoded record per line — a ``CustomerScore``, an
``IdentityMerge`` or an ``IdentifiedEvent``, recognised by their fields (times in epoch ms) —
as written by ``segflow replay --save FILE``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from segflow.errors import ConfigError
from segflow.replay.core import EVENT, MERGE, SCORE, Item, item_of

#: The registry key of the topic each kind of item is read from.
TOPIC_OF = {SCORE: "scores", MERGE: "merges", EVENT: "identified"}


def read_jsonl(path: Path) -> list[Item]:
    """Items from a JSON-lines file; a bad line is an error naming the file and line."""
    items: list[Item] = []
    try:
        lines = path.open(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    with lines:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("expected a JSON object")
                item = item_of(record)
                _check(item)
            except (ValueError, KeyError, TypeError) as exc:
                detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                raise ConfigError(f"{path}:{n}: {detail}") from None
            items.append(item)
    return items


def _check(item: Item) -> None:
    r = item.record
    if item.kind == SCORE:
        if not isinstance(r["customer_id"], str) or not r["customer_id"]:
            raise ValueError("customer_id must be a non-empty string")
        if not isinstance(r.get("features", {}), dict):
            raise ValueError("features must be an object of numbers")
    elif item.kind == MERGE:
        if not isinstance(r.get("absorbed_ids"), list):
            raise ValueError("absorbed_ids must be a list")
    else:
        if not isinstance(r.get("customer_id"), str) or "event_type" not in r["event"]:
            raise KeyError("customer_id or event.event_type")


def write_jsonl(items: Iterable[Item], out: IO[str]) -> int:
    """Write items as JSON lines (readable by :func:`read_jsonl`); returns the count."""
    n = 0
    for item in items:
        out.write(json.dumps(item.record, separators=(",", ":"), default=str) + "\n")
        n += 1
    return n


def read_topics(
    settings: Any, kinds: Iterable[str] = (SCORE, MERGE, EVENT), idle: float = 3.0
) -> list[Item]:
    """Every committed record of the topics for ``kinds``, from the beginning to the end
    they had when the read started. Tombstones (deleted scores) are skipped."""
    from segflow.runtime.serde import Serde
    from segflow.runtime.topics import TOPICS

    serde = Serde.from_settings(settings)
    items: list[Item] = []
    for kind in kinds:
        topic = getattr(TOPICS, TOPIC_OF[kind])
        for value in _read(settings, topic.name(settings), idle):
            record = serde.decode(topic, value)
            items.append(item_of(record))
    return items


def _read(settings: Any, name: str, idle: float) -> Iterable[bytes]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    consumer = Consumer(
        {
            **settings.kafka_config(),
            "group.id": f"segflow-replay-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        md = consumer.list_topics(name, timeout=10)
        topic = md.topics.get(name)
        if topic is None or topic.error is not None or not topic.partitions:
            raise ConfigError(
                f"topic {name!r} not found on {settings.bootstrap_servers} "
                "(check --prefix / SEGFLOW_TOPIC_PREFIX)"
            )
        ends: dict[int, int] = {}
        for p in topic.partitions:
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
            except KafkaException as exc:
                raise ConfigError(f"topic {name!r}: {exc}") from None
            if high > low:
                ends[p] = high
        if not ends:
            return
        consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in ends])
        last = time.monotonic()
        while True:
            msgs = consumer.consume(5000, 0.2)
            for m in msgs:
                value = m.value()
                if m.error() or value is None:
                    continue  # tombstones: deleted scores
                if int(m.offset() or 0) < ends[int(m.partition() or 0)]:
                    yield value
            now = time.monotonic()
            if msgs:
                last = now
                continue
            behind = [
                ends[tp.partition] - tp.offset
                for tp in consumer.position([TopicPartition(name, p) for p in ends])
            ]
            if all(b <= 0 for b in behind):
                return
            # A transaction's commit marker takes the last offset and is never delivered;
            # read_committed also stops before a transaction still open.
            if all(b <= 1 for b in behind) and now - last > 0.5 or now - last > idle:
                return
    finally:
        consumer.close()
