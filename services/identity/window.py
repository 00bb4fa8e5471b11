"""The one-process identity service's de-duplication window (pure; the changelog hook around
it is :mod:`services.identity.seen`).

An event id is remembered as an 8-byte keyed hash (computed by the shell) in one window
**global across input partitions**: a duplicate is caught whichever partition (key) it
arrives on. Ids are grouped in chunks per input partition, batch and event-time hour, the
format of the front stage's window (:mod:`services.identity.dedup`, record
``IdentityDedupChunk``, key ``<partition>:<hour start ms>:<first offset>``), so the two roles
read each other's changelog. A batch adds its ids to the open chunk of their partition and
hour (the record is written again under the same key; compaction keeps the latest) until it
holds ``CHUNK_IDS`` ids, then a new chunk starts: at a low event rate a chunk per batch would
cost its key and framing (~35 B) for a handful of ids.

Expiry is by the event-time low watermark: the smallest of the per-partition watermarks (the
latest ``occurred_at`` seen on each input partition since start). A single global maximum is
wrong when partitions are consumed at different paces (a backlog, a restart): one partition
far ahead in event time would expire ids whose duplicates are still unread on a partition
behind, and those duplicates would then be emitted again. An hour is expired once its end is
more than the window behind the low watermark (ids are kept up to an hour longer than the
window). Nothing expires after a restore until the input partitions have shown where they are.

>>> w = SeenWindow(window_ms=2 * HOUR_MS)
>>> w.add(0, 11, 5 * HOUR_MS + 10, offset=0), w.add(1, 11, 5 * HOUR_MS + 20, offset=0)
(True, False)
>>> 11 in w, [(key, len(hashes)) for key, _, hashes in w.pending_chunks()]
(True, [('0:18000000:0', 8)])
>>> w.add(0, 12, 5 * HOUR_MS + 30, offset=1)  # a later batch: the same chunk, rewritten
True
>>> [(key, len(hashes)) for key, _, hashes in w.pending_chunks()]
[('0:18000000:0', 16)]
>>> w.advance(1, 8 * HOUR_MS); w.expired()  # low watermark 5 h (partition 0): nothing yet
[]
>>> w.advance(0, 8 * HOUR_MS); w.expired()  # both at 8 h: the 5 h hour left the window
[(18000000, ['0:18000000:0'])]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

HOUR_MS = 3_600_000
#: Ids per chunk before a new one starts (2 KB of hashes).
CHUNK_IDS = 256


def pack(hashes: Iterable[int]) -> bytes:
    """8 bytes (big-endian) per hash, as ``services.identity.dedup.chunk_bytes``."""
    return b"".join(h.to_bytes(8, "big") for h in hashes)


def hour_of(t: int) -> int:
    return t - t % HOUR_MS


def chunk_key(partition: int, hour: int, first: int | str) -> str:
    """``<partition>:<hour start ms>:<first offset>`` (a legacy chunk: ``e<hash>``)."""
    return f"{partition}:{hour}:{first}"


def key_hour(key: str) -> int:
    """The hour of a chunk key.

    >>> key_hour("3:7200000:15")
    7200000
    """
    return int(key.split(":", 2)[1])


class SeenWindow:
    """Remembered event-id hashes, their chunks and the per-partition watermarks (pure: the
    shell mirrors chunks to Kafka and calls the commit/abort methods with its store's)."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        #: hash -> event-time hour of its chunk
        self.ids: dict[int, int] = {}
        #: hour -> chunk keys holding ids of that hour
        self.chunks: dict[int, list[str]] = {}
        #: input partition -> latest occurred_at seen since start
        self.marks: dict[int, int] = {}
        self._pending: dict[tuple[int, int], tuple[int, list[int]]] = {}
        #: (partition, hour) -> (key, hashes) of the chunk new ids of that hour go to
        self._open: dict[tuple[int, int], tuple[str, bytes]] = {}
        self._open_undo: dict[tuple[int, int], tuple[str, bytes] | None] = {}
        self._hours: dict[int, int] = {}  # one int object per hour, shared by its entries
        # what the open transaction changed (undone by on_abort)
        self._added: list[int] = []
        self._written: list[tuple[int, str]] = []
        self._expired: list[str] = []
        self._marks_committed: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, h: object) -> bool:
        return h in self.ids

    @property
    def watermark(self) -> int | None:
        """The event-time low watermark over the partitions seen since start, if any."""
        return min(self.marks.values()) if self.marks else None

    def advance(self, partition: int, occurred_at: int) -> None:
        """Move a partition's watermark (every event read, duplicates included)."""
        if occurred_at > self.marks.get(partition, -1):
            self.marks[partition] = occurred_at

    def add(self, partition: int, h: int, occurred_at: int, offset: int) -> bool:
        """Remember hash ``h`` of an event read from ``partition``; False: already there (a
        duplicate, from whichever partition)."""
        self.advance(partition, occurred_at)
        if h in self.ids:
            return False
        hour = hour_of(occurred_at)
        hour = self._hours.setdefault(hour, hour)
        self.ids[h] = hour
        self._added.append(h)
        pending = self._pending.get((partition, hour))
        if pending is None:
            self._pending[(partition, hour)] = (offset, [h])
        else:
            pending[1].append(h)
        return True

    def pending_chunks(self) -> Iterator[tuple[str, int, bytes]]:
        """(key, partition, packed hashes) of the chunks to write for the ids added since the
        last call: per input partition and hour, the open chunk with them appended, or a new
        one (key: the first new id's offset) when it would exceed ``CHUNK_IDS``."""
        pending, self._pending = self._pending, {}
        for (p, hour), (offset, hashes) in pending.items():
            slot = (p, hour)
            opened = self._open.get(slot)
            if slot not in self._open_undo:
                self._open_undo[slot] = opened
            new = pack(hashes)
            if opened is not None and len(opened[1]) + len(new) <= 8 * CHUNK_IDS:
                key, data = opened[0], opened[1] + new
            else:
                key, data = chunk_key(p, hour, offset), new
                self.register(hour, key)
            self._open[slot] = (key, data)
            yield key, p, data

    def register(self, hour: int, key: str) -> None:
        """A chunk of ``hour`` written in the open transaction (its ids are already indexed)."""
        self.chunks.setdefault(hour, []).append(key)
        self._written.append((hour, key))

    def load(self, key: str, hashes: Iterable[int]) -> int:
        """Index a restored chunk; returns its ids."""
        hour = key_hour(key)
        hour = self._hours.setdefault(hour, hour)
        ids = self.ids
        n = 0
        for h in hashes:
            ids[h] = hour
            n += 1
        keys = self.chunks.setdefault(hour, [])
        if key not in keys:
            keys.append(key)
        return n

    def load_legacy(self, h: int, occurred_at: int) -> int:
        """Index an id restored from an ``e:<event_id>`` entry (no chunk yet); its hour."""
        hour = hour_of(occurred_at)
        hour = self._hours.setdefault(hour, hour)
        self.ids.setdefault(h, hour)
        return hour

    def expired(self) -> list[tuple[int, list[str]]]:
        """(hour, chunk keys) of the hours whose end is more than the window behind the low
        watermark; removed from the index (call :meth:`forget_ids` with their hashes)."""
        low = self.watermark
        if low is None:
            return []
        horizon = low - self.window_ms
        out = []
        for hour in [h for h in self.chunks if h + HOUR_MS <= horizon]:
            keys = self.chunks.pop(hour)
            self._expired.extend(keys)
            out.append((hour, keys))
        if out:
            gone = {hour for hour, _ in out}
            for slot in [s for s in self._open if s[1] in gone]:
                if slot not in self._open_undo:
                    self._open_undo[slot] = self._open[slot]
                del self._open[slot]
        return out

    def forget_ids(self, hour: int, hashes: Iterable[int]) -> int:
        """Drop the ids of an expired chunk (those still indexed under its hour)."""
        ids = self.ids
        n = 0
        for h in hashes:
            if ids.get(h) == hour:
                del ids[h]
                n += 1
        return n

    def on_commit(self) -> None:
        self._added.clear()
        self._written.clear()
        self._expired.clear()
        self._open_undo.clear()
        self._marks_committed = dict(self.marks)

    def on_abort(self) -> list[str]:
        """Undo the open transaction's additions; returns the keys of the chunks it expired,
        which the shell indexes again (:meth:`load`) from its rolled-back store."""
        for h in self._added:
            self.ids.pop(h, None)
        for hour, key in self._written:
            keys = self.chunks.get(hour)
            if keys is not None and key in keys:
                keys.remove(key)
                if not keys:
                    del self.chunks[hour]
        self._pending.clear()
        for slot, opened in self._open_undo.items():
            if opened is None:
                self._open.pop(slot, None)
            else:
                self._open[slot] = opened
        self._open_undo.clear()
        self.marks = dict(self._marks_committed)
        expired, self._expired = self._expired, []
        self._added.clear()
        self._written.clear()
        return expired

    def clear(self) -> None:
        self.ids.clear()
        self.chunks.clear()
        self._pending.clear()
        self._open.clear()
        self._open_undo.clear()
        self.marks.clear()
        self._marks_committed.clear()
        self._added.clear()
        self._written.clear()
        self._expired.clear()
