"""The dispatcher's input order under ``clock: event`` (a mixin of
:class:`services.dispatcher.app.Dispatcher`, shell): segment changes and identified events are
applied in the merged order of :mod:`services.dispatcher.merge`, not in the order the consumer
reads them, so one instance, two, and a new owner after ``kill -9`` decide alike (issue #15).

* A change or an event read is added to its partition's :class:`~merge.PartitionMerge` and
  what can go is applied at once (the handler) or at a tick (records that waited for the
  other input, or for the idle rule).
* **Idle**: a stream of a partition is idle when the consumer has read it to its end (no lag
  at the last batch or tick) and read nothing from it for ``order_idle_ms`` (the identified
  events: changes stop waiting for them) or ``changes_idle_ms`` (the changes: events and
  timers stop waiting for them).
* **Exactly once**: the identified events still waiting are written to the changelog with the
  transaction (``wait@<p>:<offset>``, kind ``waiting``, the record's bytes) and deleted by the
  one that applies them, so the identified topic's offsets are committed as read; a change
  that waits holds the changes partition's committed offset (the loop's ``commit_point``).
  The merge's mark (per stream, the order time of the last record applied and the offset
  after it; the clock) is written with the state it changed (``clock@<p>:change``, ...). A new
  owner restores the mark and the waiting events, reads on from the committed offsets and
  skips what was applied (also this instance after a rewind, or after a rebalance that kept
  the partition).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from segflow.runtime.loop import Incoming, Output
from segflow.runtime.records import BatchInfo, HoldPartition
from segflow.runtime.serde import Serde
from segflow.runtime.state import ChangelogStore
from segflow.runtime.topics import TOPICS
from services.dispatcher.merge import (
    CHANGE,
    EVENT,
    KINDS,
    NEVER,
    Entry,
    Kind,
    Mark,
    PartitionMerge,
    Wait,
)
from services.dispatcher.settings import DispatcherSettings

CLOCK_KEY = "clock"
WAIT_PREFIX = "wait@"  # + "<partition>:<offset>": an identified event waiting for its turn
#: refresh the consumer's lags for the idle rule at most this often (seconds)
LAG_REFRESH = 0.5
#: records of one topic's partition waiting in memory before the loop holds the partition
#: (resumed when half of them were applied): the identified topic is read ahead of the changes
WAIT_LIMIT = 50_000


def mark_keys(part: int) -> list[tuple[str, str]]:
    """The changelog keys of a partition's mark: (time key, next-offset key) per stream."""
    return [(f"{CLOCK_KEY}@{part}:{k}", f"{CLOCK_KEY}@{part}:{k}.next") for k in KINDS]


