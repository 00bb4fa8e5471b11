"""``segflow produce`` reads occurred_at as epoch ms or ISO-8601; rejections name the form."""

from __future__ import annotations

import io
import json

from segflow.produce import parse_lines

NOW = 1_704_153_600_000  # 2024-01-02T00:00:00Z


def lines(*events: dict) -> io.StringIO:
    return io.StringIO("\n".join(json.dumps(e) for e in events))


def test_iso_8601_with_z_or_offset_and_epoch_ms_are_accepted() -> None:
    base = {"event_type": "login", "user_id": "u1"}
    got = list(
        parse_lines(
            lines(
                {**base, "event_id": "e1", "occurred_at": "2024-01-01T00:00:00Z"},
                {**base, "event_id": "e2", "occurred_at": "2024-01-01T01:00:00+01:00"},
                {**base, "event_id": "e3", "occurred_at": 1704067200000},
                {**base, "event_id": "e4", "occurred_at": "1704067200000"},
            ),
            NOW,
        )
    )
    assert [(n, why) for n, _, why in got] == [(1, ""), (2, ""), (3, ""), (4, "")]
    assert {ev["occurred_at"] for _, ev, _ in got} == {1704067200000}


def test_rejections_say_what_a_valid_occurred_at_is() -> None:
    base = {"event_type": "login", "user_id": "u1"}
    got = list(
        parse_lines(
            lines(
                {**base, "event_id": "e1", "occurred_at": "2024-01-01T00:00:00"},
                {**base, "event_id": "e2", "occurred_at": "soon"},
                {**base, "event_id": "e3"},
                {**base, "event_id": "e4", "occurred_at": 1704067200},
            ),
            NOW,
        )
    )
    assert all(ev is None for _, ev, _ in got)
    whys = [why for _, _, why in got]
    assert "e1" in whys[0] and "no UTC offset" in whys[0]
    assert "e2" in whys[1] and "not a date and time" in whys[1]
    assert "e3" in whys[2] and "no valid occurred_at" in whys[2]
    assert "epoch seconds" in whys[3]
    for why in whys:
        assert "epoch milliseconds (e.g. 1704067200000)" in why
        assert "ISO-8601 with an offset or Z (e.g. 2024-01-01T00:00:00Z" in why
