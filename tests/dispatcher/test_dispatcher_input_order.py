"""With ``clock: event`` the dispatcher's decisions do not depend on how its two inputs, segment
changes and identified events, interleave (no broker: the shell's handler, commit, promotion
and flush called as the loop calls them). The consumer reads the two topics of a partition in
an order of its own: one instance, two, and a new owner after ``kill -9`` read them
differently, and the whole pipeline made different decisions on identical changes (issue #15,
tests/integration/test_pipeline_scale_out.py). Each scenario is read in every interleaving
of the two topics (each topic's own order kept), as one batch and as one batch per record;
the results (with their decision times) and the final state must be the same, and what they
decide is checked against the playbook by hand."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from segflow.runtime.loop import Incoming, Output
from segflow.runtime.records import HoldPartition
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from services.dispatcher import ordering
from services.dispatcher.adapters import Router
from services.dispatcher.app import Dispatcher, DispatcherSettings
from tests.dispatcher.test_dispatcher_event_clock import (
    BOOK,
    DAY0,
    HOUR,
    actions,
    change,
    same_partition,
)

Record = tuple[str, dict[str, Any]]  # ("change" | "event", value)


def event(cid: str, event_type: str, at: int) -> dict[str, Any]:
    return {
        "customer_id": cid,
        "event": {
            "event_id": f"{cid}-{event_type}-{at}",
            "event_type": event_type,
            "occurred_at": at,
            "properties": {},
        },
        "email_hash": "ab" * 32,
        "identified_at": at,
    }


def run(batches: list[list[Record]]) -> tuple[list[Any], dict[str, Any]]:
    """Each batch handled and committed as the loop does (events through the loop's decoder,
    each topic's records at their own offsets), then a tick's promotion; after the last batch
    both inputs are read to their end and stay quiet past the idle time, and a tick runs.
    Returns the results (without the call's fields) and the final state."""
    wall = [DAY0 / 1000]
    d = Dispatcher(
        Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="input-order-test."),
        DispatcherSettings(clock="event"),
        book=BOOK,
        router=Router(),  # no call is made here: decisions only
        clock=lambda: wall[0],
    )
    d._dirty = False  # nothing to restore
    topics = {"change": (TOPICS.segment_changes, d.changes_topic)}
    topics["event"] = (TOPICS.identified, d.events_topic)
    # while the records come, each partition has more to read on both topics (no idle rule)
    more = {(name, p): 1 for _, name in topics.values() for p in range(4)}
    d._lag_source, d._lags = (lambda: more), dict(more)
    offsets = {kind: itertools.count() for kind in topics}
    try:
        serde = Serde(d.serde.store)
        outs: list[Output] = []
        for batch in batches:
            for kind, value in batch:
                topic, name = topics[kind]
                data = serde.encode(topic, value)
                if kind == "event":
                    decoded = d.decode_identified(data)  # the loop's decoder for the topic
                else:
                    decoded = serde.decode(topic, data)
                cid, offset = value["customer_id"], next(offsets[kind])
                outs += d.handle(Incoming(topic, name, 0, offset, cid, decoded, None, []))
            outs += d.before_commit()
            d.on_commit()
            outs += d._promote()
            outs += d._flush()
            d.on_commit()
        # the end: nothing more to read, quiet for longer than the idle time, then a tick
        d._lag_source, d._lags = None, {}
        wall[0] += 3600
        outs += settle(d)
        results = sorted(
            (
                o.value["customer_id"],
                o.value["step"],
                o.value["status"],
                o.value["reason"],
                o.value["decided_at"],
                o.value["due_at"],
            )
            for o in outs
            if o.topic is TOPICS.dispatch_results
        )
        return results, {k: v for k, v in d.store.items()}
    finally:
        d.close()


def settle(d: Dispatcher) -> list[Output]:
    """A tick's work without calls: the changes and events that waited, then due steps."""
    drain = getattr(d, "_drain_all", None)  # (before the merged order nothing ever waited)
    outs = list(drain()) if drain is not None else []
    return outs + d._promote() + d._flush()


def interleavings(changes: list[Record], events: list[Record]) -> Iterator[list[Record]]:
    """Every merge of the two topics' records that keeps each topic's own order."""
    if not changes or not events:
        yield changes + events
        return
    for rest in interleavings(changes[1:], events):
        yield [changes[0], *rest]
    for rest in interleavings(changes, events[1:]):
        yield [events[0], *rest]


def every_reading(changes: list[Record], events: list[Record]) -> list[Any]:
    """The outcome of every interleaving, read as one batch and as one batch per record."""
    return [
        run(batches)
        for reads in interleavings(changes, events)
        for batches in ([reads], [[r] for r in reads])
    ]


def decided(results: list[Any], cid: str) -> list[Any]:
    return [r[1:] for r in results if r[0] == cid]


def test_a_change_is_decided_at_its_time_however_many_events_were_read_before_it() -> None:
    # x enters at 20:00 UTC: its owner task goes at once, the perks email a day later. y's
    # events are later, in quiet hours. When they were read before x's change they moved the
    # partition's clock and the change was decided at 23:00 (decided_at on every result).
    x, y = same_partition(2)
    at = DAY0 + 20 * HOUR
    changes: list[Record] = [
        ("change", change(y, "Lifecycle: loyal", at - 5 * HOUR)),
        ("change", change(x, "High-CLV Login Drop", at)),
    ]
    events: list[Record] = [
        ("event", event(y, "page_view", at + 2 * HOUR)),
        ("event", event(y, "login", at + 3 * HOUR)),
    ]
    outcomes = every_reading(changes, events)
    assert all(o == outcomes[0] for o in outcomes), "decisions depend on the input order"
    results, state = outcomes[0]
    # (step, status, reason, decided_at, due_at)
    assert decided(results, x) == [("perks_email", "scheduled", None, at, at + 24 * HOUR)]
    assert dict(actions(state, x))["owner_task"] == "in_flight"


def test_a_step_due_before_a_customers_event_fires_before_it_whatever_was_read_between() -> None:
    # x's owner task is due 48 h after its entry unless x engaged since the email. x logs in
    # 50 h after the entry: at 48 h it had not engaged, so the task goes out, and the
    # escalation (96 h) is stopped by the login.
    x, y, z = same_partition(3)
    entry = DAY0 + 10 * HOUR
    changes: list[Record] = [
        ("change", change(x, "AtRisk-60d", entry)),
        ("change", change(y, "Lifecycle: loyal", entry + 49 * HOUR)),
        ("change", change(y, "Lifecycle: loyal", entry + 100 * HOUR, "exited")),
    ]
    events: list[Record] = [
        ("event", event(x, "login", entry + 50 * HOUR)),
        ("event", event(z, "page_view", entry + 101 * HOUR)),
    ]
    outcomes = every_reading(changes, events)
    assert all(o == outcomes[0] for o in outcomes), "decisions depend on the input order"
    _, state = outcomes[0]
    steps = dict(actions(state, x))
    assert steps["owner_task"] == "in_flight", steps
    assert steps["support_escalation"] == "suppressed", steps


def test_an_event_before_a_due_step_counts_though_another_change_passed_the_step_first() -> None:
    # Session 11's residual difference: x logs in 47 h after its entry, so its owner task
    # (48 h, "no engagement since" the email) is suppressed as engaged. y's change at 49 h
    # moved the partition's clock past the task; when it was read before x's login a tick
    # fired the task (sent) before the login was applied.
    x, y, z = same_partition(3)
    entry = DAY0 + 10 * HOUR
    changes: list[Record] = [
        ("change", change(x, "AtRisk-60d", entry)),
        ("change", change(y, "Lifecycle: loyal", entry + 49 * HOUR)),
    ]
    events: list[Record] = [
        ("event", event(x, "login", entry + 47 * HOUR)),
        ("event", event(z, "page_view", entry + 50 * HOUR)),
    ]
    outcomes = every_reading(changes, events)
    assert all(o == outcomes[0] for o in outcomes), "decisions depend on the input order"
    results, state = outcomes[0]
    assert dict(actions(state, x))["owner_task"] == "suppressed", actions(state, x)
    assert ("owner_task", "suppressed", "engaged", entry + 48 * HOUR) in [
        r[:4] for r in decided(results, x)
    ], decided(results, x)


def test_an_event_read_before_the_change_that_makes_its_customer_known_still_counts() -> None:
    # x logs in an hour after entering AtRisk-60d. The dispatcher reads identified events
    # ahead of the changes they cause: read before x's entry, the login concerned a customer
    # it held nothing for and was skipped, and x's owner task went out at 48 h; read after,
    # the task was suppressed as engaged.
    x, y, z = same_partition(3)
    entry = DAY0 + 10 * HOUR
    changes: list[Record] = [
        ("change", change(x, "AtRisk-60d", entry)),
        ("change", change(y, "Lifecycle: loyal", entry + 60 * HOUR)),
    ]
    events: list[Record] = [
        ("event", event(x, "login", entry + HOUR)),
        ("event", event(z, "page_view", entry + 61 * HOUR)),
    ]
    outcomes = every_reading(changes, events)
    assert all(o == outcomes[0] for o in outcomes), "decisions depend on the input order"
    _, state = outcomes[0]
    steps = dict(actions(state, x))
    assert steps["owner_task"] == "suppressed", steps


def test_a_partition_with_too_many_records_waiting_is_held_until_half_of_them_went(
    monkeypatch: Any,
) -> None:
    # The identified topic is read ahead of the changes; what waits is held in memory, so
    # past a limit the loop holds the partition (HoldPartition) until half of it was applied.
    monkeypatch.setattr(ordering, "WAIT_LIMIT", 2)
    x, y = same_partition(2)
    d = Dispatcher(
        Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="input-order-test."),
        DispatcherSettings(clock="event"),
        book=BOOK,
        router=Router(),
        clock=lambda: DAY0 / 1000,
    )
    d._dirty = False
    part = d.store.partition_of(x)
    more = {(d.changes_topic, part): 1, (d.events_topic, part): 1}
    d._lag_source, d._lags = (lambda: more), dict(more)
    try:

        def read(topic: Any, name: str, offset: int, value: dict[str, Any]) -> list[Output]:
            return list(d.handle(Incoming(topic, name, part, offset, x, value, None, [])))

        for offset in range(2):
            read(TOPICS.identified, d.events_topic, offset, event(y, "login", DAY0 + offset))
        with pytest.raises(HoldPartition):
            read(TOPICS.identified, d.events_topic, 2, event(y, "login", DAY0 + 2))
        assert d.releases() == []
        d.before_commit()  # the waiting events are written to the changelog with the batch
        assert sum(1 for k in d.store if k.startswith(f"wait@{part}:")) == 2
        read(TOPICS.segment_changes, d.changes_topic, 0, change(x, "AtRisk-60d", DAY0 + HOUR))
        assert d.releases() == [(d.events_topic, part)]  # both events went before the change
        d.before_commit()
        assert not [k for k in d.store if k.startswith(f"wait@{part}:")]
    finally:
        d.close()
