"""The Avro contract in schemas/: parses, examples validate, stays backward compatible."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from segflow.runtime.contract import (
    backward_problems,
    check_all,
    committed_versions,
    example_record,
    named_types,
)
from segflow.runtime.serde import SCHEMAS_DIR, SchemaStore, Serde
from segflow.runtime.topics import TOPICS, load

SCHEMA_FILES = sorted(SCHEMAS_DIR.glob("*.avsc"))
SPEC_RECORDS = {
    "io.segflow.BehaviorEvent",
    "io.segflow.IdentifiedEvent",
    "io.segflow.IdentityMerge",
    "io.segflow.CustomerScore",
    "io.segflow.SegmentChange",
    "io.segflow.DispatchResult",
    "io.segflow.DeadLetter",
}


def test_every_spec_record_has_a_schema_and_every_topic_a_known_value() -> None:
    assert {p.name.removesuffix(".avsc") for p in SCHEMA_FILES} >= SPEC_RECORDS
    assert check_all() == []
    assert {t.value for t in TOPICS} >= SPEC_RECORDS


def test_behavior_event_has_the_fields_spec_names() -> None:
    fields = {
        f["name"]: f
        for f in json.loads((SCHEMAS_DIR / "io.segflow.BehaviorEvent.avsc").read_text())["fields"]
    }
    for name in [
        "event_id",
        "event_type",
        "occurred_at",
        "user_id",
        "anonymous_id",
        "device_id",
        "email",
        "amount",
        "currency",
        "product_id",
        "feature",
        "session_seconds",
        "sentiment",
        "escalated",
        "campaign_id",
        "variant",
        "properties",
    ]:
        assert name in fields, name
    assert fields["occurred_at"]["type"]["logicalType"] == "timestamp-millis"
    assert fields["email"].get("pii") is True
    for name in ["user_id", "anonymous_id", "device_id", "email"]:
        assert fields[name]["default"] is None


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_example_round_trips_through_the_wire_format(path: Path) -> None:
    serde = Serde(SchemaStore.from_dir())
    name = path.name.removesuffix(".avsc")
    version = serde.store.get(name)
    example = example_record(
        version.schema, json.loads((SCHEMAS_DIR / "examples" / f"{name}.json").read_text())
    )
    topic = TOPICS.by_value(name)
    assert serde.decode(topic, serde.encode(topic, example)) == example


def test_check_all_reports_a_broken_example(tmp_path: Path) -> None:
    shutil.copytree(SCHEMAS_DIR, tmp_path / "schemas")
    bad = tmp_path / "schemas" / "examples" / "io.segflow.IdentityMerge.json"
    record = json.loads(bad.read_text())
    del record["survivor_id"]
    bad.write_text(json.dumps(record))
    problems = check_all(tmp_path / "schemas")
    assert len(problems) == 1 and "survivor_id" in problems[0]


@pytest.mark.parametrize(
    ("old_fields", "new_fields", "problem"),
    [
        ([{"name": "a", "type": "int"}], [{"name": "a", "type": "long"}], None),
        (
            [{"name": "a", "type": "long"}],
            [{"name": "a", "type": "int"}],
            "long cannot be read as int",
        ),
        ([{"name": "a", "type": "string"}], [{"name": "a", "type": ["null", "string"]}], None),
        (
            [{"name": "a", "type": ["null", "string"]}],
            [{"name": "a", "type": "string"}],
            "null cannot be read as string",
        ),
        ([], [{"name": "b", "type": "string", "default": "x"}], None),
        ([], [{"name": "b", "type": "string"}], "added without a default"),
        ([{"name": "a", "type": "int"}], [], None),  # removing a field is fine for readers
        (
            [{"name": "old", "type": "int"}],
            [{"name": "new", "type": "int", "aliases": ["old"]}],
            None,
        ),
        (
            [{"name": "m", "type": {"type": "map", "values": "int"}}],
            [{"name": "m", "type": {"type": "map", "values": "string"}}],
            "int cannot be read as string",
        ),
    ],
)
def test_backward_compatibility_rules(old_fields, new_fields, problem) -> None:  # type: ignore[no-untyped-def]
    old = {"type": "record", "name": "R", "fields": old_fields}
    new = {"type": "record", "name": "R", "fields": new_fields}
    problems = backward_problems(old, new)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems


def _in_git_checkout() -> bool:
    probe = subprocess.run(
        ["git", "-C", str(SCHEMAS_DIR), "rev-parse", "--git-dir"], capture_output=True, check=False
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _in_git_checkout(), reason="schema history needs a git checkout")
@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_schema_is_backward_compatible_with_every_committed_version(path: Path) -> None:
    named = named_types()
    versions = [*committed_versions(path), json.loads(path.read_text())]
    for older, newer in zip(versions, versions[1:], strict=False):
        assert backward_problems(older, newer, named) == []


def test_topic_registry_rejects_a_bad_cleanup_policy(tmp_path: Path) -> None:
    from segflow.errors import ConfigError

    bad = tmp_path / "topics.yaml"
    bad.write_text(
        "topics:\n  x: {name: x, key: string, value: V, partitions: 1, cleanup: forever}\n"
    )
    with pytest.raises(ConfigError, match="unknown cleanup 'forever'"):
        load(bad)


def test_stateful_topics_are_compacted() -> None:
    assert TOPICS.scores.cleanup == "compact"
    assert TOPICS.merges.cleanup == "compact"
    assert TOPICS.events.cleanup == "delete"
