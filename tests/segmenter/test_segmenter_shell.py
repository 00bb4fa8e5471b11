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
HOUR = 3_600_000
YEAR_S = 365 * 86_400  # a percentile grid these tests' weeks never reach (T0 is day 331 of it)


def make(path: Path, refresh_s: float) -> Segmenter:
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="shell.")
    clock = iter(range(10**6))
    return Segmenter(
        settings,
        SegmenterConfig(definitions=path, reload_interval=0, percentile_refresh=refresh_s),
        clock=lambda: float(next(clock)),
    )


@pytest.fixture
def seg(tmp_path: Path) -> Segmenter:
    path = tmp_path / "s.yaml"
    path.write_text(DEFS.format(v="1"))
    return make(path, YEAR_S)


def score(cid: str, at: int, part: int = 0, **features: float) -> Incoming:
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
    return Incoming(TOPICS.scores, "shell.scores", part, 0, cid, value, None, [])


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
    # its state, at the commit, and partition 0's first (empty: nobody before a) pNN table
    assert [(o.topic, o.key) for o in out] == [(STATE_TOPIC, "a"), (STATE_TOPIC, "thresholds@0")]
    assert list(seg(score("a", T0, days_since_open=5.0))) == []  # same input: nothing at all
    assert commit(seg) == []
    out = list(seg(score("b", T0 + 6 * DAY, days_since_open=0.0)))  # watermark moves on
    commit(seg)
    ticked = list(seg.tick())
    fired = [c for c in changes(ticked) if c[1] == "Quiet"]
    # no new score for a: its recency aged (no `p50` yet: the partition's grid is yearly here)
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
    states = [(k, v["customer"]["as_of"]) for k, v in records.items() if v["kind"] == "customer"]
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


# -- percentile thresholds: per partition, on its event-time grid (issue #15) --------------
GRID = T0 - T0 % HOUR + HOUR  # the first hourly grid instant after T0


def entered(outputs: Any) -> list[tuple[str, str, int]]:
    return [
        (o.value["customer_id"], o.value["segment"], o.value["occurred_at"])
        for o in outputs
        if o.topic is TOPICS.segment_changes and o.value["transition"] == "entered"
    ]


def hourly(tmp_path: Path, defs: str = DEFS.format(v="1")) -> Segmenter:
    path = tmp_path / "hourly.yaml"
    path.write_text(defs)
    return make(path, 3600)


def test_a_partitions_table_is_recomputed_when_its_scores_reach_the_next_grid_instant(
    tmp_path: Path,
) -> None:
    seg = hourly(tmp_path)
    for i in range(10):
        list(seg(score(f"c{i}", T0, clv=float(i))))
    commit(seg)
    for _ in range(3):  # processing time recomputes nothing
        list(seg.tick())
    assert seg.thresholds_for(0) == {}  # nobody was on the partition at its first grid instant
    out = list(seg(score("x", GRID + 5 * 60_000, clv=0.0)))  # the partition reaches GRID
    # nearest-rank p50 over the ten customers held before x's score: 4.0
    assert seg.thresholds_for(0) == {("clv", 50.0): 4.0}
    # the customers it crosses enter at the grid instant, not at x's time nor at a tick
    assert entered(out) == [(f"c{i}", "Big", GRID) for i in range(4, 10)]
    table = written(commit(seg))["thresholds@0"]["thresholds"]
    assert table == {"partition": 0, "at": GRID, "values": {"clv@50": 4.0}}
    # the next score within the hour changes no threshold; one 3 h later computes one table
    list(seg(score("y", GRID + HOUR - 1, clv=100.0)))
    list(seg(score("y2", GRID + HOUR - 1, clv=100.0)))
    assert seg.thresholds_for(0) == {("clv", 50.0): 4.0}
    list(seg(score("z", GRID + 3 * HOUR + 1, clv=0.0)))
    assert seg.tables[0].at == GRID + 3 * HOUR
    assert seg.thresholds_for(0) == {("clv", 50.0): 5.0}  # 13 held: 0, 0, 1 ... 9, 100, 100


