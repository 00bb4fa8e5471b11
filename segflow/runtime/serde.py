"""Avro in the Confluent wire format: magic byte 0, a 4-byte big-endian schema id, the body.

Schema ids come from a Confluent-compatible schema registry when one is configured
(``SEGFLOW_SCHEMA_REGISTRY_URL``); otherwise they are derived deterministically from the
project's schema files (31 bits of the schema's CRC-64-AVRO fingerprint), so every process
built from the same ``schemas/`` agrees without a registry.

Records are plain dicts. Logical types are read and written as their primitive values
(``timestamp-millis`` is an ``int`` of epoch milliseconds), which keeps the cores free of
datetime handling; the bytes on the wire are the same either way.

>>> serde = Serde(SchemaStore.from_dir())
>>> from segflow.runtime.topics import TOPICS
>>> ev = {"event_id": "e1", "event_type": "login", "occurred_at": 1700000000000,
...       "user_id": "u1"}
>>> data = serde.encode(TOPICS.events, ev)
>>> data[0], len(data) > 5
(0, True)
>>> out = serde.decode(TOPICS.events, data)
>>> out["user_id"], out["occurred_at"], out["properties"]
('u1', 1700000000000, {})
"""

from __future__ import annotations

import copy
import io
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import (
    expand_schema,
    fingerprint,
    load_schema,
    to_parsing_canonical_form,
)
from fastavro.validation import validate

from segflow.errors import ConfigError, DecodeError, InvalidRecord

if TYPE_CHECKING:
    from segflow.runtime.registry import RegistryClient
    from segflow.runtime.settings import Settings
    from segflow.runtime.topics import Topic

MAGIC = 0
_HEADER = struct.Struct(">bI")
SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"


def _strip_logical_types(schema: Any) -> Any:
    """A copy of ``schema`` with every ``logicalType`` removed (same wire encoding)."""
    if isinstance(schema, dict):
        return {k: _strip_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_strip_logical_types(v) for v in schema]
    return schema


