"""The identity handler without a broker: outputs, hashing, dead letters, metrics."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY

from segflow.errors import InvalidRecord
from segflow.runtime.loop import Incoming, Output
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from services.identity.app import IdentityService, IdentitySettings, email_hash

NOW_MS = 1_800_000_000_000


def service(**config: Any) -> IdentityService:
    settings = Settings(bootstrap_servers="127.0.0.1:1", hash_secret="test-secret")
    return IdentityService(settings, IdentitySettings(**config), clock=lambda: NOW_MS / 1000)


def handle(svc: IdentityService, partition: int = 0, offset: int = 0, **event: Any) -> list[Output]:
    value = {"event_type": "login", "occurred_at": NOW_MS - 1000, **event}
    record = Incoming(TOPICS.events, "events", partition, offset, "k", value, None, [])
    outputs = list(svc.handle(record))
    serde = Serde.from_settings(svc.settings)
    for out in outputs:  # everything the handler yields encodes with its topic's schema
        if out.value is not None:
            serde.encode(out.topic, out.value)
    return outputs


def by_topic(outputs: list[Output], key: str) -> list[Output]:
    return [o for o in outputs if o.topic.key_name == key]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_identified_event_is_keyed_by_customer_and_carries_only_the_email_hash() -> None:
    svc = service()
    outputs = handle(svc, event_id="e1", user_id="u1", email="  Ana@Example.ORG ")
    (out,) = by_topic(outputs, "identified")
    assert out.key == out.value["customer_id"] and out.key.startswith("c-")
    assert out.value["event"]["email"] is None and out.value["event"]["user_id"] == "u1"
    assert out.value["email_hash"] == email_hash("test-secret", "ana@example.org")
    state = by_topic(outputs, "identity_state")
    assert state and not any("ana" in repr(o.key) + repr(o.value).lower() for o in state)


def test_merge_records_are_keyed_by_the_absorbed_id_and_name_survivor_and_cause() -> None:
    svc = service()
    older = by_topic(handle(svc, event_id="e1", anonymous_id="a1"), "identified")[0].key
    younger = by_topic(handle(svc, event_id="e2", user_id="u1"), "identified")[0].key
    before = metric("segflow_identity_merges_total", cause="anonymous_id")
    (merge,) = by_topic(handle(svc, event_id="e3", user_id="u1", anonymous_id="a1"), "merges")
    assert merge.key == younger
    assert merge.value["survivor_id"] == older and merge.value["absorbed_ids"] == [younger]
    assert merge.value["cause_identifier_type"] == "anonymous_id"
    assert merge.value["event_id"] == "e3" and merge.value["cause_identifier_hash"] != "a1"
    assert metric("segflow_identity_merges_total", cause="anonymous_id") == before + 1


def test_a_duplicate_produces_nothing_and_is_counted() -> None:
    svc = service()
    handle(svc, event_id="e1", user_id="u1")
    before = metric("segflow_identity_events_total", outcome="duplicate")
    assert handle(svc, event_id="e1", user_id="u1") == []
    assert metric("segflow_identity_events_total", outcome="duplicate") == before + 1


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"user_id": "unknown", "device_id": "0", "email": "test@test.com"}, "no_identifier"),
        ({"user_id": "u1", "occurred_at": NOW_MS + 2 * 3_600_000}, "future_event"),
        ({}, "no_identifier"),
    ],
)
def test_bad_events_are_rejected_with_a_dlq_reason(event: dict[str, Any], reason: str) -> None:
    svc = service()
    if "email" in event:
        # an event with an address is dead-lettered by the handler itself, without the
        # address (the contact vault's rule: raw addresses in no topic but the input)
        (letter,) = handle(svc, event_id="bad", **event)
        assert letter.topic is TOPICS.dlq and letter.value["reason"] == reason
        assert b"test@test.com" not in letter.value["original_value"]
    else:
        with pytest.raises(InvalidRecord) as err:
            handle(svc, event_id="bad", **event)
        assert err.value.reason == reason
    assert len(svc.store) == 0  # nothing was written for a rejected event


def test_future_skew_is_configurable() -> None:
    svc = service(max_future_skew_s=3 * 3600)
    assert by_topic(
        handle(svc, event_id="e", user_id="u", occurred_at=NOW_MS + 7_200_000), "identified"
    )


def commit(svc: IdentityService) -> list[Output]:
    """What the loop does at a commit: the hooks' before_commit outputs, then on_commit."""
    out = list(svc.seen.before_commit())
    svc.seen.on_commit()
    return out


