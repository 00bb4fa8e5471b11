"""Merges placed by identity's merge marks (issue #15), in the scorer service (in process).

Identity writes the merge-causing event with ``merge`` (survivor, absorbed ids) in the
survivor's partition and a ``customer_merged`` record after the absorbed id's events in its
own. The scorer reads the two partitions in an order that depends on timing; whatever that
order, and wherever batches end, the survivor's and the absorbed id's score records must be
the same: the merge lands at the merge-causing event, with exactly the absorbed id's events
before its ``customer_merged`` record; the survivor's partition is held at the merge-causing
event until the hand-off is there (``tests/scorer/holding.py`` does what the loop does), so
no timer fires meanwhile. An abort while held loses nothing and applies nothing twice."""

from __future__ import annotations

from typing import Any

from segflow.runtime.loop import Output
from segflow.runtime.records import Incoming
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import partition_for
from segflow.runtime.topics import TOPICS
from services.scorer.app import ScorerService
from services.scorer.features import DAY, HOUR
from services.scorer.settings import ScorerSettings
from tests.scorer.holding import HeldReader

T0 = 1_704_067_200_000
SETTINGS = Settings(bootstrap_servers="127.0.0.1:1")
SERDE = Serde.from_settings(SETTINGS)


def identified(
    cid: str, kind: str, t: int, eid: str, merge: dict[str, Any] | None = None
) -> Incoming:
    event = {"event_id": eid, "event_type": kind, "occurred_at": t, "amount": 5.0}
    value = {
        "customer_id": cid,
        "event": event,
        "email_hash": None,
        "identified_at": t,
        "merge": merge,
    }
    raw = SERDE.encode(TOPICS.identified, value)
    value = SERDE.decode(TOPICS.identified, raw)
    part = partition_for(cid, 4)  # (identity writes it keyed by the customer id)
    return Incoming(TOPICS.identified, "identified", part, 0, cid, value, None, [], raw)


