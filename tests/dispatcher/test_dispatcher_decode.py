"""The dispatcher's decoder for identified events (no broker): events about customers it
holds nothing for are skipped without a full decode, and skipping changes nothing a user
would see (outputs, state, the event-time clock)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from segflow.runtime.loop import Incoming, Output
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from services.dispatcher import core
from services.dispatcher.adapters import Router
from services.dispatcher.app import Dispatcher, DispatcherSettings
from services.dispatcher.playbooks import DEFAULT_DIR, load_book
from tests.dispatcher.test_dispatcher_event_clock import OFFSETS

NOON = 1_772_452_800_000


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    d = make()
    try:
        yield d
    finally:
        d.close()


def make(clock: str = "wall") -> Dispatcher:
    settings = Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="decode-test.")
    d = Dispatcher(
        settings,
        DispatcherSettings(clock=clock),  # type: ignore[arg-type]
        book=load_book([DEFAULT_DIR]),
        router=Router(),
        clock=lambda: NOON / 1000,
    )
    d._dirty = False  # nothing to restore
    return d


def identified(cid: str, event_type: str, at: int = NOON, **event: Any) -> dict[str, Any]:
    return {
        "customer_id": cid,
        "event": {
            "event_id": f"{cid}-{event_type}-{at}",
            "event_type": event_type,
            "occurred_at": at,
            "properties": {},
            **event,
        },
        "email_hash": "ab" * 32,
        "identified_at": at,
    }


def change(cid: str, segment: str = "AtRisk-60d", at: int = NOON) -> dict[str, Any]:
    entry = f"{cid}:{segment}:{at}"
    return {
        "change_id": f"{entry}:entered",
        "customer_id": cid,
        "segment": segment,
        "transition": "entered",
        "reason": None,
        "entry_id": entry,
        "definition_version": "test@1",
        "occurred_at": at,
        "emitted_at": at,
        "primary_segment": segment,
        "score": None,
        "explanation": [],
    }


def feed(d: Dispatcher, records: list[tuple[str, dict[str, Any]]], fast: bool) -> list[Output]:
    """Encode, decode (fast path or full) and handle, as the loop does."""
    serde = Serde(d.serde.store)
    outs: list[Output] = []
    for kind, value in records:
        topic = TOPICS.identified if kind == "event" else TOPICS.segment_changes
        name = d.events_topic if kind == "event" else d.changes_topic
        data = serde.encode(topic, value)
        decoded = (
            d.decode_identified(data) if fast and kind == "event" else serde.decode(topic, data)
        )
        offset = next(OFFSETS)
        outs += d.handle(Incoming(topic, name, 0, offset, value["customer_id"], decoded, None, []))
    outs += d.before_commit()
    return outs


def test_unknown_customers_plain_events_are_skipped_and_relevant_ones_decoded(
    dispatcher: Dispatcher,
) -> None:
    serde = dispatcher.serde

    def decoded(value: dict[str, Any]) -> dict[str, Any]:
        return dispatcher.decode_identified(serde.encode(TOPICS.identified, value))

    skipped = decoded(identified("u1", "page_view", product_id="p1"))
    assert skipped == {"customer_id": "u1", "occurred_at": NOON, "event": None}
    # what observe() acts on even for an unknown customer: decoded in full
    for value in (
        identified("u1", "email_unsubscribe"),
        identified("u1", "email_bounce"),
        identified("u1", "gdpr_forget"),
        identified("u1", "page_view", properties={"timezone": "Europe/Paris"}),
        identified("u1", "login", properties={"first_name": "Ada"}),
        identified("u1", "login", properties={"do_not_contact": "true"}),
    ):
        assert decoded(value)["event"]["event_type"] == value["event"]["event_type"]
    for key in core.PROFILE_PROPERTIES:  # every key observe() reads, whatever is added later
        value = identified("u1", "page_view", properties={key: "x"})
        assert decoded(value)["event"]["properties"] == {key: "x"}
    # a known customer's events are always decoded (a bounce makes u1 known)
    feed(dispatcher, [("event", identified("u1", "email_bounce"))], fast=True)
    assert decoded(identified("u1", "page_view"))["event"]["event_type"] == "page_view"


def test_skipping_changes_no_output_and_no_state() -> None:
    records: list[tuple[str, dict[str, Any]]] = [
        ("event", identified("a", "page_view", product_id="p1")),  # unknown: skipped
        ("event", identified("b", "login", properties={"timezone": "Asia/Tokyo"})),
        ("change", change("a")),
        ("event", identified("a", "page_view", NOON + 1, product_id="p2")),  # known now
        ("event", identified("c", "email_unsubscribe")),
        ("event", identified("d", "purchase", product_id="p3")),  # unknown: skipped
        ("change", change("d")),
        ("event", identified("a", "email_open", NOON + 2, campaign_id="atrisk-60d-winback")),
    ]
    results = []
    for fast in (False, True):
        d = make()
        try:
            outs = feed(d, records, fast)
            state = {k: v for k, v in d.store.items()}
            results.append(([(o.topic.value, o.key, o.value) for o in outs], state))
        finally:
            d.close()
    assert results[0] == results[1]
    outs, state = results[1]
    assert state["a"]["attrs"]["product_recommended"] == "p2"
    assert state["b"]["timezone"] == "Asia/Tokyo"
    assert "unsubscribed" in state["c"]["suppressions"]
    assert "product_recommended" not in state["d"]["attrs"]  # learnt before it was known


def test_skipped_events_still_move_the_event_time_clock() -> None:
    d = make(clock="event")
    try:
        feed(d, [("event", identified("x", "page_view", NOON + 5_000))], fast=True)
        assert d.now_ms() == NOON + 5_000
    finally:
        d.close()
