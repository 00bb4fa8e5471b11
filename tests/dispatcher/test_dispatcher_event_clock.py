"""With ``clock: event`` the dispatcher's decisions do not depend on how its input was batched
or when its ticks ran (no broker: the shell's handler, promotion and flush called as the loop
calls them). Issue #15: two instances, or one taking a partition over after ``kill -9``, batch
and tick differently from one instance; tests/integration/test_dispatcher_scale_out.py runs
them on a real broker."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from segflow.runtime.loop import Incoming, Output
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import partition_for
from segflow.runtime.topics import TOPICS
from services.dispatcher import core
from services.dispatcher.adapters import Router
from services.dispatcher.app import Dispatcher, DispatcherSettings
from services.dispatcher.experiments import assign
from services.dispatcher.playbooks import DEFAULT_DIR, HOLDOUT, load_book

HOUR = 3_600_000
DAY0 = 1_772_409_600_000  # 2026-03-02 00:00 UTC
BOOK = load_book([DEFAULT_DIR])
#: input offsets: the dispatcher skips a record at an offset it read before (a re-read)
OFFSETS = itertools.count()


def make() -> Dispatcher:
    d = Dispatcher(
        Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="event-clock-test."),
        DispatcherSettings(clock="event"),
        book=BOOK,
        router=Router(),  # no call is made here: promotion and decisions only
        clock=lambda: DAY0 / 1000,
    )
    d._dirty = False  # nothing to restore
    return d


def same_partition(n: int) -> list[str]:
    """``n`` customer ids on one partition (the clock is per partition), none of them in the
    holdout of a playbook used here."""
    parts = TOPICS.segment_changes.partitions
    held = [(pb.name, pb.experiment) for pb in BOOK.playbooks if pb.experiment is not None]
    ids = [
        f"cust-{i}"
        for i in range(400)
        if all(assign(f"cust-{i}", name, exp) != HOLDOUT for name, exp in held)
    ]
    first = partition_for(ids[0], parts)
    return [c for c in ids if partition_for(c, parts) == first][:n]


def change(cid: str, segment: str, at: int, transition: str = "entered") -> dict[str, Any]:
    entry = f"{cid}|{segment}|1"
    return {
        "change_id": f"{entry}:{transition}",
        "customer_id": cid,
        "segment": segment,
        "transition": transition,
        "reason": "condition" if transition == "exited" else None,
        "entry_id": entry,
        "definition_version": "test",
        "occurred_at": at,
        "emitted_at": at,
        "primary_segment": segment,
        "score": None,
        "explanation": [],
    }


def run(batches: list[list[dict[str, Any]]]) -> tuple[list[Any], dict[str, Any]]:
    """Each batch handled and committed as the loop does, then a tick's promotion (no calls):
    the results (without the shell's processing-time fields) and the final state."""
    d = make()
    offsets = itertools.count()  # the same offsets in every run (they are in the state)
    try:
        serde = Serde(d.serde.store)
        outs: list[Output] = []
        for batch in batches:
            for value in batch:
                decoded = serde.decode(
                    TOPICS.segment_changes, serde.encode(TOPICS.segment_changes, value)
                )
                incoming = Incoming(
                    TOPICS.segment_changes,
                    d.changes_topic,
                    0,
                    next(offsets),
                    value["customer_id"],
                    decoded,
                    None,
                    [],
                )
                outs += d.handle(incoming)
            outs += d.before_commit()
            outs += d._promote()
            outs += d._flush()
        results = sorted(
            (o.value["result_id"], o.value["status"], o.value["reason"], o.value["decided_at"])
            for o in outs
            if o.topic is TOPICS.dispatch_results
        )
        return results, {k: v for k, v in d.store.items()}
    finally:
        d.close()


def actions(state: dict[str, Any], cid: str) -> list[tuple[str, str]]:
    c = core.customer_from_record(state[cid])
    return [(a.step, a.status) for a in c.actions]


def splits(records: list[dict[str, Any]]) -> Iterator[list[list[dict[str, Any]]]]:
    """The records as one batch, one batch per record, and every cut in two."""
    yield [records]
    yield [[r] for r in records]
    for i in range(1, len(records)):
        yield [records[:i], records[i:]]


def test_a_step_due_before_a_customers_next_change_fires_before_it_whatever_the_batching() -> None:
    # x's crm task is due 48 h after its entry; y's change moves the partition's clock past
    # that; then x exits. Had a tick run between y's change and x's exit, the task was out
    # (in flight); in one batch the exit cancelled it: it must not depend on that.
    x, y = same_partition(2)
    entry = DAY0 + 10 * HOUR
    records = [
        change(x, "AtRisk-60d", entry),
        change(y, "Lifecycle: loyal", entry + 50 * HOUR),
        change(x, "AtRisk-60d", entry + 51 * HOUR, "exited"),
    ]
    outcomes = [run(batches) for batches in splits(records)]
    assert all(o == outcomes[0] for o in outcomes), "decisions depend on the batching"
    _, state = outcomes[0]
    # the task was due before the exit: it went out; the escalation (96 h) was cancelled
    assert dict(actions(state, x))["owner_task"] == "in_flight"
    assert dict(actions(state, x))["support_escalation"] == "suppressed"


def test_a_timer_is_decided_at_its_due_time_not_at_the_clock_of_the_tick_that_finds_it() -> None:
    # x's perks email is due at 20:00 UTC, before quiet hours (21:00-08:00); the partition's
    # clock then jumps to 22:00. A tick at 20:30 and a tick only at 22:00 must decide alike:
    # the email goes at 20:00, not delayed to 08:00 by a tick that came late.
    x, y = same_partition(2)
    entry = DAY0 + 20 * HOUR
    records = [
        change(x, "High-CLV Login Drop", entry),
        change(y, "Lifecycle: loyal", entry + 24 * HOUR + HOUR // 2),
        change(y, "Lifecycle: adopting", entry + 26 * HOUR),
    ]
    outcomes = [run(batches) for batches in splits(records)]
    assert all(o == outcomes[0] for o in outcomes), "decisions depend on the batching"
    results, state = outcomes[0]
    assert dict(actions(state, x))["perks_email"] == "in_flight"
    assert not [r for r in results if r[2] == "quiet_hours"], results


def saved(d: Dispatcher, part: int) -> int | None:
    """The partition's clock as its changelog holds it (what a new owner restores)."""
    record = d.store.get(f"clock@{part}")
    return None if record is None else int(record["clock_ms"])


def test_the_event_clock_commits_with_the_batch_that_moved_it() -> None:
    # The next owner of a partition (after kill -9) restores the clock from the changelog as
    # of the committed offsets: a clock written only by a later tick would be behind them,
    # and the records after the offsets would be decided at an older "now".
    x, y = same_partition(2)
    d = make()

    def batch(value: dict[str, Any]) -> None:
        incoming = Incoming(
            TOPICS.segment_changes, d.changes_topic, 0, next(OFFSETS), x, value, None, []
        )
        list(d.handle(incoming))
        list(d.before_commit())  # the outputs of the batch's transaction; no tick

    try:
        part = d.store.partition_of(x)
        batch(change(x, "Lifecycle: loyal", DAY0 + 5 * HOUR))
        d.store.on_commit(), d.on_commit()
        assert saved(d, part) == DAY0 + 5 * HOUR
        batch(change(y, "Lifecycle: loyal", DAY0 + 9 * HOUR))
        assert saved(d, part) == DAY0 + 9 * HOUR
        d.store.on_abort(), d.on_abort()  # that batch aborted: its records are read again
        assert d.now_ms(part) == DAY0 + 5 * HOUR
        batch(change(y, "Lifecycle: loyal", DAY0 + 9 * HOUR))
        assert saved(d, part) == DAY0 + 9 * HOUR
    finally:
        d.close()


def test_a_forget_under_the_event_clock_leaves_an_action_already_taken_to_its_call() -> None:
    (x,) = same_partition(1)
    at = DAY0 + 10 * HOUR
    entered = core.SegmentChange(x, "AtRisk-60d", "entered", f"{x}|1", at, None, (("f", "1"),))
    c, _ = core.decide(None, entered, at, BOOK)
    assert [(a.step, a.status) for a in c.actions][0] == ("reengagement_email", "in_flight")
    kept, _ = core.forget(c, at + HOUR, keep_in_flight=True)
    assert [a.status for a in kept.actions] == ["in_flight", "suppressed", "suppressed"]
    assert all(a.features == () for a in kept.actions) and kept.attrs == ()
    wall, _ = core.forget(c, at + HOUR)
    assert [a.status for a in wall.actions] == ["suppressed"] * 3


def test_an_outcome_is_settled_at_the_actions_event_time_not_at_the_clock_of_its_harvest() -> None:
    # The call's outcome is recorded at a later tick, when the partition's clock may have
    # moved on by any amount: "no engagement since" the step counts from its settled time.
    x, y = same_partition(2)
    entry = DAY0 + 10 * HOUR
    d = make()
    try:

        def handle(value: dict[str, Any]) -> list[Output]:
            cid = value["customer_id"]
            incoming = Incoming(
                TOPICS.segment_changes, d.changes_topic, 0, next(OFFSETS), cid, value, None, []
            )
            return [*d.handle(incoming), *d.before_commit()]

        handle(change(x, "AtRisk-60d", entry))  # the email goes in flight at the entry
        d._deliver()  # its call (no adapter here: it fails) is made on the I/O thread
        handle(change(y, "Lifecycle: loyal", entry + 5 * HOUR))
        outs = d._harvest(wait=10)
        (failed,) = [o.value for o in outs if o.topic is TOPICS.dispatch_results]
        assert (failed["status"], failed["step"]) == ("failed", "reengagement_email")
        assert failed["decided_at"] == entry
        customer = d.customer(x)
        assert customer is not None and customer.actions[0].settled_at == entry
    finally:
        d.close()


def test_a_step_held_by_quiet_hours_fires_later_though_another_partition_is_days_ahead() -> None:
    # x's perks email falls due at 22:00, inside quiet hours: the tick that fires it schedules
    # it again for 08:00. Another partition's clock is days ahead, so that tick's horizon
    # already covers 08:00 and it meets x's new entry again; x's own partition is not at 08:00
    # yet. The entry must wait for x's partition, not be dropped (it was: the email never
    # went, a timer lost with one instance, not with two whose horizon was shorter).
    x, y = same_partition(2)
    z = next(
        c for c in (f"other-{i}" for i in range(100)) if partition_for(c, 4) != partition_for(x, 4)
    )
    entry = DAY0 + 22 * HOUR
    records = [
        change(x, "High-CLV Login Drop", entry),
        change(z, "Lifecycle: loyal", DAY0 + 5 * 24 * HOUR),
        change(y, "Lifecycle: loyal", entry + 24 * HOUR + HOUR // 2),
        change(y, "Lifecycle: adopting", DAY0 + 60 * HOUR),
    ]
    for batches in ([records[:3], records[3:]], [[r] for r in records]):
        results, state = run(batches)
        assert dict(actions(state, x))["perks_email"] == "in_flight", results
        held = [r for r in results if r[2] == "quiet_hours"]
        assert held, "the email should have met quiet hours first"
