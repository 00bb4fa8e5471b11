"""Immutable views of a service's state, published at each commit for its query threads.

The processing loop mutates a service's tables on its own thread; the internal API
(:mod:`segflow.runtime.internal_api`) answers from another. Instead of reading the live
tables (and retrying a read torn by a concurrent change), a service publishes after each
committed transaction a :class:`Snapshot` of what its queries read, and a query reads only the
snapshot it picked up: never a half-applied batch, never a dictionary changing under it.

A snapshot is a persistent mapping: a tuple of small shard dicts, never mutated once
published. :meth:`Snapshot.evolve` copies only the shards a batch touched (and the tuple of
shard references), so publishing a batch of ``k`` changed keys over ``n`` entries costs about
``k`` small dict copies plus ``n / SHARD_SIZE`` references, not a copy of the table
(``bench/bench_snapshot.py`` measures it). Values are shared, not copied: they must be
immutable, or replaced rather than mutated by the writer (the services' records are).

>>> a = Snapshot.build({"x": 1, "y": 2})
>>> b = a.evolve({"x": 10, "z": 3, "y": None})
>>> dict(sorted(a.items())), dict(sorted(b.items()))
({'x': 1, 'y': 2}, {'x': 10, 'z': 3})
>>> len(b), b.get("y"), "z" in b
(2, None, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

V = TypeVar("V")

#: Entries per shard aimed at: a touched shard is copied whole at publication.
SHARD_SIZE = 16
#: Fewest shards (a power of two).
MIN_SHARDS = 64


def _shards_for(n: int) -> int:
    count = MIN_SHARDS
    while count * SHARD_SIZE < n:
        count *= 2
    return count


class Snapshot(Mapping[str, V], Generic[V]):
    """An immutable string-keyed mapping that is cheap to derive with a few keys changed."""

    __slots__ = ("_shards", "_mask", "_len")

    def __init__(self, shards: tuple[dict[str, V], ...], length: int) -> None:
        self._shards = shards
        self._mask = len(shards) - 1
        self._len = length

    @classmethod
    def build(cls, items: Mapping[str, V] | Iterable[tuple[str, V]]) -> Snapshot[V]:
        """A snapshot of ``items`` (a full pass: at start, or after a restore)."""
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        count = _shards_for(len(pairs))
        mask = count - 1
        shards: list[dict[str, V]] = [{} for _ in range(count)]
        for key, value in pairs:
            shards[hash(key) & mask][key] = value
        return cls(tuple(shards), sum(len(s) for s in shards))

    @classmethod
    def empty(cls) -> Snapshot[V]:
        return cls.build(())

    def evolve(self, changes: Mapping[str, V | None]) -> Snapshot[V]:
        """A new snapshot with ``changes`` applied (``None`` removes the key); this one is
        unchanged. Only the shards holding a changed key are copied."""
        if not changes:
            return self
        mask = self._mask
        shards = list(self._shards)
        copied: set[int] = set()
        length = self._len
        for key, value in changes.items():
            i = hash(key) & mask
            shard = shards[i]
            if i not in copied:
                shard = shards[i] = dict(shard)
                copied.add(i)
            if value is None:
                if shard.pop(key, _ABSENT) is not _ABSENT:
                    length -= 1
            else:
                if key not in shard:
                    length += 1
                shard[key] = value
        if length > len(shards) * SHARD_SIZE * 4:  # grown well past its shards: reshard
            return Snapshot.build((k, v) for s in shards for k, v in s.items())
        return Snapshot(tuple(shards), length)

    def __getitem__(self, key: str) -> V:
        return self._shards[hash(key) & self._mask][key]

    def get(self, key: str, default: V | None = None) -> V | None:  # type: ignore[override]
        return self._shards[hash(key) & self._mask].get(key, default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._shards[hash(key) & self._mask]

    def __iter__(self) -> Iterator[str]:
        for shard in self._shards:
            yield from shard

    def pairs(self) -> Iterator[tuple[str, V]]:
        """``(key, value)`` of every entry (faster than ``items()``: no second lookup)."""
        for shard in self._shards:
            yield from shard.items()

    def __len__(self) -> int:
        return self._len


_ABSENT = object()
