"""The shell without a broker: handler outputs, timers from the tick, rollback on abort,
hot reload, the HTTP API and the CLI commands."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest

from segflow.runtime.broker import free_port
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
    return Segmenter(
        settings,
        SegmenterConfig(definitions=path, reload_interval=0, percentile_refresh=0),
        clock=lambda: float(next(clock)),
    )


def score(cid: str, at: int, **features: float) -> Incoming:
    value = {
        "customer_id": cid,
        "as_of": at,
        "churn_probability": 0.1,
        "engagement_score": 1.0,
        "clv": features.pop("clv", 1.0),
        "cluster": None,
        "lifecycle_stage": "loyal",
        "features": features,
        "model_version": "t",
        "scored_at": 0,
    }
    return Incoming(TOPICS.scores, "shell.scores", 0, 0, cid, value, None, [])


def changes(outputs: Any) -> list[tuple[str, str, str]]:
    return [
        (o.value["customer_id"], o.value["segment"], o.value["transition"])
        for o in outputs
        if o.topic is TOPICS.segment_changes
    ]


def commit(seg: Segmenter) -> list[Any]:
    """What the loop does at a commit: the before_commit outputs, then the commit hooks."""
    out = list(seg.before_commit())
    seg.store.on_commit()
    seg.on_commit()
    return out


def written(outputs: Any) -> dict[str, Any]:
    """Changelog records by key, as a restore would read them (through the Avro serde)."""
    from services.segmenter.app import serde_for

    serde = serde_for(Settings(topic_prefix="shell."))
    return {
        o.key: None
        if o.value is None
        else serde.decode(
            STATE_TOPIC,
            o.value if isinstance(o.value, bytes) else serde.encode(STATE_TOPIC, o.value),
        )
        for o in outputs
        if o.topic is STATE_TOPIC
    }


def test_handler_writes_state_and_changes_and_the_tick_fires_timers(seg: Segmenter) -> None:
    assert list(seg(score("a", T0, days_since_open=5.0))) == []  # no segment yet
    out = commit(seg)
    assert [(o.topic, o.key) for o in out] == [(STATE_TOPIC, "a")]  # its state, at the commit
    assert list(seg(score("a", T0, days_since_open=5.0))) == []  # same input: nothing at all
    assert commit(seg) == []
    out = list(seg(score("b", T0 + 6 * DAY, days_since_open=0.0)))  # watermark moves on
    commit(seg)
    ticked = list(seg.tick())
    fired = [c for c in changes(ticked) if c[1] == "Quiet"]
    # no new score for a: its recency aged. The crossing (T0 + 5 d) comes before the tick's
    # first percentile refresh (at the watermark, T0 + 6 d), so no `p50` existed then and
    # Quiet was a's primary segment at that instant (Big follows at the refresh).
    assert fired == [("a", "Quiet", "entered"), ("a", "Quiet", "primary_changed")]
    assert seg.segment_sizes()["Quiet"] == 1 and seg.members("Quiet") == ["a"]
    # the tick's own transaction carries the new state of a (the loop runs no hook for it)
    records = written(ticked)
    quiet = [m for m in records["a"]["customer"]["memberships"] if m["segment"] == "Quiet"]
    assert quiet[0]["active"] is True
    # the status of partition 0 (the records' partition): statuses are per partition
    assert records["segment:Quiet@0"]["segment"]["last_entry_at"] is not None
    assert records["a"] == seg.store.get("a")  # what is written is what the table holds


def test_state_is_written_once_per_customer_per_transaction(seg: Segmenter) -> None:
    for day in range(5):  # five scores of one customer in one batch
        list(seg(score("a", T0 + day * DAY, days_since_open=8.0 + day)))
    list(seg(score("b", T0, days_since_open=1.0)))
    out = commit(seg)
    records = written(out)
    states = [
        (k, v["customer"]["as_of"]) for k, v in records.items() if not k.startswith("segment:")
    ]
    assert len(records) == len(out)  # one record per key
    assert states == [("a", T0 + 4 * DAY), ("b", T0)]  # the latest of each, once
    assert seg.store.get("a")["customer"]["as_of"] == T0 + 4 * DAY
    segments = [o.key for o in out if o.key.startswith("segment:")]
    assert segments == ["segment:Quiet@0"]  # a entered Quiet on day 2: one status record


def test_a_merge_writes_the_absorbed_tombstone_at_the_commit(seg: Segmenter) -> None:
    list(seg(score("a", T0, days_since_open=12.0)))
    list(seg(score("b", T0, days_since_open=1.0)))
    commit(seg)
    merge = {"survivor_id": "b", "absorbed_ids": ["a"], "occurred_at": T0 + 1}
    out = list(seg(Incoming(TOPICS.merges, seg.merges_topic, 0, 0, "a", merge, None, [])))
    assert ("a", "Quiet", "exited") in changes(out)
    assert written(commit(seg))["a"] is None  # a tombstone
    assert "a" not in seg.store and "a" not in seg.states


def test_an_id_merged_away_is_never_evaluated_again_even_by_a_late_score(
    seg: Segmenter, tmp_path: Path
) -> None:
    # Seen in the demo: the scorer, on its own consumer, emitted scores for an absorbed id
    # after the segmenter had handled the merge; the id came back into segments with its
    # entry counter restarted (and the dispatcher contacted it again).
    list(seg(score("a", T0, days_since_open=12.0)))
    commit(seg)
    merge = {"survivor_id": "b", "absorbed_ids": ["a"], "occurred_at": T0 + 1}
    list(seg(Incoming(TOPICS.merges, seg.merges_topic, 0, 0, "a", merge, None, [])))
    commit(seg)
    late = list(seg(score("a", T0 + DAY, days_since_open=30.0)))
    assert changes(late) == [] and "a" not in seg.states
    assert commit(seg) == []
    # a merge whose absorbed id had no state yet also retires it
    list(
        seg(
            Incoming(
                TOPICS.merges,
                seg.merges_topic,
                0,
                1,
                "x",
                {**merge, "absorbed_ids": ["x"]},
                None,
                [],
            )
        )
    )
    commit(seg)
    assert changes(seg(score("x", T0 + DAY, days_since_open=30.0))) == []
    # ... and the retirement survives a restart (it is in the changelog)
    again = Segmenter(seg.settings, seg.config, clock=seg.clock)
    again.store.load_snapshot(seg.store.snapshot())  # what a restore would load
    again.rebuild()
    assert changes(again(score("a", T0 + 2 * DAY, days_since_open=40.0))) == []


def test_a_forget_request_exits_every_membership_and_retires_the_id(seg: Segmenter) -> None:
    list(seg(score("a", T0, days_since_open=12.0, clv=5.0)))
    list(seg(score("b", T0, days_since_open=1.0, clv=1.0)))
    commit(seg)
    seg.tick()
    request = {"request_id": "fr-1", "customer_id": "a", "requested_at": T0 + 5, "reason": None}
    out = list(seg(Incoming(TOPICS.forget, seg.forget_topic, 0, 0, "a", request, None, [])))
    exits = [
        o.value
        for o in out
        if o.topic is TOPICS.segment_changes and o.value["transition"] == "exited"
    ]
    assert exits and {e["reason"] for e in exits} == {"forgotten"}
    assert {e["segment"] for e in exits} >= {"Quiet"}
    assert written(commit(seg))["a"] is None and "a" not in seg.states
    assert changes(seg(score("a", T0 + DAY, days_since_open=20.0))) == []


def test_a_timer_that_changes_nothing_is_not_written_and_refires_harmlessly_after_restore(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        'version: "1"\nsegments:\n'
        '  - {name: Quiet, enter: {feature: days_since_open, op: ">=", value: 10}}\n'
        '  - {name: Lapsed, enter: {all: [{feature: days_since_open, op: ">=", '
        'value: 3}, {feature: clv, op: ">=", value: 100}]}}\n'
    )
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="shell.")

    def segmenter() -> Segmenter:
        return Segmenter(settings, SegmenterConfig(definitions=path), clock=lambda: 0.0)

    seg = segmenter()
    list(seg(score("a", T0, days_since_open=0.0)))
    list(seg(score("b", T0 + 4 * DAY, days_since_open=0.0)))  # the watermark: day 4
    commit(seg)
    assert seg.states["a"].next_timer == T0 + 3 * DAY  # days_since_open reaches 3
    ticked = list(seg.tick())
    customers = [k for k in written(ticked) if not k.startswith("segment:")]
    assert customers == [] and changes(ticked) == []  # a's crossing changed nothing
    assert seg.states["a"].next_timer == T0 + 10 * DAY  # the next crossing, kept in memory
    commit(seg)
    # a restart: the stored state still has the day-3 timer; it fires again, to no effect
    again = segmenter()
    again.store.load_snapshot(seg.store.snapshot())
    again.rebuild()
    assert again.states["a"].next_timer == T0 + 3 * DAY
    ticked = list(again.tick())
    assert changes(ticked) == [] and "a" not in written(ticked)
    assert again.states["a"].next_timer == T0 + 10 * DAY
    for s in (seg, again):  # both reach Quiet on day 10, once
        list(s(score("b", T0 + 11 * DAY, days_since_open=0.0)))
        commit(s)
        assert ("a", "Quiet", "entered") in changes(s.tick())
        assert changes(s.tick()) == []


@pytest.mark.parametrize("written", [False, True], ids=["before-hook", "after-hook"])
def test_abort_rolls_the_caches_back_to_the_store(seg: Segmenter, written: bool) -> None:
    list(seg(score("a", T0, days_since_open=12.0)))
    commit(seg)
    list(seg(score("a", T0 + DAY, days_since_open=0.0)))
    list(seg(score("c", T0 + DAY, days_since_open=0.0)))
    assert seg.segment_sizes()["Quiet"] == 0
    if written:  # the abort came after before_commit wrote the batch's state
        list(seg.before_commit())
    seg.store.on_abort()
    seg.on_abort()
    assert seg.segment_sizes()["Quiet"] == 1 and seg.states["a"].as_of == T0
    assert "c" not in seg.states and "c" not in seg.store
    assert list(seg.before_commit()) == []  # nothing left over from the aborted batch


def test_a_feature_the_scores_lack_is_counted_and_logged_once(
    seg: Segmenter, caplog: pytest.LogCaptureFixture
) -> None:
    from services.segmenter.app import MISSING_FEATURES

    before = MISSING_FEATURES.labels("days_since_open")._value.get()
    # The level and the handler set on the service's logger itself: an earlier test in the
    # same process (the in-process demo) sets the root logger to ERROR and replaces its
    # handlers.
    logger = logging.getLogger("segflow.segmenter")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="segflow.segmenter"):
            for i in range(32):  # the check samples one score in 16
                list(seg(score(f"c{i}", T0, opens_7d=1.0)))  # no days_since_open in scores
    finally:
        logger.removeHandler(caplog.handler)
    assert MISSING_FEATURES.labels("days_since_open")._value.get() - before == 2
    # (a record can reach caplog twice: through our handler and by propagation)
    warnings = list({id(r): r for r in caplog.records if "do not carry" in r.getMessage()}.values())
    assert len(warnings) == 1 and warnings[0].fields["feature"] == "days_since_open"


def test_percentile_threshold_refreshes_from_the_population(seg: Segmenter) -> None:
    for i in range(10):
        list(seg(score(f"c{i}", T0, clv=float(i))))
    refreshed = changes(seg.tick())  # recomputes p50 over the ten customers: 4.0
    assert seg.thresholds == {("clv", 50.0): 4.0}
    # scored before any threshold existed, c9 enters at the refresh (issue #17: it used to wait
    # for its next score), and its next score changes nothing
    assert ("c9", "Big", "entered") in refreshed
    assert changes(seg(score("c9", T0 + 1, clv=9.0))) == []


def test_a_moving_percentile_re_evaluates_the_customers_it_crosses(seg: Segmenter) -> None:
    """Issue #17's oracle: a customer whose clv did not change but whose rank did (others
    came, left or changed) is in or out of `clv >= p50` from the refresh on, not only at its
    next score (which may be days away: scores are emitted only on material changes)."""

    def members() -> list[str]:
        return sorted(
            c
            for c, st in seg.states.items()
            if st.memberships.get("Big", None) and st.memberships["Big"].active
        )

    for i in range(10):  # the highest clv first: no threshold exists when they are scored
        list(seg(score(f"c{i}", T0, clv=float(9 - i))))
    commit(seg)
    seg.tick()  # p50 over the ten: 4.0
    commit(seg)
    assert seg.thresholds == {("clv", 50.0): 4.0}
    assert members() == ["c0", "c1", "c2", "c3", "c4", "c5"]  # clv 9 ... 4
    for i in range(10):
        list(seg(score(f"n{i}", T0 + 1, clv=0.0)))
    commit(seg)
    seg.tick()  # p50 over twenty, eleven of them 0: 0.0 — c6 ... c9 (clv 3 ... 0) qualify now
    commit(seg)
    assert seg.thresholds == {("clv", 50.0): 0.0}
    assert members() == sorted([f"c{i}" for i in range(10)] + [f"n{i}" for i in range(10)])


def test_a_timer_due_before_a_percentile_refresh_reads_the_thresholds_of_before_it(
    tmp_path: Path,
) -> None:
    """Issue #17's event oracle (High-CLV Login Drop): a recency crossing due before the
    refresh's instant is decided with the threshold then in force; the refresh moves the
    customer afterwards, at its own instant (the watermark), as a score would have."""
    path = tmp_path / "s.yaml"
    path.write_text(
        'version: "1"\nsegments:\n  - name: Both\n    enter:\n      all:\n'
        '        - {feature: days_since_open, op: ">=", value: 10}\n'
        '        - {feature: clv, op: ">=", value: p50}\n'
    )
    clock = iter(range(10**6))
    seg = Segmenter(
        Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="shell."),
        SegmenterConfig(definitions=path, reload_interval=0, percentile_refresh=0),
        clock=lambda: float(next(clock)),
    )
    list(seg(score("a", T0, clv=5.0, days_since_open=5.0)))  # crosses 10 days at T0 + 5 d
    list(seg(score("b", T0, clv=1.0, days_since_open=0.0)))
    commit(seg)
    seg.tick()
    commit(seg)
    assert seg.thresholds == {("clv", 50.0): 1.0}  # a's clv 5 is above it
    for i, clv in enumerate((10.0, 20.0, 30.0)):  # richer customers, a day after the crossing
        list(seg(score(f"r{i}", T0 + 6 * DAY, clv=clv, days_since_open=0.0)))
    commit(seg)
    out = [
        (o.value["customer_id"], o.value["transition"], o.value["occurred_at"])
        for o in seg.tick()
        if o.topic is TOPICS.segment_changes and o.value["transition"] in ("entered", "exited")
    ]
    assert seg.thresholds == {("clv", 50.0): 10.0}  # a's clv is below it from now on
    assert out == [("a", "entered", T0 + 5 * DAY), ("a", "exited", T0 + 6 * DAY)]


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
    base = f"http://127.0.0.1:{server.port}"
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
        server.stop()


def test_cli_check_prints_line_and_field_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFS.format(v="1").replace("value: 10", "value: ten"))
    assert cli(["segments", "check", str(bad)]) == 1
    assert f"{bad}:5: segments[0].enter.value:" in capsys.readouterr().out
    good = Path(__file__).resolve().parents[2] / "services/segmenter/segments/default.yaml"
    assert cli(["segments", "check", str(good)]) == 0
    assert "OK, version 2026.12.3+" in capsys.readouterr().out


def test_state_schema_example_round_trips_through_the_serde() -> None:
    from services.segmenter.app import serde_for
    from services.segmenter.core import state_from_record

    here = Path(__file__).resolve().parents[2] / "schemas"
    example = json.loads((here / "examples/io.segflow.SegmenterStateEntry.json").read_text())
    serde = serde_for(Settings(bootstrap_servers="127.0.0.1:1"))
    assert serde.decode(STATE_TOPIC, serde.encode(STATE_TOPIC, example)) == example
    assert state_from_record(example).primary == "AtRisk-60d"


def test_explain_url_with_nothing_listening_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert cli(["explain", "a", "--url", url]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach a segmenter at {url}" in err and "9412" in err