def test_each_partition_has_its_own_table(tmp_path: Path) -> None:
    seg = hourly(tmp_path)
    for i in range(10):
        list(seg(score(f"a{i}", T0, part=0, clv=float(i))))
        list(seg(score(f"b{i}", T0, part=1, clv=float(100 + i))))
    list(seg(score("a-late", GRID, part=0, clv=0.0)))
    assert seg.thresholds_for(0) == {("clv", 50.0): 4.0} and seg.thresholds_for(1) == {}
    list(seg(score("b-late", GRID, part=1, clv=0.0)))
    assert seg.thresholds_for(0) == {("clv", 50.0): 4.0}
    assert seg.thresholds_for(1) == {("clv", 50.0): 104.0}


BOTH = (
    'version: "1"\nsegments:\n  - name: Both\n    enter:\n      all:\n'
    '        - {feature: days_since_open, op: ">=", value: 2}\n'
    '        - {feature: clv, op: ">=", value: p50}\n'
    '  - name: Big\n    enter: {feature: clv, op: ">=", value: p80}\n'
    '    exit: {feature: clv, op: "<", value: p70}\n'
)


def records_of(seed: int) -> list[Incoming]:
    """Five days of scores on two partitions, in the partition's order: some customers
    scored again with a new clv, recencies that cross 2 days between scores (timers)."""
    import random

    from segflow.runtime.state import partition_for

    rng = random.Random(seed)
    ids = [f"c{i:03d}" for i in range(60)]
    out = []
    t = T0
    for _ in range(400):
        t += rng.randrange(0, 20 * 60_000)
        cid = rng.choice(ids)
        part = partition_for(cid, 2)
        clv = round(rng.lognormvariate(3, 1), 1)
        out.append(score(cid, t, part=part, clv=clv, days_since_open=rng.choice([0.0, 0.5, 1.5])))
    return out


def run(seg: Segmenter, records: list[Incoming], tick_every: int) -> list[tuple[Any, ...]]:
    out: list[Any] = []
    for n, r in enumerate(records, 1):
        out += list(seg(r))
        if n % tick_every == 0:
            out += commit(seg)
            out += list(seg.tick())
            out += commit(seg)
    for _ in range(100):  # every due timer, in bounded ticks
        out += list(seg.tick())
        out += commit(seg)
    return sorted(
        (o.value["customer_id"], o.value["segment"], o.value["transition"], o.value["occurred_at"])
        for o in out
        if o.topic is TOPICS.segment_changes
    )


def test_thresholds_and_changes_do_not_depend_on_ticks_batches_or_instances(
    tmp_path: Path,
) -> None:
    """The same records make the same changes whether the tick runs after every record or
    every 150, and whether one segmenter holds both partitions or two hold one each (the
    deployment-wide refresh of before made these differ)."""
    records = records_of(15)
    one = run(hourly(tmp_path, BOTH), records, tick_every=1)
    assert len({c[1] for c in one if c[2] == "entered"}) == 2  # both pNN segments used
    assert run(hourly(tmp_path, BOTH), records, tick_every=150) == one
    halves = [
        run(hourly(tmp_path, BOTH), [r for r in records if r.partition == p], tick_every=7)
        for p in (0, 1)
    ]
    assert sorted(halves[0] + halves[1]) == one


def test_a_new_owner_continues_with_the_committed_table(tmp_path: Path) -> None:
    """Not a recomputation from the restored customers: those changed after the grid
    instant, and another instance's table would differ from the one the partition had."""
    seg = hourly(tmp_path)
    for i in range(10):
        list(seg(score(f"c{i}", T0, clv=float(i))))
    list(seg(score("x", GRID + 1, clv=0.0)))  # table over the ten: p50 4.0
    for i in range(10):  # ten richer customers within the same hour
        list(seg(score(f"r{i}", GRID + 2, clv=50.0)))
    commit(seg)
    owner = hourly(tmp_path)
    owner.store.load_snapshot(seg.store.snapshot())
    owner.rebuild()
    assert owner.thresholds_for(0) == seg.thresholds_for(0) == {("clv", 50.0): 4.0}
    assert owner.tables[0].at == GRID
    later = score("y", GRID + HOUR + 1, clv=0.0)  # both compute the next table alike
    assert sorted(entered(owner(later))) == sorted(entered(seg(later)))
    assert owner.thresholds_for(0) == seg.thresholds_for(0) == {("clv", 50.0): 9.0}


