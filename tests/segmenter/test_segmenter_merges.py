"""Where the segmenter retires a merged-away id (issue #15; services/segmenter/merging.py).

The merge record (``segflow.identity.merges``) and the absorbed id's scores come on different
topics: which the segmenter reads first depends on timing. The scorer writes the absorbed
id's score tombstone after all its scores, with the merge in its headers; the segmenter
retires the id there, so the same scores are taken in and the exits carry the same instant
whichever it read first. Seen in the pipeline test before: a score as of before the merge,
read after the merge record, was dropped (a Lifecycle entry made in one run only)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from segflow.runtime.loop import Incoming, Output
from segflow.runtime.records import merge_headers
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from services.segmenter.app import Segmenter, SegmenterConfig
from services.segmenter.dsl import DAY
from tests.segmenter.test_segmenter_shell import score as shell_score

DEFS = """version: "1"
segments:
  - name: Active
    priority: 5
    enter: {feature: logins, op: ">=", value: 1}
  - name: Buyer
    priority: 9
    enter: {feature: purchases, op: ">=", value: 1}
"""
T0 = 1_700_000_000_000
MERGE_AT = T0 + 4 * DAY
WAIT_S = 7 * 86_400


def make(path: Path) -> Segmenter:
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="merges.")
    clock = iter(range(10**6))
    config = SegmenterConfig(
        definitions=path, reload_interval=0, percentile_refresh=365 * 86_400, merge_wait=WAIT_S
    )
    return Segmenter(settings, config, clock=lambda: float(next(clock)))


@pytest.fixture
def defs(tmp_path: Path) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(DEFS)
    return path


def part_of(seg: Segmenter, cid: str) -> int:
    return seg.store.partition_of(cid)


def score(seg: Segmenter, cid: str, at: int, **features: float) -> Incoming:
    record = shell_score(cid, at, part_of(seg, cid), **features)
    return record._replace(topic_name=seg.scores_topic)


def tombstone(seg: Segmenter, cid: str, headers: list[Any] | None = None) -> Incoming:
    """The scorer's score tombstone, as the loop hands it over (value None)."""
    part = part_of(seg, cid)
    return Incoming(TOPICS.scores, seg.scores_topic, part, 0, cid, None, None, headers or [])  # type: ignore[arg-type]


def merged(seg: Segmenter, cid: str = "a", survivor: str = "s") -> Incoming:
    value = {
        "merge_id": "m-" + cid,
        "survivor_id": survivor,
        "absorbed_ids": [cid],
        "occurred_at": MERGE_AT,
        "merged_at": MERGE_AT,
        "in_identified": True,
    }
    part = part_of(seg, cid)
    return Incoming(TOPICS.merges, seg.merges_topic, part, 0, cid, value, None, [])


def marked_tombstone(seg: Segmenter, cid: str = "a", survivor: str = "s") -> Incoming:
    return tombstone(seg, cid, merge_headers(survivor, MERGE_AT))  # type: ignore[arg-type]


def commit(seg: Segmenter) -> list[Output]:
    out = list(seg.before_commit())
    seg.store.on_commit()
    seg.on_commit()
    return out


def run(seg: Segmenter, records: Iterable[Incoming], commit_each: bool = True) -> list[Any]:
    """Feed ``records`` (a commit and a tick after each); the segment changes as the pipeline
    test compares them: customer, segment, transition, reason, entry id, event time."""
    out: list[Output] = []
    for record in records:
        out += seg(record)
        if commit_each:
            out += commit(seg)
            out += seg.tick()
    return [
        (
            v["customer_id"],
            v["segment"],
            v["transition"],
            v["reason"],
            v["entry_id"],
            v["occurred_at"],
        )
        for o in out
        if o.topic is TOPICS.segment_changes and isinstance(v := o.value, dict)
    ]


