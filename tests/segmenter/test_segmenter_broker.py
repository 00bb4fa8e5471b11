"""The segmenter on the real broker: scores in → changes out, kill -9 and restart, merges,
and an invalid definition pushed at runtime."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from segflow.runtime.kafka import make_admin
from segflow.runtime.leash import leashed
from segflow.runtime.settings import Settings
from segflow.runtime.testing import produce, read_all
from segflow.runtime.topics import TOPICS
from services.segmenter import core
from services.segmenter.app import SegmenterConfig, build_loop, serde_for
from services.segmenter.cli import main as cli
from services.segmenter.dsl import DAY, parse

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000
DEFS = """version: "{version}"
segments:
  - name: High
    priority: 10
    enter: {{feature: x, op: ">=", value: 0.8}}
    exit: {{feature: x, op: "<", value: 0.5}}
    re_engaged_when: {{feature: y, op: ">", value: 0}}
  - name: Low
    priority: 5
    enter: {{feature: x, op: "<", value: 0.2}}
"""


def score(customer: str, at: int, **features: float) -> dict[str, Any]:
    return {
        "customer_id": customer,
        "as_of": at,
        "churn_probability": 0.1,
        "engagement_score": 50.0,
        "clv": 10.0,
        "cluster": None,
        "lifecycle_stage": "loyal",
        "features": features,
        "model_version": "test",
        "scored_at": int(time.time() * 1000),
    }


def send(s: Settings, topic: Any, records: list[dict[str, Any]], key: str = "customer_id") -> None:
    serde = serde_for(s)
    produce(s, topic.name(s), [(str(r[key]).encode(), serde.encode(topic, r)) for r in records])


def changes(s: Settings, expected: int | None = None, timeout: float = 60) -> list[dict[str, Any]]:
    serde = serde_for(s)
    return [
        serde.decode(TOPICS.segment_changes, r.value)
        for r in read_all(s, TOPICS.segment_changes.name(s), expected=expected, timeout=timeout)
    ]


def config(tmp_path: Path, version: str = "1", **extra: Any) -> SegmenterConfig:
    path = tmp_path / "segments.yaml"
    path.write_text(DEFS.format(version=version))
    return SegmenterConfig(definitions=path, reload_interval=0.2, tick_interval=0.2, **extra)


def test_scores_in_expected_changes_out_with_explanations_and_merges(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    s = kafka_settings
    send(
        s,
        TOPICS.scores,
        [
            score("a", T0, x=0.9),
            score("b", T0, x=0.1),
            score("a", T0 + DAY, x=0.6),  # hysteresis: stays in High
            score("a", T0 + 2 * DAY, x=0.3, y=1.0),
        ],
    )
    _, loop = build_loop(s, config(tmp_path, instance="it1"))
    loop.run(idle_timeout=2)
    got = changes(s, expected=6)
    assert [
        (c["customer_id"], c["segment"], c["transition"], c["primary_segment"])
        for c in sorted(got, key=lambda c: (c["customer_id"], c["occurred_at"]))
    ] == [
        ("a", "High", "entered", "High"),
        ("a", "High", "primary_changed", "High"),
        ("a", "High", "re_engaged", None),
        ("a", "High", "primary_changed", None),
        ("b", "Low", "entered", "Low"),
        ("b", "Low", "primary_changed", "Low"),
    ]
    entered = next(c for c in got if c["transition"] == "entered" and c["customer_id"] == "a")
    assert entered["explanation"] == [
        {
            "path": "segments[0].enter",
            "feature": "x",
            "operator": ">=",
            "observed": 0.9,
            "threshold": 0.8,
            "margin": 0.1,
            "passed": True,
            "observed_text": None,
            "threshold_text": None,
        }
    ]
    assert entered["definition_version"].startswith("1+")
    assert entered["entry_id"] == "a|High|1"

    # b is merged into a: b's memberships exit with reason "merged", a is re-evaluated
    send(
        s,
        TOPICS.merges,
        [
            {
                "merge_id": "m1",
                "survivor_id": "a",
                "absorbed_ids": ["b"],
                "cause_identifier_type": "email",
                "cause_identifier_hash": "h",
                "event_id": "e1",
                "occurred_at": T0 + 3 * DAY,
                "merged_at": T0 + 3 * DAY,
            }
        ],
        key="survivor_id",
    )
    _, loop = build_loop(s, config(tmp_path, instance="it1"))
    loop.run(idle_timeout=2)
    merged = [c for c in changes(s, expected=8) if c["customer_id"] == "b"][-2:]
    assert [(c["segment"], c["transition"], c["reason"]) for c in merged] == [
        ("Low", "exited", "merged"),
        ("Low", "primary_changed", "merged"),
    ]


def expected_changes(records: list[dict[str, Any]], text: str) -> Counter[str]:
    """What the pure core says the changes must be (per customer, in order)."""
    defs = parse(text)
    states: dict[str, core.CustomerState] = {}
    out: Counter[str] = Counter()
    for r in records:
        cid = r["customer_id"]
        states[cid], ch = core.evaluate(states.get(cid), core.Score.from_record(r), defs)
        out.update(c.change_id for c in ch)
    return out


def test_kill_9_and_restart_restores_state_no_entered_repeated_no_change_lost(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    s = kafka_settings
    records = [
        score(f"c{i % 200}", T0 + i * 60_000, x=[0.9, 0.6, 0.1, 0.4][(i // 200) % 4])
        for i in range(4000)
    ]
    send(s, TOPICS.scores, records)
    cfg = config(tmp_path)
    env = {
        **os.environ,
        "SEGFLOW_BOOTSTRAP_SERVERS": s.bootstrap_servers,
        "SEGFLOW_TOPIC_PREFIX": s.topic_prefix,
        "SEGFLOW_LOG_LEVEL": "WARNING",
        "SEGFLOW_SEGMENTER_DEFINITIONS": str(cfg.definitions),
        "SEGFLOW_SEGMENTER_BATCH_SIZE": "300",
        "SEGFLOW_SEGMENTER_PRE_COMMIT_DELAY": "0.3",
        "SEGFLOW_SEGMENTER_INSTANCE": "kill9",
    }
    cmd = [sys.executable, "-m", "services.segmenter"]
    proc = subprocess.Popen(leashed(cmd), cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        want = expected_changes(records, cfg.definitions.read_text())
        deadline = time.monotonic() + 60
        seen = 0
        while time.monotonic() < deadline:  # kill once some batches are committed
            seen = len(read_all(s, TOPICS.segment_changes.name(s), timeout=30))
            if seen >= 300:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert 300 <= seen < sum(want.values())  # killed mid-stream
        env["SEGFLOW_SEGMENTER_PRE_COMMIT_DELAY"] = "0"
        proc = subprocess.Popen(leashed(cmd), cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        got = changes(s, expected=sum(want.values()), timeout=60)
    finally:
        proc.terminate()
        proc.wait(20)
    ids = Counter(c["change_id"] for c in got)
    assert [i for i, n in ids.items() if n > 1] == []  # nothing doubled, no entered repeated
    assert ids == want  # nothing lost


def test_invalid_definition_at_runtime_is_rejected_and_evaluation_continues(
    kafka_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = kafka_settings
    cfg = config(tmp_path, version="1")
    segmenter, loop = build_loop(s, cfg)
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    try:
        send(s, TOPICS.scores, [score("a", T0, x=0.9)])
        assert len(changes(s, expected=2)) == 2
        caplog.set_level(logging.ERROR, logger="segflow.segmenter")
        cfg.definitions.write_text(DEFS.format(version="2").replace('op: "<"', 'op: "<<"'))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            "definition rejected" in r.message for r in caplog.records
        ):
            time.sleep(0.1)
        rejected = [r for r in caplog.records if r.message == "definition rejected"]
        assert [(r.fields["line"], r.fields["field"]) for r in rejected] == [  # type: ignore[attr-defined]
            (6, "segments[0].exit.op"),
            (10, "segments[1].enter.op"),
        ]
        send(s, TOPICS.scores, [score("b", T0, x=0.1)])  # still evaluated, on version 1
        got = changes(s, expected=4)
        b = [c for c in got if c["customer_id"] == "b"]
        assert [(c["segment"], c["transition"]) for c in b] == [
            ("Low", "entered"),
            ("Low", "primary_changed"),
        ]
        assert all(c["definition_version"].startswith("1+") for c in got)
        cfg.definitions.write_text(DEFS.format(version="3"))  # a valid new version is taken
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not segmenter.defs.version.startswith("3+"):
            time.sleep(0.1)
        send(s, TOPICS.scores, [score("c", T0, x=0.95)])
        got = changes(s, expected=6)
        assert {c["definition_version"][:2] for c in got if c["customer_id"] == "c"} == {"3+"}
    finally:
        loop.stop()
        runner.join(30)


def test_explain_reads_the_changelog_and_creates_no_topic(
    kafka_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = kafka_settings
    send(s, TOPICS.scores, [score("a", T0, x=0.9)])
    cfg = config(tmp_path, instance="explain")
    _, loop = build_loop(s, cfg)
    loop.run(idle_timeout=2)
    monkeypatch.setenv("SEGFLOW_BOOTSTRAP_SERVERS", s.bootstrap_servers)
    monkeypatch.setenv("SEGFLOW_TOPIC_PREFIX", s.topic_prefix)
    definitions = ["--definitions", str(cfg.definitions)]
    assert cli(["explain", "a", *definitions]) == 0
    out = capsys.readouterr().out
    assert "primary segment: High" in out
    assert "* High: member since 1700000000000" in out
    assert "Low: not a member (enter rule)" in out and "[fail] x < 0.2 (observed 0.9" in out
    assert cli(["explain", "nobody", *definitions]) == 1
    assert "no segmenter state for customer 'nobody'" in capsys.readouterr().err

    # a prefix with no segmenter under it (e.g. the demo's demo-<time>. forgotten): a clear
    # error and a non-zero exit, and the read-only command creates no topic
    wrong = s.topic_prefix.rstrip(".") + "-wrong."
    monkeypatch.setenv("SEGFLOW_TOPIC_PREFIX", wrong)
    assert cli(["explain", "a", *definitions]) == 2
    err = capsys.readouterr().err
    assert f"no segmenter state under prefix '{wrong}'" in err
    assert "is SEGFLOW_TOPIC_PREFIX right?" in err
    topics = make_admin(s).list_topics(timeout=10).topics
    assert [t for t in topics if t.startswith(wrong)] == []
