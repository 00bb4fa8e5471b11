"""Segment-level lifecycle: ``deprecated`` after a segment had no entry for ``deprecate_after``,
``reactivated`` on its next entry, and the status record (pure; split out of
:mod:`services.segmenter.core`, issue #14).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from services.segmenter.dsl import (
    DAY,
    Definitions,
    Explanation,
)
from services.segmenter.model import DEPRECATED, ENTERED, REACTIVATED, Change


@dataclass(frozen=True)
class SegmentStatus:
    """When a segment last gained a member, and whether it is deprecated."""

    segment: str
    first_seen: int
    last_entry_at: int | None = None
    deprecated: bool = False
    deprecations: int = 0


def track_statuses(
    statuses: Mapping[str, SegmentStatus], changes: Iterable[Change], defs: Definitions
) -> tuple[dict[str, SegmentStatus], list[Change]]:
    """Record entries; an entry into a deprecated segment reactivates it.

    >>> from services.segmenter.dsl import parse
    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: x, op: ">", value: 1}}\\n')
    >>> st = {"A": SegmentStatus("A", 0, 0, deprecated=True, deprecations=1)}
    >>> _, out = track_statuses(st, [Change("c", "A", ENTERED, "c|A|1", "v", 5, "A")], defs)
    >>> [(c.transition, c.customer_id, c.change_id) for c in out]
    [('reactivated', 'c', 'A|deprecation|1|reactivated')]
    """
    new = dict(statuses)
    out: list[Change] = []
    for c in changes:
        if c.transition != ENTERED:
            continue
        st = new.get(c.segment) or SegmentStatus(c.segment, c.occurred_at)
        if st.deprecated:
            idle = (c.occurred_at - (st.last_entry_at or st.first_seen)) / DAY
            out.append(
                Change(
                    c.customer_id,
                    c.segment,
                    REACTIVATED,
                    f"{c.segment}|deprecation|{st.deprecations}",
                    defs.version,
                    c.occurred_at,
                    c.primary_segment,
                    reason="qualified",
                    explanation=(
                        Explanation(
                            "deprecation",
                            "days_since_last_entry",
                            ">=",
                            idle,
                            defs.deprecate_after_ms / DAY,
                            None,
                            True,
                        ),
                    ),
                )
            )
        new[c.segment] = replace(
            st, last_entry_at=max(c.occurred_at, st.last_entry_at or 0), deprecated=False
        )
    return new, out


def expire(
    statuses: Mapping[str, SegmentStatus], now: int, defs: Definitions
) -> tuple[dict[str, SegmentStatus], list[Change]]:
    """Segments with no entry for ``deprecate_after`` (event time) become ``deprecated``.

    >>> from services.segmenter.dsl import parse
    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: x, op: ">", value: 1}}\\n')
    >>> st, out = expire({}, 0, defs)           # first seen now
    >>> expire(st, 89 * DAY, defs)[1]
    []
    >>> st, out = expire(st, 90 * DAY, defs)
    >>> [(c.segment, c.transition, c.customer_id) for c in out], expire(st, 200 * DAY, defs)[1]
    ([('A', 'deprecated', '')], [])
    """
    new = dict(statuses)
    out: list[Change] = []
    for seg in defs.segments:
        st = new.get(seg.name)
        if st is None:
            new[seg.name] = SegmentStatus(seg.name, now)
            continue
        last = st.last_entry_at if st.last_entry_at is not None else st.first_seen
        if not st.deprecated and now - last >= defs.deprecate_after_ms:
            n = st.deprecations + 1
            out.append(
                Change(
                    "",
                    seg.name,
                    DEPRECATED,
                    f"{seg.name}|deprecation|{n}",
                    defs.version,
                    now,
                    None,
                    reason="inactive",
                    explanation=(
                        Explanation(
                            "deprecation",
                            "days_since_last_entry",
                            ">=",
                            (now - last) / DAY,
                            defs.deprecate_after_ms / DAY,
                            (now - last - defs.deprecate_after_ms) / DAY,
                            True,
                        ),
                    ),
                )
            )
            new[seg.name] = replace(st, deprecated=True, deprecations=n)
    return new, out


def next_deprecation(statuses: Mapping[str, SegmentStatus], defs: Definitions) -> int | None:
    """The earliest event time at which :func:`expire` would deprecate a segment."""
    due = [
        (st.last_entry_at if st.last_entry_at is not None else st.first_seen)
        + defs.deprecate_after_ms
        for st in statuses.values()
        if not st.deprecated and st.segment in defs.by_name
    ]
    return min(due) if due else None


def status_to_record(st: SegmentStatus) -> dict[str, Any]:
    return {
        "kind": "segment",
        "customer": None,
        "segment": {
            "segment": st.segment,
            "first_seen": st.first_seen,
            "last_entry_at": st.last_entry_at,
            "deprecated": st.deprecated,
            "deprecations": st.deprecations,
        },
    }


def status_from_record(record: Mapping[str, Any]) -> SegmentStatus:
    """SegmenterStateEntry record (kind ``segment``) → SegmentStatus.

    >>> status_from_record(status_to_record(SegmentStatus("A", 1, 2, True, 1)))
    SegmentStatus(segment='A', first_seen=1, last_entry_at=2, deprecated=True, deprecations=1)
    """
    s = record["segment"]
    return SegmentStatus(
        s["segment"], s["first_seen"], s["last_entry_at"], s["deprecated"], s["deprecations"]
    )
