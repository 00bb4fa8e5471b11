"""Factories for confluent-kafka clients and topic administration, configured from Settings."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from segflow.errors import BrokerError
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS, Topic


def _librdkafka_keys(overrides: dict[str, Any]) -> dict[str, Any]:
    """``linger_ms=5`` → ``linger.ms``; callbacks (``stats_cb``, ``error_cb``) keep their names."""
    return {k if k.endswith("_cb") else k.replace("_", "."): v for k, v in overrides.items()}


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent producer (acks=all); pass ``transactional_id`` via overrides for EOS."""
    conf: dict[str, Any] = {
        **settings.kafka_config(),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 500000,
        "compression.type": "lz4",
    }
    conf.update(_librdkafka_keys(overrides))
    return Producer(conf)


def produce(
    producer: Producer,
    topic: str,
    value: bytes | None,
    key: bytes | None,
    on_delivery: Any = None,
    headers: Any = None,
    partition: int | None = None,
) -> None:
    """``producer.produce`` that waits (serving delivery reports) while the local queue is full.

    ``partition``: an explicit partition (None: the key's, librdkafka's default partitioner)."""
    while True:
        try:
            if partition is not None:
                producer.produce(
                    topic,
                    value,
                    key,
                    partition=partition,
                    headers=headers or None,
                    on_delivery=on_delivery,
                )
            elif headers:
                producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
            else:
                producer.produce(topic, value, key, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.05)


def make_consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    """A consumer with manual commits that reads only committed transactional data."""
    conf: dict[str, Any] = {
        **settings.kafka_config(),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        # The broker answers a fetch once 256 KB are ready or 50 ms passed, instead of on
        # every producer batch: far fewer fetch requests per record (the broker's CPU on a
        # small box), for at most 50 ms more per hop (the loop waits up to ``poll_timeout``
        # to fill a batch anyway).
        "fetch.min.bytes": 262144,
        "fetch.wait.max.ms": 50,
        "queued.max.messages.kbytes": 65536,
    }
    conf.update(_librdkafka_keys(overrides))
    return Consumer(conf)


def make_admin(settings: Settings) -> AdminClient:
    """An admin client; use it as a context manager (``with make_admin(s) as admin:``) so it
    is destroyed when the block ends, not whenever the garbage collector gets to it."""
    return AdminClient(settings.kafka_config())


def wait_for_broker(settings: Settings, timeout: float = 30.0) -> None:
    """Return once the cluster answers a metadata request, or raise BrokerError."""
    with make_admin(settings) as admin:
        try:
            admin.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise BrokerError(
                f"no Kafka broker answered at {settings.bootstrap_servers} within {timeout:.0f}s"
            ) from exc


def ensure_topics(
    settings: Settings,
    topics: Iterable[Topic] | None = None,
    names: dict[str, Topic] | None = None,
    timeout: float = 30.0,
) -> list[str]:
    """Create missing topics from the registry; returns the names created.

    ``names`` maps explicit topic names to registry entries (tests use fresh names).
    """
    wanted: dict[str, Topic] = dict(names or {})
    for topic in topics if topics is not None else TOPICS:
        wanted.setdefault(topic.name(settings), topic)
    with make_admin(settings) as admin:
        return _create_missing(admin, wanted, timeout)


def _create_missing(admin: AdminClient, wanted: dict[str, Topic], timeout: float) -> list[str]:
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(name, num_partitions=t.partitions, replication_factor=1, config=t.config())
        for name, t in wanted.items()
        if name not in existing
    ]
    if not new:
        return []
    created: list[str] = []
    for name, future in admin.create_topics(new, request_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"could not create topic {name}: {exc}") from exc
    return created