def test_an_aborted_grid_instant_rolls_the_table_back(tmp_path: Path) -> None:
    seg = hourly(tmp_path)
    for i in range(10):
        list(seg(score(f"c{i}", T0, clv=float(i))))
    commit(seg)
    list(seg(score("x", GRID + 1, clv=0.0)))
    assert seg.thresholds_for(0) == {("clv", 50.0): 4.0}
    seg.store.on_abort()
    seg.on_abort()
    assert seg.thresholds_for(0) == {} and seg.tables[0].at == GRID - HOUR
    assert seg.members("Big") == []
    list(seg(score("x", GRID + 1, clv=0.0)))  # redone after the abort: the same table
    assert seg.thresholds_for(0) == {("clv", 50.0): 4.0}
    assert seg.members("Big") == [f"c{i}" for i in range(4, 10)]


def test_a_timer_due_before_the_grid_instant_reads_the_table_of_before_it(
    tmp_path: Path,
) -> None:
    """Issue #17's event oracle (High-CLV Login Drop): a recency crossing due before the
    grid instant is decided with the table then in force, even when the score that reaches
    the grid instant comes before any tick; the new table moves the customer afterwards, at
    the grid instant."""
    seg = hourly(
        tmp_path,
        'version: "1"\nsegments:\n  - name: Both\n    enter:\n      all:\n'
        '        - {feature: days_since_open, op: ">=", value: 10}\n'
        '        - {feature: clv, op: ">=", value: p50}\n',
    )
    # a's recency crosses 10 days at T0 + 86.4 min: within the hour after GRID (T0 + 46.7 min)
    list(seg(score("a", T0, clv=5.0, days_since_open=9.94)))
    list(seg(score("b", T0, clv=1.0, days_since_open=0.0)))
    list(seg(score("c", GRID - 1, clv=1.0, days_since_open=0.0)))
    assert seg.thresholds_for(0) == {}
    list(seg(score("d", GRID + 1, clv=1.0)))  # p50 over a, b, c: 1.0 — a is above it
    assert seg.thresholds_for(0) == {("clv", 50.0): 1.0}
    # richer customers within that hour: the next table's p50 is 10.0, above a's clv
    for i in range(6):
        list(seg(score(f"r{i}", GRID + 2, clv=10.0 * (i + 1), days_since_open=0.0)))
    crossing = seg.states["a"].next_timer
    assert crossing is not None and GRID < crossing < GRID + HOUR
    out = [
        (o.value["customer_id"], o.value["transition"], o.value["occurred_at"])
        for o in seg(score("e", GRID + HOUR, clv=1.0))  # no tick ran: the grid fires a's timer
        if o.topic is TOPICS.segment_changes and o.value["transition"] in ("entered", "exited")
    ]
    assert seg.thresholds_for(0) == {("clv", 50.0): 10.0}
    assert out == [("a", "entered", crossing), ("a", "exited", GRID + HOUR)]


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


def test_a_merged_away_id_counts_in_its_partitions_tables_up_to_the_merges_time(
    tmp_path: Path,
) -> None:
    """Where a merge record falls among the partition's scores depends on fetch timing (it
    comes on its own topic); its own event time decides which tables still count the
    absorbed id — also for a new owner restoring the partition in between."""
    seg = hourly(tmp_path)
    for i in range(4):
        list(seg(score(f"c{i}", T0, clv=float(i))))
    list(seg(score("rich", T0, clv=100.0)))
    merge = {"survivor_id": "c0", "absorbed_ids": ["rich"], "occurred_at": GRID + 30 * 60_000}
    list(seg(Incoming(TOPICS.merges, seg.merges_topic, 0, 0, "rich", merge, None, [])))
    commit(seg)
    assert "rich" not in seg.states
    owner = hourly(tmp_path)
    owner.store.load_snapshot(seg.store.snapshot())
    owner.rebuild()
    for s in (seg, owner):
        list(s(score("x", GRID + 1, clv=0.0)))  # GRID: merged after it, rich still counts
        assert s.thresholds_for(0) == {("clv", 50.0): 2.0}  # 0, 1, 2, 3, 100
        list(s(score("y", GRID + HOUR + 1, clv=0.0)))  # GRID + 1 h: rich has gone
        assert s.thresholds_for(0) == {("clv", 50.0): 1.0}  # 0, 0, 1, 2, 3
