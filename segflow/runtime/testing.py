"""Helpers for tests and benchmarks against a real broker: fresh names, produce, read back."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from segflow.runtime.broker import LocalBroker, free_port
from segflow.runtime.kafka import ensure_topics, make_admin, make_producer
from segflow.runtime.kafka import produce as kafka_produce
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS, Topic


def unique_prefix(label: str = "t") -> str:
    """A fresh topic prefix, so each test gets its own topics and groups."""
    return f"{label}-{uuid.uuid4().hex[:10]}."


def isolated_settings(bootstrap: str, label: str = "t", **extra: Any) -> Settings:
    """Settings with a fresh topic prefix and every registry topic created under it."""
    settings = Settings(bootstrap_servers=bootstrap, topic_prefix=unique_prefix(label), **extra)
    ensure_topics(settings)
    return settings


def create_topic(settings: Settings, name: str, like: Topic, partitions: int | None = None) -> str:
    """Create an extra topic ``name`` with ``like``'s settings (and optional partitions)."""
    entry = (
        like
        if partitions is None
        else Topic(like.key_name, like.suffix, like.key, like.value, partitions, like.cleanup)
    )
    ensure_topics(settings, topics=[], names={name: entry})
    return name


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


def segment_entered(cid: str, at: int, segment: str = "S") -> dict[str, Any]:
    """A SegmentChange record: ``cid`` entered ``segment`` at event time ``at`` (what the
    dispatcher acts on), for tests that feed the dispatcher without a segmenter."""
    entry = f"{cid}:{segment}:{at}"
    return {
        "change_id": f"{entry}:entered",
        "customer_id": cid,
        "segment": segment,
        "transition": "entered",
        "reason": None,
        "entry_id": entry,
        "definition_version": "test@1",
        "occurred_at": at,
        "emitted_at": at,
        "primary_segment": segment,
        "score": None,
        "explanation": [],
    }


def produce(
    settings: Settings,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    **overrides: Any,
) -> int:
    """Produce raw (key, value) pairs and wait for every delivery; returns the count."""
    producer = make_producer(settings, **overrides)
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    n = 0
    try:
        for key, value in records:
            kafka_produce(producer, topic, value, key, on_delivery)
            n += 1
            if n % 1000 == 0:
                producer.poll(0)
        remaining = producer.flush(60)
    finally:
        producer.close()
    if remaining or errors:
        raise AssertionError(f"{remaining} undelivered, errors: {errors[:3]}")
    return n


def produce_events(
    settings: Settings, topic: str, events: Iterable[dict[str, Any]], key_field: str = "user_id"
) -> int:
    serde = Serde.from_settings(settings)
    return produce(
        settings,
        topic,
        ((str(ev[key_field]).encode(), serde.encode(TOPICS.events, ev)) for ev in events),
    )


def wait_until(
    condition: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` passes
    (AssertionError naming ``what``). Tests wait on a condition with a deadline, never on a
    bare sleep."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(interval)


def _record(m: Any) -> Record:
    return Record(
        cast(str, m.topic()),
        cast(int, m.partition()),
        cast(int, m.offset()),
        m.key(),
        m.value(),
        cast(list[tuple[str, bytes | None]], m.headers() or []),
    )


def read_all(
    settings: Settings,
    topic: str,
    expected: int | None = None,
    timeout: float = 60.0,
    isolation: str = "read_committed",
    on_idle: Callable[[], None] | None = None,
) -> list[Record]:
    """Read ``topic`` from the beginning to its end; no consumer group involved.

    The end is each partition's end offset (with ``read_committed``, the last stable offset:
    what is committed now), reported by the broker as partition EOF, not a guess from idle
    time. With ``expected``, keep reading (calling ``on_idle`` while nothing arrives) until at
    least that many records are there, then to the end, so duplicates beyond the expected
    count are seen too. A partition counts as read once it reached its end; records written
    to it while others are still being read are kept, so a topic written to during the read
    still ends. Consumer errors raise; ``timeout`` raises with what was read so far.
    """
    consumer = Consumer(
        {
            **settings.kafka_config(),
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": isolation,
        }
    )
    deadline = time.monotonic() + timeout
    with make_admin(settings) as admin:
        # a broker that is just starting can report the topic unknown for a moment
        while (meta := admin.list_topics(topic, timeout=10).topics[topic]).error is not None:
            if time.monotonic() >= deadline:
                raise AssertionError(f"cannot read {topic}: {meta.error}")
            time.sleep(0.2)
        parts = sorted(meta.partitions)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list[Record] = []
    at_end: set[int] = set()
    try:
        while True:
            done = len(at_end) == len(parts)
            if done and (expected is None or len(out) >= expected):
                return out
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"read {len(out)} records of {topic} in {timeout:g} s"
                    + (f", expected {expected}" if expected is not None else "")
                    + f"; partitions at their end: {sorted(at_end)} of {parts}"
                )
            msgs = consumer.consume(1000, 0.2)
            for m in msgs:
                err = m.error()
                if err is None:
                    out.append(_record(m))
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(cast(int, m.partition()))
                else:
                    raise AssertionError(f"reading {topic}: {err}")
            if not msgs and done and on_idle is not None:
                on_idle()
    finally:
        consumer.close()


def wait_markers(settings: Settings, topic: str, timeout: float = 30.0) -> None:
    """Wait until no committed transaction's records are still hidden from read_committed
    readers of ``topic``: each partition's last stable offset reached its end. A producer's
    ``commit_transaction`` returns once the coordinator has the commit; the markers reach the
    partitions just after, so a read_committed reader right then can find a partition's end
    before that transaction's records (a run that stopped a moment ago)."""
    base = {**settings.kafka_config(), "enable.auto.commit": False}
    group = f"markers-{uuid.uuid4().hex[:8]}"
    stable = Consumer({**base, "group.id": group, "isolation.level": "read_committed"})
    raw = Consumer({**base, "group.id": group, "isolation.level": "read_uncommitted"})
    deadline = time.monotonic() + timeout
    try:
        parts = sorted(raw.list_topics(topic, timeout=10).topics[topic].partitions)
        while True:
            pending = []
            for p in parts:
                tp = TopicPartition(topic, p)
                lso = stable.get_watermark_offsets(tp, timeout=10, cached=False)[1]
                end = raw.get_watermark_offsets(tp, timeout=10, cached=False)[1]
                if lso < end:
                    pending.append(f"{p}: {lso} of {end}")
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{topic}: a transaction still pending after {timeout:g} s: {pending}"
                )
            time.sleep(0.1)
    finally:
        stable.close()
        raw.close()


def private_broker(bootstrap: str | None) -> tuple[str, LocalBroker | None]:
    """``bootstrap`` if given, else a fresh local broker in a temporary folder (for benches).

    Returns the address and the broker the caller must stop (None when none was started).
    """
    if bootstrap is not None:
        return bootstrap, None
    broker = LocalBroker(
        Path(tempfile.mkdtemp(prefix="segflow-bench-")) / "broker",
        port=free_port(),
        controller_port=free_port(),
    )
    broker.start(leash=True)  # dies with the bench, however the bench ends
    return broker.bootstrap, broker


def processes_marked(*marks: str) -> list[tuple[int, str]]:
    """Live processes (pid, command line) whose command line or environment holds a mark.

    Marks are strings a run puts on everything it starts (its broker address, its state
    folder), so leftovers are found by what they carry, not by who their parent was. Zombies
    (exited, not yet reaped) are not counted.
    """
    import os

    wanted = [m.encode() for m in marks]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(m in cmdline or m in environ for m in wanted):
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found
