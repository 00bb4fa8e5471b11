"""``segflow replay``: recorded history through new rule versions, the difference, nothing sent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from segflow.cli import main
from segflow.receiver import Receiver
from segflow.replay import core
from segflow.replay.source import read_jsonl
from segflow.runtime.state import partition_for
from services.dispatcher.playbooks import Book, parse_documents
from services.segmenter.dsl import DAY, HOUR, parse

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_710_000_000_000  # a Saturday, 16:00 UTC: outside the default quiet hours

BIG = """version: "{v}"
segments:
  - name: Big
    priority: 10
    enter: {{feature: clv, op: ">=", value: {threshold}}}
"""
PLAYBOOK = """playbook: BigThanks
segment: Big
steps:
  - {id: thanks, channel: email, after: 0h, template: t-thanks}
"""


def defs(threshold: float, version: str = "1") -> Any:
    return parse(BIG.format(v=version, threshold=threshold))


def book(text: str = PLAYBOOK) -> Book:
    playbooks, policy = parse_documents(text, "test.yaml")
    return Book(tuple(playbooks)) if policy is None else Book(tuple(playbooks), policy)


def scores(*rows: tuple[str, int, float]) -> list[core.Item]:
    return [
        core.score_item({"customer_id": c, "as_of": at, "clv": clv, "features": {}})
        for c, at, clv in rows
    ]


HISTORY = scores(("c1", T0, 450.0), ("c2", T0 + 1000, 600.0), ("c3", T0 + 2000, 100.0))


def diff_of(
    items: list[core.Item], old: Any, new: Any, b_old: Book, b_new: Book | None = None
) -> dict[str, Any]:
    return core.compare(core.replay(items, old, b_old), core.replay(items, new, b_new or b_old))


# -- the difference, on hand-built histories ---------------------------------------------------
def test_lower_threshold_moves_a_known_customer_in_and_contacts_them() -> None:
    diff = diff_of(HISTORY, defs(500), defs(400, "2"), book())
    big = diff["segments"]["Big"]
    assert big["would_enter"] == ["c1"] and big["members_gained"] == ["c1"]
    assert big["would_not_enter"] == [] and big["members_lost"] == []
    assert big["final_size"] == {"old": 1, "new": 2, "delta": 1}
    assert big["entries"] == {"old": 1, "new": 2, "delta": 1}
    assert diff["definitions"]["changed"] == ["Big"]
    assert diff["actions"] == [
        {
            "playbook": "BigThanks",
            "channel": "email",
            "outcome": "sent",
            "old": 1,
            "new": 2,
            "delta": 1,
        }
    ]
    assert diff["contacts"]["BigThanks"]["newly_contacted"] == ["c1"]
    assert diff["identical"] is False


def test_higher_threshold_moves_a_known_customer_out() -> None:
    diff = diff_of(HISTORY, defs(500), defs(700, "2"), book())
    big = diff["segments"]["Big"]
    assert big["would_not_enter"] == ["c2"] and big["members_lost"] == ["c2"]
    assert big["final_size"]["new"] == 0
    assert diff["contacts"]["BigThanks"]["no_longer_contacted"] == ["c2"]


def test_identical_definitions_give_an_empty_difference() -> None:
    diff = diff_of(HISTORY, defs(500), defs(500), book())
    assert diff["identical"] is True
    assert diff["segments"] == {} and diff["actions"] == [] and diff["contacts"] == {}
    assert diff["totals"]["sent"] == {"old": 1, "new": 1, "delta": 0}


def test_a_recency_threshold_is_reached_on_event_time_timers_without_a_new_score() -> None:
    text = """version: "{v}"
segments:
  - name: Quiet
    enter: {{feature: days_since_open, op: ">=", value: {days}}}
