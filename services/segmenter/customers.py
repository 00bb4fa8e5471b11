"""What changes a customer besides a score, as functions of the running
:class:`~services.segmenter.app.Segmenter`: identity merges, forget requests and attribute
records (split out of ``app.py``, issue #14; the segmenter's methods of the same names call
these).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from segflow.runtime.loop import Output
from services.segmenter import core, shared
from services.segmenter.metrics import ATTRIBUTE_UPDATES

if TYPE_CHECKING:
    from services.segmenter.app import Segmenter

# A customer id that must never be evaluated again: absorbed by an identity merge, or
# forgotten. A late score for it (the scorer handles merges on its own consumer) would
# otherwise bring the id back into segments with a restarted entry counter.
RETIRED_KEY = "retired:"


def merge(seg: Segmenter, merge: dict[str, Any], part: int) -> Iterator[Output]:
    """A merge arrives on the absorbed id's partition (merges are keyed by it): the
    absorbed id is retired there. The survivor is advanced to the merge's time only when
    it lives on the same partition; elsewhere its own timers advance it (its owner does
    not read this record), so results do not depend on which instance owns which."""
    survivor = str(merge["survivor_id"])
    now = max(int(merge.get("occurred_at") or 0), seg.watermarks.get(part, 0))
    occurred = int(merge.get("occurred_at") or 0)
    for absorbed in merge.get("absorbed_ids") or []:
        if absorbed == survivor:
            continue
        yield from retire(seg, absorbed, "merged", survivor, now, part, occurred)
    st = seg.states.get(survivor)
    if st is not None and seg.store.partition_of(survivor) == part:
        new, changes = core.advance(st, now, seg.defs, seg.thresholds_for(part), seg.lookups)
        yield from seg._apply(st, new, changes, part)


def attributes(
    seg: Segmenter, key: Any, record: dict[str, Any] | None, part: int
) -> Iterator[Output]:
    """A customer's attributes changed (segflow.attributes, co-partitioned with the
    scores): store them and re-evaluate the customer at its partition's event time. A
    tombstone (forget, or a merge's absorbed id) clears them."""
    if record is None:
        cid = key.decode() if isinstance(key, bytes) else str(key or "")
        attrs: dict[str, str] = {}
    else:
        cid = str(record["customer_id"])
        attrs = dict(record.get("attributes") or {})
    if not cid or cid in seg.retired:
        return
    ATTRIBUTE_UPDATES.inc()
    old = seg.states.get(cid)
    if old is None and not attrs:
        return
    now = seg.watermarks.get(part, 0)
    new, changes = core.set_attributes(
        old, cid, attrs, now, seg.defs, seg.thresholds_for(part), seg.lookups
    )
    yield from seg._apply(old, new, changes, part)


def forget(seg: Segmenter, request: dict[str, Any], part: int) -> Iterator[Output]:
    """A forget request: every membership exits ``forgotten``, the state is deleted and
    the id is retired (later scores for it are dropped)."""
    cid = str(request["customer_id"])
    now = max(int(request.get("requested_at") or 0), seg.watermarks.get(part, 0))
    yield from retire(seg, cid, "forgotten", None, now, part)


def retire(
    seg: Segmenter,
    cid: str,
    why: str,
    survivor: str | None,
    now: int,
    part: int,
    leaves_at: int | None = None,
) -> Iterator[Output]:
    """Retire ``cid``: its memberships exit, its state goes. ``leaves_at`` (a merge's own
    event time): its ``pNN`` values stay in its partition's population for the tables of
    grid instants up to then, kept in the ``retired:`` record until a new owner's restore
    (README.md, "Percentile thresholds per partition"); a forgotten id's go at once."""
    st = seg.states.get(cid)
    kept: dict[str, float] = {}
    if st is not None:
        yield from seg._emit(core.absorb(st, survivor, now, seg.defs, reason=why), part)
        seg._index(st, part, remove=True)
        if leaves_at is not None:
            kept = {
                f: v for f, _ in seg.defs.percentiles if isinstance(v := st.values.get(f), float)
            }
            shared.linger(seg, cid, part, kept, leaves_at)
        del seg.states[cid]
        seg._dirty.add(cid)
        seg._unwritten[cid] = part  # a tombstone at the commit
    if seg.retired.get(cid) != why:
        seg.retired[cid] = why
        seg._dirty.add(RETIRED_KEY + cid)
        # The reason rides in the segment-status slot of the state record (kind retired).
        marker = {"segment": why, "first_seen": now}
        values = None
        if kept and leaves_at is not None:  # the values still in the population, until when
            values = {"customer_id": cid, "as_of": leaves_at, "numbers": kept, "texts": {}}
            values["memberships"] = []
        record = {"kind": "retired", "customer": values, "segment": marker}
        yield seg.store.put(RETIRED_KEY + cid, record, part)