MERGE_AT = T0 + 2 * DAY
#: The survivor's partition: events, the merge-causing event, then days of events after it.
SURVIVOR = [
    identified("s", "purchase", T0, "s1"),
    identified("s", "page_view", T0 + DAY, "s2"),
    identified("s", "login", MERGE_AT, "s3", {"survivor_id": "s", "absorbed_ids": ["b"]}),
    *(identified("s", "page_view", MERGE_AT + d * DAY + HOUR, f"s{4 + d}") for d in range(6)),
    identified("s", "purchase", MERGE_AT + 7 * DAY, "s10"),
]
#: The absorbed id's partition: its events, then its customer_merged record.
ABSORBED = [
    identified("b", "purchase", T0 + HOUR, "b1"),
    identified("b", "page_view", T0 + DAY + 2 * HOUR, "b2"),
    identified("b", "session_start", MERGE_AT - HOUR, "b3"),
    identified(
        "b", "customer_merged", MERGE_AT, "m-b", {"survivor_id": "s", "absorbed_ids": ["b"]}
    ),
]
#: Another customer of the survivor's partition, whose events move that partition's clock
#: on while the survivor waits.
OTHER = [identified("x", "page_view", T0 + d * DAY // 2, f"o{d}") for d in range(24)]


def service() -> ScorerService:
    return ScorerService(
        SETTINGS,
        ScorerSettings(allowed_lateness_hours=24 * 90, shared_model=False),
        clock=lambda: (T0 + 20 * DAY) / 1000,
    )


def per_customer(outputs: list[Output]) -> dict[str, list[Any]]:
    """The survivor's and the absorbed id's score records, each in its own order (what a
    reader of its partition of segflow.scores sees), without the processing time."""
    out: dict[str, list[Any]] = {"s": [], "b": []}
    for o in outputs:
        if o.topic is TOPICS.scores and o.key in out:
            value = None if o.value is None else {k: v for k, v in o.value.items()}
            if value is not None:
                del value["scored_at"]
            out[str(o.key)].append(value)
    return out


def run(order: list[Incoming], batch: int, abort_after: int | None = None) -> dict[str, Any]:
    """One instance reads ``order``, committing every ``batch`` records (and ticking)."""
    svc = service()
    reader = HeldReader(svc, batch)
    if abort_after is not None:  # (nothing committed before: everything is read again)
        for record in order[: abort_after + 1]:
            reader.read(record)
        assert reader.held and svc.holding, "the survivor's partition should be held here"
        reader.abort()  # the transaction aborts: its outputs are gone, the batch comes again
        reader.held.clear()
    for record in order:
        reader.read(record)
    committed = reader.finish()
    assert not svc.waiting and not svc.held and not svc.holding, "a merge still waits"
    return per_customer(committed)


def two_instances(delay: int, batch: int) -> dict[str, Any]:
    """Instance A owns the survivor's (and the other customer's) partitions, B the absorbed
    id's; each has its own clock. B reads its partition first; its hand-off reaches A only
    after A read ``delay`` of its records (so A holds the survivor's partition at the merge
    meanwhile)."""
    a, b = service(), service()
    a.states.assigned = {p for p in range(4) if p != partition_for("b", 4)}
    b.states.assigned = {partition_for("b", 4)}
    assert partition_for("x", 4) == partition_for("s", 4) != partition_for("b", 4)
    assert a.states.owns("s") and a.states.owns("x") and not a.states.owns("b")
    committed: list[Output] = []
    for record in ABSORBED:
        committed += [*b.handle(record), *b.before_commit(), *b.tick()]
    handoffs = [o for o in committed if o.topic is TOPICS.scorer_handoff]
    assert [h.value["kind"] for h in handoffs] == ["marked"]
    mine = sorted(SURVIVOR + OTHER, key=lambda r: r.value["event"]["occurred_at"])
    reader = HeldReader(a, batch)

    def hand_off() -> None:
        for h in handoffs:
            wire = SERDE.encode(TOPICS.scorer_handoff, h.value)
            value = SERDE.decode(TOPICS.scorer_handoff, wire)
            part = partition_for("s", 4)
            reader.read(Incoming(TOPICS.scorer_handoff, "handoff", part, 0, h.key, value, None, []))

    for i, record in enumerate(mine):
        if i == delay:
            hand_off()
        reader.read(record)
    if delay >= len(mine):
        hand_off()
    committed += reader.finish()
    assert not a.waiting and not a.held and not a.holding, "a merge still waits"
    return per_customer(committed)


def in_time_order() -> list[Incoming]:
    """All three partitions read in event-time order (the customer_merged record just before
    the merge-causing event): no event is late, and the hand-off is there at the merge."""
    return sorted(ABSORBED + SURVIVOR + OTHER, key=lambda r: r.value["event"]["occurred_at"])


def test_the_merge_lands_at_its_marks_whatever_order_the_partitions_are_read_in() -> None:
    reference = run(in_time_order(), batch=3)
    scores = [v for v in reference["s"] if v is not None]
    at_merge = [v for v in scores if v["as_of"] >= MERGE_AT]
    assert at_merge[0]["features"]["lifetime_purchases"] == 2.0  # b1 merged there, s10 not yet
    assert scores[-1]["features"]["lifetime_purchases"] == 3.0
    assert reference["b"][-1] is None and len(reference["b"]) > 1  # scored, then a tombstone
    assert reference["b"].count(None) == 1  # one tombstone, after all its scores
    assert run(in_time_order(), batch=1) == reference
    # the survivor's partition read to the merge-causing event before the absorbed id's
    # customer_merged record: parked, then merged at the same point
    assert run(SURVIVOR[:3] + ABSORBED + SURVIVOR[3:] + OTHER, batch=2) == reference
    # two instances: the hand-off arrives while the survivor's owner's clock moves on days
    # past the merge (parked: none of its timers fires meanwhile), or before the merge
    for delay, batch in [(len(SURVIVOR + OTHER), 1), (20, 4), (12, 3), (0, 5)]:
        assert two_instances(delay, batch) == reference, (delay, batch)


def test_an_abort_while_the_survivors_partition_is_held_loses_and_doubles_nothing() -> None:
    order = SURVIVOR[:3] + ABSORBED + SURVIVOR[3:] + OTHER
    assert run(order, batch=100, abort_after=2) == run(order, batch=100)


def test_an_invalid_merge_causing_event_is_dropped_but_its_merge_is_applied() -> None:
    future = T0 + 30 * DAY  # the service's clock is at T0 + 20 days: 10 days ahead
    mark = {"survivor_id": "s", "absorbed_ids": ["b"]}
    for parked_first in (False, True):
        svc = service()
        records = [
            identified("s", "purchase", T0, "s1"),
            identified("b", "purchase", T0 + HOUR, "b1"),
            identified("b", "customer_merged", future, "m-b", mark),
            identified("s", "login", future, "s2", mark),
        ]
        if parked_first:  # the survivor reaches the merge before the hand-off is there
            records = [records[0], records[3], records[1], records[2]]
        reader = HeldReader(svc, 1, tick=False)
        for r in records:
            reader.read(r)  # raises nothing: the merge is not dead-lettered with it
        reader.finish()
        assert reader.holds == parked_first
        st = svc.states.get("s")
        assert st is not None and st["lifetime_purchases"] == 2, parked_first
        assert st["lifetime_logins"] == 0 and st["last_event_ms"] < future, parked_first
        assert svc.states.get("b") is None and not svc.waiting and not svc.held


def test_the_records_a_held_partition_waits_for_end_the_batch_early() -> None:
    """The scorer's ``urgent()`` hook (the loop ends a batch ~25 ms after such a record
    instead of filling it for up to 0.2 s: segflow/runtime/holds.py): the absorbed id's
    ``customer_merged`` is urgent where another instance owns the survivor (it sends the
    hand-off that instance waits for) or where the survivor's partition is held here for it;
    not where this instance owns the survivor and does not wait; a hand-off always; the
    customers' events never."""
    mark, event = ABSORBED[-1], ABSORBED[0]
    b = service()
    b.states.assigned = {partition_for("b", 4)}
    assert b.urgent(b._identified, mark.partition, mark.raw)
    assert not b.urgent(b._identified, event.partition, event.raw)
    one = service()
    one.states.assigned = set(range(4))
    assert not one.urgent(one._identified, mark.partition, mark.raw)
    reader = HeldReader(one, 100)  # the survivor's partition read first: held at the merge
    for record in SURVIVOR[:3]:
        reader.read(record)
    assert reader.holds == 1
    assert one.urgent(one._identified, mark.partition, mark.raw)
    assert not one.urgent(one._identified, event.partition, event.raw)
    assert one.urgent(one._handoff_topic, partition_for("s", 4), b"")
    reader.read(mark)  # the hand-off arrives (in process): released in the same batch
    assert not reader.held
    assert not one.urgent(one._identified, mark.partition, mark.raw)
