"""A Faust codec over the shared :class:`~segflow.runtime.serde.Serde`.

Faust topics and tables then read and write exactly what the rest of segflow does: Avro of
the registry's schema in the Confluent wire format (magic byte, schema id, body), records as
plain dicts. Register one codec per topic entry and pass it as ``value_serializer``::

    codec = register(serde, TOPICS.scores)          # name "segflow:scores"
    topic = app.topic(TOPICS.scores.name(settings), value_serializer=codec.name)
    table = app.Table("memberships", value_serializer=register(serde, TOPICS.scores).name)

>>> from segflow.runtime.serde import SchemaStore, Serde
>>> from segflow.runtime.topics import TOPICS
>>> codec = AvroCodec(Serde(SchemaStore.from_dir()), TOPICS.merges)
>>> merge = {"merge_id": "m1", "survivor_id": "a", "absorbed_ids": ["b"],
...          "cause_identifier_type": "email", "cause_identifier_hash": "h", "event_id": "e",
...          "occurred_at": 1, "merged_at": 2}
>>> data = codec.dumps(merge)
>>> data[0], codec.loads(data) == merge
(0, True)
"""

from __future__ import annotations

from typing import Any

from faust.serializers import codecs
from faust.types.codecs import CodecT

from segflow.runtime.serde import Serde
from segflow.runtime.topics import Topic


class AvroCodec(codecs.Codec):
    """Encode dicts as Confluent-framed Avro of ``topic``'s value schema, and back."""

    def __init__(self, serde: Serde, topic: Topic, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.serde = serde
        self.topic = topic

    def _dumps(self, obj: Any) -> bytes:
        return self.serde.encode(self.topic, obj)

    def _loads(self, s: bytes) -> Any:
        return self.serde.decode(self.topic, s)

    def clone(self, *children: CodecT) -> CodecT:
        new = type(self)(self.serde, self.topic, children=(*self.children, *children))
        return new


def register(serde: Serde, topic: Topic, name: str | None = None) -> AvroCodec:
    """Create the codec for ``topic`` and register it with Faust under ``name``."""
    codec = AvroCodec(serde, topic)
    codec.name = name or f"segflow:{topic.key_name}"  # type: ignore[attr-defined]
    codecs.register(codec.name, codec)  # type: ignore[attr-defined]
    return codec
