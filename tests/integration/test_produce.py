"""`segflow produce FILE`: valid lines arrive as Avro, bad lines are reported by number."""

from __future__ import annotations

import io
import json

import pytest

from segflow.produce import produce_file
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import read_all
from segflow.runtime.topics import TOPICS

pytestmark = pytest.mark.broker


def test_produce_sends_valid_lines_and_reports_bad_ones(kafka_settings: Settings) -> None:
    good = [
        {
            "event_id": f"e{i}",
            "event_type": "login",
            "occurred_at": 1_700_000_000_000 + i,
            "user_id": f"u{i}",
        }
        for i in range(20)
    ]
    lines = [json.dumps(e) for e in good]
    lines.insert(3, "{not json")
    lines.insert(
        7, json.dumps({"event_id": "x", "event_type": "login", "occurred_at": 1_700_000_000_000})
    )
    lines.insert(9, "")
    report = io.StringIO()

    status = produce_file(kafka_settings, io.StringIO("\n".join(lines)), out=report)

    assert status == 1
    text = report.getvalue()
    assert "line 4: rejected: not JSON" in text
    assert "line 8: rejected: no_identifier" in text
    assert "sent 20 events" in text and "rejected 2 lines" in text
    serde = Serde.from_settings(kafka_settings)
    out = read_all(kafka_settings, TOPICS.events.name(kafka_settings), expected=20)
    got = sorted((r.key, serde.decode(TOPICS.events, r.value)["event_id"]) for r in out)
    assert got == sorted((f"u{i}".encode(), f"e{i}") for i in range(20))
