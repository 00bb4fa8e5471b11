"""The one-process identity service's de-duplication window over ``e:`` state entries (pure;
moved out of :mod:`services.identity.core`, which re-exports it)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from typing import Any

Entry = dict[str, Any]


class DedupWindow:
    """Which ``e:`` entries to expire: those older than the window behind the event-time
    low watermark. Rebuildable from the state at any time.

    The low watermark is the smallest of the per-partition watermarks (the latest
    ``occurred_at`` seen on each input partition since start). A single global maximum is
    wrong when partitions are consumed at different paces (a backlog, a restart): one
    partition far ahead in event time would expire ids whose duplicates are still unread on
    a partition behind, and those duplicates would then be emitted again.

    >>> w = DedupWindow(window_ms=100)
    >>> state = {"e:a": {"created_at": 10}, "e:b": {"created_at": 150}}
    >>> w.seen("a", 10, partition=0); w.seen("b", 150, partition=0)
    >>> w.seen("c", 400, partition=1)
    >>> w.expired(state)  # low watermark 150 (partition 0): horizon 50
    ['e:a']
    """

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self.marks: dict[int, int] = {}  # input partition -> latest occurred_at seen
        self._heap: list[tuple[int, str]] = []
        self._popped: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def watermark(self) -> int | None:
        """The event-time low watermark over the partitions seen since start, if any."""
        return min(self.marks.values()) if self.marks else None

    def seen(self, event_id: str, occurred_at: int, partition: int = 0) -> None:
        """Record an event id written to the state (read from input ``partition``)."""
        heapq.heappush(self._heap, (occurred_at, event_id))
        if occurred_at > self.marks.get(partition, -1):
            self.marks[partition] = occurred_at

    def advance(self, partition: int, occurred_at: int) -> None:
        """Move a partition's watermark without recording an id (e.g. a dropped duplicate)."""
        if occurred_at > self.marks.get(partition, -1):
            self.marks[partition] = occurred_at

    def rebuild(self, entries: Iterable[tuple[str, Entry]]) -> int:
        """Index every ``e:`` entry of a restored state; returns how many. Nothing expires
        until the input partitions have shown where they are in event time."""
        heap = [(int(v.get("created_at") or 0), k[2:]) for k, v in entries if k[:2] == "e:"]
        heapq.heapify(heap)
        self._heap = heap
        self._popped = []
        self.marks = {}
        return len(heap)

    def expired(self, state: Mapping[str, Entry], max_keys: int = 50_000) -> list[str]:
        """State keys of seen entries that left the window (at most ``max_keys``)."""
        low = self.watermark
        if low is None:
            return []
        horizon = low - self.window_ms
        heap = self._heap
        out: list[str] = []
        while heap and heap[0][0] < horizon and len(out) < max_keys:
            at, event_id = heapq.heappop(heap)
            self._popped.append((at, event_id))
            key = "e:" + event_id
            entry = state.get(key)
            if entry is not None and entry.get("created_at") == at:
                out.append(key)
        return out

    def on_commit(self) -> None:
        self._popped.clear()

    def on_abort(self) -> None:
        """The deletions were rolled back: index their entries again."""
        for item in self._popped:
            heapq.heappush(self._heap, item)
        self._popped.clear()
