"""The records and callbacks of the shared loop (moved out of :mod:`segflow.runtime.loop`,
which re-exports them): what a handler receives and returns, and the hooks it may give."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

from segflow.runtime.topics import Topic


class Incoming(NamedTuple):
    """One decoded input record (a NamedTuple: cheap to build once per record)."""

    topic: Topic
    topic_name: str
    partition: int
    offset: int
    key: str | bytes | None
    value: dict[str, Any]
    timestamp_ms: int | None
    headers: list[tuple[str, bytes | None]]
    #: The value's bytes as consumed (wire format), for handlers that pass them on.
    raw: bytes | None = None


class Output(NamedTuple):
    """One record to produce: ``value`` None is a tombstone (compacted topics); ``bytes`` are
    a value already encoded in the wire format of ``topic``'s schema (produced as they are)."""

    topic: Topic
    key: str | bytes | None
    value: dict[str, Any] | bytes | None
    topic_name: str | None = None  # overrides the registry name (tests, custom prefixes)
    headers: list[tuple[str, bytes]] | None = None
    #: An explicit partition (a changelog record goes to its state's partition); None: the
    #: key's (librdkafka's default partitioner).
    partition: int | None = None


class BatchInfo(NamedTuple):
    """A batch about to be handled, for handlers that track how far each input has been read
    (e.g. an event-time clock that must not run ahead of a partition with unread data)."""

    #: Records of each input (topic, partition) in the batch.
    counts: dict[tuple[str, int], int]
    #: Every assigned input partition: records after this batch that the consumer has not
    #: read yet (cached high watermark minus position), or None while unknown.
    lag: dict[tuple[str, int], int | None]


class Handler(Protocol):
    """Turns one input record into the records to produce."""

    def __call__(self, record: Incoming) -> Iterable[Output]: ...


class Hooks(Protocol):
    """Optional callbacks for stateful handlers."""

    def on_abort(self) -> None:
        """The open transaction was aborted: drop state changed since the last commit."""

    def on_commit(self) -> None:
        """The batch's outputs and offsets were committed."""

    # Optional: ``before_commit() -> Iterable[Output]``, called once per batch just before the
    # commit; its outputs join the batch's transaction (e.g. one state record per batch
    # instead of one per input).
    # Optional: ``before_batch(batch: BatchInfo) -> None``, called with each batch before its
    # records are handled.
    # Optional: ``on_assign(partitions: set[int]) -> None`` (restore and rebuild those
    # partitions' state before their records arrive) and ``on_revoke(partitions: set[int])
    # -> None`` (drop their state and timers: another instance owns them now; also called
    # when they are lost).
