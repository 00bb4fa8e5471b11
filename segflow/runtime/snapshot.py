"""Views of a service's state published at each commit, for its query threads.

The processing loop mutates a service's tables on its own thread; the internal API
(:mod:`segflow.runtime.internal_api`) answers from another. Instead of reading the live tables
(and retrying a read torn by a concurrent change), a service publishes after each committed
transaction what its queries read, and a request reads only the view it acquired: one
committed state, whole, never a batch half applied, never a dictionary changing under it.

:class:`Published` keeps two copies of the table's references (not of its values) and swaps
them: the published one is never written while published; the other is brought up to date
with the keys the last commits changed, once no request still reads it, and then published.
A commit costs O(keys it changed), not a copy of the table (``bench/bench_snapshot.py``).
Neither side waits: a request in flight on the previous copy only delays the swap to a later
commit (the view then lags a commit behind). Values are shared, never copied, so they must be
immutable or replaced rather than mutated by the writer (the services' records are; the
scorer, whose states are dicts it changes in place, publishes copies of the changed ones).

>>> table = Published({"x": 1, "y": 2}, extra="v1")
>>> with table.read() as view:
...     table.publish({"x": 10, "z": 3, "y": None}, extra="v2")  # the loop commits meanwhile
...     sorted(view.items()), view.extra
([('x', 1), ('y', 2)], 'v1')
>>> table.publish({}, extra="v3")  # the next commit: the reader is gone, the swap happens
>>> with table.read() as view:
...     sorted(view.items()), view.extra
([('x', 10), ('z', 3)], 'v3')
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

V = TypeVar("V")
E = TypeVar("E")


class _Buffer(Generic[V]):
    __slots__ = ("table", "readers")

    def __init__(self, table: dict[str, V]) -> None:
        self.table = table
        self.readers = 0


class View(Mapping[str, V], Generic[V, E]):
    """A read-only mapping over one published copy, with what was published beside it
    (``extra``). Valid inside its :meth:`Published.read` block only."""

    __slots__ = ("_table", "extra")

    def __init__(self, table: dict[str, V], extra: E) -> None:
        self._table = table
        self.extra = extra

    def __getitem__(self, key: str) -> V:
        return self._table[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._table.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def pairs(self) -> Iterator[tuple[str, V]]:
        """``(key, value)`` of every entry (no second lookup per key, unlike ``items()``)."""
        return iter(self._table.items())


class Published(Generic[V, E]):
    """A table published at each commit by one writer thread, read by any number of others."""

    def __init__(self, items: Mapping[str, V] | Iterable[tuple[str, V]], extra: E) -> None:
        self._lock = threading.Lock()
        self.rebuild(items, extra)

    def rebuild(self, items: Mapping[str, V] | Iterable[tuple[str, V]], extra: E) -> None:
        """Publish a whole new table (at start, after a restore or a revocation): O(size)."""
        table = dict(items)
        current, spare = _Buffer(table), _Buffer(dict(table))
        with self._lock:
            self._current, self._spare = current, spare
            self._extra = extra
        #: Changes the spare copy has not had yet (it was published before them), and the
        #: changes since the last swap (which the published copy will lack once retired).
        self._behind: dict[str, V | None] = {}
        self._since_swap: dict[str, V | None] = {}

    def publish(self, changes: Mapping[str, V | None], extra: E) -> None:
        """After a commit (writer thread): the changed keys (``None``: deleted) and the new
        ``extra``. Published at once unless a request still reads the spare copy; then with
        a later commit's."""
        self._behind.update(changes)
        self._since_swap.update(changes)
        with self._lock:
            spare = self._spare
            if spare.readers:  # a request started before the last swap is still on it
                return
        table: dict[str, Any] = spare.table
        table.update(self._behind)  # in C; the deleted keys, set to None here, go next
        for key in [k for k, v in self._behind.items() if v is None]:
            del table[key]
        with self._lock:
            self._current, self._spare = spare, self._current
            self._extra = extra
        # The copy just retired was published before the changes since that swap.
        self._behind, self._since_swap = self._since_swap, {}

    @contextmanager
    def read(self) -> Iterator[View[V, E]]:
        """The current view, not written to until the block ends (request threads)."""
        with self._lock:
            buffer = self._current
            buffer.readers += 1
            extra = self._extra
        try:
            yield View(buffer.table, extra)
        finally:
            with self._lock:
                buffer.readers -= 1
