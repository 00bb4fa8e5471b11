"""Avro serde in the Confluent wire format: ids, evolution, errors, registry."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer

from segflow.errors import ConfigError, DecodeError, InvalidRecord, RetryableError
from segflow.runtime.broker import free_port
from segflow.runtime.contract import example_record
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


def test_every_archived_writer_schema_is_resolved_to_the_current_reader(tmp_path: Path) -> None:
    """Every version under ``schemas/archive/`` (the repository's own, plus an old
    BehaviorEvent without ``variant`` added here): a producer still on it writes its example
    record under its id, and a consumer on the current schema reads every field it wrote and
    the fields added since at their defaults."""
    schemas = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, schemas)
    current = json.loads((schemas / "io.segflow.BehaviorEvent.avsc").read_text())
    old = {**current, "fields": [f for f in current["fields"] if f["name"] != "variant"]}
    (schemas / "archive" / "v0").mkdir(parents=True)
    (schemas / "archive" / "v0" / "io.segflow.BehaviorEvent.avsc").write_text(json.dumps(old))
    store = SchemaStore.from_dir(schemas)
    serde = Serde(store)
    archived = [v for v in store.by_local_id.values() if v.path and "archive" in v.path.parts]
    assert sorted(str(v.path) for v in archived) == sorted(
        str(path) for path in (schemas / "archive").glob("*/*.avsc")
    )
    assert len(archived) >= 2  # the one added here and the repository's
    topic_of = {t.value: t for t in TOPICS}
    for version in archived:
        example = example_record(  # bytes fields: JSON strings in the example files
            version.schema,
            json.loads((schemas / "examples" / f"{version.full_name}.json").read_text()),
        )
        names = {f["name"] for f in version.schema["fields"]}
        buf = io.BytesIO()
        buf.write(struct.pack(">bI", 0, version.local_id))
        schemaless_writer(buf, version.parsed, {k: v for k, v in example.items() if k in names})
        written = schemaless_reader(io.BytesIO(buf.getvalue()[5:]), version.parsed)
        out = serde.decode(topic_of[version.full_name], buf.getvalue())
        for field in store.current[version.full_name].schema["fields"]:
            name = field["name"]
            want = written[name] if name in names else field["default"]
            assert out[name] == want, f"{version.path}: {name}"
    v0 = next(v for v in archived if v.path is not None and v.path.parent.name == "v0")
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, v0.local_id))
    schemaless_writer(buf, v0.parsed, EVENT)
    out = serde.decode(TOPICS.events, buf.getvalue())
    assert out["variant"] is None and out["user_id"] == "u1"


class _Registry(BaseHTTPRequestHandler):
    """The two calls of a Confluent-compatible registry segflow makes, on 127.0.0.1."""

    calls: list[tuple[str, str, str | None]] = []
    schemas: dict[int, str] = {}

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(("POST", self.path, self.headers.get("Authorization")))
        if "Broken" in body["schema"]:
            self._answer(422, {"error_code": 42201, "message": "Invalid schema"})
            return
        self.schemas[42] = body["schema"]
        self._answer(200, {"id": 42})

    def do_GET(self) -> None:  # noqa: N802
        self.calls.append(("GET", self.path, self.headers.get("Authorization")))
        sid = int(self.path.split("?")[0].rsplit("/", 1)[1])
        if sid in self.schemas:
            self._answer(200, {"schema": self.schemas[sid]})
        else:
            self._answer(404, {"error_code": 40403, "message": "Schema not found"})

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def registry() -> Any:
    _Registry.calls, _Registry.schemas = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_registry_ids_are_used_when_a_registry_is_configured(registry: str) -> None:
    client = RegistryClient(registry, basic_auth=("svc", "pw"))
    serde = Serde(SchemaStore.from_dir(), client, topic_prefix="acme.")
    data = serde.encode(TOPICS.events, EVENT)
    serde.encode(TOPICS.events, EVENT)
    assert struct.unpack(">bI", data[:5]) == (0, 42)
    posts = [c for c in _Registry.calls if c[0] == "POST"]
    assert [p[1].split("?")[0] for p in posts] == ["/subjects/acme.events-value/versions"]  # cached
    assert posts[0][2] == "Basic " + base64.b64encode(b"svc:pw").decode()
    assert json.loads(_Registry.schemas[42])["name"] == "io.segflow.BehaviorEvent"
    # A consumer that never saw id 42 fetches the writer's schema from the registry.
    reader = Serde(SchemaStore.from_dir(), RegistryClient(registry), topic_prefix="acme.")
    assert reader.decode(TOPICS.events, data)["event_id"] == "e1"
    assert any(c[0] == "GET" and c[1].startswith("/schemas/ids/42") for c in _Registry.calls)


def test_registry_refusals_and_outages_are_told_apart(registry: str) -> None:
    client = RegistryClient(registry)
    with pytest.raises(ConfigError, match="HTTP 422: Invalid schema"):
        client.register("x-value", {"type": "record", "name": "Broken", "fields": []})
    with pytest.raises(ConfigError, match="HTTP 404"):
        client.schema_by_id(7)
    with pytest.raises(RetryableError, match="unreachable"):
        RegistryClient(f"http://127.0.0.1:{free_port()}").schema_by_id(1)


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