def local_schema_id(schema: dict[str, Any]) -> int:
    """Deterministic schema id: 31 bits of the CRC-64-AVRO fingerprint of the canonical form.

    >>> local_schema_id({"type": "record", "name": "X", "fields": []})
    1474642113
    """
    fp = fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    return int(fp, 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class SchemaVersion:
    """One schema version: its full name, expanded JSON and fastavro-parsed forms."""

    full_name: str
    schema: dict[str, Any]  # expanded, standalone JSON (what a registry stores)
    parsed: Any  # parsed without logical types, for reading and writing
    local_id: int
    path: Path | None = None

    @classmethod
    def from_json(cls, schema: dict[str, Any], path: Path | None = None) -> SchemaVersion:
        expanded = cast(dict[str, Any], expand_schema(schema))
        name = str(expanded.get("name", ""))
        ns = expanded.get("namespace")
        full_name = name if "." in name or not ns else f"{ns}.{name}"
        parsed = parse_schema(_strip_logical_types(copy.deepcopy(expanded)))
        return cls(full_name, expanded, parsed, local_schema_id(expanded), path)


class SchemaStore:
    """All schema versions segflow knows: the current files plus ``schemas/archive/``."""

    def __init__(self, current: dict[str, SchemaVersion], archived: list[SchemaVersion]) -> None:
        self.current = current
        self.by_local_id: dict[int, SchemaVersion] = {}
        for version in [*archived, *current.values()]:
            self.by_local_id[version.local_id] = version

    @classmethod
    def from_dir(cls, directory: Path = SCHEMAS_DIR) -> SchemaStore:
        current: dict[str, SchemaVersion] = {}
        for path in sorted(directory.glob("*.avsc")):
            version = cls._load(path)
            if version.full_name != path.name.removesuffix(".avsc"):
                raise ConfigError(f"{path}: file name must be the record's full name")
            current[version.full_name] = version
        archived = [cls._load(p) for p in sorted((directory / "archive").glob("*/*.avsc"))]
        if not current:
            raise ConfigError(f"no .avsc schemas found in {directory}")
        return cls(current, archived)

    @staticmethod
    def _load(path: Path) -> SchemaVersion:
        try:
            schema = load_schema(str(path), _write_hint=False)
        except Exception as exc:  # fastavro raises several types for bad schemas
            raise ConfigError(f"{path}: invalid Avro schema: {exc}") from exc
        return SchemaVersion.from_json(cast(dict[str, Any], schema), path)

    def get(self, full_name: str) -> SchemaVersion:
        try:
            return self.current[full_name]
        except KeyError:
            raise ConfigError(f"no schema named {full_name!r} in schemas/") from None

    def __iter__(self) -> Iterator[SchemaVersion]:
        return iter(self.current.values())


class Serde:
    """Encode and decode topic values in the Confluent wire format."""

    def __init__(
        self,
        store: SchemaStore,
        registry: RegistryClient | None = None,
        topic_prefix: str = "segflow.",
    ) -> None:
        self.store = store
        self.registry = registry
        self.topic_prefix = topic_prefix
        self._write_ids: dict[str, int] = {}
        self._readers: dict[int, SchemaVersion] = dict(store.by_local_id)
        self._current: dict[tuple[str, bytes], bool] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Serde:
        registry = None
        if settings.schema_registry_url:
            from segflow.runtime.registry import RegistryClient

            registry = RegistryClient.from_settings(settings)
        return cls(SchemaStore.from_dir(settings.schemas_dir), registry, settings.topic_prefix)

    # -- writing ---------------------------------------------------------------------
    def schema_id(self, topic: Topic) -> int:
        """The id written in front of values of ``topic`` (registered on first use)."""
        sid = self._write_ids.get(topic.value)
        if sid is None:
            version = self.store.get(topic.value)
            if self.registry is None:
                sid = version.local_id
            else:
                subject = f"{topic.name_with(self.topic_prefix)}-value"
                sid = self.registry.register(subject, version.schema)
                self._readers[sid] = version
            self._write_ids[topic.value] = sid
        return sid

    def encode(self, topic: Topic, record: dict[str, Any]) -> bytes:
        """Encode ``record`` with the current schema of ``topic``'s values."""
        return self.encode_record(topic.value, record, self.schema_id(topic))

    def encode_record(self, full_name: str, record: dict[str, Any], schema_id: int) -> bytes:
        version = self.store.get(full_name)
        buf = io.BytesIO()
        buf.write(_HEADER.pack(MAGIC, schema_id))
        try:
            schemaless_writer(buf, version.parsed, record)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            raise InvalidRecord(self._why_invalid(version, record, exc)) from exc
        return buf.getvalue()

    @staticmethod
    def _why_invalid(version: SchemaVersion, record: Any, exc: Exception) -> str:
        try:
            validate(record, version.parsed, raise_errors=True)
        except Exception as verr:  # ValidationError lists the failing fields
            return f"{version.full_name}: {verr}"
        return f"{version.full_name}: {exc}"

    # -- reading ---------------------------------------------------------------------
    def decode(self, topic: Topic, data: bytes | None) -> dict[str, Any]:
        """Decode a value of ``topic``, resolving an older writer schema to the current one."""
        if data is None:
            raise DecodeError("value is empty (tombstone)", reason="undecodable")
        if len(data) < 5 or data[0] != MAGIC:
            raise DecodeError("not Confluent wire format (bad magic byte)", reason="undecodable")
        _, sid = _HEADER.unpack_from(data)
        writer = self._writer(sid)
        reader = self.store.get(topic.value)
        if writer.full_name != reader.full_name:
            raise DecodeError(
                f"schema id {sid} is {writer.full_name}, expected {reader.full_name}",
                reason="wrong_schema",
            )
        fo = io.BytesIO(data)
        fo.seek(5)
        try:
            if writer is reader:
                record = schemaless_reader(fo, writer.parsed, None)
            else:
                record = schemaless_reader(fo, writer.parsed, reader.parsed)
        except Exception as exc:  # EOFError, UnicodeDecodeError, IndexError, SchemaResolution...
            raise DecodeError(
                f"Avro body does not match schema id {sid}: {type(exc).__name__}: {exc}",
                reason="undecodable",
            ) from exc
        if fo.tell() != len(data):
            raise DecodeError(
                f"{len(data) - fo.tell()} trailing bytes after the record", reason="undecodable"
            )
        if not isinstance(record, dict):
            raise DecodeError("decoded value is not a record", reason="undecodable")
        return record

    def written_with_current(self, topic: Topic, data: bytes) -> bool:
        """Whether wire-format ``data`` was written with ``topic``'s current schema (so its
        bytes can be read or spliced by that schema's layout); unknown ids answer False."""
        sid = bytes(data[1:5])
        key = (topic.value, sid)
        current = self._current.get(key)
        if current is None:
            try:
                writer: SchemaVersion | None = self._writer(int.from_bytes(sid, "big"))
            except DecodeError:
                writer = None
            current = self._current[key] = writer is self.store.get(topic.value)
        return current

    def _writer(self, sid: int) -> SchemaVersion:
        version = self._readers.get(sid)
        if version is None and self.registry is not None:
            try:
                schema = self.registry.schema_by_id(sid)
            except Exception as exc:
                raise DecodeError(f"schema id {sid}: {exc}", reason="unknown_schema_id") from exc
            version = SchemaVersion.from_json(schema)
            self._readers[sid] = version
        if version is None:
            raise DecodeError(f"unknown schema id {sid}", reason="unknown_schema_id")
        return version


def encode_key(topic: Topic, key: str | bytes | None) -> bytes | None:
    """Keys are UTF-8 strings (or raw bytes for ``key: bytes`` topics)."""
    if key is None or isinstance(key, bytes):
        return key
    return key.encode()


def decode_key(topic: Topic, key: bytes | None) -> str | bytes | None:
    if key is None or topic.key == "bytes":
        return key
    try:
        return key.decode()
    except UnicodeDecodeError as exc:
        raise DecodeError("key is not UTF-8", reason="undecodable") from exc


def schema_json(version: SchemaVersion) -> str:
    """The expanded schema as compact JSON, as sent to a registry."""
    return json.dumps(version.schema, separators=(",", ":"))
