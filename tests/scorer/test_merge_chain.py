"""A chain of merges read out of order by the scorer service (in process, no broker).

X absorbs Y, then Z absorbs X: identity writes the two merges keyed by their absorbed ids, so
they sit in different partitions of the merges topic and the scorer may read the second one
first. The merged-away X must then stay merged away: Y's state goes on to Z, and X gets no
live score after its tombstone (before: a new X was started from Y's state and scored)."""

from __future__ import annotations

from typing import Any

import pytest

from segflow.runtime.loop import Output
from segflow.runtime.records import Incoming
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from services.scorer.app import ScorerService
from services.scorer.features import DAY, HOUR

T0 = 1_704_067_200_000


def identified(cid: str, kind: str, t: int, eid: str) -> Incoming:
    event = {"event_id": eid, "event_type": kind, "occurred_at": t, "amount": 5.0}
    value = {"customer_id": cid, "event": event, "email_hash": None, "identified_at": t}
    return Incoming(TOPICS.identified, "identified", 0, 0, cid, value, None, [])


def merge(survivor: str, absorbed: str, t: int) -> Incoming:
    value = {
        "merge_id": f"m-{survivor}-{absorbed}",
        "survivor_id": survivor,
        "absorbed_ids": [absorbed],
        "occurred_at": t,
        "merged_at": t,
    }
    return Incoming(TOPICS.merges, "merges", 0, 0, absorbed, value, None, [])


@pytest.mark.parametrize("order", ["in order", "second merge read first"])
def test_a_chain_of_merges_read_in_any_order_leaves_one_live_customer(order: str) -> None:
    svc = ScorerService(
        Settings(bootstrap_servers="127.0.0.1:1"), clock=lambda: (T0 + 10 * DAY) / 1000
    )
    svc.scorer.sink = None  # learns in place: no learner topic here
    outs: list[Output] = []

    def feed(*records: Incoming) -> None:
        for r in records:
            outs.extend(svc.handle(r))
        outs.extend(svc.before_commit())

    feed(
        identified("z", "purchase", T0, "e1"),
        identified("x", "purchase", T0 + HOUR, "e2"),
        identified("y", "purchase", T0 + 2 * HOUR, "e3"),
    )
    xy, zx = merge("x", "y", T0 + 3 * HOUR), merge("z", "x", T0 + 3 * HOUR + 50)
    feed(*((xy, zx) if order == "in order" else (zx, xy)))
    scores: dict[str, Any] = {}
    for o in outs:
        if o.topic is TOPICS.scores:
            scores[str(o.key)] = o.value  # the latest per id, as compaction keeps it
    assert scores["x"] is None and scores["y"] is None, {k: v is None for k, v in scores.items()}
    assert scores["z"] is not None and scores["z"]["features"]["lifetime_purchases"] == 3.0
    assert svc.states.get("x") is None and svc.states.get("y") is None
    assert svc.states.get("z")["lifetime_purchases"] == 3  # type: ignore[index]
