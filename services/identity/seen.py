"""The one-process identity service's de-duplication window as a loop hook over its changelog.

The window (:class:`~services.identity.window.SeenWindow`, global across input partitions)
is mirrored to ``segflow.identity.dedup`` in the front stage's chunk format
(:mod:`services.identity.dedup`: ``IdentityDedupChunk``, 8-byte keyed BLAKE2b hashes, key
``<input partition>:<hour start ms>:<first offset>``, written to the input partition's
changelog partition). The one-process role restores every partition of it (it reads every
input partition); a deployment that moves to the split roles keeps the ids per partition in
its fronts' windows, and one that moves back restores them all.

Chunks are written by the loop's ``before_commit`` (the batch's transaction, with its
outputs and offsets; the open chunk of a partition and hour is written again with the
batch's ids appended, up to 256 ids); expired hours are tombstoned by the tick.
``e:<event_id>`` entries in ``segflow.identity.state`` (the window of earlier releases,
43 B per id) are read on restore and de-duplicate as before; the ticks move them into
chunks (partition 0, key ``0:<hour>:e<first hash>``) and tombstone them, 50,000 per tick, in
one transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from segflow.runtime.loop import Output
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.topics import TOPICS
from services.identity.dedup import chunk_bytes, chunk_hashes
from services.identity.window import SeenWindow, chunk_key, key_hour

LEGACY_PARTITION = 0
MIGRATE_PER_TICK = 50_000


def dedup_key(secret: str) -> bytes:
    """The BLAKE2b key of event-id hashes: the front stage's (same hashes in both roles)."""
    return hashlib.sha256(b"segflow-dedup\x00" + secret.encode()).digest()


class SeenIds:
    """Loop hook: the window, its changelog store, and the migration of ``e:`` entries."""

    def __init__(
        self,
        settings: Settings,
        window_ms: int,
        serde: Serde | None = None,
        store: ChangelogStore | None = None,
    ) -> None:
        # One global window: restore() reads every partition, and nothing is dropped on a
        # rebalance (this hook has no on_assign/on_revoke, and the store is not a loop hook).
        # partitioned=True so that a tombstone goes to the partition its chunk was written to.
        self.store = store or ChangelogStore(
            settings, TOPICS.identity_dedup, serde, partitioned=True, encoded=True
        )
        self.window = SeenWindow(window_ms)
        self._key = dedup_key(settings.hash_secret.get_secret_value())
        #: ``e:`` entries of the identity state not moved into chunks yet: (key, hash, hour)
        self.legacy: list[tuple[str, int, int]] = []
        self._taken: list[tuple[str, int, int]] = []

    def digest(self, event_id: str) -> int:
        return int.from_bytes(
            hashlib.blake2b(event_id.encode(), key=self._key, digest_size=8).digest(), "big"
        )

    def __len__(self) -> int:
        return len(self.window)

    # -- restore ------------------------------------------------------------------------------
    def restore(self, graph: Iterable[tuple[str, dict[str, Any]]] = ()) -> int:
        """Load every chunk, then index the ``e:`` entries among ``graph`` (the identity
        state's items); returns the records read."""
        n = self.store.restore()
        self.rebuild(graph)
        return n

    def rebuild(self, graph: Iterable[tuple[str, dict[str, Any]]] = ()) -> None:
        self.window.clear()
        for key in list(self.store.table):
            if not key.endswith(":w"):  # not a front's order time (services/identity/front.py)
                self._load(key)
        self.legacy = []
        for key, value in graph:
            if key[:2] == "e:":
                h = self.digest(key[2:])
                self.legacy.append(
                    (key, h, self.window.load_legacy(h, int(value.get("created_at") or 0)))
                )

    def _load(self, key: str) -> None:
        chunk = self.store.get(key)
        if chunk is not None:
            self.window.load(key, chunk_hashes(bytes(chunk["hashes"])))

    # -- loop hooks ---------------------------------------------------------------------------
    def before_commit(self) -> Iterator[Output]:
        for key, p, hashes in self.window.pending_chunks():
            yield self.store.put(key, {"hour": key_hour(key), "hashes": hashes}, p)

    def on_commit(self) -> None:
        self.store.on_commit()
        self.window.on_commit()
        self._taken.clear()

    def on_abort(self) -> None:
        self.store.on_abort()
        for key in self.window.on_abort():  # expired in the aborted transaction: back
            self._load(key)
        self.legacy[:0] = self._taken
        self._taken.clear()

    # -- tick ---------------------------------------------------------------------------------
    def expire(self) -> tuple[list[Output], int]:
        """Tombstones of the chunks whose hour left the window, and how many ids went."""
        out: list[Output] = []
        n = 0
        for hour, keys in self.window.expired():
            for key in keys:
                chunk = self.store.get(key)
                if chunk is not None:
                    n += self.window.forget_ids(hour, chunk_hashes(bytes(chunk["hashes"])))
                    out.append(self.store.delete(key))
        return out, n

    def migrate(self, graph: ChangelogStore) -> list[Output]:
        """Move up to ``MIGRATE_PER_TICK`` ``e:`` entries into chunks: the chunks' puts and
        the entries' tombstones, for one transaction."""
        if not self.legacy:
            return []
        taken, self.legacy = self.legacy[:MIGRATE_PER_TICK], self.legacy[MIGRATE_PER_TICK:]
        self._taken.extend(taken)
        by_hour: dict[int, list[int]] = {}
        for key, h, hour in taken:
            if key in graph and self.window.ids.get(h) == hour:
                by_hour.setdefault(hour, []).append(h)
        out: list[Output] = []
        for hour, hashes in by_hour.items():
            key = chunk_key(LEGACY_PARTITION, hour, f"e{hashes[0]:016x}")
            self.window.register(hour, key)
            out.append(
                self.store.put(key, {"hour": hour, "hashes": chunk_bytes(hashes)}, LEGACY_PARTITION)
            )
        out.extend(graph.delete(key) for key, _, _ in taken if key in graph)
        return out