def absorbed_stream(seg: Segmenter) -> list[Incoming]:
    """Partition of "a" in order: a's scores (the last as of before the merge), then its
    tombstone; then a later score of another customer of the partition."""
    other = next(c for c in (f"x{i}" for i in range(100)) if part_of(seg, c) == part_of(seg, "a"))
    return [
        score(seg, "a", T0, logins=0.0, purchases=1.0),
        score(seg, other, T0 + DAY, logins=0.0),
        score(seg, "a", T0 + 3 * DAY, logins=2.0, purchases=1.0),  # enters Active
        marked_tombstone(seg),
        score(seg, other, MERGE_AT + DAY, logins=0.0),
    ]


#: What the absorbed id's partition makes, whichever way the merge record is read: Buyer from
#: its first score, Active from its last one (as of before the merge), both left at the
#: merge (the tombstone's watermark, T0 + 3 days, is before it), and its primary cleared.
EXPECTED = sorted(
    [
        ("a", "Buyer", "entered", "condition", "a|Buyer|1", T0),
        ("a", "Buyer", "primary_changed", "priority", "a|Buyer|1", T0),
        ("a", "Active", "entered", "condition", "a|Active|1", T0 + 3 * DAY),
        ("a", "Active", "exited", "merged", "a|Active|1", MERGE_AT),
        ("a", "Buyer", "exited", "merged", "a|Buyer|1", MERGE_AT),
        ("a", "Buyer", "primary_changed", "merged", "", MERGE_AT),
    ]
)


def only_a(changes: list[Any]) -> list[Any]:
    return sorted(c for c in changes if c[0] == "a")


@pytest.mark.parametrize("at", [0, 1, 2, 3, 4, 5])
def test_the_absorbed_ids_scores_count_and_it_exits_at_its_tombstone_wherever_the_merge_is_read(
    defs: Path, at: int
) -> None:
    """The merge record read anywhere in the absorbed id's partition (before its last
    scores, between them and the tombstone, after it): the same changes, at the same event
    times. Before, read before the last score it dropped that score (no Active entry)."""
    seg = make(defs)
    stream = absorbed_stream(seg)
    records = [*stream[:at], merged(seg), *stream[at:]]
    got = only_a(run(seg, records))
    assert got == EXPECTED
    assert seg.retired == {"a": "merged"} and "a" not in seg.states
    assert not any(seg.merging.values()), "no merge left pending"
    # a later score for the id is dropped, as before
    assert run(seg, [score(seg, "a", MERGE_AT + 2 * DAY, logins=5.0)]) == []


def test_a_pending_merge_survives_a_new_owner(defs: Path) -> None:
    """The merge read first, committed; a new owner restores the partition (the pending
    marker is in the changelog) and reads the rest: the same changes as one owner."""
    seg = make(defs)
    stream = absorbed_stream(seg)
    first = only_a(run(seg, [stream[0], merged(seg), stream[1]]))
    marker = "merging:a"
    assert seg.store.get(marker) is not None
    assert seg.store.partition_of(marker) == part_of(seg, "a")
    owner = make(defs)
    owner.store.load_snapshot(seg.store.snapshot())  # what a restore would load
    owner.rebuild()
    assert owner.merging == {part_of(seg, "a"): {"a": ("s", MERGE_AT)}}
    rest = only_a(run(owner, stream[2:]))
    assert sorted(first + rest) == EXPECTED
    assert marker not in owner.store  # the marker goes with the retirement (a tombstone)
    assert owner.retired == {"a": "merged"}


def test_the_exit_instant_is_the_partitions_watermark_at_the_tombstone_when_past_the_merge(
    defs: Path,
) -> None:
    """The tombstone read when the partition's scores are past the merge: exits at that
    watermark (a function of the partition's records in order), after the id's timers due
    by then; not at the watermark when the merge record happened to be read."""
    seg = make(defs)
    stream = absorbed_stream(seg)
    late = score(seg, stream[1].key, MERGE_AT + 6 * 3_600_000, logins=0.0)  # type: ignore[arg-type]
    for merge_first in (True, False):
        seg = make(defs)
        stream = absorbed_stream(seg)
        records = [*stream[:3], late, stream[3]]
        records.insert(1 if merge_first else 5, merged(seg))
        exits = [c for c in only_a(run(seg, records)) if c[2] == "exited"]
        assert {c[5] for c in exits} == {MERGE_AT + 6 * 3_600_000}, merge_first


