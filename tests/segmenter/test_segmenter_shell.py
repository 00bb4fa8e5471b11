"""The shell without a broker: handler outputs, timers from the tick, rollback on abort,
hot reload, the HTTP API and the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest

from segflow.runtime.loop import Incoming
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from services.segmenter import api
from services.segmenter.app import STATE_TOPIC, Segmenter, SegmenterConfig
from services.segmenter.cli import main as cli
from services.segmenter.dsl import DAY

DEFS = """version: "{v}"
segments:
  - name: Quiet
    priority: 5
    enter: {{feature: days_since_open, op: ">=", value: 10}}
  - name: Big
    priority: 9
    enter: {{feature: clv, op: ">=", value: p50}}
"""
T0 = 1_700_000_000_000


@pytest.fixture
def seg(tmp_path: Path) -> Segmenter:
    path = tmp_path / "s.yaml"
    path.write_text(DEFS.format(v="1"))
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="shell.")
    clock = iter(range(10**6))
    return Segmenter(settings, SegmenterConfig(definitions=path, reload_interval=0,
                                               percentile_refresh=0),
                     clock=lambda: float(next(clock)))


def score(cid: str, at: int, **features: float) -> Incoming:
    value = {"customer_id": cid, "as_of": at, "churn_probability": 0.1, "engagement_score": 1.0,
             "clv": features.pop("clv", 1.0), "cluster": None, "lifecycle_stage": "loyal",
             "features": features, "model_version": "t", "scored_at": 0}
    return Incoming(TOPICS.scores, "shell.scores", 0, 0, cid, value, None, [])


def changes(outputs: Any) -> list[tuple[str, str, str]]:
    return [(o.value["customer_id"], o.value["segment"], o.value["transition"])
            for o in outputs if o.topic is TOPICS.segment_changes]


def test_handler_writes_state_and_changes_and_the_tick_fires_timers(seg: Segmenter) -> None:
    out = list(seg(score("a", T0, days_since_open=5.0)))
    assert [o.topic for o in out] == [STATE_TOPIC]  # state only: no segment yet
    assert list(seg(score("a", T0, days_since_open=5.0))) == []  # same input: nothing at all
    out = list(seg(score("b", T0 + 6 * DAY, days_since_open=0.0)))  # watermark moves on
    fired = [c for c in changes(seg.tick()) if c[1] == "Quiet"]
    assert fired == [("a", "Quiet", "entered")]  # no new score for a: its recency aged
    assert seg.segment_sizes()["Quiet"] == 1 and seg.members("Quiet") == ["a"]


def test_abort_rolls_the_caches_back_to_the_store(seg: Segmenter) -> None:
    list(seg(score("a", T0, days_since_open=12.0)))
    seg.store.on_commit()
    seg.on_commit()
    list(seg(score("a", T0 + DAY, days_since_open=0.0)))
    assert seg.segment_sizes()["Quiet"] == 0
    seg.store.on_abort()
    seg.on_abort()
    assert seg.segment_sizes()["Quiet"] == 1 and seg.states["a"].as_of == T0


def test_percentile_threshold_refreshes_from_the_population(seg: Segmenter) -> None:
    for i in range(10):
        list(seg(score(f"c{i}", T0, clv=float(i))))
    seg.tick()  # recomputes p50 over the ten customers: 4.0
    assert seg.thresholds == {("clv", 50.0): 4.0}
    assert changes(seg(score("c9", T0 + 1, clv=9.0)))[0] == ("c9", "Big", "entered")


def test_reload_rejects_invalid_and_takes_valid_versions(seg: Segmenter, tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    old = seg.defs.version
    path.write_text(DEFS.format(v="2").replace(">=", "=>", 1))
    assert seg.reload() is False and seg.defs.version == old
    path.write_text(DEFS.format(v="3"))
    assert seg.reload() is True and seg.defs.version.startswith("3+")


def test_http_api_shows_sizes_members_and_why(seg: Segmenter) -> None:
    list(seg(score("a", T0, days_since_open=12.0)))
    server = api.serve(seg, 0, host="127.0.0.1")
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        sizes = json.loads(urlopen(f"{base}/segments").read())
        assert sizes["sizes"] == {"Quiet": 1, "Big": 0}
        assert json.loads(urlopen(f"{base}/segments/Quiet").read())["members"] == ["a"]
        why = json.loads(urlopen(f"{base}/customers/a").read())
        quiet = next(s for s in why["segments"] if s["segment"] == "Quiet")
        assert why["primary_segment"] == "Quiet" and quiet["member"] is True
        assert quiet["conditions"][0]["observed"] == 12.0
        assert quiet["conditions"][0]["margin"] == 2.0
    finally:
        server.shutdown()


def test_cli_check_prints_line_and_field_and_fails(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFS.format(v="1").replace("value: 10", "value: ten"))
    assert cli(["segments", "check", str(bad)]) == 1
    assert f"{bad}:5: segments[0].enter.value:" in capsys.readouterr().out
    good = Path(__file__).resolve().parents[2] / "services/segmenter/segments/default.yaml"
    assert cli(["segments", "check", str(good)]) == 0
    assert "OK, version 2026.11.1+" in capsys.readouterr().out


def test_state_schema_example_round_trips_through_the_serde() -> None:
    from services.segmenter.app import serde_for
    from services.segmenter.core import state_from_record

    here = Path(__file__).resolve().parents[2] / "schemas"
    example = json.loads((here / "examples/io.segflow.SegmenterStateEntry.json").read_text())
    serde = serde_for(Settings(bootstrap_servers="127.0.0.1:1"))
    assert serde.decode(STATE_TOPIC, serde.encode(STATE_TOPIC, example)) == example
    assert state_from_record(example).primary == "AtRisk-60d"
