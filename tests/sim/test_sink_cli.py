"""Sinks and the ``simulate`` command: files, Kafka (real broker), progress and pacing."""

from __future__ import annotations

import argparse
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from segflow.sim.cli import add_parser, main
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery, Malformed, NoiseConfig
from segflow.sim.sink import DeliveryFailed, JsonLinesSink, KafkaSink, Pacer


def test_simulate_writes_events_and_truth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, truth = tmp_path / "events.jsonl", tmp_path / "truth.jsonl"
    code = main(
        [
            "--customers",
            "50",
            "--days",
            "14",
            "--seed",
            "9",
            "--start",
            "2024-03-01",
            "--mix",
            "silent_decline=1,steady_buyer=1",
            "--out",
            str(out),
            "--truth",
            str(truth),
            "--duplicates",
            "0.05",
            "--malformed",
            "0.02",
        ]
    )
    assert code == 0
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b""
    parsed, broken = [], 0
    for line in lines[:-1]:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            broken += 1
    valid = [
        e
        for e in parsed
        if isinstance(e, dict) and e.get("event_id") and isinstance(e.get("occurred_at"), int)
    ]
    assert len(valid) > 1000 and broken > 0
    assert min(e["occurred_at"] for e in valid) >= 1709251200000  # 2024-03-01
    records = [json.loads(x) for x in truth.read_text().splitlines()]
    assert len(records) == 50
    assert {r["persona"] for r in records} == {"silent_decline", "steady_buyer"}
    assert "wrote" in capsys.readouterr().err
    # the same arguments write the same bytes
    again = tmp_path / "again.jsonl"
    main(
        [
            "--customers",
            "50",
            "--days",
            "14",
            "--seed",
            "9",
            "--start",
            "2024-03-01",
            "--mix",
            "silent_decline=1,steady_buyer=1",
            "--out",
            str(again),
            "--quiet",
            "--duplicates",
            "0.05",
            "--malformed",
            "0.02",
        ]
    )
    assert again.read_bytes() == out.read_bytes()


def test_simulate_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    for bad in (["--mix", "ghost=1"], ["--late", "1.5"], ["--start", "2024-13-01"], []):
        with pytest.raises(SystemExit):
            parser.parse_args(["simulate", "--out", "x", *bad] if bad else ["simulate"])
    assert "unknown persona 'ghost'" in capsys.readouterr().err


def test_json_lines_sink_writes_malformed_records_verbatim() -> None:
    buf = io.BytesIO()
    sink = JsonLinesSink(buf)
    ev = {"event_id": "e1", "event_type": "login", "occurred_at": 5, "user_id": "u"}
    sink.write(
        [
            Delivery(5, "u", ev, "c0", None),
            Malformed(6, b"u", b"\x00\x7f\x7f\x7f\x7fnot-an-avro-body", "bad_framing", "c0"),
        ]
    )
    stats = sink.close()
    assert (stats.events, stats.malformed) == (1, 1)
    first, second, end = buf.getvalue().split(b"\n")
    assert json.loads(first) == ev and second.startswith(b"\x00") and end == b""


class FakeProducer:
    """A stand-in for confluent_kafka.Producer: a bounded queue that fails on cue."""

    def __init__(self, capacity: int, fail_every: int = 0) -> None:
        self.capacity = capacity
        self.fail_every = fail_every
        self.queue: list[tuple[str, bytes | None, bytes | None, Any]] = []
        self.delivered: list[tuple[bytes | None, bytes | None]] = []
        self.buffer_errors = 0

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        on_delivery: Any = None,
    ) -> None:
        if len(self.queue) >= self.capacity:
            self.buffer_errors += 1
            raise BufferError("queue full")
        self.queue.append((topic, value, key, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        n = len(self.queue)
        for _topic, value, key, cb in self.queue:
            failed = self.fail_every and (len(self.delivered) + 1) % self.fail_every == 0
            self.delivered.append((key, value))
            cb("Broker: Message size too large" if failed else None, None)
        self.queue.clear()
        return n

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0


def _items(n_customers: int = 20) -> list[Any]:
    noise = NoiseConfig(malformed=0.05)
    return list(Simulation(SimConfig(customers=n_customers, days=5, seed=1, noise=noise)).run())


def test_kafka_sink_retries_a_full_queue_and_keys_by_identifier() -> None:
    items = _items()
    producer = FakeProducer(capacity=100)
    sink = KafkaSink(producer, "t", lambda record: json.dumps(record).encode())
    sink.write(items)
    stats = sink.close()
    assert producer.buffer_errors > 0
    assert stats.records == len(items) == len(producer.delivered)
    assert [k for k, _ in producer.delivered] == [
        i.key.encode() if isinstance(i, Delivery) else i.key for i in items
    ]
    assert stats.malformed == sum(isinstance(i, Malformed) for i in items) > 0


def test_kafka_sink_reports_delivery_failures() -> None:
    sink = KafkaSink(FakeProducer(capacity=10_000, fail_every=50), "t", lambda record: b"x")
    sink.write(_items())
    with pytest.raises(DeliveryFailed, match="Message size too large"):
        sink.close()


def test_pacer_sleeps_to_hold_the_rate() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = Pacer(rate=1000, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        pacer.pace(500)
    assert now[0] == pytest.approx(105.0)
    assert len(slept) == 10


@pytest.mark.broker
def test_kafka_sink_produces_decodable_events(kafka_bootstrap: str) -> None:
    from segflow.runtime.kafka import make_consumer
    from segflow.runtime.serde import Serde
    from segflow.runtime.settings import Settings
    from segflow.runtime.topics import TOPICS

    settings = Settings(bootstrap_servers=kafka_bootstrap)
    topic = f"sim-test-{uuid.uuid4().hex[:10]}"
    items = _items(10)
    sink = KafkaSink.from_settings(settings, topic=topic)
    sink.write(items)
    stats = sink.close()
    assert stats.records == len(items) and stats.failed == 0

    serde = Serde.from_settings(settings)
    consumer = make_consumer(settings, f"sim-test-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic])
    got: list[Any] = []
    try:
        for _ in range(120):
            if len(got) >= len(items):
                break
            got.extend(consumer.consume(num_messages=1000, timeout=1.0))
    finally:
        consumer.close()
    assert len(got) == len(items)
    events = {i.event["event_id"]: i for i in items if isinstance(i, Delivery)}
    decoded = 0
    for msg in got:
        assert msg.error() is None
        value = msg.value()
        if value[:1] == b"\x00" and not value.startswith(b"\x00\x7f\x7f\x7f\x7f"):
            record = serde.decode(TOPICS.events, value)
            item = events[record["event_id"]]
            assert msg.key() == item.key.encode()
            assert record["occurred_at"] == item.event["occurred_at"]
            decoded += 1
    assert decoded == sum(isinstance(i, Delivery) for i in items)
