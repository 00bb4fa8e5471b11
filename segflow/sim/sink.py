"""Sinks for simulated items: a JSON-lines file or the events topic (the simulator's shell).

``JsonLinesSink`` writes one JSON event per line (malformed records as their raw bytes);
``KafkaSink`` encodes events with the shared serde (Confluent wire format) and produces them
keyed by :func:`segflow.sim.identities.event_key`, malformed records as raw bytes. Both are
driven with batches of items in delivery order and report what they wrote on ``close``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from segflow.sim.noise import Delivery, Item, Malformed, encode_json

#: Field order and defaults of the BehaviorEvent Avro record.
EVENT_FIELDS = (
    "event_id",
    "event_type",
    "occurred_at",
    "user_id",
    "anonymous_id",
    "device_id",
    "email",
    "amount",
    "currency",
    "product_id",
    "feature",
    "session_seconds",
    "sentiment",
    "escalated",
    "campaign_id",
    "variant",
)


class DeliveryFailed(Exception):
    """Some records could not be delivered to Kafka (the first errors are in the message)."""


@dataclass(frozen=True)
class SinkStats:
    """What a sink wrote: events (duplicates included), malformed records, failures."""

    events: int
    malformed: int
    failed: int = 0
    errors: tuple[str, ...] = field(default=())

    @property
    def records(self) -> int:
        """All records written, valid or not."""
        return self.events + self.malformed


class Sink(Protocol):
    """Where simulated items go."""

    def write(self, items: Sequence[Item]) -> None:
        """Write a batch of items in delivery order."""

    def close(self) -> SinkStats:
        """Flush everything and report; raise :class:`DeliveryFailed` on lost records."""


def to_record(event: dict[str, Any]) -> dict[str, Any]:
    """The full Avro record of an event: absent optional fields as None, properties as a map.

    >>> r = to_record({"event_id": "e", "event_type": "login", "occurred_at": 1, "user_id": "u"})
    >>> r["email"], r["properties"], len(r)
    (None, {}, 17)
    """
    record = {**_EMPTY_RECORD, **event}
    if record["properties"] is None:
        record["properties"] = {}
    return record


_EMPTY_RECORD: dict[str, Any] = {**dict.fromkeys(EVENT_FIELDS), "properties": None}


class JsonLinesSink:
    """Write events as JSON lines to a binary file; malformed records go out as raw bytes."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.events = 0
        self.malformed = 0

    def write(self, items: Sequence[Item]) -> None:
        """Append a batch of items, one line each."""
        if not items:
            return
        lines: list[str] = []
        add = lines.append
        bad = 0
        encode = encode_json
        for item in items:
            if type(item) is Delivery:
                add(encode(item.event))
            else:
                assert isinstance(item, Malformed)
                add(item.value.decode("utf-8", "surrogateescape"))
                bad += 1
        add("")
        self.out.write("\n".join(lines).encode("utf-8", "surrogateescape"))
        self.events += len(items) - bad
        self.malformed += bad

    def close(self) -> SinkStats:
        """Flush the file (the caller closes it)."""
        self.out.flush()
        return SinkStats(self.events, self.malformed)


class ProducerLike(Protocol):
    """The part of ``confluent_kafka.Producer`` the Kafka sink uses."""

    def produce(
        self, topic: str, *, value: Any = ..., key: Any = ..., on_delivery: Any = ...
    ) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...


class KafkaSink:
    """Produce items to a topic: events Avro-encoded by ``encode``, malformed ones raw."""

    POLL_EVERY = 2000

    def __init__(
        self,
        producer: ProducerLike,
        topic: str,
        encode: Callable[[dict[str, Any]], bytes],
        flush_timeout: float = 60.0,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.encode = encode
        self.flush_timeout = flush_timeout
        self.events = 0
        self.malformed = 0
        self.failed = 0
        self.errors: list[str] = []
        self._since_poll = 0

    @classmethod
    def from_settings(
        cls, settings: Any, topic: str | None = None, create: bool = True, **overrides: Any
    ) -> KafkaSink:
        """A sink on ``topic`` (default: the events topic) built from the shared runtime.

        With ``create`` the topic is created (with the events topic's settings) if missing.
        """
        from segflow.runtime.kafka import ensure_topics, make_producer
        from segflow.runtime.serde import Serde
        from segflow.runtime.topics import TOPICS

        serde = Serde.from_settings(settings)
        events = TOPICS.events

        def encode(record: dict[str, Any]) -> bytes:
            return serde.encode(events, record)

        name = topic or events.name(settings)
        if create:
            ensure_topics(settings, topics=[], names={name: events})
        return cls(make_producer(settings, **overrides), name, encode)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(str(err))

    def _produce(self, value: bytes, key: bytes | None) -> None:
        while True:
            try:
                self.producer.produce(
                    self.topic, value=value, key=key, on_delivery=self._on_delivery
                )
                return
            except BufferError:
                self.producer.poll(0.05)

    def write(self, items: Sequence[Item]) -> None:
        """Produce a batch (serving delivery reports as it goes)."""
        encode = self.encode
        produce = self._produce
        for item in items:
            if type(item) is Delivery:
                produce(encode(to_record(item.event)), item.key.encode())
                self.events += 1
            else:
                assert isinstance(item, Malformed)
                produce(item.value, item.key)
                self.malformed += 1
        self._since_poll += len(items)
        if self._since_poll >= self.POLL_EVERY:
            self.producer.poll(0)
            self._since_poll = 0

    def close(self) -> SinkStats:
        """Flush; raise :class:`DeliveryFailed` if any record failed or was left unsent."""
        left = self.producer.flush(self.flush_timeout)
        close = getattr(self.producer, "close", None)  # a real Producer: destroyed now
        if close is not None:
            close()
        stats = SinkStats(self.events, self.malformed, self.failed + left, tuple(self.errors))
        if stats.failed:
            detail = "; ".join(self.errors) or f"{left} records still queued after flush"
            raise DeliveryFailed(
                f"{stats.failed} of {stats.records} records not delivered: {detail}"
            )
        return stats


def retime(item: Item, now_ms: int) -> Item:
    """Move an item to wall-clock time ``now_ms``, keeping its lateness (steady-rate mode).

    Duplicates share their original's record, which was already moved.

    >>> ev = {"event_id": "e", "occurred_at": 1_000, "user_id": "u"}
    >>> retime(Delivery(5_000, "u", ev, "c0", "late"), 100_000).event["occurred_at"]
    96000
    """
    if type(item) is Delivery:
        if item.noise != "duplicate":
            item.event["occurred_at"] = now_ms - (item.delivered_at - item.event["occurred_at"])
        return item._replace(delivered_at=now_ms)
    assert isinstance(item, Malformed)
    return item._replace(delivered_at=now_ms)


@dataclass
class Pacer:
    """Hold a steady rate: after ``n`` items, sleep until ``n / rate`` seconds have passed."""

    rate: float
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    started: float | None = None
    sent: int = 0

    def pace(self, n: int) -> None:
        """Account for ``n`` more items, sleeping if ahead of schedule."""
        now = self.clock()
        if self.started is None:
            self.started = now
        self.sent += n
        ahead = self.started + self.sent / self.rate - now
        if ahead > 0:
            self.sleep(ahead)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (the simulator makes no cycles; its many short-lived
    dicts otherwise make the collector cost a third of the run)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def chunks(items: Iterable[Item], size: int) -> Iterable[list[Item]]:
    """Batches of at most ``size`` items.

    >>> [len(c) for c in chunks(iter(range(5)), 2)]  # type: ignore[arg-type]
    [2, 2, 1]
    """
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
