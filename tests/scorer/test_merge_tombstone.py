"""The absorbed id's score tombstone says where the id went (issue #15).

The segmenter retires a merged-away id at its score tombstone, the id's last record in its
scores partition (services/segmenter/merging.py): the tombstone carries the survivor and the
merge's event time in its headers, and is written also for an id the scorer has no state of,
so that the segmenter always has it to wait for. A forget's tombstone carries none."""

from __future__ import annotations

from typing import Any

from segflow.runtime.loop import Output
from segflow.runtime.records import merged_into
from segflow.runtime.topics import TOPICS
from tests.scorer.holding import HeldReader
from tests.scorer.test_merge_marks import (
    ABSORBED,
    MERGE_AT,
    OTHER,
    SURVIVOR,
    identified,
    service,
)


def score_records(out: list[Output], cid: str) -> list[tuple[Any, Any]]:
    """``cid``'s records on segflow.scores in order: (as_of or None, what the headers say)."""
    return [
        (None if o.value is None else o.value["as_of"], merged_into(o.headers))  # type: ignore[index]
        for o in out
        if o.topic is TOPICS.scores and o.key == cid
    ]


def read(records: list[Any], batch: int = 2) -> list[Output]:
    reader = HeldReader(service(), batch)
    for r in records:
        reader.read(r)
    return reader.finish()


def test_the_absorbed_ids_last_score_record_is_a_tombstone_naming_the_survivor_and_time() -> None:
    order = sorted(ABSORBED + SURVIVOR + OTHER, key=lambda r: r.value["event"]["occurred_at"])
    for batch in (1, 3, 100):
        got = score_records(read(order, batch), "b")
        assert len(got) > 1 and all(at is not None and at <= MERGE_AT for at, _ in got[:-1])
        assert all(headers is None for _, headers in got[:-1])  # scores carry none
        assert got[-1] == (None, ("s", MERGE_AT)), batch
    # the survivor's scores carry no merge headers
    assert all(h is None for _, h in score_records(read(order), "s"))


def test_an_absorbed_id_never_scored_still_gets_its_tombstone_once() -> None:
    mark = {"survivor_id": "s", "absorbed_ids": ["n"]}
    records = [
        identified("s", "purchase", MERGE_AT - 1000, "s1"),
        identified("n", "customer_merged", MERGE_AT, "m-n", mark),
        identified("s", "login", MERGE_AT, "s2", mark),
    ]
    out = read(records)
    assert score_records(out, "n") == [(None, ("s", MERGE_AT))]
    # the customer_merged record read again (a replay): no second tombstone
    svc = service()
    reader = HeldReader(svc, 1)
    for r in [*records, records[1]]:
        reader.read(r)
    assert score_records(reader.finish(), "n") == [(None, ("s", MERGE_AT))]


def test_a_forgotten_ids_tombstone_carries_no_merge() -> None:
    records = [
        identified("f", "purchase", MERGE_AT - 1000, "f1"),
        identified("f", "customer_forgotten", MERGE_AT, "f2"),
    ]
    got = score_records(read(records, 1), "f")
    assert got[-1] == (None, None) and got[0][0] is not None
