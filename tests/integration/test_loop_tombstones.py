"""A handler that asks for a compacted input's tombstones gets them, with their headers; any
other handler never sees them (the loop drops them before it, as before). On a real broker:
the segmenter asks for the scores topic's, where the scorer's tombstone of a merged-away id
names the survivor and the merge's time (services/segmenter/merging.py)."""

from __future__ import annotations

from typing import Any

import pytest

from segflow.runtime.kafka import make_producer
from segflow.runtime.kafka import produce as kafka_produce
from segflow.runtime.loop import Incoming, LoopConfig, ProcessingLoop
from segflow.runtime.records import merge_headers, merged_into
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import read_all
from segflow.runtime.topics import TOPICS
from tests.integration.test_loop import example_score

pytestmark = pytest.mark.broker


def test_only_a_handler_that_asked_for_tombstones_gets_them_with_their_headers(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    scores = TOPICS.scores.name(s)
    serde = Serde.from_settings(s)
    example = example_score()
    producer = make_producer(s)
    errors: list[Any] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    kafka_produce(producer, scores, serde.encode(TOPICS.scores, example), b"c1", delivered)
    kafka_produce(producer, scores, None, b"c1", delivered, merge_headers("c9", 1_000))
    kafka_produce(producer, scores, None, b"c2", delivered)  # a forget's: no headers
    assert producer.flush(30) == 0 and not errors

    def run(group: str, tombstones: tuple[str, ...]) -> list[Incoming]:
        seen: list[Incoming] = []
        config = LoopConfig(
            service="tomb",
            group_id=s.topic_prefix + group,
            sources={scores: TOPICS.scores},
            transactional_id=s.topic_prefix + group,
            tombstones=tombstones,
        )
        loop = ProcessingLoop(s, config, lambda r: seen.append(r) or [])  # type: ignore[arg-type]
        assert loop.run(max_records=3, idle_timeout=20) == 3
        return seen

    asked = run("asked", (scores,))
    by_key = {k: [r for r in asked if r.key == k] for k in ("c1", "c2")}  # (partitions apart)
    c1 = by_key["c1"]
    assert [r.value is None for r in c1] == [False, True] and c1[0].value["customer_id"] == "c1"
    assert merged_into(c1[1].headers) == ("c9", 1_000)
    assert [(r.value, merged_into(r.headers)) for r in by_key["c2"]] == [(None, None)]
    others = run("others", ())
    assert [(r.key, r.value["customer_id"]) for r in others] == [("c1", "c1")]
    assert read_all(s, TOPICS.dlq.name(s)) == []  # neither dead-letters a tombstone
