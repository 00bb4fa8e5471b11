"""The Segment -> BehaviorEvent mapping (pure) and event-time parsing shared with produce."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segflow.collector.core import EventMap, MappingConfig, MessageError, map_message, map_request
from segflow.events import parse_event_time

ROOT = Path(__file__).resolve().parents[2]
CFG = MappingConfig()
NOW = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def test_core_imports_no_io() -> None:
    code = (
        "import sys, segflow.collector.core\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('confluent_kafka', 'aiohttp', 'httpx', 'fastavro', 'prometheus_client')"
        " or m.startswith('segflow.runtime')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_every_call_type_maps_to_an_event() -> None:
    base = {"userId": "u1", "anonymousId": "a1", "timestamp": NOW}
    got = {
        kind: map_message({**base, "type": kind, "messageId": kind, **extra}, NOW, None, CFG)
        for kind, extra in {
            "identify": {"traits": {"email": "x@y.io", "zip": "10001"}},
            "track": {"event": "Feature Used", "properties": {"feature": "reports"}},
            "page": {"name": "Home"},
            "screen": {"name": "Settings"},
            "alias": {"previousId": "anon-7"},
            "group": {"groupId": "acme", "traits": {"plan": "enterprise"}},
        }.items()
    }
    assert {k: v["event_type"] for k, v in got.items()} == {
        "identify": "identify",
        "track": "feature_use",
        "page": "page_view",
        "screen": "page_view",
        "alias": "identify",
        "group": "group",
    }
    assert got["identify"]["email"] == "x@y.io" and got["identify"]["properties"] == {
        "zip": "10001"
    }
    assert got["track"]["feature"] == "reports"
    assert (got["alias"]["user_id"], got["alias"]["anonymous_id"]) == ("u1", "anon-7")
    assert got["group"]["properties"] == {"group_id": "acme", "plan": "enterprise"}
    assert all(v["event_id"] == k and v["occurred_at"] == NOW for k, v in got.items())


def test_event_map_overrides_and_unknown_names_are_kept() -> None:
    cfg = MappingConfig(events=EventMap({"Trial Started": "session_start"}))
    msg = {"type": "track", "userId": "u", "messageId": "m"}
    assert (
        map_message({**msg, "event": "trial started"}, NOW, None, cfg)["event_type"]
        == "session_start"
    )
    assert (
        map_message({**msg, "event": "Webinar Joined"}, NOW, None, cfg)["event_type"]
        == "webinar_joined"
    )


def test_clock_skew_is_corrected_from_sent_at_and_the_receive_time() -> None:
    # the device's clock is 5 minutes fast: it says it sent at 00:05, we received at 00:00
    msg = {
        "type": "track",
        "userId": "u",
        "event": "e",
        "messageId": "m",
        "timestamp": "2024-01-01T00:04:00Z",
        "sentAt": "2024-01-01T00:05:00Z",
    }
    assert map_message(msg, NOW, None, CFG)["occurred_at"] == NOW - 60_000
    # the batch's sentAt applies to messages without their own
    events, _ = map_request(
        {"batch": [{**msg, "sentAt": None}], "sentAt": "2024-01-01T00:05:00Z"}, "batch", NOW, CFG
    )
    assert events[0]["occurred_at"] == NOW - 60_000


def test_missing_message_id_gets_a_stable_content_hash() -> None:
    msg = {"type": "track", "userId": "u", "event": "e", "timestamp": NOW}
    a = map_message({**msg, "sentAt": NOW}, NOW, None, CFG)["event_id"]
    b = map_message({**msg, "sentAt": NOW + 500}, NOW + 900, None, CFG)["event_id"]
    c = map_message({**msg, "event": "f"}, NOW, None, CFG)["event_id"]
    assert a == b != c


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        ({"type": "group", "userId": "u"}, "groupId"),
        ({"type": "alias", "previousId": "p"}, "previousId and userId"),
        (
            {"type": "track", "userId": "u", "event": "e", "properties": {"revenue": "lots"}},
            "properties.revenue: expected a number",
        ),
        ({"type": "track", "userId": "u", "event": "e", "properties": {"sentiment": 3}}, "[-1, 1]"),
        (
            {"type": "track", "userId": "u", "event": "e", "properties": {"escalated": "yes"}},
            "true or false",
        ),
        ({"type": "track", "userId": {"id": 1}, "event": "e"}, "userId: expected a string"),
        (
            {"type": "track", "userId": "u", "event": "e", "timestamp": "2030-01-01T00:00:00Z"},
            "in the future",
        ),
        (
            {"type": "track", "userId": "u", "event": "e", "timestamp": 1704067200},
            "looks like epoch seconds",
        ),
    ],
)
def test_rejections_name_the_field_and_what_was_expected(msg: dict, expected: str) -> None:
    with pytest.raises(MessageError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        map_message({"messageId": "m", **msg}, NOW, None, CFG)


def test_raw_email_never_lands_in_properties() -> None:
    ev = map_message(
        {
            "type": "identify",
            "userId": "u",
            "messageId": "m",
            "traits": {"email": "a@b.io", "nested": {"email": "a@b.io"}},
        },
        NOW,
        None,
        CFG,
    )
    assert ev["email"] == "a@b.io" and "email" not in ev["properties"]


@given(st.integers(min_value=100_000_000_000, max_value=4_102_444_800_000))
def test_iso_and_epoch_forms_agree(ms: int) -> None:
    from datetime import UTC, datetime, timedelta, timezone

    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    assert parse_event_time(ms) == ms
    assert parse_event_time(dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")) == ms
    plus2 = dt.astimezone(timezone(timedelta(hours=2))).isoformat(timespec="milliseconds")
    assert parse_event_time(plus2) == ms


@pytest.mark.parametrize("bad", ["2024-01-01T00:00:00", "yesterday", "", None, True, 12.5, [1]])
def test_every_rejected_time_names_the_expected_forms(bad: object) -> None:
    with pytest.raises(
        ValueError, match="expected epoch milliseconds .* or ISO-8601 with an offset or Z"
    ):
        parse_event_time(bad)
