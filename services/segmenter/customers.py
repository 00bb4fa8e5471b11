"""What changes a customer besides a score, as functions of the running
:class:`~services.segmenter.app.Segmenter`: identity merges (retired at the scorer's score
tombstone of the absorbed id, :mod:`services.segmenter.merging`), forget requests and
attribute records (split out of ``app.py``, issue #14; the segmenter's methods of the same
names call these).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from segflow.runtime.loop import Output
from segflow.runtime.records import merged_into
from services.segmenter import core, merging, shared
from services.segmenter.metrics import ATTRIBUTE_UPDATES

if TYPE_CHECKING:
    from services.segmenter.app import Segmenter

# A customer id that must never be evaluated again: absorbed by an identity merge, or
# forgotten. A late score for it (the scorer handles merges on its own consumer) would
# otherwise bring the id back into segments with a restarted entry counter.
RETIRED_KEY = "retired:"


def merge(seg: Segmenter, merge: dict[str, Any], part: int) -> Iterator[Output]:
    """A merge arrives on the absorbed id's partition (merges are keyed by it). A merge
    identity placed in the identified partitions (``in_identified``) retires the absorbed id
    at the scorer's tombstone of its score, after all its scores (:func:`tombstoned`): read
    before it, the record only leaves a pending marker (``merging.py``), unless the
    partition's watermark is already past the fallback's deadline. Other merges (from before
    the marks, or by hand) retire it here, as before. The survivor is advanced to the
    merge's time only when it lives on the same partition; elsewhere its own timers advance
    it (its owner does not read this record), so results do not depend on which instance
    owns which."""
    survivor = str(merge["survivor_id"])
    now = max(int(merge.get("occurred_at") or 0), seg.watermarks.get(part, 0))
    occurred = int(merge.get("occurred_at") or 0)
    late = merging.late(occurred, seg.watermarks.get(part, 0), _wait_ms(seg))
    for absorbed in merge.get("absorbed_ids") or []:
        if absorbed == survivor:
            continue
        if (
            merge.get("in_identified")
            and not late
            and absorbed not in seg.retired
            and seg.store.partition_of(absorbed) == part
        ):
            yield from wait(seg, absorbed, survivor, occurred, part)
        else:
            yield from absorb(seg, absorbed, survivor, now, occurred, part)
    st = seg.states.get(survivor)
    if st is not None and seg.store.partition_of(survivor) == part:
        new, changes = core.advance(st, now, seg.defs, seg.thresholds_for(part), seg.lookups)
        yield from seg._apply(st, new, changes, part)


def _wait_ms(seg: Segmenter) -> int:
    return int(seg.config.merge_wait * 1000)


def wait(seg: Segmenter, cid: str, survivor: str, at: int, part: int) -> Iterator[Output]:
    """``cid`` was merged into ``survivor`` at ``at``; its scores before its score
    tombstone still count: keep the merge pending (in the changelog, for a new owner)."""
    pending = seg.merging.setdefault(part, {})
    if pending.get(cid) == (survivor, at):
        return
    pending[cid] = (survivor, at)
    seg._dirty.add(merging.MERGING_KEY + cid)
    yield seg.store.put(merging.MERGING_KEY + cid, merging.to_record(survivor, at), part)


def tombstoned(
    seg: Segmenter, key: Any, headers: list[tuple[str, bytes | None]], part: int
) -> Iterator[Output]:
    """A score tombstone. With merge headers (the scorer's, after all the absorbed id's
    scores in this partition) the id is retired here, its memberships exiting at
    :func:`merging.exit_at`; without (a forget, whose request retires the id, or a scorer
    from before the headers) only an id with a pending merge is, with that merge."""
    cid = key.decode() if isinstance(key, bytes) else str(key or "")
    if not cid or cid in seg.retired:
        return
    merged = merged_into(headers) or seg.merging.get(part, {}).get(cid)
    if merged is None:
        return
    survivor, at = merged
    now = merging.exit_at(at, seg.watermarks.get(part, 0))
    yield from absorb(seg, cid, survivor, now, at, part)


def overdue(seg: Segmenter, part: int, as_of: int) -> Iterator[Output]:
    """The fallback, before a score at ``as_of`` is taken in: the pending merges of the
    partition whose tombstone has not come by the merge's time plus ``merge_wait``."""
    pending = seg.merging.get(part)
    if not pending:
        return
    for cid in merging.overdue(pending, as_of, _wait_ms(seg)):
        survivor, at = pending[cid]
        now = merging.exit_at(at, seg.watermarks.get(part, 0))
        yield from absorb(seg, cid, survivor, now, at, part)


def absorb(
    seg: Segmenter, cid: str, survivor: str, now: int, at: int, part: int
) -> Iterator[Output]:
    """Retire ``cid``, merged into ``survivor`` at ``at``: its timers due by ``now`` fire
    first (as the tick would have by then: the result does not depend on when it ran), then
    its memberships exit ``merged`` at ``now``."""
    st = seg.states.get(cid)
    if st is not None:
        new, changes = core.advance(st, now, seg.defs, seg.thresholds_for(part), seg.lookups)
        yield from seg._apply(st, new, changes, part)
    yield from retire(seg, cid, "merged", survivor, now, part, at)


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
    for pending in seg.merging.values():  # a merge waiting for the tombstone is done
        if pending.pop(cid, None) is not None:
            seg._dirty.add(merging.MERGING_KEY + cid)
            yield seg.store.delete(merging.MERGING_KEY + cid)
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
