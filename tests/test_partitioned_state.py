"""Partitioned state without a broker: a store keeps, pins and drops keys by partition, and the
segmenter's clock and timers are per partition (a customer's timer waits for its own
partition's event time, not for the most advanced partition's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from segflow.runtime.loop import Incoming
from segflow.runtime.serde import SchemaStore, Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore, partition_for
from segflow.runtime.topics import TOPICS
from services.segmenter.app import Segmenter, SegmenterConfig
from services.segmenter.dsl import DAY

T0 = 1_700_000_000_000
N = TOPICS.segmenter_state.partitions


def ids_by_partition(count: int = 2) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    i = 0
    while len(out) < N or any(len(v) < count for v in out.values()):
        cid = f"cust{i}"
        bucket = out.setdefault(partition_for(cid, N), [])
        if len(bucket) < count:
            bucket.append(cid)
        i += 1
    return out


def store() -> ChangelogStore:
    return ChangelogStore(
        Settings(bootstrap_servers="unused:1"), TOPICS.scores, Serde(SchemaStore.from_dir())
    )


def test_a_store_writes_each_key_to_its_partition_and_pins_explicit_ones() -> None:
    st = store()
    out = st.put("a", {"v": 1})
    assert out.partition == partition_for("a", N)
    other = (partition_for("seg", N) + 1) % N
    pinned = st.put("seg", {"v": 2}, partition=other)
    assert pinned.partition == other and st.partition_of("seg") == other
    assert st.delete("seg").partition == other  # the tombstone follows the key
    third = next(p for p in range(N) if p not in (other, partition_for("seg", N)))
    with pytest.raises(ValueError, match="unique across partitions"):
        st.put("seg", {"v": 3}, partition=third)


def test_revoking_partitions_drops_their_keys_only_and_owns_follows() -> None:
    st = store()
    ids = ids_by_partition()
    for cids in ids.values():
        for cid in cids:
            st.put(cid, {"v": cid})
    st.put("agg@0", {"v": 0}, partition=0)
    st.on_commit()
    st.assigned = set(range(N))
    st.on_revoke({0, 1})
    assert {k for k, _ in st.items()} == set(ids[2] + ids[3])
    assert not st.owns(ids[0][0]) and st.owns(ids[3][0])
    st.put(ids[2][0], {"v": "changed"})
    st.on_revoke({2})
    st.on_abort()  # the undo log of a dropped partition must not resurrect its keys
    assert {k for k, _ in st.items()} == set(ids[3])


# -- the segmenter's per-partition clock ---------------------------------------------------
DEFS = """version: "1"
segments:
  - name: Quiet
    priority: 5
    enter: {feature: days_since_open, op: ">=", value: 10}
"""


@pytest.fixture
def seg(tmp_path: Path) -> Segmenter:
    path = tmp_path / "s.yaml"
    path.write_text(DEFS)
    clock = iter(range(10**6))
    return Segmenter(
        Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="part."),
        SegmenterConfig(definitions=path, reload_interval=0),
        clock=lambda: float(next(clock)),
    )


def score(cid: str, at: int, **features: float) -> Incoming:
    value = {
        "customer_id": cid,
        "as_of": at,
        "churn_probability": 0.1,
        "engagement_score": 1.0,
        "clv": 1.0,
        "cluster": None,
        "lifecycle_stage": "loyal",
        "features": features,
        "model_version": "t",
        "scored_at": 0,
    }
    part = partition_for(cid, N)
    return Incoming(TOPICS.scores, "part.scores", part, 0, cid, value, None, [])


def entered(outputs: Any) -> list[str]:
    return [
        o.value["customer_id"]
        for o in outputs
        if o.topic is TOPICS.segment_changes and o.value["transition"] == "entered"
    ]


def test_a_timer_waits_for_its_own_partitions_event_time(seg: Segmenter) -> None:
    ids = ids_by_partition()
    a, a2 = ids[0]
    b = ids[1][0]
    assert entered(seg(score(a, T0, days_since_open=5.0))) == []  # Quiet at T0 + 5 days
    list(seg(score(b, T0 + 30 * DAY, days_since_open=0.0)))  # another partition runs ahead
    assert entered(seg.tick()) == []  # a's partition is still at T0
    assert seg.watermark == T0  # the instance clock: the minimum over its partitions
    list(seg(score(a2, T0 + 6 * DAY, days_since_open=0.0)))  # a's partition passes the timer
    assert entered(seg.tick()) == [a]


def test_revoked_partitions_take_their_customers_and_timers_with_them(seg: Segmenter) -> None:
    ids = ids_by_partition()
    a, b = ids[0][0], ids[1][0]
    list(seg(score(a, T0, days_since_open=5.0)))
    list(seg(score(b, T0, days_since_open=5.0)))
    list(seg.before_commit())
    seg.store.on_commit()
    seg.on_commit()
    seg.store.assigned = set(range(N))
    seg.store.on_revoke({0})
    seg.on_revoke({0})
    assert a not in seg.states and b in seg.states
    list(seg(score(ids[0][1], T0 + 20 * DAY, days_since_open=0.0)))
    list(seg(score(ids[1][1], T0 + 20 * DAY, days_since_open=0.0)))
    assert entered(seg.tick()) == [b]  # a's timer went with its partition


def test_a_segment_is_deprecated_per_partition_once_with_the_partition_in_its_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(DEFS + "deprecate_after: 5d\n")
    seg = Segmenter(
        Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="part."),
        SegmenterConfig(definitions=path, reload_interval=3600),
    )
    ids = ids_by_partition()
    list(seg(score(ids[0][0], T0, days_since_open=0.0)))
    list(seg(score(ids[1][0], T0, days_since_open=0.0)))
    list(seg.tick())  # statuses first seen at T0
    list(seg(score(ids[0][1], T0 + 6 * DAY, days_since_open=0.0)))  # only partition 0 moves on
    out = [o.value for o in seg.tick() if o.topic is TOPICS.segment_changes]
    assert [(c["segment"], c["transition"], c["change_id"]) for c in out] == [
        ("Quiet", "deprecated", "Quiet|deprecation|1@0|deprecated")
    ]
    assert [o for o in seg.tick() if o.topic is TOPICS.segment_changes] == []  # once
    assert not seg.statuses["Quiet"].deprecated  # partition 1 still has it active
