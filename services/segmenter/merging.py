"""Where the segmenter retires a merged-away id (pure: no Kafka, no clock; issue #15).

A merge that identity placed in the identified partitions (``IdentityMerge.in_identified``)
reaches the segmenter twice: as the record on ``segflow.identity.merges`` and as the
scorer's score tombstone of the absorbed id, with the merge in its headers
(``segflow-merged-into``, ``segflow-merged-at``), written after all that id's scores in its
scores partition. The two come on different topics, so which is read first depends on
timing; the tombstone's place among the partition's scores does not. So the id is retired at
its tombstone, and a merge record read first only leaves a pending marker (``merging:<id>``
in the changelog, so that a new owner waits too) while the id's last scores are still taken
in. Exits are stamped :func:`exit_at`: the merge's time or, if later, the partition's
watermark at the tombstone (a function of the partition's records in order, and the instant
up to which the tick may already have fired the id's timers).

Fallback, when the tombstone does not come (a scorer from before the headers whose tombstone
was read before the merge record, a reader that finds the tombstone compacted away, a merge
whose absorbed id the scorer never saw): the pending id is retired once its partition's
watermark passes the merge's time plus ``merge_wait`` (:func:`overdue`), or at once when the
merge record is read that late. A header-less tombstone of an id with a pending merge (a
scorer from before the headers) retires it with the pending merge's survivor and time.

>>> pending = {"a": ("s", 1_000), "b": ("s", 5_000)}
>>> overdue(pending, 4_001, wait_ms=3_000)
['a']
>>> exit_at(1_000, 900), exit_at(1_000, 2_500)
(1000, 2500)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Changelog key prefix of a pending merge: ``merging:<absorbed id>``, in the absorbed id's
#: partition (kind ``merging``; the survivor and the merge's event time ride in the
#: segment-status slot of the record, as ``segment`` and ``first_seen``).
MERGING_KEY = "merging:"

#: absorbed id -> (survivor, merge event time ms)
Pending = Mapping[str, tuple[str, int]]


def late(at: int, watermark: int, wait_ms: int) -> bool:
    """Whether a merge at ``at`` is past waiting for its tombstone at ``watermark``."""
    return watermark > at + wait_ms


def overdue(pending: Pending, watermark: int, wait_ms: int) -> list[str]:
    """The pending ids whose tombstone is overdue at ``watermark`` (past the merge's time
    plus ``wait_ms``), in id order."""
    return sorted(cid for cid, (_, at) in pending.items() if late(at, watermark, wait_ms))


def exit_at(merged_at: int, watermark: int) -> int:
    """The instant an absorbed id's memberships exit at its tombstone: the merge's event
    time, or the partition's watermark there if later."""
    return max(merged_at, watermark)


def to_record(survivor: str, at: int) -> dict[str, Any]:
    """The changelog record of a pending merge (SegmenterStateEntry, kind ``merging``).

    >>> from_record(to_record("s", 7))
    ('s', 7)
    """
    return {"kind": "merging", "customer": None, "segment": {"segment": survivor, "first_seen": at}}


def from_record(record: Mapping[str, Any]) -> tuple[str, int]:
    """(survivor, merge event time) of a pending merge's changelog record."""
    slot = record["segment"]
    return str(slot["segment"]), int(slot["first_seen"])


def load(
    by_part: dict[int, dict[str, tuple[str, int]]],
    key: str,
    part: int,
    record: Mapping[str, Any] | None,
) -> None:
    """Restore (or, ``record`` None, drop) the pending merge of changelog ``key``.

    >>> by_part: dict[int, dict[str, tuple[str, int]]] = {}
    >>> load(by_part, "merging:a", 2, to_record("s", 7)); by_part
    {2: {'a': ('s', 7)}}
    >>> load(by_part, "merging:a", 2, None); by_part
    {2: {}}
    """
    cid = key[len(MERGING_KEY) :]
    if record is None:
        by_part.get(part, {}).pop(cid, None)
    else:
        by_part.setdefault(part, {})[cid] = from_record(record)
