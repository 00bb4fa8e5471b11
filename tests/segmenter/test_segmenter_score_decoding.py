"""The segmenter decodes only the features its definitions read (runtime.projection): the
result must be the full decode's, map reduced to those keys, whatever the scores look like."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segflow.errors import DecodeError
from segflow.runtime.projection import MapProjection
from segflow.runtime.serde import SchemaStore, Serde
from segflow.runtime.topics import TOPICS
from services.scorer.features import FEATURE_NAMES

SERDE = Serde(SchemaStore.from_dir())
WANTED = frozenset({"days_since_open", "logins_3d_vs_prior28_change", "revenue_28d", "missing_x"})


def record(features: dict[str, float], **over: Any) -> dict[str, Any]:
    return {
        "customer_id": "c-1",
        "as_of": 1_700_000_000_000,
        "churn_probability": 0.25,
        "engagement_score": 50.0,
        "clv": 120.5,
        "cluster": 3,
        "lifecycle_stage": "loyal",
        "features": features,
        "top_features": [{"name": "days_since_open", "value": 2.0, "contribution": 0.3}],
        "model_version": "m+n5",
        "scored_at": 1_700_000_000_500,
        "cluster_description": "busy",
        **over,
    }


def full(data: bytes, keys: frozenset[str]) -> dict[str, Any]:
    out = SERDE.decode(TOPICS.scores, data)
    out["features"] = {k: v for k, v in out["features"].items() if k in keys}
    return out


keys_st = st.one_of(
    st.sampled_from(sorted(FEATURE_NAMES)),
    st.text(min_size=0, max_size=80),  # empty, unicode and 64+ byte keys (a 2-byte length)
)
features_st = st.dictionaries(keys_st, st.floats(allow_nan=False), max_size=40)
other_st = st.fixed_dictionaries(
    {
        "customer_id": st.text(max_size=70),
        "as_of": st.integers(-(2**62), 2**62),
        "cluster": st.none() | st.integers(-(2**31), 2**31 - 1),
        "lifecycle_stage": st.text(max_size=10),
        "model_version": st.text(max_size=5),
    }
)
PROJECTION = MapProjection(SERDE, TOPICS.scores, "features", WANTED)  # shared: layouts change


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(features_st, other_st), min_size=1, max_size=4),
    st.frozensets(keys_st, max_size=6),
)
def test_projection_equals_the_full_decode_reduced_to_the_keys(
    batch: list[tuple[dict[str, float], dict[str, Any]]], extra: frozenset[str]
) -> None:
    keys = WANTED | extra | frozenset(k for f, _ in batch for k in list(f)[:2])
    PROJECTION.keys = keys
    for features, other in batch:  # the same map layout twice in a row, then another
        data = SERDE.encode(TOPICS.scores, record(features, **other))
        assert PROJECTION(data) == full(data, keys)
        assert PROJECTION(data) == full(data, keys)


def test_a_scorer_shaped_score_is_read_in_place_after_the_first() -> None:
    projection = MapProjection(SERDE, TOPICS.scores, "features", WANTED)
    for i in range(5):
        features = {name: float(i * 7 + j) for j, name in enumerate(FEATURE_NAMES)}
        data = SERDE.encode(TOPICS.scores, record(features, customer_id=f"c-{i}" * (i + 1)))
        got = projection(data)
        assert got == full(data, WANTED)
        assert sorted(got["features"]) == [
            "days_since_open",
            "logins_3d_vs_prior28_change",
            "revenue_28d",
        ]
    assert (projection.misses, projection.hits) == (1, 4)  # one walk, then in place
    for misses, other in enumerate(("revenue_28x", "x_revenue_28d"), start=2):
        renamed = {(other if n == "revenue_28d" else n): 1.0 for n in FEATURE_NAMES}
        data = SERDE.encode(TOPICS.scores, record(renamed))
        assert projection(data)["features"] == {
            "days_since_open": 1.0,
            "logins_3d_vs_prior28_change": 1.0,
        }
        assert projection.misses == misses  # other key bytes: walked again, not misread


@pytest.mark.parametrize("cut", [5, 9, 40, 200, -30, -1])
def test_truncated_or_padded_bytes_fail_as_in_the_full_decode(cut: int) -> None:
    projection = MapProjection(SERDE, TOPICS.scores, "features", WANTED)
    data = SERDE.encode(TOPICS.scores, record({n: 1.0 for n in FEATURE_NAMES}))
    projection(data)  # the layout is known
    for broken in (data[:cut], data + b"\x00"):
        with pytest.raises(DecodeError) as mine:
            projection(broken)
        with pytest.raises(DecodeError) as theirs:
            SERDE.decode(TOPICS.scores, broken)
        assert mine.value.reason == theirs.value.reason


def test_other_schema_ids_and_framing_go_to_the_serde() -> None:
    projection = MapProjection(SERDE, TOPICS.scores, "features", WANTED)
    data = SERDE.encode(TOPICS.scores, record({"days_since_open": 2.0}))
    unknown = data[:1] + struct.pack(">I", 12345) + data[5:]
    with pytest.raises(DecodeError) as err:
        projection(unknown)
    assert err.value.reason == "unknown_schema_id"
    with pytest.raises(DecodeError):
        projection(b"\x01" + data[1:])  # bad magic byte
    with pytest.raises(DecodeError):
        projection(None)
    merges = SERDE.encode(
        TOPICS.merges,
        {
            "merge_id": "m",
            "survivor_id": "a",
            "absorbed_ids": ["b"],
            "cause_identifier_type": "email",
            "cause_identifier_hash": "h",
            "event_id": "e",
            "occurred_at": 1,
            "merged_at": 2,
        },
    )
    with pytest.raises(DecodeError) as err:
        projection(merges)  # another record type's schema id
    assert err.value.reason == "wrong_schema"


def test_infinite_and_negative_zero_values_come_back_exactly() -> None:
    projection = MapProjection(SERDE, TOPICS.scores, "features", WANTED)
    for value in (math.inf, -math.inf, -0.0, 5e-324):
        data = SERDE.encode(TOPICS.scores, record({"revenue_28d": value}))
        got = projection(data)["features"]["revenue_28d"]
        assert got == value and math.copysign(1, got) == math.copysign(1, value)
