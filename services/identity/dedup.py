"""The front stage's event de-duplication window, partitioned like ``segflow.events``.

An event id is remembered as an 8-byte keyed hash (BLAKE2b with a key derived from the hash
secret) in the window of the input partition it was read from, for 7 days of event time behind
that partition's watermark (the latest ``occurred_at`` read from it). A duplicate is caught
when it arrives on the same partition as the first copy, which is where a producer's retry or
a replay of the same keyed record puts it; the same event id produced under another key lands
in another partition and is not caught (the one-instance service of earlier releases caught
it; README).

State, per input partition ``p`` (``segflow.identity.dedup``, compacted, co-partitioned with
the events: a record of partition ``p`` lives in changelog partition ``p``): one chunk record
per batch and event-time hour, key ``<p>:<hour start ms>:<first offset>``, value the hour and
the concatenated 8-byte hashes (:class:`IdentityDedupChunk`); and the partition's stream time
(:mod:`services.identity.order`), key ``<p>:w`` (``hour`` = that time, no hashes). A chunk is
written in the batch's transaction, together with the link requests and the offsets; an hour
whose end is more than the window behind the partition's watermark is expired by tombstoning
its chunks (so ids are kept up to an hour longer than the window). In memory: one ``dict`` hash
-> hour per owned partition, and the chunks' bytes (about 90 bytes per remembered id, against
about 450 for the ``e:<event_id>`` entries of the one-instance service).

The store restores only the partitions the consumer group assigns (``on_assign``) and drops
the revoked ones: this object is the loop hook and delegates to its
:class:`~segflow.runtime.state.ChangelogStore`.

>>> w = Window(window_ms=2 * HOUR_MS)
>>> w.add(0, 11, 5 * HOUR_MS + 10, offset=0), w.add(0, 11, 5 * HOUR_MS + 20, offset=1)
(True, False)
>>> w.add(1, 11, 5 * HOUR_MS, offset=0)  # another partition: another window
True
>>> sorted(w.pending_chunks())
[('0:18000000:0', 0, 18000000, [11]), ('1:18000000:0', 1, 18000000, [11])]
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from segflow.runtime.loop import Output
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.topics import TOPICS

HOUR_MS = 3_600_000


def chunk_bytes(hashes: Iterable[int]) -> bytes:
    """8 bytes (big-endian) per hash, concatenated.

    >>> list(chunk_hashes(chunk_bytes([1, 2 ** 64 - 1]))) == [1, 2 ** 64 - 1]
    True
    """
    return b"".join(h.to_bytes(8, "big") for h in hashes)


def chunk_hashes(data: bytes) -> Iterator[int]:
    for i in range(0, len(data) - 7, 8):
        yield int.from_bytes(data[i : i + 8], "big")


def parse_key(key: str) -> tuple[int, int]:
    """(partition, hour) of a chunk key.

    >>> parse_key("3:7200000:15")
    (3, 7200000)
    """
    p, hour, _ = key.split(":", 2)
    return int(p), int(hour)


class Window:
    """The ids of each input partition (pure: no I/O; the shell mirrors chunks to Kafka)."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        #: partition -> hash -> event-time hour of its chunk
        self.ids: dict[int, dict[int, int]] = {}
        #: partition -> hour -> chunk keys holding it
        self.chunks: dict[int, dict[int, list[str]]] = {}
        #: partition -> latest occurred_at read (absent: nothing read since assignment)
        self.marks: dict[int, int] = {}
        self._pending: dict[tuple[int, int], tuple[int, list[int]]] = {}
        self._hours: dict[int, int] = {}  # one int object per hour, shared by its entries

    def __len__(self) -> int:
        return sum(len(d) for d in self.ids.values())

    def add(self, partition: int, h: int, occurred_at: int, offset: int) -> bool:
        """Remember ``h`` (an event id's hash) read from ``partition``; False: a duplicate."""
        if occurred_at > self.marks.get(partition, -1):
            self.marks[partition] = occurred_at
        ids = self.ids.get(partition)
        if ids is None:
            ids = self.ids[partition] = {}
        if h in ids:
            return False
        hour = occurred_at - occurred_at % HOUR_MS
        hour = self._hours.setdefault(hour, hour)
        ids[h] = hour
        pending = self._pending.get((partition, hour))
        if pending is None:
            self._pending[(partition, hour)] = (offset, [h])
        else:
            pending[1].append(h)
        return True

    def advance(self, partition: int, occurred_at: int) -> None:
        if occurred_at > self.marks.get(partition, -1):
            self.marks[partition] = occurred_at

    def pending_chunks(self) -> Iterator[tuple[str, int, int, list[int]]]:
        """(key, partition, hour, hashes) of the ids added since the last call."""
        pending, self._pending = self._pending, {}
        for (p, hour), (offset, hashes) in pending.items():
            key = f"{p}:{hour}:{offset}"
            self.chunks.setdefault(p, {}).setdefault(hour, []).append(key)
            yield key, p, hour, hashes

    def load(self, key: str, hashes: Iterable[int]) -> None:
        """Index a restored chunk."""
        p, hour = parse_key(key)
        hour = self._hours.setdefault(hour, hour)
        ids = self.ids.setdefault(p, {})
        for h in hashes:
            ids[h] = hour
        self.chunks.setdefault(p, {}).setdefault(hour, []).append(key)

    def expired(self) -> list[tuple[int, int, list[str]]]:
        """(partition, hour, chunk keys) of the hours that left each partition's window; their
        chunks are removed from the index (call :meth:`forget_ids` with their hashes)."""
        out: list[tuple[int, int, list[str]]] = []
        for p, mark in self.marks.items():
            horizon = mark - self.window_ms
            hours = self.chunks.get(p)
            if not hours:
                continue
            for hour in [h for h in hours if h + HOUR_MS <= horizon]:
                out.append((p, hour, hours.pop(hour)))
        return out

    def forget_ids(self, partition: int, hour: int, hashes: Iterable[int]) -> int:
        ids = self.ids.get(partition, {})
        n = 0
        for h in hashes:
            if ids.get(h) == hour:
                del ids[h]
                n += 1
        return n

    def drop(self, partitions: Iterable[int], marks: bool = True) -> None:
        for p in partitions:
            self.ids.pop(p, None)
            self.chunks.pop(p, None)
            if marks:
                self.marks.pop(p, None)
            for key in [k for k in self._pending if k[0] == p]:
                del self._pending[key]

    def clear(self) -> None:
        self.ids.clear()
        self.chunks.clear()
        self._pending.clear()