class Ordering:
    """Merged input order of :class:`~services.dispatcher.app.Dispatcher` (clock: event)."""

    if TYPE_CHECKING:  # provided by Dispatcher
        cfg: DispatcherSettings
        store: ChangelogStore
        changes_topic: str
        events_topic: str
        clock: Callable[[], float]
        serde: Serde
        _event_clocks: dict[int, int]

        def decode_identified(self, data: bytes | None) -> dict[str, Any]: ...

        def _apply(self, kind: Kind, item: Any, part: int, now: int) -> Iterator[Output]: ...

    def _init_ordering(self) -> None:
        self._merges: dict[int, PartitionMerge] = {}
        self._saved_marks: dict[int, Mark] = {}
        self._read_at: dict[tuple[Kind, int], float] = {}
        self._lags: dict[tuple[str, int], int | None] = {}
        self._lag_source: Callable[[], dict[tuple[str, int], int | None]] | None = None
        self._lags_at = 0.0
        self._held: set[tuple[str, int]] = set()  # input partitions held: too much waiting
        self._in_batch: set[tuple[str, int]] = set()  # partitions with records in the batch
        # offsets of the waiting events written to the changelog, per partition (committed)
        self._written: dict[int, set[int]] = {}
        self._written_committed: dict[int, set[int]] = {}

    # -- reading ---------------------------------------------------------------------------
    def _read(self, kind: Kind, record: Incoming, cid: str, at: int, item: Any) -> Iterator[Output]:
        """Add a change or an event to its partition's merge, then apply what can go."""
        part = self.store.partition_of(cid)
        merge = self._merge(part)
        if merge.waiting(kind) >= WAIT_LIMIT:  # read again once half of them went
            self._held.add((record.topic_name, record.partition))
            raise HoldPartition
        if not merge.add(kind, record.offset, at, item):
            return  # read (or applied) before: the consumer read it again
        self._read_at[(kind, part)] = self.clock()
        yield from self._drain(part)

    def _merge(self, part: int) -> PartitionMerge:
        merge = self._merges.get(part)
        if merge is None:
            merge = self._merges[part] = PartitionMerge(self._load_mark(part))
            waiting = self._load_waiting(part)
            merge.restore(EVENT, waiting)
            self._written[part] = {e.offset for e in waiting}
            self._written_committed[part] = set(self._written[part])
            self._saved_marks[part] = merge.mark()
            # changes: quiet counts from when this instance took the partition (the
            # segmenter may be taking its own partitions over after the same kill)
            self._read_at[(CHANGE, part)] = self.clock()
        return merge

    def _load_mark(self, part: int) -> Mark:
        times: list[int] = []
        nexts: list[int | None] = []
        for time_key, next_key in mark_keys(part):
            t, n = self.store.get(time_key), self.store.get(next_key)
            times.append(int(t["clock_ms"]) if t and t.get("clock_ms") is not None else NEVER)
            nexts.append(int(n["clock_ms"]) if n and n.get("clock_ms") is not None else None)
        return Mark((times[0], times[1]), (nexts[0], nexts[1]), self._event_clocks.get(part, 0))

    def _load_waiting(self, part: int) -> list[Entry]:
        """The identified events a previous owner wrote as waiting, in their order."""
        prefix = f"{WAIT_PREFIX}{part}:"
        out = []
        for key in sorted(k for k in self.store if k.startswith(prefix)):
            rec = self.store.get(key)
            if rec is None:
                continue
            data = rec["started"][0]
            item = (self.decode_identified(data), data)
            counts = rec["counts"]
            out.append(Entry(int(counts["offset"]), int(counts["time"]), rec["clock_ms"], item))
        return out

    def _drain(self, part: int) -> Iterator[Output]:
        """Apply the partition's records that can go, in the merged order, each at the
        partition's clock once it is applied (its order time); then move the clock."""
        merge = self._merges[part]
        idle = self._idle(CHANGE, part), self._idle(EVENT, part)
        while True:
            try:
                kind, entry = merge.pop(*idle)
            except Wait:
                break
            self._event_clocks[part] = merge.clock
            yield from self._apply(kind, entry.item, part, merge.clock)
        self._event_clocks[part] = merge.advance(*idle)

    def _drain_all(self) -> Iterator[Output]:
        """At a tick: records that waited for the other input or for the idle rule."""
        if not self._merges:
            return
        if self._lag_source is not None and time.monotonic() - self._lags_at >= LAG_REFRESH:
            self._lags_at = time.monotonic()
            self._lags = self._lag_source()
        for part in list(self._merges):
            yield from self._drain(part)

    # -- the idle rule -----------------------------------------------------------------------
    def _idle(self, kind: Kind, part: int) -> bool:
        """``kind``'s stream of ``part`` was read to its end and nothing was read from it for
        ``order_idle_ms`` since this instance took the partition (without a loop, e.g. tests:
        everything was read, it is idle at once)."""
        topic = self.changes_topic if kind == CHANGE else self.events_topic
        if self._lag_source is None:
            return self._lags.get((topic, part), 0) == 0
        if self._lags.get((topic, part)) != 0 or (topic, part) in self._in_batch:
            return False
        read_at = self._read_at.get((kind, part))
        if read_at is None:  # identified events: none read since this instance took it
            return True
        idle_ms = self.cfg.changes_idle_ms if kind == CHANGE else self.cfg.order_idle_ms
        return (self.clock() - read_at) * 1000 >= idle_ms

    def releases(self) -> list[tuple[str, int]]:
        """Held partitions whose waiting records went down to half the limit."""
        out = []
        for topic, part in list(self._held):
            kind = CHANGE if topic == self.changes_topic else EVENT
            merge = self._merges.get(part)
            if merge is None or merge.waiting(kind) <= WAIT_LIMIT // 2:
                self._held.discard((topic, part))
                out.append((topic, part))
        return out

    def before_batch(self, batch: BatchInfo) -> None:
        """The loop's lags before each batch (records after it not read yet, per partition)."""
        self._lags = dict(batch.lag)
        self._lags_at = time.monotonic()
        self._in_batch = {k for k, n in batch.counts.items() if n}  # read, not yet handled

    # -- transactions ------------------------------------------------------------------------
    def commit_point(self, topic: str, partition: int, offset: int) -> int:
        """The loop's ``commit_point``: never past a change or event not applied yet."""
        merge = self._merges.get(partition)
        if merge is None:
            return offset
        if topic == self.changes_topic:
            return merge.commit_offset(CHANGE, offset)
        return offset  # events waiting are written to the changelog (``_flush_marks``)

    def _flush_marks(self) -> list[Output]:
        """The marks that changed and the identified events waiting (new ones written, applied
        ones deleted), written with the state (same transaction): the consumer's offsets go
        past the events, which a new owner finds in the changelog."""
        outs: list[Output] = []
        for part, merge in self._merges.items():
            written = self._written.setdefault(part, set())
            waiting = {e.offset: e for e in merge.pending(EVENT)}
            for offset in sorted(written - waiting.keys()):
                outs.append(self.store.delete(f"{WAIT_PREFIX}{part}:{offset:020d}"))
            for offset in sorted(waiting.keys() - written):
                outs.append(self._write_waiting(part, waiting[offset]))
            self._written[part] = set(waiting)
        for part, merge in self._merges.items():
            mark, saved = merge.mark(), self._saved_marks.get(part)
            if mark == saved:
                continue
            for i, (time_key, next_key) in enumerate(mark_keys(part)):
                if saved is None or saved.times[i] != mark.times[i]:
                    rec = {"kind": "clock", "clock_ms": mark.times[i]}
                    outs.append(self.store.put(time_key, rec, part))
                if mark.nexts[i] is not None and (saved is None or saved.nexts[i] != mark.nexts[i]):
                    rec = {"kind": "clock", "clock_ms": mark.nexts[i]}
                    outs.append(self.store.put(next_key, rec, part))
            self._saved_marks[part] = mark
        return outs

    def _write_waiting(self, part: int, entry: Entry) -> Output:
        value, data = entry.item
        data = data or value.get("raw") or self.serde.encode(TOPICS.identified, value)
        record = {
            "kind": "waiting",
            "customer_id": str(value["customer_id"]),
            "clock_ms": entry.order,
            "counts": {"offset": entry.offset, "time": entry.time},
            "started": [data],  # the record's Avro bytes (as read)
        }
        return self.store.put(f"{WAIT_PREFIX}{part}:{entry.offset:020d}", record, part)

    def _merges_committed(self) -> None:
        self._in_batch = set()
        for part, merge in self._merges.items():
            merge.committed()
            self._written_committed[part] = set(self._written.get(part, ()))

    def _merges_aborted(self) -> None:
        self._in_batch = set()
        for part, merge in self._merges.items():
            merge.aborted()
            self._saved_marks[part] = merge.mark()
            self._written[part] = set(self._written_committed.get(part, ()))

    def _merges_reread(self, partitions: set[int]) -> None:
        self._held = {k for k in self._held if k[1] not in partitions}  # the loop forgets them
        for part in partitions:
            merge = self._merges.get(part)
            if merge is not None:
                merge.rereads()

    def _merges_dropped(self, partitions: set[int]) -> None:
        self._held = {k for k in self._held if k[1] not in partitions}
        for part in partitions:
            self._merges.pop(part, None)
            self._saved_marks.pop(part, None)
            self._written.pop(part, None)
            self._written_committed.pop(part, None)
            for kind in KINDS:
                self._read_at.pop((kind, part), None)

    def waiting(self) -> int:
        """Changes and events read and not applied yet (all partitions)."""
        return sum(m.waiting(k) for m in self._merges.values() for k in KINDS)