"""
    # c1 is scored once; only c2's later score moves event time on by 30 days.
    items = [
        core.score_item({"customer_id": "c1", "as_of": T0, "features": {"days_since_open": 1.0}}),
        core.score_item(
            {"customer_id": "c2", "as_of": T0 + 30 * DAY, "features": {"days_since_open": 0.0}}
        ),
    ]
    old = core.run_segmenter(core.ordered(items), parse(text.format(v=1, days=20)))
    new = core.run_segmenter(core.ordered(items), parse(text.format(v=2, days=5)))
    [entered_old] = [c for c in old.changes if c.transition == "entered"]
    [entered_new] = [c for c in new.changes if c.transition == "entered"]
    assert (entered_old.customer_id, entered_old.occurred_at) == ("c1", T0 + 19 * DAY)
    assert (entered_new.customer_id, entered_new.occurred_at) == ("c1", T0 + 4 * DAY)
    diff = core.compare(
        core.Replay(old, core.run_dispatcher(old.changes, items, Book(()))),
        core.Replay(new, core.run_dispatcher(new.changes, items, Book(()))),
    )
    assert diff["segments"]["Quiet"]["first_entry"] == {
        "earlier": 1,
        "later": 0,
        "median_shift_hours": -15 * 24.0,
    }


def test_recorded_unsubscribe_suppresses_the_new_entrys_email() -> None:
    unsubscribe = core.event_item(
        {
            "customer_id": "c1",
            "event": {
                "event_id": "e1",
                "event_type": "email_unsubscribe",
                "occurred_at": T0 - HOUR,
            },
        }
    )
    diff = diff_of([*HISTORY, unsubscribe], defs(500), defs(400, "2"), book())
    assert diff["history"]["events"] == 1
    assert diff["actions"] == [
        {
            "playbook": "BigThanks",
            "channel": "email",
            "outcome": "suppressed:unsubscribed",
            "old": 0,
            "new": 1,
            "delta": 1,
        }
    ]
    assert diff["contacts"] == {}


def test_new_playbook_step_is_counted_and_steps_not_yet_due_stay_pending() -> None:
    longer = PLAYBOOK + "  - {id: task, channel: crm_task, after: 2h, subject: Call them}\n"
    # c2 enters at T0+1s; history runs on to T0+3h (c3's next score): the task comes due.
    items = [*HISTORY, *scores(("c3", T0 + 3 * HOUR, 100.0))]
    diff = diff_of(items, defs(500), defs(500), book(), book(longer))
    assert diff["playbooks"]["changed"] == ["BigThanks"]
    assert diff["segments"] == {}
    assert diff["actions"] == [
        {
            "playbook": "BigThanks",
            "channel": "crm_task",
            "outcome": "sent",
            "old": 0,
            "new": 1,
            "delta": 1,
        }
    ]
    # with the history ending an hour after the entry, the task is still pending
    diff = diff_of(
        [*HISTORY, *scores(("c3", T0 + HOUR, 100.0))], defs(500), defs(500), book(), book(longer)
    )
    assert [(a["outcome"], a["new"]) for a in diff["actions"]] == [("pending", 1)]


def test_merge_exits_the_absorbed_customer() -> None:
    merge = core.merge_item(
        {"merge_id": "m", "survivor_id": "c2", "absorbed_ids": ["c1"], "occurred_at": T0 + 5000}
    )
    diff = diff_of([*HISTORY, merge], defs(500), defs(400, "2"), book())
    big = diff["segments"]["Big"]
    assert big["would_enter"] == ["c1"]
    assert big["exits"] == {"old": 0, "new": 1, "delta": 1}  # c1 exits, merged into c2
    assert big["members_gained"] == []


# -- the command line ----------------------------------------------------------------------------
def write_history(path: Path, items: list[core.Item]) -> Path:
    path.write_text("".join(json.dumps(dict(i.record)) + "\n" for i in items))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "old.yaml").write_text(BIG.format(v=1, threshold=500))
    (tmp_path / "new.yaml").write_text(BIG.format(v=2, threshold=400))
    (tmp_path / "pb").mkdir()
    (tmp_path / "pb" / "big.yaml").write_text(PLAYBOOK)
    return {
        "old": tmp_path / "old.yaml",
        "new": tmp_path / "new.yaml",
        "pb": tmp_path / "pb",
        "history": write_history(tmp_path / "history.jsonl", HISTORY),
    }


def replay_cli(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "replay",
        "--from",
        str(files["history"]),
        "--current-segments",
        str(files["old"]),
        "--current-playbooks",
        str(files["pb"]),
        *extra,
    ]


def test_cli_prints_the_difference_and_sends_nothing_to_a_listening_receiver(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver().start()
    try:
        for name in ("CRM_BASE_URL", "EMAIL_BASE_URL"):
            monkeypatch.setenv(f"SEGFLOW_DISPATCHER_{name}", receiver.url)
        monkeypatch.setenv("SEGFLOW_DISPATCHER_WEBHOOK_URL", receiver.url + "/webhook")
        assert main(replay_cli(files, "--segments", str(files["new"]))) == 0
    finally:
        receiver.stop()
    out = capsys.readouterr().out
    assert "nothing sent" in out
    assert "would enter: c1" in out
    assert "BigThanks" in out and "1 → 2 (+1)" in out
    assert receiver.requests == []


def test_replay_never_loads_an_api_client(files: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from segflow.cli import main\n"
        f"assert main({replay_cli(files, '--segments', str(files['new']), '--json')!r}) == 0\n"
        "loaded = [m for m in ('httpx', 'aiohttp', 'services.dispatcher.adapters',\n"
        "                      'services.dispatcher.app') if m in sys.modules]\n"
        "print('LOADED', loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out[: out.index("LOADED")])["totals"]["sent"]["new"] == 2
    assert "LOADED []" in out


def test_current_versions_come_from_the_services_settings(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --current-*, the current versions are what the segmenter and dispatcher read
    from SEGFLOW_SEGMENTER_DEFINITIONS and SEGFLOW_DISPATCHER_PLAYBOOKS."""
    assert main(replay_cli(files, "--segments", str(files["new"]), "--json")) == 0
    explicit = json.loads(capsys.readouterr().out)
    monkeypatch.setenv("SEGFLOW_SEGMENTER_DEFINITIONS", str(files["old"]))
    monkeypatch.setenv("SEGFLOW_DISPATCHER_PLAYBOOKS", str(files["pb"]))
    args = ["replay", "--from", str(files["history"]), "--segments", str(files["new"]), "--json"]
    assert main(args) == 0
    from_env = json.loads(capsys.readouterr().out)
    assert from_env == explicit
    assert from_env["definitions"]["old"].split("+")[0] == "1"  # not the default segments
    assert from_env["totals"]["sent"]["old"] == 1  # the playbook in files["pb"] ran