def test_a_tombstone_without_merge_headers_changes_nothing_unless_a_merge_waits(
    defs: Path,
) -> None:
    """A forget's tombstone (its request retires the id) or one of a scorer from before the
    headers: ignored as before; with a merge pending for the id (an older scorer), the id is
    retired with that merge."""
    seg = make(defs)
    run(seg, [score(seg, "a", T0, logins=1.0)])
    assert run(seg, [tombstone(seg, "a")]) == []
    assert "a" in seg.states and not seg.retired
    got = run(seg, [merged(seg), tombstone(seg, "a")])
    assert [(c[1], c[2], c[3], c[5]) for c in got] == [
        ("Active", "exited", "merged", MERGE_AT),
        ("Active", "primary_changed", "merged", MERGE_AT),
    ]
    assert seg.retired == {"a": "merged"}


def test_a_merge_without_marks_retires_at_its_record_as_before(defs: Path) -> None:
    seg = make(defs)
    run(seg, [score(seg, "a", T0, logins=1.0)])
    unmarked = merged(seg)
    unmarked = unmarked._replace(value={**unmarked.value, "in_identified": False})
    got = run(seg, [unmarked])
    assert ("a", "Active", "exited", "merged", "a|Active|1", MERGE_AT) in got
    assert not any(seg.merging.values())


def test_the_fallback_retires_a_pending_merge_once_its_partition_is_past_the_wait(
    defs: Path,
) -> None:
    """No tombstone comes (a scorer from before the headers whose tombstone was read first,
    or compacted away): the id is retired when a score of its partition passes the merge's
    time plus ``merge_wait``, before that score; a merge read that late retires it at once."""
    seg = make(defs)
    stream = absorbed_stream(seg)
    other = str(stream[1].key)
    deadline = MERGE_AT + WAIT_S * 1000
    got = run(seg, [stream[0], merged(seg), stream[2], score(seg, other, deadline, logins=0.0)])
    assert "a" in seg.states and not seg.retired  # at the deadline, not past it: waiting
    got += run(seg, [score(seg, other, deadline + 1, logins=0.0)])
    exits = [c for c in only_a(got) if c[2] == "exited"]
    assert {(c[1], c[3], c[5]) for c in exits} == {
        ("Active", "merged", deadline),
        ("Buyer", "merged", deadline),
    }
    assert seg.retired == {"a": "merged"} and not any(seg.merging.values())
    assert seg.store.get("merging:a") is None
    # read when the partition is already past the wait: retired at once, nothing pending
    b = next(c for c in (f"b{i}" for i in range(100)) if part_of(seg, c) == part_of(seg, "a"))
    got = run(seg, [score(seg, b, deadline + 2, logins=1.0), merged(seg, b)])
    assert (b, "Active", "exited", "merged", f"{b}|Active|1", deadline + 2) in got
    assert seg.retired.get(b) == "merged" and not any(seg.merging.values())


def test_forget_of_an_id_with_a_pending_merge_clears_the_marker(defs: Path) -> None:
    seg = make(defs)
    run(seg, [score(seg, "a", T0, logins=1.0), merged(seg)])
    request = {"customer_id": "a", "requested_at": T0 + DAY}
    forget = Incoming(TOPICS.forget, seg.forget_topic, part_of(seg, "a"), 0, "a", request, None, [])
    got = run(seg, [forget])
    assert ("a", "Active", "exited", "forgotten", "a|Active|1", T0 + DAY) in got
    assert seg.retired == {"a": "forgotten"} and "merging:a" not in seg.store
    assert run(seg, [marked_tombstone(seg)]) == []  # the merge's tombstone after: nothing
