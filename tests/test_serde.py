"""Avro serde in the Confluent wire format: ids, evolution, errors, registry."""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastavro import schemaless_writer

from segflow.errors import DecodeError, InvalidRecord
from segflow.runtime.registry import RegistryClient
from segflow.runtime.serde import SCHEMAS_DIR, SchemaStore, Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS

EVENT = {
    "event_id": "e1",
    "event_type": "login",
    "occurred_at": 1_700_000_000_000,
    "user_id": "u1",
    "properties": {"zip": "10115"},
}


def test_local_ids_are_deterministic_across_instances() -> None:
    a, b = Serde(SchemaStore.from_dir()), Serde(SchemaStore.from_dir())
    assert a.encode(TOPICS.events, EVENT) == b.encode(TOPICS.events, EVENT)
    ids = {a.schema_id(t) for t in TOPICS}
    assert len(ids) == len(TOPICS)  # one distinct id per record type


def test_wire_format_header() -> None:
    serde = Serde(SchemaStore.from_dir())
    data = serde.encode(TOPICS.events, EVENT)
    magic, sid = struct.unpack(">bI", data[:5])
    assert magic == 0 and sid == serde.schema_id(TOPICS.events)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "undecodable"),
        (b"\x01\x00\x00\x00\x01abc", "undecodable"),
        (b"\x00\x00\x00\x00\x07abc", "unknown_schema_id"),
        (None, "undecodable"),
    ],
)
def test_bad_bytes_raise_decode_errors_with_reasons(data: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        Serde(SchemaStore.from_dir()).decode(TOPICS.events, data)
    assert info.value.reason == reason


def test_truncated_and_trailing_bodies_are_undecodable() -> None:
    serde = Serde(SchemaStore.from_dir())
    data = serde.encode(TOPICS.events, EVENT)
    for broken in (data[:-3], data + b"\x00\x00"):
        with pytest.raises(DecodeError, match="Avro body|trailing"):
            serde.decode(TOPICS.events, broken)


def test_a_value_of_another_record_type_is_rejected() -> None:
    serde = Serde(SchemaStore.from_dir())
    merge = json.loads((SCHEMAS_DIR / "examples" / "io.segflow.IdentityMerge.json").read_text())
    with pytest.raises(DecodeError) as info:
        serde.decode(TOPICS.events, serde.encode(TOPICS.merges, merge))
    assert info.value.reason == "wrong_schema"


def test_encoding_a_record_missing_a_required_field_names_the_field() -> None:
    serde = Serde(SchemaStore.from_dir())
    with pytest.raises(InvalidRecord, match="event_type"):
        serde.encode(TOPICS.events, {"event_id": "e1", "occurred_at": 1, "user_id": "u"})


def test_old_writer_schema_in_archive_is_resolved_to_the_current_reader(tmp_path: Path) -> None:
    schemas = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, schemas)
    current = json.loads((schemas / "io.segflow.BehaviorEvent.avsc").read_text())
    old = {**current, "fields": [f for f in current["fields"] if f["name"] != "variant"]}
    (schemas / "archive" / "v0").mkdir(parents=True)
    (schemas / "archive" / "v0" / "io.segflow.BehaviorEvent.avsc").write_text(json.dumps(old))
    store = SchemaStore.from_dir(schemas)
    serde = Serde(store)
    old_version = next(v for v in store.by_local_id.values() if v.path and "archive" in str(v.path))
    # A producer still on the old schema writes under the old schema's id...
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, old_version.local_id))
    schemaless_writer(buf, old_version.parsed, EVENT)
    # ...and a consumer on the current schema reads it, the new field at its default.
    out = serde.decode(TOPICS.events, buf.getvalue())
    assert out["variant"] is None and out["user_id"] == "u1"


def test_registry_ids_are_used_when_a_registry_is_configured() -> None:
    calls: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if request.method == "POST":
            body: dict[str, Any] = json.loads(request.content)
            assert json.loads(body["schema"])["name"] == "io.segflow.BehaviorEvent"
            return httpx.Response(200, json={"id": 42})
        return httpx.Response(404, json={"error_code": 40403})

    registry = RegistryClient(
        "http://registry.test", httpx.Client(transport=httpx.MockTransport(handler))
    )
    serde = Serde(SchemaStore.from_dir(), registry, topic_prefix="acme.")
    data = serde.encode(TOPICS.events, EVENT)
    serde.encode(TOPICS.events, EVENT)
    assert struct.unpack(">bI", data[:5]) == (0, 42)
    assert calls == [("POST", "/subjects/acme.events-value/versions")]  # cached after the first
    assert serde.decode(TOPICS.events, data)["event_id"] == "e1"


def test_settings_never_show_secrets() -> None:
    s = Settings(
        bootstrap_servers="h:1",
        hash_secret="topsecret",
        kafka_password="pw",
        schema_registry_password="regpw",
    )
    text = repr(s) + str(s) + str(s.model_dump())
    assert "topsecret" not in text and "regpw" not in text
    assert s.kafka_config()["sasl.password"] == "pw"


def test_kafka_bootstrap_env_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "10.0.0.1:9092")
    assert Settings().bootstrap_servers == "10.0.0.1:9092"
    monkeypatch.setenv("SEGFLOW_KAFKA_EXTRA", "security.protocol=SASL_SSL, sasl.mechanism=PLAIN")
    conf = Settings().kafka_config()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "PLAIN"


def test_written_with_current_tells_the_current_schema_from_others() -> None:
    serde = Serde(SchemaStore.from_dir())
    event = json.loads((SCHEMAS_DIR / "examples" / "io.segflow.BehaviorEvent.json").read_text())
    data = serde.encode(TOPICS.events, event)
    assert serde.written_with_current(TOPICS.events, data)
    assert not serde.written_with_current(TOPICS.identified, data)  # another topic's schema
    unknown = data[:1] + struct.pack(">I", 7) + data[5:]
    assert not serde.written_with_current(TOPICS.events, unknown)
