"""A call the vendor does not de-duplicate is recorded as started, in a committed
transaction, before it is made; an owner that finds it started and unsettled does not make it
again (issue #15: ``kill -9`` must not send an email twice). No broker: the shell's tick, commit
and abort hooks called as the loop calls them, with adapters that count their calls. The broker
runs are tests/dispatcher/test_dispatcher_integration.py (kill -9 twice) and
tests/integration/test_dispatcher_scale_out.py (two instances, one killed)."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from segflow.runtime.loop import Incoming, Output
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from services.dispatcher import core
from services.dispatcher.adapters import Router, Sent
from services.dispatcher.app import Dispatcher, DispatcherSettings
from tests.dispatcher.test_dispatcher_event_clock import BOOK, DAY0, OFFSETS, change, same_partition


class Counting:
    """An adapter that records every call it makes."""

    def __init__(self, endpoint: str, at_most_once: bool) -> None:
        self.endpoint = endpoint
        self.once = at_most_once
        self.calls: list[str] = []

    def at_most_once(self, channel: str) -> bool:
        return self.once

    async def send(self, req: core.Request) -> Sent:
        self.calls.append(req.key)
        return Sent(202, self.endpoint)


def make() -> tuple[Dispatcher, Counting, Counting]:
    email, crm = Counting("email", True), Counting("crm", False)
    d = Dispatcher(
        Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="started-test."),
        DispatcherSettings(clock="event"),
        book=BOOK,
        router=Router(crm=crm, email=email),  # type: ignore[arg-type]
        clock=lambda: DAY0 / 1000,
    )
    d._dirty = False  # nothing to restore
    return d, email, crm


def commit(d: Dispatcher) -> None:
    """The loop's hooks after a commit: the store, then the dispatcher."""
    d.store.on_commit()
    d.on_commit()


def abort(d: Dispatcher) -> None:
    d.store.on_abort()
    d.on_abort()


def enter(d: Dispatcher, cid: str, segment: str) -> list[Output]:
    """A segment change handled and its batch's writes taken, as the loop does (committed)."""
    value = change(cid, segment, DAY0 + 10 * 3_600_000)
    incoming = Incoming(
        TOPICS.segment_changes, d.changes_topic, 0, next(OFFSETS), cid, value, None, []
    )
    outs = [*d.handle(incoming), *d.before_commit()]
    commit(d)
    return outs


def wait_calls(d: Dispatcher) -> None:
    deadline = time.monotonic() + 10
    while any(not f.done() for _, f in d._calls):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def email_action(d: Dispatcher, cid: str) -> core.Action:
    c = d.customer(cid)
    assert c is not None
    (a,) = [a for a in c.actions if a.channel == "email"]
    return a


def written(d: Dispatcher, outs: list[Output], cid: str) -> list[core.Customer]:
    """The customer records among a transaction's outputs (the store writes encoded bytes)."""
    return [
        core.customer_from_record(d.serde.decode(TOPICS.dispatcher_state, o.value))
        for o in outs
        if o.topic is TOPICS.dispatcher_state and o.key == cid
    ]


def unknown_count(channel: str) -> float:
    v = REGISTRY.get_sample_value("segflow_dispatch_unknown_outcome_total", {"channel": channel})
    return v or 0.0


def test_an_email_is_recorded_as_started_in_the_ticks_transaction_and_called_after_its_commit() -> (
    None
):
    (x,) = same_partition(1)
    d, email, crm = make()
    try:
        enter(d, x, "AtRisk-60d")
        assert email_action(d, x).status == "in_flight"
        outs = d.tick()  # the loop's tick: its outputs go into the tick's transaction
        (record,) = written(d, outs, x)
        started = [a for a in record.actions if a.started]
        assert [(a.channel, a.status) for a in started] == [("email", "in_flight")]
        wait_calls(d)
        assert email.calls == []  # not before the commit
        commit(d)
        wait_calls(d)
        assert email.calls == [email_action(d, x).key]
        outs = d.tick()  # the outcome settles the entry and clears the mark
        a = email_action(d, x)
        assert (a.status, a.started) == ("sent", False)
        assert any(o.topic is TOPICS.dispatch_results for o in outs)
    finally:
        d.close()


