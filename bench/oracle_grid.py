"""The segment oracle's ``pNN`` thresholds (issue #15): per partition of the scores topic, on
that partition's event-time grid, as ``services/segmenter/README.md`` documents — written
here from the documentation, importing nothing from ``services``.

A partition (librdkafka's default partitioner: CRC-32 of the customer id, modulo the topic's
4 partitions) has one table at a time. Walking the partition's records in the order they
were processed (the harness numbers them, ``seq``): its first score makes the first table
(over whoever the partition held then: usually nobody), at the grid instant at or before the
score; afterwards the first score whose time reaches the grid instant after the table's makes
the next one, taken at that grid instant, over the latest score of every id the partition
holds — before that score is taken in. A merge (on the absorbed id's partition): the
absorbed id's later scores still reach the grid but are not held, and its latest value
counts in the partition's tables up to the merge's own time (not in a table taken at a grid
instant after it).
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

#: The scores topic's partitions (schemas/topics.yaml).
PARTITIONS = 4

#: (the instant the table takes effect, the seq of the record that reached it, the table)
Refresh = tuple[int, int, dict[tuple[str, float], float]]


def partition_of(customer_id: str) -> int:
    """The partition a customer id's records are on (CRC-32 of its bytes, modulo 4)."""
    return zlib.crc32(customer_id.encode()) % PARTITIONS


def _table(
    held: Mapping[str, tuple[int, dict[str, Any]]], keys: Iterable[tuple[str, float]]
) -> dict[tuple[str, float], float]:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    out: dict[tuple[str, float], float] = {}
    for feature, p in keys:
        vals = sorted(
            float(v[feature])
            for _, v in held.values()
            if v.get(feature) is not None and not math.isnan(float(v[feature]))
        )
        if vals:
            out[(feature, p)] = vals[min(max(1, math.ceil(p / 100 * len(vals))), len(vals)) - 1]
    return out


def grid_refreshes(
    scores: Mapping[str, list[dict[str, Any]]],
    merge_seq: Mapping[str, int],
    merge_time: Mapping[str, int],
    keys: list[tuple[str, float]],
    step_ms: int,
) -> dict[int, list[Refresh]]:
    """Each partition's tables in order, from every id's scores (``as_of``, ``seq``,
    ``values``) and each absorbed id's merge: its seq and its event time."""
    records: dict[int, list[tuple[int, int, str, int, dict[str, Any]]]] = defaultdict(list)
    for cid, lst in scores.items():
        for sc in lst:
            records[partition_of(cid)].append((int(sc["seq"]), 1, cid, int(sc["as_of"]), sc))
    for cid, seq in merge_seq.items():
        records[partition_of(cid)].append((int(seq), 0, cid, 0, {}))
    step = max(int(step_ms), 1)
    out: dict[int, list[Refresh]] = {}
    for part, recs in records.items():
        refs: list[Refresh] = []
        held: dict[str, tuple[int, dict[str, Any]]] = {}  # id -> (as_of, values) of its latest
        gone: dict[str, int] = {}  # merged-away id -> the merge's event time
        at: int | None = None
        for seq, kind, cid, as_of, sc in sorted(recs):
            if kind == 0:
                gone[cid] = int(merge_time[cid])
                continue
            if at is None or as_of >= at + step:
                instant = as_of - as_of % step if at is None else at + step
                at = as_of - as_of % step
                for x in [x for x in held if gone.get(x, instant) < instant]:
                    del held[x]  # merged before the grid instant
                refs.append((instant, seq, _table(held, keys)))
            if cid in gone or (cid in held and as_of < held[cid][0]):
                continue
            held[cid] = (as_of, sc["values"])
        out[part] = refs
    return out
