"""The scorer service on a real broker: scores, DLQ reasons, kill -9 and restart."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from segflow.runtime.kafka import make_producer
from segflow.runtime.kafka import produce as kafka_produce
from segflow.runtime.leash import leashed
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import produce, read_all
from segflow.runtime.topics import TOPICS
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery
from services.scorer.app import MARKERS

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


def identified(customers: int, days: int) -> list[tuple[str, dict[str, Any]]]:
    sim = Simulation(SimConfig(customers=customers, days=days, seed=21))
    out = []
    for d in sim.run():
        if isinstance(d, Delivery):
            event = {**d.event, "email": None}
            out.append(
                (
                    d.customer,
                    {
                        "customer_id": d.customer,
                        "event": event,
                        "email_hash": None,
                        "identified_at": event["occurred_at"],
                    },
                )
            )
    return out


def produce_identified(settings: Settings, records: list[tuple[str, dict[str, Any]]]) -> None:
    serde = Serde.from_settings(settings)
    produce(
        settings,
        TOPICS.identified.name(settings),
        ((k.encode(), serde.encode(TOPICS.identified, v)) for k, v in records),
    )


def start(
    settings: Settings,
    idle: float = 3.0,
    delay: float = 0.0,
    batch: int = 200,
    extra: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SEGFLOW_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SEGFLOW_TOPIC_PREFIX": settings.topic_prefix,
        "SEGFLOW_LOG_LEVEL": "INFO",
        "SEGFLOW_SCORER_GROUP_ID": settings.topic_prefix + "scorer",
        "SEGFLOW_SCORER_CHECKPOINT_SECONDS": "1",
        "SEGFLOW_SCORER_BATCH_SIZE": str(batch),
        "SEGFLOW_SCORER_PRE_COMMIT_DELAY": str(delay),
        **(extra or {}),
    }
    log = Path(tempfile.gettempdir()) / f"scorer-{settings.topic_prefix}log"  # kept for failures
    with log.open("ab") as err:
        return subprocess.Popen(
            leashed([sys.executable, "-m", "services.scorer", "--idle-timeout", str(idle)]),
            cwd=ROOT,
            env=env,
            stderr=err,
        )


def decoded(settings: Settings, topic: Any, **kw: Any) -> list[tuple[str, dict[str, Any] | None]]:
    serde = Serde.from_settings(settings)
    return [
        (r.key.decode() if r.key else "", None if r.value is None else serde.decode(topic, r.value))
        for r in read_all(settings, topic.name(settings), **kw)
    ]


def wait_for_records(settings: Settings, topic: str, n: int, timeout: float = 60.0) -> int:
    """Return as soon as ``n`` committed records are on ``topic`` (or the timeout passes)."""
    consumer = Consumer(
        {
            **settings.kafka_config(),
            "group.id": f"w-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        while seen < n and time.monotonic() < deadline:
            seen += sum(1 for m in consumer.consume(100, 0.2) if not m.error())
    finally:
        consumer.close()
    return seen


def expected_counts(records: list[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    return collections.Counter(k for k, v in records if v["event"]["event_type"] == "purchase")


def assert_exactly_once(settings: Settings, records: list[tuple[str, dict[str, Any]]]) -> None:
    """Every customer's state counts each of its events once; its scores saw every purchase."""
    state: dict[str, dict[str, Any] | None] = {}
    for key, value in decoded(settings, TOPICS.scorer_state):
        if not key.startswith(MARKERS):  # (the partitions' clocks)
            state[key] = value
    events = collections.Counter(k for k, _ in records)
    assert {k: v["lifetime_events"] for k, v in state.items() if v} == dict(events)
    purchases = expected_counts(records)
    best: dict[str, float] = collections.defaultdict(float)
    for key, score in decoded(settings, TOPICS.scores):
        assert score is not None and 0.0 <= score["churn_probability"] <= 1.0
        best[key] = max(best[key], score["features"]["lifetime_purchases"])
    assert {k: int(v) for k, v in best.items() if v} == dict(purchases)