def hashes(svc: IdentityService, out: Output) -> bytes:
    """The hashes of a chunk record as its consumers decode it."""
    assert isinstance(out.value, bytes)
    return bytes(Serde.from_settings(svc.settings).decode(out.topic, out.value)["hashes"])


def test_tick_expires_event_ids_behind_the_window() -> None:
    svc = service(dedup_window_days=1)
    for i, age_days in enumerate((3, 2, 0)):
        handle(svc, event_id=f"e{i}", user_id="u1", occurred_at=NOW_MS - age_days * 86_400_000)
    chunks = commit(svc)
    assert {o.topic.key_name for o in chunks} == {"identity_dedup"}
    assert sorted(len(hashes(svc, o)) for o in chunks) == [8, 8, 8]  # one hour each
    assert not any(k.startswith("e:") for k in svc.store)  # no per-event state entries
    tombstones = list(svc.tick())
    svc.seen.on_commit()
    assert all(o.value is None for o in tombstones) and len(tombstones) == 2
    assert {o.key for o in tombstones} < {o.key for o in chunks}
    # each tombstone goes to the partition its chunk was written to
    assert {o.key: o.partition for o in tombstones} == {
        o.key: o.partition for o in chunks if o.key in {t.key for t in tombstones}
    }
    # e0 and e1 left the window: accepted again; e2 is still a duplicate
    again = handle(svc, event_id="e0", user_id="u1", occurred_at=NOW_MS - 3 * 86_400_000)
    assert by_topic(again, "identified")
    assert handle(svc, event_id="e2", user_id="u1", occurred_at=NOW_MS) == []


def test_a_duplicate_under_another_key_on_another_partition_is_dropped() -> None:
    svc = service()
    assert by_topic(handle(svc, partition=0, offset=5, event_id="e1", user_id="u1"), "identified")
    commit(svc)
    assert handle(svc, partition=3, offset=9, event_id="e1", device_id="d7") == []
    # ... and within one batch, before the first copy's chunk is written
    assert by_topic(handle(svc, partition=1, offset=1, event_id="e2", user_id="u2"), "identified")
    assert handle(svc, partition=2, offset=1, event_id="e2", user_id="u2") == []


def test_event_ids_of_an_earlier_release_still_deduplicate_and_move_into_chunks() -> None:
    # identity.state of an earlier release: an ``e:<event_id>`` entry per remembered event
    svc = service()
    first = handle(svc, event_id="e1", user_id="u1")
    commit(svc)
    svc.store.on_commit()
    svc.seen.store.table.clear()  # as if the chunk had never been written ...
    svc.store.table["e:e1"] = {"kind": "seen", "created_at": NOW_MS - 1000}  # ... but this
    svc.seen.rebuild(svc.store.items())  # what restore() does after reading the changelogs
    assert handle(svc, partition=2, event_id="e1", user_id="u1") == []
    moved = list(svc.tick())
    svc.seen.on_commit()
    svc.store.on_commit()
    (chunk,) = [o for o in moved if o.topic.key_name == "identity_dedup"]
    (tomb,) = [o for o in moved if o.topic.key_name == "identity_state"]
    assert tomb.key == "e:e1" and tomb.value is None and "e:e1" not in svc.store
    assert hashes(svc, chunk) == svc.seen.digest("e1").to_bytes(8, "big")
    svc.seen.rebuild(svc.store.items())  # a restart after the move
    assert handle(svc, event_id="e1", user_id="u1") == []
    assert by_topic(first, "identified")


def test_an_aborted_migration_keeps_the_entries_to_move_later() -> None:
    svc = service()
    svc.store.table["e:old"] = {"kind": "seen", "created_at": NOW_MS - 1000}
    svc.seen.rebuild(svc.store.items())
    assert len(list(svc.tick())) == 2  # a chunk and a tombstone ...
    svc.store.on_abort()  # ... in a transaction that aborted
    svc.seen.on_abort()
    assert "e:old" in svc.store and svc.seen.store.table == {}
    assert handle(svc, event_id="old", user_id="u1") == []  # still de-duplicated
    assert len(list(svc.tick())) == 2  # moved by the next tick


