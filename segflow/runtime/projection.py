"""Decoding a record while reading only some keys of one of its ``map<double>`` fields.

A ``CustomerScore`` carries every feature the scorer computes (about 180 map entries) and the
segmenter reads the twenty or so its definitions use. Decoding the whole map builds a Python
string and float per entry, most of the decoding time. :class:`MapProjection` decodes the fields
before and after the map with fastavro and reads the wanted entries of the map in place:

* the first value with a new map *layout* (entry count, key lengths and key bytes) is walked
  entry by entry and the layout remembered: where each key's 8-byte value sits;
* a later value is checked against the remembered layout with one vectorised comparison of
  every byte that is not a value (the count, each key's length byte and bytes, the end
  marker). Equal bytes there mean that walking this value would visit the very same positions
  (each step only depends on those bytes), so the wanted values are read at the remembered
  offsets;
* anything else (another writer schema id, a map in several blocks or with keys of 64 bytes or
  more, a value that does not match) goes through the full decode of
  :meth:`~segflow.runtime.serde.Serde.decode`, which also raises the same
  :class:`~segflow.errors.DecodeError` for undecodable bytes.

The result is the full decode's dict with the map reduced to the wanted keys it holds.
"""

from __future__ import annotations

import copy
import io
import struct
from collections.abc import Collection
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from fastavro import parse_schema, schemaless_reader

from segflow.errors import DecodeError
from segflow.runtime.serde import MAGIC, Serde, _strip_logical_types
from segflow.runtime.topics import Topic

_HEADER = struct.Struct(">bI")
_DOUBLE = struct.Struct("<d")


class _Layout:
    """Where a map's non-value bytes are (relative to its start) and what they hold."""

    __slots__ = ("positions", "expected", "offsets", "size")

    def __init__(
        self, positions: list[int], expected: bytes, offsets: dict[str, int], size: int
    ) -> None:
        self.positions: npt.NDArray[np.intp] = np.array(positions, dtype=np.intp)
        self.expected: npt.NDArray[np.uint8] = np.frombuffer(expected, dtype=np.uint8)
        self.offsets = offsets  # key -> offset of its value
        self.size = size  # bytes of the whole map, end marker included


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint (Avro int/long) at ``pos``: (value, position after it)."""
    shift = 0
    n = 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7


def walk(data: bytes, start: int) -> _Layout | None:
    """The layout of the ``map<double>`` at ``start``, or None when it is not cacheable (several
    blocks, a block with a byte size, a key of 64 bytes or more).

    >>> import fastavro, io
    >>> buf = io.BytesIO()
    >>> fastavro.schemaless_writer(buf, {"type": "map", "values": "double"}, {"a": 1.0, "bc": 2.0})
    >>> lay = walk(buf.getvalue(), 0)
    >>> sorted(lay.offsets.items()), lay.size == len(buf.getvalue())
    ([('a', 3), ('bc', 14)], True)
    """
    n, pos = _varint(data, start)
    positions = list(range(start, pos))
    offsets: dict[str, int] = {}
    if n < 0:
        return None
    for _ in range(n):
        length = data[pos]
        if length >= 0x80 or length & 1:  # a multi-byte or negative length
            return None
        key_end = pos + 1 + (length >> 1)
        positions.extend(range(pos, key_end))
        offsets[data[pos + 1 : key_end].decode()] = key_end - start
        pos = key_end + 8
    if n:
        if data[pos] != 0:  # more blocks follow
            return None
        positions.append(pos)
        pos += 1
    if pos > len(data):
        return None
    expected = bytes(data[p] for p in positions)
    return _Layout([p - start for p in positions], expected, offsets, pos - start)


class MapProjection:
    """Decode values of ``topic`` reading only ``keys`` of its ``map<double>`` field ``field``.

    ``keys`` may be replaced at any time (e.g. when a service reloads what it reads).
    """

    def __init__(self, serde: Serde, topic: Topic, field: str, keys: Collection[str]) -> None:
        self.serde = serde
        self.topic = topic
        self.field = field
        self.keys = frozenset(keys)
        version = serde.store.get(topic.value)
        fields = version.schema["fields"]
        names = [f["name"] for f in fields]
        if field not in names:
            raise ValueError(f"{version.full_name} has no field {field!r}")
        i = names.index(field)
        if fields[i]["type"] != {"type": "map", "values": "double"}:
            raise ValueError(f"{version.full_name}.{field} is not a map of doubles")
        namespace = version.full_name.rpartition(".")[0]
        self._prefix = self._part(namespace, "Prefix", fields[:i])
        self._suffix = self._part(namespace, "Suffix", fields[i + 1 :])
        self._local_id = version.local_id
        self._current: dict[int, bool] = {}  # schema id -> written with the current schema
        self._layout: _Layout | None = None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _part(namespace: str, name: str, fields: list[dict[str, Any]]) -> Any:
        schema = {
            "type": "record",
            "name": f"_Projection{name}",
            "namespace": namespace,
            "fields": copy.deepcopy(fields),
        }
        return parse_schema(_strip_logical_types(schema), named_schemas={})

    def __call__(self, data: bytes | None) -> dict[str, Any]:
        if data is None or len(data) < 5 or data[0] != MAGIC:
            return self.serde.decode(self.topic, data)  # raises its DecodeError
        sid = _HEADER.unpack_from(data)[1]
        current = self._current.get(sid)
        if current is None:
            try:
                current = self.serde._writer(sid).local_id == self._local_id
            except DecodeError:
                current = False
            self._current[sid] = current
        if not current:
            return self._full(data)  # an older writer schema (or none): the serde decides
        try:
            fo = io.BytesIO(data)
            fo.seek(5)
            head = cast(dict[str, Any], schemaless_reader(fo, self._prefix, None))
            start = fo.tell()
            layout = self._layout
            if layout is None or not self._matches(layout, data, start):
                layout = walk(data, start)
                if layout is None:
                    return self._full(data)
                self._layout = layout
                self.misses += 1
            else:
                self.hits += 1
            offsets = layout.offsets
            values: dict[str, float] = {}
            for key in self.keys:
                offset = offsets.get(key)
                if offset is not None:
                    values[key] = _DOUBLE.unpack_from(data, start + offset)[0]
            fo.seek(start + layout.size)
            tail = cast(dict[str, Any], schemaless_reader(fo, self._suffix, None))
            if fo.tell() != len(data):
                raise DecodeError(f"{len(data) - fo.tell()} trailing bytes after the record")
        except (EOFError, IndexError, ValueError, UnicodeDecodeError, struct.error):
            return self._full(data)  # the full decode says what is wrong with it
        head[self.field] = values
        head.update(tail)
        return head

    @staticmethod
    def _matches(layout: _Layout, data: bytes, start: int) -> bool:
        if start + layout.size > len(data):
            return False
        buf = np.frombuffer(data, dtype=np.uint8)
        return bool(np.array_equal(buf[layout.positions + start], layout.expected))

    def _full(self, data: bytes) -> dict[str, Any]:
        record = self.serde.decode(self.topic, data)
        values = record.get(self.field) or {}
        record[self.field] = {k: values[k] for k in self.keys if k in values}
        return record