def test_an_aborted_start_makes_no_call_and_the_next_tick_starts_it_again() -> None:
    (x,) = same_partition(1)
    d, email, _ = make()
    try:
        enter(d, x, "AtRisk-60d")
        d.tick()
        abort(d)  # the tick's transaction (with the start record) rolled back
        wait_calls(d)
        assert email.calls == [] and not d._calling
        d.tick()
        commit(d)
        wait_calls(d)
        assert email.calls == [email_action(d, x).key]  # once
    finally:
        d.close()


def test_an_email_started_by_an_earlier_owner_fails_as_ambiguous_and_is_not_called_again() -> None:
    x, y = same_partition(2)
    d, email, crm = make()
    try:
        enter(d, x, "AtRisk-60d")  # an email in flight
        enter(d, y, "AtRisk-60d")
        # x's call was recorded as started by an owner killed before the answer: the
        # changelog this owner restored holds the mark, and no call of its own is under way
        c = d.customer(x)
        assert c is not None
        d._put(core.start_call(c, email_action(d, x).key))
        d._index(d._cache[x])
        before = unknown_count("email")
        outs = d.tick()
        commit(d)
        wait_calls(d)
        results = [o.value for o in outs if o.topic is TOPICS.dispatch_results]
        (failed,) = [r for r in results if r["customer_id"] == x]
        assert (failed["status"], failed["reason"]) == ("failed", core.UNKNOWN_OUTCOME)
        assert any(o.topic is TOPICS.dlq for o in outs)
        assert email.calls == [email_action(d, y).key]  # y's (never started) goes out
        assert unknown_count("email") == before + 1
        a = email_action(d, x)
        assert (a.status, a.started) == ("failed", False)
        cx = d.customer(x)
        assert cx is not None and a.key in {k for _, _, k in cx.sends}  # still under the caps
    finally:
        d.close()


def test_a_crm_call_is_not_recorded_as_started_and_is_repeated_after_a_crash() -> None:
    (x,) = same_partition(1)
    d, email, crm = make()
    try:
        enter(d, x, "Lifecycle: loyal")  # a CRM property sync, in flight at once
        c = d.customer(x)
        assert c is not None
        keys = sorted(a.key for a in c.actions if a.status == "in_flight")
        assert len(keys) == 2  # the property sync and the list membership
        outs = d.tick()
        assert not any(act.started for rec in written(d, outs, x) for act in rec.actions)
        wait_calls(d)
        assert sorted(crm.calls) == keys  # made at once, before any commit
        # killed before the outcome was recorded: a new owner calls it again (same key)
        d2, _, crm2 = make()
        try:
            d2._put(c)
            d2._index(c)
            d2.tick()
            wait_calls(d2)
            assert sorted(crm2.calls) == keys
        finally:
            d2.close()
    finally:
        d.close()


def test_the_start_mark_survives_the_compact_record_and_an_outcome_clears_it() -> None:
    a = core.Action("sf-" + "a" * 32, "c", "P", "s", "S", "e", "email", "A", 0, "P", 1, 2)
    c = core.Customer("c", actions=(core.replace(a, status="in_flight"),))
    started = core.start_call(c, a.key)
    assert core.customer_from_record(core.customer_record(started)) == started
    assert started.actions[0].started
    for kind in ("sent", "retry", "failed"):
        after, _ = core.record_outcome(started, a.key, core.Outcome(kind), 5, BOOK)
        assert not after.actions[0].started, kind


def test_an_ambiguous_failure_keeps_its_place_under_the_caps_and_a_plain_one_gives_it_back() -> (
    None
):
    a = core.Action("sf-" + "b" * 32, "c", "P", "s", "S", "e", "email", "A", 0, "P", 1, 2)
    c = core.Customer(
        "c", sends=(("email", 1, a.key),), actions=(core.replace(a, status="in_flight"),)
    )
    for detail, kept in (
        ("ambiguous: timeout after sending; at-most-once, not retried", True),
        (core.UNKNOWN_OUTCOME, True),
        ("HTTP 400", False),
    ):
        after, _ = core.record_outcome(c, a.key, core.Outcome("failed", detail=detail), 5, BOOK)
        assert (after.actions[0].status, bool(after.sends)) == ("failed", kept), detail
