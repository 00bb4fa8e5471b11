"""Merges in the scorer shell: where a merge lands among the survivor's and the absorbed
ids' records, hand-offs between instances, forwarded events (a mixin of
:class:`services.scorer.app.ScorerService`; the merge code moved out of ``app.py``).

Merge marks (issue #15)
    Identity places every merge in the identified partitions the scorer reads in order: the
    merge-causing event carries ``merge`` (``customer_id`` = survivor, the absorbed ids) and
    each absorbed id gets a ``customer_merged`` record keyed by it, after all its events.
    The absorbed id's owner, at that record, fires the absorbed id's timers due before the
    merge, deletes its state (tombstones) and hands the state off (``marked``; empty: none).
    The survivor's owner, at the merge-causing event, merges the hand-offs of every absorbed
    id there and then applies the event. A hand-off that arrives before its merge-causing
    event waits as ``held:<absorbed>`` (survivor's partition). A hand-off that is not there
    yet makes the handler hold the whole identified partition at the merge-causing event
    (:class:`~segflow.runtime.records.HoldPartition`, before anything changed): the loop
    commits the partition's offset up to that record, pauses it there and reads on the other
    partitions (the absorbed id's among them, and ``scorer.handoff``); once every awaited id
    is ``held:`` (read in the batch or committed before), :meth:`Merges.releases` (asked
    after each record while a partition is held) releases the partition and the loop handles
    the merge-causing event (which now merges normally), then the partition's records it
    kept; :meth:`Merges.urgent` ends a batch early at a record another partition waits
    for (a hand-off, a ``customer_merged`` whose survivor another instance owns or whose
    survivor's partition is held here), so that the round trip does not wait for full
    batches. So a scores partition's record order is
    a function of its input partitions' record order (the partition's other customers wait
    too), with one instance as with N. No deadlock: identity writes merges in one global
    order, each absorbed id's ``customer_merged`` before its merge-causing event, and a hold
    waits only for such an earlier record (a partition held at a record blocks only records
    written after it). With both ids in the same partition ``customer_merged`` comes first,
    so the hand-off is there; a missing one there (not written by identity) would wait
    behind its own hold: then the survivor alone is parked, as before.
    Parked survivor (``wait:<survivor>``, in the survivor's partition, same transaction as
    the offsets; written by earlier releases, which parked instead of holding, and by the
    same-partition case): it records the absorbed ids and, in order, every later record of
    the survivor; nothing is applied to it and no timer of it fires until the last hand-off
    arrives, then the merge is applied at the same point and the parked records after it
    (so a changelog with ``wait:`` entries drains). Its partition's other customers go on:
    their scores' place relative to the survivor's depends on timing.

Merges without marks (``IdentityMerge.in_identified`` false: written before the marks, or by
hand) are applied when read from ``segflow.identity.merges``, as before: their position
among the customers' events depends on timing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from segflow.errors import InvalidRecord
from segflow.runtime.loop import Output
from segflow.runtime.records import HoldPartition
from segflow.runtime.serde import Serde
from segflow.runtime.state import ChangelogStore, partition_for
from segflow.runtime.topics import TOPICS
from services.scorer.core import FORGET_EVENT, Out, Scorer
from services.scorer.features import State, new_state, upgrade
from services.scorer.metrics import FORWARDED, HANDOFFS, HOLDS, PARKED

#: State-changelog key prefix of a merged-away id's marker (``merged:<absorbed_id>``, a
#: ScorerState whose ``customer_id`` is the survivor), in the absorbed id's partition: later
#: events for the absorbed id are forwarded to the survivor, a replayed merge is a no-op.
MERGED_KEY = "merged:"
#: ``wait:<survivor>``, in the survivor's partition: a survivor parked at its merge-causing
#: event (a ScorerState: ``awaiting`` = the merge's absorbed ids, ``parked`` = the records
#: since, the first one the merge-causing event; ``last_event_ms`` = the merge's event time).
WAIT_KEY = "wait:"
#: ``held:<absorbed>``, in the survivor's partition: an absorbed id's state handed off for a
#: merge the survivor's owner has not reached yet (``emitted_stage`` ABSENT: it had none).
HELD_KEY = "held:"
ABSENT = "absent"
#: A parked record (``wait:`` ``parked``): a tag byte, the survivor's partition watermark when
#: the record was read (``_NO_WM``: none) and the record's wire bytes (which start with 0).
_PARKED = struct.Struct(">bq")
_NO_WM = -(2**63)


def park_entry(wm: int | None, raw: bytes) -> bytes:
    """A parked record with the watermark it was read at."""
    return _PARKED.pack(1, _NO_WM if wm is None else wm) + raw


def park_split(entry: bytes) -> tuple[int | None, bytes]:
    """(watermark when read, the record's wire bytes) of a parked record; one parked before
    the watermark was kept (the wire bytes alone): None."""
    if entry[:1] != b"\x01":
        return None, entry
    _, wm = _PARKED.unpack_from(entry)
    return (None if wm == _NO_WM else wm), entry[_PARKED.size :]


#: ``event_type`` of identity's record keyed by an absorbed id at its merge.
MERGED_EVENT = "customer_merged"
_MERGED_BYTES = MERGED_EVENT.encode()  # (in its wire bytes: an Avro string)


class Merges:
    """The merge part of the scorer's shell (a mixin: the attributes are the service's)."""

    states: ChangelogStore
    serde: Serde
    scorer: Scorer
    merged: dict[str, str]
    forwarded: int
    _dirty: set[str]
    #: Survivors parked at a merge (``wait:`` records) and absorbed ids held (``held:``).
    waiting: set[str]
    held: set[str]
    #: Identified partitions held at a merge-causing event: partition -> (survivor, the
    #: absorbed ids whose hand-offs it waits for).
    holding: dict[int, tuple[str, list[str]]]
    _identified: str
    _handoff_topic: str

    if TYPE_CHECKING:

        def _outputs(self, outs: Iterable[Out]) -> Iterator[Output]:
            raise NotImplementedError

    def _marks(self) -> None:
        """The parked and held ids, from the store (after a restore, a revoke or an abort)."""
        self.waiting, self.held = set(), set()
        for k in self.states.table:
            if k.startswith(WAIT_KEY):
                self.waiting.add(k[len(WAIT_KEY) :])
            elif k.startswith(HELD_KEY):
                self.held.add(k[len(HELD_KEY) :])

    def urgent(self, topic: str, _partition: int, value: bytes | None) -> bool:
        """Loop hook: whether a record read should end its batch soon (its transaction
        commits what another partition waits for: :mod:`segflow.runtime.holds`): a hand-off
        (a held partition of this instance may wait for it), an absorbed id's
        ``customer_merged`` whose survivor another instance owns (it waits for the hand-off
        this batch sends) or whose survivor's partition is held here for it."""
        if topic == self._handoff_topic:
            return True
        if topic != self._identified or value is None or _MERGED_BYTES not in value:
            return False
        try:
            rec = self.serde.decode(TOPICS.identified, value)
        except Exception:  # noqa: BLE001 (dead-lettered when handled)
            return False
        mark = rec.get("merge")
        if mark is None or rec["event"]["event_type"] != MERGED_EVENT:
            return False
        absorbed = str(rec["customer_id"])
        return not self.states.owns(str(mark["survivor_id"])) or any(
            absorbed in missing for _, missing in self.holding.values()
        )

    def releases(self) -> list[tuple[str, int]]:
        """Loop hook: the held identified partitions whose hand-offs are all there now (or
        whose survivor was forgotten meanwhile)."""
        out = []
        for part, (survivor, awaiting) in list(self.holding.items()):
            if survivor in self.scorer.retired or all(a in self.held for a in awaiting):
                del self.holding[part]
                out.append((self._identified, part))
        return out

    # -- identified records ------------------------------------------------------------------
    def _route(
        self, value: dict[str, Any], raw: bytes | None, part: int, now: int, admitted: bool
    ) -> Iterator[Output]:
        """An identified record, as read (``admitted`` False) or replayed from a ``wait:``
        record (checked and counted by the clock when it was read)."""
        cid = str(value["customer_id"])
        event = value["event"]
        mark = value.get("merge")
        if cid in self.waiting:
            yield from self._park(cid, value, raw, part, now, admitted)
            return
        if mark is not None and event["event_type"] == MERGED_EVENT and mark["survivor_id"] != cid:
            yield from self._absorb(cid, str(mark["survivor_id"]), int(event["occurred_at"]), now)
            return
        survivor = self.merged.get(cid)
        if survivor is not None and event["event_type"] != FORGET_EVENT:
            yield from self._forward(survivor, cid, "", raw, part, now, admitted)
            return
        if mark is not None:
            yield from self._at_merge(
                cid, [str(a) for a in mark["absorbed_ids"]], value, part, now, admitted
            )
            return
        _, outs = self.scorer.on_event(
            self.states.get(cid), cid, event, now, source=part, admitted=admitted
        )
        yield from self._outputs(outs)

    def _park(
        self,
        cid: str,
        value: dict[str, Any],
        raw: bytes | None,
        part: int,
        now: int,
        admitted: bool,
    ) -> Iterator[Output]:
        """A record for a parked survivor: checked and counted now, applied after the merge."""
        event = value["event"]
        mark = value.get("merge")
        if not admitted:
            if mark is not None and event["event_type"] == MERGED_EVENT:
                pass  # no event: it does not move the clock
            elif mark is not None:
                raw = self._admit_marked(cid, value, part, now)
            else:
                self.scorer.admit(cid, event, now, part)  # raises before anything changed
        wait = self.states.get(WAIT_KEY + cid)
        assert wait is not None
        entry = raw or self.serde.encode(TOPICS.identified, value)
        parked = [*wait["parked"], park_entry(self._read_watermark(cid, admitted), entry)]
        PARKED.inc()
        yield self.states.put(WAIT_KEY + cid, {**wait, "parked": parked}, partition=self._part(cid))

    def _admit_marked(self, cid: str, value: dict[str, Any], part: int, now: int) -> bytes | None:
        """Check a merge-causing event as it is read. The merge happens even when the event
        is invalid (too late, from the future): then its record is rewritten as the merge
        alone (``customer_merged`` keyed by the survivor), and the event is dropped."""
        try:
            self.scorer.admit(cid, value["event"], now, part)
        except InvalidRecord as exc:
            HANDOFFS.labels("invalid", exc.reason).inc()
            event = value["event"]
            alone = {
                "event_id": event["event_id"],
                "event_type": MERGED_EVENT,
                "occurred_at": event["occurred_at"],
                "properties": {},
            }
            value.update(event=alone)
            return self.serde.encode(TOPICS.identified, value)
        return None

    def _read_watermark(self, cid: str, admitted: bool) -> int | None:
        """The watermark of ``cid``'s partition as the record at hand was read: now, or (a
        parked record replayed) when it was first read."""
        sc = self.scorer
        if admitted and sc.read_watermark is not None:
            return sc.read_watermark[1]
        return sc.watermark_of(sc.part(cid))

    def _at_merge(
        self,
        survivor: str,
        absorbed: list[str],
        value: dict[str, Any],
        part: int,
        now: int,
        admitted: bool,
    ) -> Iterator[Output]:
        """The merge-causing event of ``survivor``: merge every absorbed id's hand-off here
        and apply the event, or hold its partition here until they are all there (a
        survivor parked before, or waiting for an id of its own partition: park it)."""
        if not admitted and survivor not in self.scorer.retired:
            missing = [a for a in absorbed if a != survivor and a not in self.held]
            if missing and all(self._part(a) != part for a in missing):
                self.holding[part] = (survivor, missing)
                HOLDS.inc()
                raise HoldPartition("merge")
        if not admitted:
            rewritten = self._admit_marked(survivor, value, part, now)
            if rewritten is not None:
                value = self.serde.decode(TOPICS.identified, rewritten)
        event = value["event"]
        at = int(event["occurred_at"])
        absorbed = [a for a in absorbed if a != survivor]
        if survivor in self.scorer.retired:  # the same forgotten person: nothing to keep
            self.scorer.dropped_retired += 1
            for a in absorbed:
                if a in self.held:
                    self.held.discard(a)
                    yield self.states.delete(HELD_KEY + a)
            return
        # the survivor's scores due before the merge first, as of their own instants
        st, outs = self.scorer.fire_urgent(survivor, self.states.get(survivor), now)
        st, more = self.scorer.fire_before(survivor, st, at, now)
        yield from self._outputs([*outs, *more])
        if any(a not in self.held for a in absorbed):
            self.scorer.seal()  # its buckets into its state before the cache goes
            self.scorer.release(survivor)
            wait = new_state(survivor, at)
            wait["awaiting"] = absorbed
            entry = self.serde.encode(TOPICS.identified, value)
            wait["parked"] = [park_entry(self._read_watermark(survivor, admitted), entry)]
            self.waiting.add(survivor)
            PARKED.inc()
            yield self.states.put(WAIT_KEY + survivor, wait, partition=self._part(survivor))
            return
        yield from self._merge_held(survivor, absorbed, at, now)
        if event["event_type"] != MERGED_EVENT:
            _, outs = self.scorer.on_event(
                self.states.get(survivor), survivor, event, now, source=part, admitted=True
            )
            yield from self._outputs(outs)

    def _merge_held(
        self, survivor: str, absorbed: list[str], at: int, now: int
    ) -> Iterator[Output]:
        held = {a: self.states.get(HELD_KEY + a) for a in absorbed}

        def get(cid: str) -> State | None:
            if cid in held:
                st = held[cid]
                return None if st is None or st["emitted_stage"] == ABSENT else st
            return self.states.get(cid)

        merge = {"survivor_id": survivor, "absorbed_ids": absorbed, "occurred_at": at}
        outs = self.scorer.on_merge(get, merge, now, elsewhere=held)
        # the absorbed ids' tombstones were written by their owners, with the hand-offs
        yield from self._outputs(o for o in outs if o.customer_id not in held)
        for a in absorbed:
            self.held.discard(a)
            yield self.states.delete(HELD_KEY + a)

    def _absorb(self, absorbed: str, survivor: str, at: int, now: int) -> Iterator[Output]:
        """The absorbed id's ``customer_merged`` record, after all its events: its timers due
        before the merge fire, its state goes (tombstones) to the survivor's owner. Its score
        tombstone, after all its scores, carries the merge in its headers (the segmenter
        retires the id there); it is written also when the id has no state (never scored),
        so that the segmenter always has it to wait for (one record per merge)."""
        payload = b""
        st = self.states.get(absorbed)
        fresh = absorbed not in self.merged and absorbed not in self.scorer.retired
        if st is None and fresh:
            yield from self._outputs(self.scorer.tombstone(absorbed, (survivor, at)))
        if st is not None and absorbed not in self.scorer.retired:
            st, outs = self.scorer.fire_urgent(absorbed, st, now)
            st, more = self.scorer.fire_before(absorbed, st, at, now)
            yield from self._outputs([*outs, *more])
            self.scorer.seal()
            st = self.states.get(absorbed)
            assert st is not None
            payload = self.serde.encode(TOPICS.scorer_state, st)
            self.scorer.release(absorbed)
            self._dirty.discard(absorbed)
            yield self.states.delete(absorbed)
            yield from self._outputs(self.scorer.tombstone(absorbed, (survivor, at)))
        marker = new_state(survivor, at)
        marker["emitted_stage"] = "merged"
        self.merged[absorbed] = survivor
        yield self.states.put(MERGED_KEY + absorbed, marker, partition=self._part(absorbed))
        if self.states.owns(survivor):  # in process, at the same point as through the topic
            HANDOFFS.labels("local", "marked").inc()
            yield from self._arrived(survivor, absorbed, payload, now)
        else:
            yield self._handoff("marked", survivor, absorbed, "", payload, now)

    def _arrived(self, survivor: str, absorbed: str, payload: bytes, now: int) -> Iterator[Output]:
        """An absorbed id's state for ``survivor`` (a ``marked`` hand-off): held until the
        survivor's owner reaches the merge-causing event, or the last one a parked survivor
        waited for: the merge then, and the records parked after it."""
        if survivor in self.scorer.retired:
            self.scorer.dropped_retired += 1
            return
        if payload:
            state = self.serde.decode(TOPICS.scorer_state, payload)
            upgrade(state)
        else:
            state = new_state(absorbed, 0)
            state["emitted_stage"] = ABSENT
        self.held.add(absorbed)
        yield self.states.put(HELD_KEY + absorbed, state, partition=self._part(survivor))
        wait = self.states.get(WAIT_KEY + survivor) if survivor in self.waiting else None
        if wait is None or any(a not in self.held for a in wait["awaiting"]):
            return
        self.waiting.discard(survivor)
        yield self.states.delete(WAIT_KEY + survivor)
        part = self._part(survivor)
        parked = list(wait["parked"])
        # Replayed, the parked records fire only the survivor's timers due before each of
        # them or by the watermark its partition had when it was read, not every timer the
        # watermark passed meanwhile: those fire at the next tick, after the last of them.
        sc = self.scorer
        store, sc.store = sc.store, None
        try:
            wm, raw = park_split(parked.pop(0))
            sc.read_watermark = (sc.part(survivor), wm)
            first = self.serde.decode(TOPICS.identified, raw)
            yield from self._at_merge(
                survivor, list(wait["awaiting"]), first, part, now, admitted=True
            )
            for i, entry in enumerate(parked):
                if survivor in self.waiting:  # parked again, at a later merge: the rest after it
                    again = self.states.get(WAIT_KEY + survivor)
                    assert again is not None
                    rest = [*again["parked"], *parked[i:]]
                    yield self.states.put(
                        WAIT_KEY + survivor, {**again, "parked": rest}, partition=part
                    )
                    return
                wm, raw = park_split(entry)
                sc.read_watermark = (sc.part(survivor), wm)
                value = self.serde.decode(TOPICS.identified, raw)
                yield from self._route(value, raw, part, now, admitted=True)
        finally:
            sc.store, sc.read_watermark = store, None

    # -- merges from segflow.identity.merges (without marks) -----------------------------------
    def _merge(self, merge: dict[str, Any], now: int) -> Iterator[Output]:
        """An IdentityMerge, read by the owner of its partition (its absorbed id's): absorbed
        states whose survivor this instance owns merge here, as with one instance; the others
        go to the survivor's owner through ``scorer.handoff``. Either way the absorbed id gets
        a ``merged:`` marker, so that its later events follow it. A merge identity also placed
        in the identified partitions (``in_identified``) is applied there, not here."""
        if merge.get("in_identified"):
            return
        survivor = self._final(str(merge["survivor_id"]))
        if survivor != merge["survivor_id"]:  # merged away itself, by a merge read first
            merge = {**merge, "survivor_id": survivor}
        owns = self.states.owns
        absorbed = [
            a
            for a in merge["absorbed_ids"]
            if a != survivor and a not in self.merged and a not in self.scorer.retired
        ]
        if survivor in self.scorer.retired or owns(survivor):
            yield from self._outputs(self.scorer.on_merge(self.states.get, merge, now))
        else:
            self.scorer.seal()  # the absorbed states' buckets compressed (written at commit)
            for a in absorbed:
                if not owns(a):
                    continue
                st = self.states.get(a)
                if st is None:
                    continue
                self.scorer.release(a)
                self._dirty.discard(a)
                yield self.states.delete(a)
                at = int(merge.get("occurred_at") or 0)
                yield from self._outputs(self.scorer.tombstone(a, (survivor, at)))
                payload = self.serde.encode(TOPICS.scorer_state, st)
                yield self._handoff("state", survivor, a, str(merge["merge_id"]), payload, now)
        if survivor in self.scorer.retired:
            return
        for a in absorbed:
            if owns(a):
                marker = new_state(survivor, int(merge.get("merged_at") or 0))
                marker["emitted_stage"] = "merged"
                self.merged[a] = survivor
                yield self.states.put(MERGED_KEY + a, marker, partition=self._part(a))

    def _final(self, cid: str) -> str:
        """Where ``cid``'s state went, following the merges this instance holds markers for
        (two merges of a chain sit in different partitions of the merges topic and may be
        read in either order: without this, X absorbing Y read after Z absorbed X started a
        new X that got a live score after X's tombstone)."""
        seen = {cid}
        while cid in self.merged and self.merged[cid] not in seen:
            cid = self.merged[cid]
            seen.add(cid)
        return cid

    def _forward(
        self,
        survivor: str,
        absorbed: str,
        merge_id: str,
        raw: bytes | None,
        part: int,
        now: int,
        admitted: bool = False,
    ) -> Iterator[Output]:
        """An event for a merged-away id: applied to the survivor (followed through further
        merges), here when this instance owns it, else through a hand-off; parked with the
        survivor's records when it waits at a merge."""
        seen = {absorbed}
        while survivor in self.merged and survivor not in seen:  # a chain of merges
            seen.add(survivor)
            survivor = self.merged[survivor]
        if survivor in self.scorer.retired:
            self.scorer.dropped_retired += 1
            return
        if not self.states.owns(survivor):
            if not admitted:  # checked and counted by the partition it was read from
                value = self.serde.decode(TOPICS.identified, raw)
                self.scorer.admit(survivor, value["event"], now, part)
            yield self._handoff("event", survivor, absorbed, merge_id, raw or b"", now)
            return
        value = self.serde.decode(TOPICS.identified, raw)
        if survivor in self.waiting:
            yield from self._park(survivor, value, raw, part, now, admitted)
            return
        self.forwarded += 1
        FORWARDED.inc()
        _, outs = self.scorer.on_event(
            self.states.get(survivor), survivor, value["event"], now, source=part, admitted=admitted
        )
        yield from self._outputs(outs)

    def _handed(self, h: dict[str, Any], part: int, now: int) -> Iterator[Output]:
        """A hand-off for a survivor this instance owns (its partition's)."""
        survivor, absorbed, kind = str(h["survivor_id"]), str(h["absorbed_id"]), h["kind"]
        HANDOFFS.labels("received", kind).inc()
        if kind == "marked":
            yield from self._arrived(survivor, absorbed, bytes(h["payload"]), now)
            return
        if kind == "event":  # (checked, and its clock moved, where it was read)
            yield from self._forward(
                survivor, absorbed, h["merge_id"], h["payload"], part, now, admitted=True
            )
            return
        seen = {absorbed}
        while survivor in self.merged and survivor not in seen:  # merged away meanwhile
            seen.add(survivor)
            survivor = self.merged[survivor]
        if survivor in self.scorer.retired:
            self.scorer.dropped_retired += 1  # the same forgotten person: nothing to keep
            return
        if not self.states.owns(survivor):
            yield self._handoff("state", survivor, absorbed, h["merge_id"], h["payload"], now)
            return
        state = self.serde.decode(TOPICS.scorer_state, h["payload"])
        upgrade(state)

        def get(cid: str) -> State | None:
            return state if cid == absorbed else self.states.get(cid)

        merge = {"survivor_id": survivor, "absorbed_ids": [absorbed]}
        outs = self.scorer.on_merge(get, merge, now, elsewhere=(absorbed,))
        # the absorbed id's tombstones were written by its owner, with the hand-off
        yield from self._outputs(o for o in outs if o.customer_id != absorbed)

    def _handoff(
        self, kind: str, survivor: str, absorbed: str, merge_id: str, payload: bytes, now: int
    ) -> Output:
        HANDOFFS.labels("sent", kind).inc()
        value = {
            "kind": kind,
            "survivor_id": survivor,
            "absorbed_id": absorbed,
            "merge_id": merge_id,
            "payload": payload,
            "handed_off_at": now,
        }
        return Output(TOPICS.scorer_handoff, survivor, value, partition=self._part(survivor))

    def _part(self, cid: str) -> int:
        return partition_for(cid, self.states.partitions)