def test_an_invalid_service_setting_is_named(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEGFLOW_SEGMENTER_BATCH_SIZE", "lots")
    args = ["replay", "--from", str(files["history"]), "--segments", str(files["new"])]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "SEGFLOW_SEGMENTER_BATCH_SIZE" in err and "nothing replayed" in err


def test_identical_file_prints_no_difference(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(replay_cli(files, "--segments", str(files["old"]))) == 0
    assert "no difference" in capsys.readouterr().out


def test_playbook_file_replaces_the_same_named_playbook(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held_out = tmp_path / "big-holdout.yaml"
    held_out.write_text(PLAYBOOK.replace("steps:", "experiment: {holdout: 0.99}\nsteps:"))
    assert main(replay_cli(files, "--playbooks", str(held_out), "--json")) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["playbooks"]["changed"] == ["BigThanks"] and diff["playbooks"]["added"] == []
    outcomes = {(a["outcome"], a["old"], a["new"]) for a in diff["actions"]}
    assert outcomes == {("sent", 1, 0), ("holdout", 0, 1)}


def test_invalid_new_definitions_are_rejected_with_line_and_field(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        BIG.format(v=2, threshold=400).replace('">="', '"=>"') + "    cooldown: 3 days\n"
    )
    assert main(replay_cli(files, "--segments", str(bad))) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert f"{bad}:5: segments[0].enter.op: unknown operator '=>'" in out.err
    assert f"{bad}:6: segments[0].cooldown: bad duration '3 days'" in out.err


def test_invalid_new_playbook_is_rejected_with_line_and_field(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad-pb.yaml"
    bad.write_text(PLAYBOOK.replace("channel: email", "channel: emial"))
    assert main(replay_cli(files, "--playbooks", str(bad))) == 1
    assert f"{bad}:4: steps[0].channel: must be one of" in capsys.readouterr().err


def test_a_bad_history_line_names_the_file_and_line(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with files["history"].open("a") as f:
        f.write('{"customer": "c9"}\n')
    assert main(replay_cli(files, "--segments", str(files["new"]))) == 2
    assert f"{files['history']}:4: not a CustomerScore" in capsys.readouterr().err


def test_neither_new_segments_nor_playbooks_is_an_error(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(replay_cli(files)) == 2
    assert "--segments" in capsys.readouterr().err


# -- a recorded scores topic on the real broker --------------------------------------------------
@pytest.mark.broker
def test_replays_a_recorded_scores_topic_read_committed(
    kafka_settings: Any,
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from segflow.runtime.kafka import make_producer
    from segflow.runtime.serde import Serde
    from segflow.runtime.topics import TOPICS

    serde = Serde.from_settings(kafka_settings)
    topic = TOPICS.scores.name(kafka_settings)

    def record(cid: str, at: int, clv: float) -> bytes:
        return serde.encode(
            TOPICS.scores,
            {
                "customer_id": cid,
                "as_of": at,
                "churn_probability": 0.1,
                "engagement_score": 50.0,
                "clv": clv,
                "cluster": None,
                "lifecycle_stage": "loyal",
                "features": {},
                "top_features": [],
                "model_version": "t",
                "scored_at": at,
                "cluster_description": "",
            },
        )

    producer = make_producer(kafka_settings, transactional_id=f"{topic}-test")
    producer.init_transactions(30)
    producer.begin_transaction()  # as the scorer writes: in transactions
    for cid, at, clv in (("c1", T0, 450.0), ("c2", T0 + 1000, 600.0), ("c3", T0 + 2000, 100.0)):
        producer.produce(topic, record(cid, at, clv), cid.encode())
    producer.commit_transaction(30)
    producer.begin_transaction()  # an aborted score must not be replayed
    producer.produce(topic, record("c4", T0 + 3000, 900.0), b"c4")
    producer.flush(30)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, None, b"c3")  # a tombstone (a merged-away score) is skipped
    producer.commit_transaction(30)

    monkeypatch.setenv("SEGFLOW_BOOTSTRAP_SERVERS", kafka_settings.bootstrap_servers)
    saved = tmp_path / "saved.jsonl"
    args = [
        "replay",
        "--prefix",
        kafka_settings.topic_prefix,
        "--current-segments",
        str(files["old"]),
        "--current-playbooks",
        str(files["pb"]),
        "--segments",
        str(files["new"]),
        "--json",
    ]
    assert main([*args, "--save", str(saved)]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["history"]["scores"] == 3
    assert diff["segments"]["Big"]["would_enter"] == ["c1"]
    assert diff["segments"]["Big"]["final_size"] == {"old": 1, "new": 2, "delta": 1}
    assert diff["totals"]["sent"] == {"old": 1, "new": 2, "delta": 1}
    assert [i.record["customer_id"] for i in read_jsonl(saved)] == ["c1", "c2", "c3"]
    # the saved history replays to the same difference without the broker
    assert main(["replay", "--from", str(saved), *args[3:]]) == 0
    assert json.loads(capsys.readouterr().out) == diff


@pytest.mark.broker
def test_unknown_prefix_is_a_clear_error(
    kafka_bootstrap: str,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEGFLOW_BOOTSTRAP_SERVERS", kafka_bootstrap)
    args = [
        "replay",
        "--prefix",
        "no-such-prefix.",
        "--current-segments",
        str(files["old"]),
        "--current-playbooks",
        str(files["pb"]),
        "--segments",
        str(files["new"]),
    ]
    assert main(args) == 2
    assert "topic 'no-such-prefix.scores' not found" in capsys.readouterr().err


TOP = """version: "1"
segments:
  - name: Top
    enter: {feature: clv, op: ">=", value: p80}
"""


def nearest_rank(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def test_percentiles_rank_a_customer_among_its_own_scores_partition_as_the_service_does() -> None:
    """Live, a ``pNN`` table is per partition of ``segflow.scores`` (services/segmenter/
    README.md): the replay ranks each customer among its own partition's customers too."""
    ids = [f"c{i}" for i in range(40)]
    by_part = {p: [c for c in ids if partition_for(c, 2) == p][:5] for p in (0, 1)}
    value = {c: float(1 + k) for k, c in enumerate(by_part[0])}
    value |= {c: float(100 + k) for k, c in enumerate(by_part[1])}
    rows = [(c, T0 + i, v) for i, (c, v) in enumerate(value.items())]
    # the same values again two hours on: each partition reaches its next grid instant
    history = core.ordered(scores(*rows, *[(c, at + 2 * HOUR, v) for c, at, v in rows]))

    def entered(partitions: int) -> set[str]:
        run = core.run_segmenter(history, parse(TOP), partitions=partitions)
        return {c.customer_id for c in run.changes if c.transition == "entered"}

    per_partition = {
        c
        for cs in by_part.values()
        for c in cs
        if value[c] >= nearest_rank([value[x] for x in cs], 80)
    }
    deployment = {c for c in value if value[c] >= nearest_rank(list(value.values()), 80)}
    assert per_partition != deployment  # (the population tells the two rules apart)
    assert entered(2) == per_partition
    assert entered(1) == deployment


def test_a_moved_threshold_takes_a_customer_in_at_the_grid_instant_without_a_new_score() -> None:
    """c1 is scored once (clv 50); the others' values fall. At the next grid instant the
    partition's p80 drops below 50 and c1 enters then, as the live segmenter re-evaluates the
    customers between an old and a new threshold."""
    assert T0 % HOUR == 0
    first = [("c1", T0, 50.0)] + [(f"c{k}", T0, 98.0 + k) for k in range(2, 6)]  # 100..103
    fallen = [(f"c{k}", T0 + 2 * HOUR + k, float(k - 1)) for k in range(2, 6)]  # 1..4
    history = core.ordered(scores(*first, *fallen, ("c2", T0 + 3 * HOUR, 1.0)))
    run = core.run_segmenter(history, parse(TOP))
    entries = [(c.customer_id, c.occurred_at) for c in run.changes if c.transition == "entered"]
    # the table of T0 + 2 h: p80 of [50, 100, 101, 102, 103] = 102 (c4, c5 enter at T0 + 1 h);
    # of T0 + 3 h: p80 of [50, 1, 2, 3, 4] = 4: c1 and c5 enter at T0 + 3 h
    assert nearest_rank([50.0, 100.0, 101.0, 102.0, 103.0], 80) == 102.0
    assert nearest_rank([50.0, 1.0, 2.0, 3.0, 4.0], 80) == 4.0
    assert ("c1", T0 + 3 * HOUR) in entries
    assert [e for e in entries if e[0] == "c1"] == [("c1", T0 + 3 * HOUR)]