def test_scores_state_and_dead_letters_on_a_real_broker(kafka_settings: Settings) -> None:
    records = identified(customers=25, days=40)
    produce_identified(kafka_settings, records)
    serde = Serde.from_settings(kafka_settings)
    future = {
        **records[-1][1],
        "event": {
            **records[-1][1]["event"],
            "event_id": "future",
            "occurred_at": int(time.time() * 1000) + 10 * 86_400_000,
        },
    }
    produce(
        kafka_settings,
        TOPICS.identified.name(kafka_settings),
        [(b"c-x", serde.encode(TOPICS.identified, future)), (b"c-y", b"not avro")],
    )
    proc = start(kafka_settings)
    assert proc.wait(timeout=90) == 0
    assert_exactly_once(kafka_settings, records)
    reasons = sorted(v["reason"] for _, v in decoded(kafka_settings, TOPICS.dlq) if v)
    assert reasons == ["future_event", "undecodable"]
    # its own checkpoint (the topic may also hold churn.shared, the deployment's one model,
    # published when this instance, its learner, learned something)
    checkpoint = dict(decoded(kafka_settings, TOPICS.scorer_model)).get("churn.scorer-0")
    assert checkpoint is not None and checkpoint["model"]


def test_kill_9_mid_stream_then_restart_counts_every_event_once(kafka_settings: Settings) -> None:
    records = identified(customers=30, days=50)
    produce_identified(kafka_settings, records)
    proc = start(kafka_settings, idle=30, delay=0.3, batch=50)
    assert wait_for_records(kafka_settings, TOPICS.scores.name(kafka_settings), 20) >= 20
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    committed = {
        k: v
        for k, v in decoded(kafka_settings, TOPICS.scorer_state)
        if v and not k.startswith(MARKERS)
    }
    assert committed, "nothing committed before the kill"
    assert 0 < sum(v["lifetime_events"] for v in committed.values()) < len(records)  # mid-stream
    restarted = start(kafka_settings)
    assert restarted.wait(timeout=90) == 0
    assert_exactly_once(kafka_settings, records)


def produce_in_one_transaction(
    settings: Settings, records: list[tuple[str, dict[str, Any]]]
) -> None:
    """Like the identity service: the records become visible on every partition at once."""
    serde = Serde.from_settings(settings)
    topic = TOPICS.identified.name(settings)
    producer = make_producer(settings, **{"transactional.id": f"burst-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for key, value in records:
        kafka_produce(producer, topic, serde.encode(TOPICS.identified, value), key.encode())
    producer.commit_transaction(60)


def wait_until_consumed(settings: Settings, timeout: float = 60.0) -> bool:
    """Wait until the scorer's group has committed every record now on the identified topic."""
    topic = TOPICS.identified.name(settings)
    target: dict[int, int] = {}
    for r in read_all(settings, topic):
        target[r.partition] = max(target.get(r.partition, 0), r.offset + 1)
    consumer = Consumer({**settings.kafka_config(), "group.id": settings.topic_prefix + "scorer"})
    parts = [TopicPartition(topic, p) for p in sorted(target)]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done = consumer.committed(parts, timeout=10)
            if all(tp.offset >= target[tp.partition] for tp in done):
                return True
            time.sleep(0.2)
    finally:
        consumer.close()
    return False


def test_a_burst_after_a_pause_is_not_dead_lettered_as_too_late(
    kafka_settings: Settings,
) -> None:
    """A week of event time arrives at once after the inputs went quiet, written the way the
    identity service writes a burst: one group of customers after another (it re-keys its
    input partition by partition), each group's week in time order. So every identified
    partition holds runs of days that start over, and while one partition is read the others
    still wait with older events. With the default 48 h lateness none may be dead-lettered
    ``too_late`` (the demo lost 8,002 of 41,414 events that way)."""
    records = identified(customers=40, days=14)
    split = records[0][1]["event"]["occurred_at"] + 7 * 86_400_000

    def as_identity_writes(week: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        return sorted(
            week, key=lambda r: (zlib.adler32(r[0].encode()) % 4, r[1]["event"]["occurred_at"])
        )

    week1 = as_identity_writes([r for r in records if r[1]["event"]["occurred_at"] < split])
    week2 = as_identity_writes([r for r in records if r[1]["event"]["occurred_at"] >= split])
    proc = start(kafka_settings, idle=10.0, batch=5000)
    try:
        produce_in_one_transaction(kafka_settings, week1)
        assert wait_until_consumed(kafka_settings)  # every partition read to its end
        produce_in_one_transaction(kafka_settings, week2)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    serde = Serde.from_settings(kafka_settings)
    burst = {
        r.partition
        for r in read_all(kafka_settings, TOPICS.identified.name(kafka_settings))
        if serde.decode(TOPICS.identified, r.value)["event"]["occurred_at"] >= split
    }
    assert len(burst) == TOPICS.identified.partitions  # every partition had older events waiting
    letters = [v for _, v in decoded(kafka_settings, TOPICS.dlq) if v]
    assert [v["reason"] for v in letters] == []
    assert_exactly_once(kafka_settings, records)
