"""The scorer's timers (pure): when each customer is next scored, and the flush that fires
the due ones as the watermark passes them (moved out of :mod:`services.scorer.core`; see its
module doc, *Emission* and *Event time*)."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from services.scorer.config import Out, ScoreEmit, StateWrite
from services.scorer.features import Buckets, State
from services.scorer.labels import Labels
from services.scorer.view import Scored


def _written(outs: list[Out]) -> dict[str, State | None]:
    return {o.customer_id: o.state for o in outs if isinstance(o, StateWrite)}


def _overlay(
    states: Mapping[str, State | None], get: Callable[[str], State | None]
) -> Callable[[str], State | None]:
    def lookup(cid: str) -> State | None:
        return states[cid] if cid in states else get(cid)

    return lookup


class Timers(Labels):
    """The timer part of :class:`services.scorer.core.Scorer` (a mixin: the attributes are
    the scorer's dataclass fields, the methods below the scorer's own)."""

    #: Per input partition: a heap of (due, customer id); a customer's timer is in its
    #: partition's heap and fires when that partition's watermark passes it.
    _timers: dict[Any, list[tuple[int, str]]]
    _timer_at: dict[str, int]
    #: Each customer's live timer: where it was set, (the position of the record, the phase
    #: of the score that set it, see :meth:`_emit`); it is due from there on, or from where
    #: the watermark passes it, whichever is later.
    _timer_from: dict[str, tuple[int, int]]
    _cache: dict[str, tuple[bytes, Buckets]]
    _unsealed: dict[str, State]
    #: Deferred scores: customer id -> (emit even if nothing moved; as of; position).
    _urgent: dict[str, tuple[bool, int, int]]
    #: Score outputs held until :meth:`settle` (``defer_scores``): (order key, output).
    _held: list[tuple[tuple[int, int, int, str], ScoreEmit]]
    defer_scores: bool
    retired: set[str]
    #: The shell's state lookup (optional): an event that finds its customer's timer already
    #: passed by the watermark then fires every such timer at once, on stacked arrays (as a
    #: flush would; the same scores), instead of this customer's alone, one row at a time.
    store: Callable[[str], State | None] | None = None
    #: Set by the shell while it replays a record parked behind a merge: (the customer's
    #: partition, its watermark when the record was read). :meth:`fire_before` then fires
    #: what that watermark had passed, not what the clock passed since (timing).
    read_watermark: tuple[Any, int | None] | None = None

    if TYPE_CHECKING:

        def score_many(self, items: Sequence[tuple[State, int]]) -> list[Scored]:
            raise NotImplementedError

        def _settle(
            self,
            st: State,
            s: Scored,
            now_ms: int,
            force: bool = False,
            at: tuple[int, int] | None = None,
        ) -> ScoreEmit | None:
            raise NotImplementedError

    # -- the order of the score outputs ----------------------------------------------------
    def _emit(self, out: ScoreEmit, at: tuple[int, int], as_of: int = 0) -> list[Out]:
        """``out`` as an output now, or held until :meth:`settle` (``defer_scores``) at
        ``at``: (the position of the record that made it due, phase), then its instant and
        customer id. Phases of one record: 0 the timers set before it that it passed (or
        that its customer's own event fires first, and the grid points after those that are
        due too), 1 its own score (an urgent event, a merge and its tombstones), 2 the timers
        set by it or its score and already passed (a late event's next refresh)."""
        if not self.defer_scores:
            return [out]
        self._held.append(((at[0], at[1], as_of, out.customer_id), out))
        return []

    def tombstone(self, customer_id: str, merged: tuple[str, int] | None = None) -> list[Out]:
        """A score tombstone for ``customer_id`` (merged away into ``merged`` = (survivor,
        merge event time), which its headers carry) at the current record's place (held like
        the scores: after the customer's scores due before it)."""
        return self._emit(ScoreEmit(customer_id, None, merged), (self._pos, 1))

    def _timer_order(
        self, cid: str, due: int, since: tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """Where a timer of ``cid`` due at ``due`` set at ``since`` (None: its live timer's)
        fires (see :meth:`_emit`): where its partition's watermark passed it, but not before
        the record that set it (and after that record's own score if that set it)."""
        since = self._timer_from.get(cid, (-1, 0)) if since is None else since
        passed = self.passed_at(self.part(cid), due)
        if passed > since[0]:
            return (passed, 0)
        return (since[0], 0 if since[1] == 0 else 2)

    def settle(self, get: Callable[[str], State | None], now_ms: int) -> list[Out]:
        """Before the batch commits: score the customers whose urgent events or merges were
        deferred (:attr:`defer_scores`), each once, as of its latest event (or the merge, if
        later), and those whose timers their partition's watermark passed, on stacked arrays;
        then the batch's score outputs, in the order of the records that made them due
        (a record's timers before its own score; timers by instant and customer id), so the
        order of a scores partition's records depends on the input records only."""
        outs: list[Out] = []
        self._settle_due(get, now_ms, outs, sorted(self._timers, key=str))
        held, self._held = self._held, []
        held.sort(key=lambda x: x[0])
        outs += [emit for _, emit in held]
        self._passes.clear()
        return outs

    def _settle_due(
        self, get: Callable[[str], State | None], now_ms: int, outs: list[Out], parts: list[Any]
    ) -> None:
        """The deferred scores, then the timers partitions ``parts``' watermarks passed."""
        due: list[tuple[str, State, bool, int, int]] = []
        for cid, (force, as_of, pos) in self._urgent.items():
            st = get(cid)
            if st is None:
                continue
            st = dict(st)
            if cid in self._unsealed:
                self._unsealed[cid] = st
            due.append((cid, st, force, as_of, pos))
        self._urgent.clear()
        if due:
            scored = self.score_many([(st, as_of) for _, st, _, as_of, _ in due])
            for (cid, st, force, _, pos), s in zip(due, scored, strict=True):
                emit = self._settle(st, s, now_ms, force=force, at=(pos, 1))
                outs.append(StateWrite(cid, st))
                if emit is not None:
                    outs.append(emit)
        if outs:  # the states just scored (also by the caller), before they are stored
            get = _overlay(_written(outs), get)
        self._fire_timers(get, now_ms, outs, parts)

    # -- timers --------------------------------------------------------------------------
    def _due(self, st: State) -> int:
        """When the customer should next be scored (event time), which is also the instant it
        is scored as of: a pending customer ``min_emit_interval`` after its latest event (a
        burst is scored once it pauses), but not before that long after its last emission or
        before its last score; a refresh at the next point of its grid after its last score.
        Neither depends on when the timer fires (watermark, batching, instance)."""
        if st["pending"]:
            last = st["emitted_as_of"]
            due = int(st["last_event_ms"]) + self.config.min_emit_interval_ms
            if last is not None:
                due = max(due, int(last) + self.config.min_emit_interval_ms)
            return max(due, int(st["scored_as_of"] or 0))
        every = self._every(st)
        scored = int(st["scored_as_of"] or st["last_event_ms"])
        return (scored // every + 1) * every

    def _every(self, st: State) -> int:
        cfg = self.config
        quiet = int(st["scored_as_of"] or st["last_event_ms"]) - int(st["last_event_ms"])
        if st["emitted_stage"] == "churned" or quiet >= cfg.slow_refresh_after_ms:
            return cfg.churned_refresh_interval_ms
        return cfg.refresh_interval_ms

    def fire_before(
        self, customer_id: str, state: State | None, t: int, now_ms: int
    ) -> tuple[State | None, list[Out]]:
        """Score the customer at every instant it is due before event time ``t`` (a deferred
        urgent score, a pending score, refreshes) or by its partition's watermark, each as of
        that instant with the state it had then: call before applying an event (or merge) of
        ``t``. The watermark may not have passed the first ones yet; they fire first all the
        same, so which events a score holds depends on the customer's own events only, not on
        batching or tick timing. Those the watermark passed fire first even when ``t`` is
        older (a late event): as they would have at a flush between the records, so whether
        a flush came in between does not matter either."""
        outs: list[Out] = []
        if state is None:
            return state, outs
        urgent = self._urgent.pop(customer_id, None)
        if urgent is not None:  # (also when this event is older: it came after that one)
            at = (urgent[2], 1)
            state = self._fire_one(customer_id, state, urgent[1], now_ms, urgent[0], outs, at)
        part = self.part(customer_id)
        wm, due = self.watermark_of(part), self._due(state)
        if self.read_watermark is not None and self.read_watermark[0] == part:
            wm = self.read_watermark[1]
        limit = t if wm is None else max(t, wm + 1)
        if self.store is not None and wm is not None and due <= wm:
            self._settle_due(self.store, now_ms, outs, [part])
            state = _written(outs).get(customer_id) or state
        for _ in range(1000):  # (a grid point a day at most: years of silence)
            due = self._due(state)
            if due >= limit:
                break
            at = self._timer_order(customer_id, due)
            state = self._fire_one(customer_id, state, due, now_ms, False, outs, at)
        return state, outs

    def fire_urgent(
        self, customer_id: str, state: State | None, now_ms: int
    ) -> tuple[State | None, list[Out]]:
        """Score the customer's deferred urgent event now, as of its own instant (as the
        batch's settle would): before a merge moves or extends its state, so that whether it
        is scored with or without the merge does not depend on where a batch ended."""
        outs: list[Out] = []
        urgent = self._urgent.pop(customer_id, None)
        if urgent is not None and state is not None:
            at = (urgent[2], 1)
            state = self._fire_one(customer_id, state, urgent[1], now_ms, urgent[0], outs, at)
        return state, outs

    def _fire_one(
        self,
        cid: str,
        state: State,
        as_of: int,
        now_ms: int,
        force: bool,
        outs: list[Out],
        at: tuple[int, int],
    ) -> State:
        st = dict(state)
        if cid in self._unsealed:
            self._unsealed[cid] = st
        emit = self._settle(st, self.score_many([(st, as_of)])[0], now_ms, force=force, at=at)
        outs.append(StateWrite(cid, st))
        if emit is not None:
            outs.append(emit)
        return st

    def _schedule(self, customer_id: str, due: int, at: tuple[int, int] | None = None) -> None:
        """Set the customer's timer to ``due``, set at ``at`` (see :attr:`_timer_from`; None:
        by the current record); the same due time keeps where it was first set."""
        if self._timer_at.get(customer_id) == due:
            return
        self._timer_at[customer_id] = due
        self._timer_from[customer_id] = (self._pos, 1) if at is None else at
        heap = self._timers.get(self.part(customer_id))
        if heap is None:
            heap = self._timers[self.part(customer_id)] = []
        heapq.heappush(heap, (due, customer_id))

    def rebuild(
        self, states: Iterable[tuple[str, State]], retired: Iterable[str] | None = None
    ) -> None:
        """Recreate the timers from the states (after a restore or an abort) and, if given, the
        forgotten ids. The partitions' clocks are not taken from the states but from their own
        changelog records (the shell's :meth:`restore_clocks`)."""
        self._cache.clear()  # may hold changes that were rolled back
        self._unsealed.clear()
        self._urgent.clear()
        self._held.clear()
        self._passes.clear()
        if retired is not None:
            self.retired = set(retired)
        self._timers = {}
        self._timer_at = {}
        self._timer_from = {}
        for cid, st in states:
            due = self._due(st)
            self._timer_at[cid] = due
            self._timers.setdefault(self.part(cid), []).append((due, cid))
        for heap in self._timers.values():
            heapq.heapify(heap)

    def flush(
        self,
        get: Callable[[str], State | None],
        states: Callable[[], Iterable[tuple[str, State]]],
        now_ms: int,
        out_of_time: Callable[[], bool] | None = None,
    ) -> list[Out]:
        """Time-driven work up to the watermarks: :meth:`settle` (customers whose timer their
        partition's watermark passed: pending ones and refreshes, up to
        ``max_scores_per_flush``; in the service the batches' settles leave none, unless
        something other than the records moved time), then take the training snapshots and
        learn from the labels that matured, by the instance's clock (see :meth:`mature` for
        ``out_of_time``)."""
        outs: list[Out] = self.settle(get, now_ms)
        if self.watermark is None:
            return outs
        self.snapshots(states)  # (their features do not depend on the scoring fields)
        self.mature(states, out_of_time)
        return outs

    def _fire_timers(
        self, get: Callable[[str], State | None], now_ms: int, outs: list[Out], parts: list[Any]
    ) -> None:
        """Score the customers of partitions ``parts`` whose timers their partition's watermark
        passed, each as of its due instant (up to ``max_scores_per_flush`` in all), into
        ``outs``."""
        budget = self.config.max_scores_per_flush
        for part in parts:
            wm = self.watermark_of(part)
            timers = self._timers.get(part)
            if wm is None or not timers:
                continue
            while budget > 0 and timers and timers[0][0] <= wm:
                # rounds: a customer scored at one grid point may be due at the next one too
                # (the watermark jumped days): each point is scored as of itself
                due: list[tuple[str, State, tuple[int, int]]] = []
                seen: set[str] = set()
                while timers and timers[0][0] <= wm and len(due) < budget:
                    at, cid = heapq.heappop(timers)
                    if cid in seen or self._timer_at.get(cid) != at:
                        continue  # superseded: the customer's live timer is elsewhere
                    del self._timer_at[cid]
                    st = get(cid)
                    if st is None:
                        continue  # deleted since
                    since = self._timer_from.pop(cid, (-1, 0))
                    if self._due(st) > wm:  # its due time moved on (e.g. onto the weekly grid)
                        self._schedule(cid, self._due(st), since)
                        continue
                    seen.add(cid)
                    st = dict(st)
                    if cid in self._unsealed:
                        self._unsealed[cid] = st
                    due.append((cid, st, since))
                if not due:
                    break
                budget -= len(due)
                scored = self.score_many([(st, self._due(st)) for _, st, _ in due])
                settled: dict[str, State | None] = {}
                for (cid, st, since), s in zip(due, scored, strict=True):
                    when = self._timer_order(cid, s.as_of, since)
                    emit = self._settle(st, s, now_ms, at=when)
                    outs.append(StateWrite(cid, st))
                    settled[cid] = st
                    if emit is not None:
                        outs.append(emit)
                get = _overlay(settled, get)
