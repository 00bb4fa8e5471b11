"""``segflow produce FILE``: send JSON-lines BehaviorEvents to ``segflow.events`` as Avro.

Each line is one event (the shape ``segflow simulate --out`` writes). Lines that are not JSON,
or break the event contract, are reported with their line number and not sent; the rest are
sent keyed by the event's first identifier. The exit status is 1 when any line was rejected.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from segflow.errors import InvalidRecord, SegflowError
from segflow.events import validate_event
from segflow.runtime.kafka import ensure_topics, make_producer, produce
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from segflow.sim.identities import event_key

MAX_FUTURE_MS = 24 * 3600 * 1000


def parse_lines(lines: IO[str], now_ms: int) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """Yield (line number, event or None, why rejected) for each non-empty line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, None, f"not JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(event, dict):
            yield n, None, "not a JSON object"
            continue
        try:
            validate_event(event, now_ms, MAX_FUTURE_MS)
        except InvalidRecord as exc:
            yield n, None, f"{exc.reason}: {exc.detail}"
            continue
        yield n, event, ""


def produce_file(settings: Settings, lines: IO[str], out: IO[str] = sys.stderr) -> int:
    """Send the file's valid events; returns the exit status."""
    serde = Serde.from_settings(settings)
    ensure_topics(settings, topics=[TOPICS.events])
    topic = TOPICS.events.name(settings)
    producer = make_producer(settings)
    failures: list[str] = []
    sent = rejected = 0
    started = last = time.monotonic()

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None and len(failures) < 5:
            failures.append(str(err))

    for n, event, why in parse_lines(lines, int(time.time() * 1000)):
        if event is None:
            rejected += 1
            print(f"line {n}: rejected: {why}", file=out)
            continue
        try:
            value = serde.encode(TOPICS.events, event)
        except InvalidRecord as exc:
            rejected += 1
            print(f"line {n}: rejected: {exc.detail}", file=out)
            continue
        produce(producer, topic, value, event_key(event).encode(), on_delivery)
        sent += 1
        if sent % 5000 == 0:
            producer.poll(0)
            if time.monotonic() - last > 2:
                last = time.monotonic()
                print(f"  {sent:,} sent ({sent / (last - started):,.0f}/s)", file=out)
    left = producer.flush(60)
    producer.close()
    if left or failures:
        raise SegflowError(f"{left} events undelivered; errors: {failures}")
    elapsed = time.monotonic() - started
    print(
        f"sent {sent:,} events to {topic} in {elapsed:.1f}s; rejected {rejected:,} lines", file=out
    )
    return 1 if rejected else 0