def forget(svc: IdentityService, cid: str, request_id: str = "fr-1") -> list[Output]:
    value = {"request_id": request_id, "customer_id": cid, "requested_at": NOW_MS, "reason": None}
    record = Incoming(TOPICS.forget, "forget", 0, 0, cid, value, None, [])
    outputs = list(svc.handle(record))
    serde = Serde.from_settings(svc.settings)
    for out in outputs:
        if out.value is not None:
            serde.encode(out.topic, out.value)
    return outputs


def test_forget_erases_the_profile_tells_downstream_and_drops_the_persons_later_events() -> None:
    svc = service()
    cid = by_topic(
        handle(svc, event_id="e1", user_id="u1", email="ana@example.org", device_id="d1"),
        "identified",
    )[0].key
    outputs = forget(svc, cid)
    (note,) = by_topic(outputs, "identified")
    assert note.key == cid and note.value["event"]["event_type"] == "customer_forgotten"
    left = {k: v for k, v in svc.store.items() if not k.startswith("e:")}
    # only do-not-relink markers of the strong identifiers remain: no profile, no device
    assert left and all(
        v["kind"] == "forgotten" and not v.get("customer_id") for v in left.values()
    )
    assert len(left) == 2
    before = metric("segflow_identity_events_total", outcome="forgotten")
    again = handle(svc, event_id="e2", email=" ANA@example.org", device_id="d9")
    assert by_topic(again, "identified") == []  # dropped, not re-profiled
    assert metric("segflow_identity_events_total", outcome="forgotten") == before + 1
    # the freed device links someone else normally
    other = by_topic(handle(svc, event_id="e3", user_id="u2", device_id="d1"), "identified")
    assert other and other[0].key != cid


def test_forgetting_an_unknown_customer_still_tells_downstream() -> None:
    svc = service()
    (note,) = by_topic(forget(svc, "c-unknown"), "identified")
    assert note.value["customer_id"] == "c-unknown"


def test_an_event_without_email_passes_through_byte_for_byte() -> None:
    """As the loop runs it (the consumed bytes on the record), an event without email is
    spliced into its IdentifiedEvent: the bytes equal encoding the decoded form, and decode
    to the same event; an event with an email is re-encoded without it."""
    svc = service()
    serde = Serde.from_settings(svc.settings)
    base = {"event_type": "purchase", "occurred_at": NOW_MS - 1000}
    events = [
        {
            **base,
            "event_id": "e1",
            "user_id": "u1",
            "amount": 12.5,
            "currency": "EUR",
            "product_id": "p-9",
            "properties": {"timezone": "Europe/Paris", "zip": "75001"},
        },
        {**base, "event_id": "e2", "anonymous_id": "a" * 300, "escalated": True},
        {**base, "event_id": "e3", "user_id": "u2", "email": "Ana@Example.org"},
    ]
    for event in events:
        raw = serde.encode(TOPICS.events, event)
        value = serde.decode(TOPICS.events, raw)
        record = Incoming(TOPICS.events, "events", 0, 0, "k", value, None, [], raw)
        (out,) = by_topic(list(svc.handle(record)), "identified")
        expected = {
            "customer_id": out.key,
            "event": {**value, "email": None},
            "email_hash": email_hash("test-secret", event["email"]) if "email" in event else None,
            "identified_at": NOW_MS,
            "merge": None,  # no merge: the field's null byte follows the splice
        }
        if "email" in event:
            assert out.value == expected  # re-encoded by the loop, without the email
        else:
            assert out.value == serde.encode(TOPICS.identified, expected)
            assert serde.decode(TOPICS.identified, out.value) == expected


def test_the_one_process_window_hashes_event_ids_as_the_front_stage_does() -> None:
    # same chunk format and hashes: a deployment moving between the roles keeps its window
    from services.identity.dedup import DedupStore

    svc = service()
    front = DedupStore(svc.settings, svc.rules.dedup_window_ms)
    assert svc.seen.store.topic is front.store.topic
    assert [svc.seen.digest(e) for e in ("e1", "e2")] == [front.digest(e) for e in ("e1", "e2")]
    assert svc.seen.digest("e1") != service_with_secret("other").seen.digest("e1")


def service_with_secret(secret: str) -> IdentityService:
    settings = Settings(bootstrap_servers="127.0.0.1:1", hash_secret=secret)
    return IdentityService(settings, IdentitySettings(), clock=lambda: NOW_MS / 1000)