class DedupStore:
    """The front stage's window as a loop hook over its changelog store."""

    def __init__(self, settings: Settings, window_ms: int, store: ChangelogStore | None = None):
        self.store = store or ChangelogStore(
            settings, TOPICS.identity_dedup, partitioned=True, encoded=True
        )
        self.window = Window(window_ms)
        secret = settings.hash_secret.get_secret_value().encode()
        self._key = hashlib.sha256(b"segflow-dedup\x00" + secret).digest()
        self._marks_committed: dict[int, int] = {}
        self._added: list[tuple[int, int]] = []

    # what the loop reads of a partitioned store (co-partitioning check, kept partitions)
    @property
    def partitioned(self) -> bool:
        return self.store.partitioned

    @property
    def topic_name(self) -> str:
        return self.store.topic_name

    def digest(self, event_id: str) -> int:
        return int.from_bytes(
            hashlib.blake2b(event_id.encode(), key=self._key, digest_size=8).digest(), "big"
        )

    def first_time(self, partition: int, event_id: str, occurred_at: int, offset: int) -> bool:
        """Whether ``event_id`` is new in ``partition``'s window (then remembered)."""
        h = self.digest(event_id)
        if self.window.add(partition, h, occurred_at, offset):
            self._added.append((partition, h))
            return True
        return False

    def __len__(self) -> int:
        return len(self.window)

    # -- hooks ------------------------------------------------------------------------------
    def restore(self) -> int:
        """Load every partition (one instance outside a consumer group, tools)."""
        n = self.store.restore()
        self._rebuild(None)
        return n

    def on_assign(self, partitions: set[int]) -> None:
        self.store.on_assign(partitions)
        self._rebuild(set(partitions))

    def on_revoke(self, partitions: set[int]) -> None:
        self.store.on_revoke(partitions)
        self.window.drop(partitions)
        for p in partitions:
            self._marks_committed.pop(p, None)

    def before_commit(self) -> Iterator[Output]:
        for key, p, hour, hashes in self.window.pending_chunks():
            yield self.store.put(key, {"hour": hour, "hashes": chunk_bytes(hashes)}, partition=p)

    def on_commit(self) -> None:
        self.store.on_commit()
        self._added.clear()
        self._marks_committed = dict(self.window.marks)

    def on_abort(self) -> None:
        self.store.on_abort()
        for p, h in self._added:
            self.window.ids.get(p, {}).pop(h, None)
        self._added.clear()
        self.window.marks = dict(self._marks_committed)
        # chunks and tombstones of the aborted transaction: index what the store holds now
        self._rebuild(set(self.window.ids) | set(self.window.chunks))

    def expire(self) -> Iterator[Output]:
        """Tombstones of the chunks whose hour left their partition's window (tick)."""
        for p, hour, keys in self.window.expired():
            for key in keys:
                raw = self.store.table.get(key)
                if raw is not None:
                    chunk = self.store.get(key)
                    assert chunk is not None
                    self.window.forget_ids(p, hour, chunk_hashes(bytes(chunk["hashes"])))
                yield self.store.delete(key)

    def _rebuild(self, partitions: set[int] | None) -> None:
        if partitions is None:
            self.window.clear()
        else:
            self.window.drop(partitions, marks=False)
        for key in list(self.store.table):
            if key.endswith(":w"):
                continue  # a partition's order time (FrontService.on_assign)
            p, _ = parse_key(key)
            if partitions is not None and p not in partitions:
                continue
            chunk = self.store.get(key)
            if chunk is not None:
                self.window.load(key, chunk_hashes(bytes(chunk["hashes"])))

    def stats(self) -> dict[str, Any]:
        return {"ids": len(self.window), "chunks": len(self.store)}
