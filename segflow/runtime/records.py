"""The records, callbacks and configuration of the shared loop (moved out of
:mod:`segflow.runtime.loop`, which re-exports them): what a handler receives and returns, the
hooks it may give, and :class:`LoopConfig`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from segflow.runtime.topics import Topic


class HoldPartition(Exception):  # noqa: N818 (a signal to the loop, not an error)
    """Raised by a handler for a record it cannot handle yet (it waits for something another
    input brings): the loop holds the record's (topic, partition) at it, with no outputs for
    it, and hands it to the handler again once a hook releases the partition
    (:mod:`segflow.runtime.holds`). Raise it before changing any state."""


class Incoming(NamedTuple):
    """One decoded input record (a NamedTuple: cheap to build once per record). ``value`` is
    None only for a tombstone of a source the handler asked for (``LoopConfig.tombstones``);
    the loop drops every other compacted input's tombstones before the handler."""

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


#: (topic name, partition, offset after the last record read) -> the offset to commit
#: (``ProcessingLoop(commit_point=...)``: a service that buffers records past a batch commits
#: the offset of its oldest buffered one, so a new owner reads it again).
CommitPoint = Callable[[str, int, int], int]


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
    # Optional: ``before_revoke(partitions: set[int], timeout: float) -> int``, called when a
    # rebalance takes partitions away (not when they are lost, not when the loop closes):
    # finish the work under way for them within ``timeout`` seconds, return how much could
    # not finish; the loop then runs one tick, whose transaction commits what finished while
    # this instance still owns the partitions (the service needs a ``tick``).
    # Optional: ``releases() -> Iterable[tuple[str, int]]``, asked after each poll and batch,
    # and after each record while partitions are held (a handler raised ``HoldPartition``):
    # the (topic, partition) pairs to resume at their held record (segflow.runtime.holds).
    # Optional: ``urgent(topic: str, partition: int, value: bytes | None) -> bool``, asked of
    # each record read: True ends the batch being polled soon (polled in 10 ms slices, at
    # least 25 ms), so that its transaction commits early what a held partition (here or at
    # another instance) waits for.


@dataclass
class LoopConfig:
    service: str
    group_id: str
    sources: dict[str, Topic]  # topic name → registry entry
    exactly_once: bool = True
    # Stable per instance across restarts: the transactional.id (fences a zombie) and the
    # consumer's group.instance.id (static membership: a restarted instance takes its
    # partitions back at once instead of waiting out the dead member's session).
    transactional_id: str | None = None
    batch_size: int = 5000
    poll_timeout: float = 0.2
    max_idle_commit: float = 1.0
    commit_timeout: float = 30.0
    pre_commit_delay: float = 0.0  # fault injection for tests: widen the open-transaction window
    # A commit blocked longer than this exits the process (status 75) so the supervisor
    # restarts it: librdkafka's send_offsets_to_transaction can ignore its timeout when the
    # coordinator dies (confluentinc/librdkafka#5456, #5511). Fencing keeps this safe.
    stuck_timeout: float = 120.0
    # Periodic work without input (timers, time-driven refreshes): ``tick()`` is called at
    # most every ``tick_interval`` seconds and its outputs commit in their own transaction.
    tick_interval: float = 1.0
    # On a clean stop, how long hooks may take to finish work under way (see ``drain``).
    drain_timeout: float = 10.0
    consumer_overrides: dict[str, Any] = field(default_factory=dict)
    producer_overrides: dict[str, Any] = field(default_factory=dict)
    # Per source topic name, a decoder to use instead of the serde's full decode (e.g. a
    # ``runtime.projection.MapProjection`` that reads only the map keys the service uses). It
    # raises ``DecodeError`` for undecodable bytes, as the serde does.
    decoders: dict[str, Callable[[bytes | None], dict[str, Any]]] = field(default_factory=dict)
    # Source topic names left out of the co-partitioning check: a one-partition input read
    # by the member that the range assignor gives partition 0 (the one that also owns
    # partition 0 of every other input), e.g. the scorer's examples topic for its learner.
    uncopartitioned: tuple[str, ...] = ()
    # Compacted source topic names whose tombstones the handler receives (``Incoming`` with
    # ``value`` None, headers as produced); other compacted inputs' tombstones are dropped
    # before the handler (the key was deleted upstream). The segmenter asks for the scores
    # topic's: the scorer's tombstone of a merged-away id says where it went (below).
    tombstones: tuple[str, ...] = ()


#: Headers of a tombstone that deletes a key because it was merged into another one: the
#: survivor's key and the merge's event time (epoch ms, decimal). The scorer writes them on
#: an absorbed id's score tombstone, after all that id's scores in its partition; the
#: segmenter retires the id there (services/segmenter/README.md, "Running N instances").
MERGED_INTO = "segflow-merged-into"
MERGED_AT = "segflow-merged-at"


def merge_headers(survivor: str, at: int) -> list[tuple[str, bytes]]:
    """The headers of a tombstone for a key merged into ``survivor`` at ``at``.

    >>> merge_headers("c-1", 1_700_000_000_000)
    [('segflow-merged-into', b'c-1'), ('segflow-merged-at', b'1700000000000')]
    """
    return [(MERGED_INTO, survivor.encode()), (MERGED_AT, str(at).encode())]


def merged_into(headers: list[tuple[str, bytes | None]] | None) -> tuple[str, int] | None:
    """(survivor, merge time) from a tombstone's headers; None when they do not say (a
    forget, a writer from before the headers, or unreadable values).

    >>> merged_into(merge_headers("c-1", 5))
    ('c-1', 5)
    >>> merged_into([("segflow-merged-into", b"c-1")]), merged_into(None)
    (None, None)
    """
    found = dict(headers or [])
    survivor, at = found.get(MERGED_INTO), found.get(MERGED_AT)
    if not survivor or not at or not at.isdigit():
        return None
    return survivor.decode(), int(at)
