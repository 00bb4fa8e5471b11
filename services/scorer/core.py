"""Scorer core (pure): event-time features, online churn scoring, coalesced emission.

The shell hands every identified event to :meth:`Scorer.on_event` with the customer's state
(a dict shaped like ``io.segflow.ScorerState``, see :mod:`services.scorer.features`) and gets
back the new state and the outputs to produce; it calls :meth:`Scorer.flush` on every tick.
Time is an argument everywhere: ``now_ms`` (processing time) only stamps ``scored_at`` and
rejects events from the future; everything else runs on event time.

Event time
    ``max_event_ms`` (the clock) is the smallest latest ``occurred_at`` of the input
    partitions that may still deliver older events: those with records in the batch at hand
    or unread records, as the shell reports (:meth:`Scorer.on_batch`); the largest of all
    when every partition has been read to its end. The **watermark** is
    ``max_event_ms - watermark_delay_ms`` (the out-of-orderness we wait for): time-driven work
    (pending scores, refreshes) happens when the watermark passes its due time. The **final
    watermark** is ``max_event_ms - allowed_lateness_ms``: an event older than it is rejected
    (``too_late``, dead-lettered); a later one lands in its own day bucket however late it
    comes, and churn labels mature only when their horizon is behind the final watermark.

Emission (coalescing)
    An *urgent* event (purchase, cancellation, escalated ticket, unsubscribe, or the first
    activity after a day or more of silence) scores the customer at once. Any other event marks
    it pending: it is scored when the watermark passes ``min_emit_interval_ms`` after its last
    emission, so a burst of page views yields one score. A scored customer is emitted only when
    something moved materially (a quantised fingerprint of its features, its churn probability
    by ``churn_delta``, engagement by ``engagement_delta``, lifecycle stage or cluster).
    Every customer is also refreshed on the ``refresh_interval_ms`` event-time grid (weekly
    once churned or silent for four weeks), so recency grows and windows roll for silent
    customers too; a refresh is emitted only when it moved something materially.

Churn
    ``churn_probability`` is the probability of no *qualifying activity* (``churn_activity``:
    purchase, login or any) in the next ``churn_horizon_days`` (H). Every customer is
    snapshotted one day in ``snapshot_every_days`` as scored at that midnight, and the
    snapshot is labelled exactly H days later, once that day is behind the final watermark
    (see :meth:`Scorer.snapshots` and :meth:`Scorer.mature`). The model's inputs include the
    buy-till-you-die summary and a BG/NBD fit of the customers (:mod:`services.scorer.btyd`),
    refitted weekly, whose probability of no activity in H is also the cold-start prior
    (:data:`CHURN_PRIOR`); the weights are sign-constrained (:data:`CHURN_SIGNS`). One
    customer in ``holdout_every`` is never learned from: its labels measure the scores as
    served.

>>> sc = Scorer(ScorerConfig())
>>> t0 = 1_704_067_200_000
>>> st, out = sc.on_event(None, "c1", {"event_type": "purchase", "occurred_at": t0,
...                                    "amount": 20.0}, now_ms=t0)
>>> [type(o).__name__ for o in out]
['StateWrite', 'ScoreEmit']
>>> score = out[1].score
>>> p = score["churn_probability"]
>>> score["features"]["purchases_7d"], score["lifecycle_stage"], 0 <= p <= 1
(1.0, 'onboarded', True)
"""

from __future__ import annotations

import heapq
import math
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from segflow.errors import InvalidRecord
from services.scorer import btyd
from services.scorer.config import DEFAULT_HIGH_VALUE_ZIPS as DEFAULT_HIGH_VALUE_ZIPS
from services.scorer.config import FORGET_EVENT as FORGET_EVENT
from services.scorer.config import STAGES as STAGES
from services.scorer.config import URGENT_TYPES as URGENT_TYPES
from services.scorer.config import Out as Out
from services.scorer.config import Retire as Retire
from services.scorer.config import ScoreEmit as ScoreEmit
from services.scorer.config import ScorerConfig as ScorerConfig
from services.scorer.config import StateWrite as StateWrite
from services.scorer.features import (
    DAY,
    EVENT_SIGNAL,
    FEATURE_INDEX,
    FEATURE_NAMES,
    HOUR,
    NEVER_DAYS,
    QUALIFYING,
    RING,
    Buckets,
    State,
    apply_event,
    compute,
    compute_many,
    high_value_zip,
    merge_into,
    new_state,
)
from services.scorer.model import CLUSTER_DIMS, ChurnModel
from services.scorer.view import (
    _BG_EXPECTED,
    _BG_P_ALIVE,
    _BG_P_NONE,
    _BT_T,
    _BT_TX,
    _BT_X,
    _CLUSTER_NAMES,
    _SINCE_Q,
    cluster_rows,
    clv,
    engagement,
    engagement_rows,
    fingerprint,
    fingerprints,
    model_input,
)
from services.scorer.view import _MI_NAMES as _MI_NAMES
from services.scorer.view import CHURN_PRIOR as CHURN_PRIOR
from services.scorer.view import CHURN_SIGNS as CHURN_SIGNS
from services.scorer.view import MODEL_INPUTS as MODEL_INPUTS
from services.scorer.view import PRIOR_SHARE_FEATURE as PRIOR_SHARE_FEATURE
from services.scorer.view import lifecycle as lifecycle
from services.scorer.view import model_matrix as model_matrix
from services.scorer.view import new_model as new_model


def _overlay(
    states: Mapping[str, State | None], get: Callable[[str], State | None]
) -> Callable[[str], State | None]:
    def lookup(cid: str) -> State | None:
        return states[cid] if cid in states else get(cid)

    return lookup


class Pending:
    """One day's training snapshots waiting for their label (H days later): per snapshot the
    customer, its qualifying days before the day, its model input and churn score as scored,
    whether it is held back (measured, never learned) and its days since the last qualifying
    activity (recency)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.q_days: list[int] = []
        self.x: list[npt.NDArray[np.float32]] = []
        self.p: list[float] = []
        self.holdout: list[bool] = []
        self.since: list[float] = []

    def add(
        self, cid: str, q_days: int, x: npt.NDArray[np.float64], p: float, held: bool, since: float
    ) -> None:
        self.ids.append(cid)
        self.q_days.append(q_days)
        self.x.append(x.astype(np.float32))
        self.p.append(p)
        self.holdout.append(held)
        self.since.append(since)


@dataclass(frozen=True)
class Scored:
    """One customer scored as of ``as_of``."""

    as_of: int
    vector: npt.NDArray[np.float64]
    churn: float
    engagement: float
    clv: float
    cluster: int
    stage: str
    top: list[tuple[str, float]]
    fingerprint: int


@dataclass
class Scorer:
    """The scorer's process-wide state: event-time clock, model, timers (rebuildable)."""

    config: ScorerConfig
    model: ChurnModel = field(default_factory=new_model)
    max_event_ms: int | None = None
    #: Per input partition: (largest occurred_at, processing time it last had an event).
    _sources: dict[Any, tuple[int, int]] = field(default_factory=dict)
    #: Per input partition, as last reported by :meth:`on_batch`: records of the batch at
    #: hand not handled yet, and records not read yet after the batch (None: unknown).
    _pending: dict[Any, int] = field(default_factory=dict)
    _lag: dict[Any, int | None] = field(default_factory=dict)
    #: Per input partition: (sequence number, occurred_at) of its last ``reorder_records``
    #: records that no later record undercuts (the front is their minimum).
    _recent: dict[Any, deque[tuple[int, int]]] = field(default_factory=dict)
    _seq: dict[Any, int] = field(default_factory=dict)
    _timers: list[tuple[int, str]] = field(default_factory=list)
    #: Each customer's live timer (the heap may also hold superseded ones, skipped when
    #: popped): one per customer, so no customer is ever left without one.
    _timer_at: dict[str, int] = field(default_factory=dict)
    _descriptions: dict[int, str] = field(default_factory=dict)
    emitted: int = 0
    scored: int = 0
    #: Decompressed buckets of recently seen customers: (the compressed blob they match,
    #: buckets). A state whose blob is not the cached object (a rollback, a restore) reloads.
    cache_size: int = 20_000
    _cache: dict[str, tuple[bytes, Buckets]] = field(default_factory=dict)
    #: True: every state an output carries is complete. False: a changed customer's buckets
    #: stay decompressed in the cache and its state's ``buckets`` field is stale until
    #: :meth:`seal` compresses it (once per batch instead of once per event); call
    #: :meth:`seal` before persisting states or reading them outside the scorer.
    pack_states: bool = True
    _unsealed: dict[str, State] = field(default_factory=dict)
    #: False: an urgent event is scored inside :meth:`on_event`. True: it only marks the
    #: customer, and :meth:`settle` scores every marked customer once, on stacked arrays,
    #: before the batch commits (the service's mode: the same transaction, so the same
    #: exactly-once outputs, without per-event numpy work on one-row arrays; several urgent
    #: events of one customer in a batch give one score, with all of them).
    defer_scores: bool = False
    #: Customers to score at :meth:`settle` (True: emit even if nothing moved, after a merge).
    _urgent: dict[str, bool] = field(default_factory=dict)
    #: Customer ids that were forgotten (see :meth:`forget`); the shell restores them.
    retired: set[str] = field(default_factory=set)
    #: Events and merges dropped because their customer id was forgotten.
    dropped_retired: int = 0
    #: None: this scorer learns its own model. Set (N instances, one model): what it would
    #: learn goes to ``sink(kind, payload)`` instead, for the deployment's one learner
    #: (:func:`learn_from`): ``"examples"`` (a label day's matured snapshots), ``"clusters"``
    #: (cluster inputs of the snapshots) and ``"summary"`` (the BG/NBD summaries of a refit
    #: day); the scorer scores with the model versions the learner publishes.
    sink: Callable[[str, dict[str, Any]], None] | None = None

    # -- clock ---------------------------------------------------------------------------
    @property
    def watermark(self) -> int | None:
        """Event time up to which the stream is considered complete enough to act on."""
        if self.max_event_ms is None:
            return None
        return self.max_event_ms - self.config.watermark_delay_ms

    @property
    def final_watermark(self) -> int | None:
        """Event time before which no event is accepted any more."""
        if self.max_event_ms is None:
            return None
        return self.max_event_ms - self.config.allowed_lateness_ms

    def _observe(self, source: Any, t: int, now_ms: int) -> None:
        """Advance the clock with an event of ``t`` from input partition ``source``: the clock
        is the smallest latest event time of the partitions that can still deliver older
        events (see :meth:`on_batch`), or the largest of all when none can; it never goes
        backwards. A replay that reads one partition ahead of the others thus does not make
        the others' events late."""
        old = self._sources.get(source)
        self._sources[source] = (t if old is None or t > old[0] else old[0], now_ms)
        if source in self._lag:  # the floor only matters for reported partitions
            recent = self._recent.get(source)
            if recent is None:
                recent = self._recent[source] = deque()
            seq = self._seq[source] = self._seq.get(source, 0) + 1
            while recent and recent[-1][1] >= t:
                recent.pop()
            recent.append((seq, t))
            if recent[0][0] <= seq - self.config.reorder_records:
                recent.popleft()
        self._advance(now_ms)

    def _holds(self, source: Any, seen: int, now_ms: int) -> bool:
        """Whether ``source`` may still deliver events older than its latest: it has records
        in the batch at hand or unread ones (as last reported); without a report, whether it
        delivered within ``source_idle_ms`` of processing time."""
        if source in self._lag:
            lag = self._lag[source]
            if self._pending.get(source, 0) > 0 or (lag is not None and lag > 0):
                return True
            if lag is not None:
                return False
        return now_ms - seen <= self.config.source_idle_ms

    def _advance(self, now_ms: int) -> None:
        holding = [
            self._floor(src, t)
            for src, (t, seen) in self._sources.items()
            if self._holds(src, seen, now_ms)
        ]
        clock = min(holding) if holding else max(t for t, _ in self._sources.values())
        if clock >= 0 and (self.max_event_ms is None or clock > self.max_event_ms):
            self.max_event_ms = clock

    def _floor(self, source: Any, latest: int) -> int:
        """What a partition that may still deliver holds the clock at: the oldest of its last
        ``reorder_records`` records when it is reported (its unread records may start over
        from there), else its latest."""
        recent = self._recent.get(source)
        if source in self._lag and recent:
            return min(latest, recent[0][1])
        return latest

    def expect_sources(self, sources: Iterable[Any], now_ms: int) -> None:
        """Declare input partitions before they deliver: each holds the clock back until its
        first event, until it is reported caught up, or (without reports) until it has been
        idle for ``source_idle_ms``."""
        for source in sources:
            self._sources.setdefault(source, (-1, now_ms))

    def drop_sources(self, sources: Iterable[Any]) -> None:
        """Input partitions this instance no longer reads (another owns them): they stop
        holding the clock back."""
        for source in sources:
            for table in (self._sources, self._pending, self._lag, self._recent, self._seq):
                table.pop(source, None)

    def on_batch(
        self, pending: Mapping[Any, int], lag: Mapping[Any, int | None], now_ms: int
    ) -> None:
        """Report the input partitions' progress before a batch is handled: ``pending`` =
        records of each partition in the batch, ``lag`` = records of each assigned partition
        not read yet after the batch (None: unknown). A partition with either holds the clock
        back, so a burst read from one partition after a pause does not carry the clock past
        older events waiting in another; one read to its end does not hold it at all (an
        empty or quiet partition does not stall the clock either). Partitions missing from
        ``lag`` fall back to the processing-time rule."""
        self._pending = dict(pending)
        self._lag = dict(lag)
        for source in self._lag:
            self._sources.setdefault(source, (-1, now_ms))
        if self._sources:
            self._advance(now_ms)

    def _handled(self, source: Any) -> None:
        n = self._pending.get(source)
        if n:
            self._pending[source] = n - 1

    # -- events --------------------------------------------------------------------------
    def on_event(
        self,
        state: State | None,
        customer_id: str,
        event: Mapping[str, Any],
        now_ms: int,
        source: Any = 0,
    ) -> tuple[State | None, list[Out]]:
        """Apply one event to the customer's state; score at once if the event is urgent.

        A ``customer_forgotten`` event deletes the customer (:meth:`forget`); an event for a
        forgotten id is dropped (state None, no output). Raises
        :class:`~segflow.errors.InvalidRecord` (dead-lettered by the shell) for an event from
        the future (``future_event``), older than the allowed lateness (``too_late``) or
        without a customer id (``missing_field``).
        """
        self._handled(source)
        if not customer_id:
            raise InvalidRecord("identified event without customer_id", reason="missing_field")
        kind = str(event["event_type"])
        if kind == FORGET_EVENT:  # stamped in processing time: not a clock reading
            return None, self.forget(customer_id, int(event.get("occurred_at") or 0))
        if customer_id in self.retired:
            self.dropped_retired += 1  # never dead-lettered: it would keep the person's data
            return None, []
        t = int(event["occurred_at"])
        if t > now_ms + self.config.max_future_ms:
            raise InvalidRecord(
                f"event occurred {(t - now_ms) / 1000:.0f}s in the future", reason="future_event"
            )
        fw = self.final_watermark
        if fw is not None and t < fw:
            raise InvalidRecord(
                f"event is {(fw - t) / 1000:.0f}s older than the allowed lateness",
                reason="too_late",
            )
        self._observe(source, t, now_ms)
        st = new_state(customer_id, t) if state is None else dict(state)
        prev_active = st["last_active_ms"]
        b = self.buckets(customer_id, st)
        sd = self.model.snapshot_day
        if state is not None and sd is not None and t // DAY > sd:
            # the first event after a snapshot day the watermark has not passed yet: snapshot
            # the state before it (exactly as of that midnight)
            due = self._snapshot_days(customer_id, state, sd, t // DAY)
            if due:
                self._snapshot([(state, d) for d in due])
        del self._cache[customer_id]  # mutated below: not valid for the old blob any more
        b = apply_event(st, event, b, QUALIFYING[self.config.churn_activity])
        if kind == "identify":
            high_value_zip(st, event, self.config.high_value_zips)
        if self.pack_states:
            self._cache[customer_id] = (b.dump(), b)
            st["buckets"] = self._cache[customer_id][0]
        else:
            self._cache[customer_id] = (st["buckets"], b)
            self._unsealed[customer_id] = st
        urgent = (
            kind in URGENT_TYPES
            or (kind == "support_ticket" and bool(event.get("escalated")))
            or (
                st["last_active_ms"] is not None
                and st["last_active_ms"] != prev_active
                and (
                    prev_active is None
                    or st["last_active_ms"] - prev_active >= self.config.reactivation_gap_ms
                )
            )
        )
        outs: list[Out] = []
        if urgent and self.defer_scores:
            self._urgent.setdefault(customer_id, False)
        elif urgent:
            scored = self.score(st, max(st["last_event_ms"], self.watermark or 0), b)
            emit = self._settle(st, scored, now_ms)
            outs.append(StateWrite(customer_id, st))
            if emit is not None:
                outs.append(emit)
            return st, outs
        if not st["pending"]:
            st["pending"] = True
            self._schedule(customer_id, self._due(st))
        outs.append(StateWrite(customer_id, st))
        return st, outs

    def on_merge(
        self, get: Callable[[str], State | None], merge: Mapping[str, Any], now_ms: int
    ) -> list[Out]:
        """Fold the absorbed customers' states into the survivor's, delete theirs (state and
        score tombstones) and rescore the survivor. Replaying a merge is a no-op."""
        survivor_id = str(merge["survivor_id"])
        outs: list[Out] = []
        if survivor_id in self.retired:
            # read after the survivor's forget (merges and events are separate topics): the
            # absorbed ids are the same forgotten person, so they go too
            self.dropped_retired += 1
            for absorbed_id in merge["absorbed_ids"]:
                if absorbed_id != survivor_id:
                    outs += self.forget(absorbed_id, self.max_event_ms or 0)
            return outs
        for cid in (survivor_id, *merge["absorbed_ids"]):
            self._seal_one(cid)  # merge_into reads the compressed buckets
        survivor = get(survivor_id)
        merged = False
        for absorbed_id in merge["absorbed_ids"]:
            if absorbed_id == survivor_id:
                continue
            absorbed = get(absorbed_id)
            if absorbed is None:
                continue
            if survivor is None:
                survivor = dict(absorbed)
                survivor["customer_id"] = survivor_id
                survivor["pending"] = True
            else:
                survivor = merge_into(survivor, absorbed)
            merged = True
            outs.append(StateWrite(absorbed_id, None))
            outs.append(ScoreEmit(absorbed_id, None))
        if not merged or survivor is None:
            return outs
        for absorbed_id in merge["absorbed_ids"]:
            self._urgent.pop(absorbed_id, None)
        if self.defer_scores:
            self._urgent[survivor_id] = True
            outs.append(StateWrite(survivor_id, survivor))
            return outs
        scored = self.score(survivor, max(survivor["last_event_ms"], self.watermark or 0))
        emit = self._settle(survivor, scored, now_ms, force=True)
        outs.append(StateWrite(survivor_id, survivor))
        if emit is not None:
            outs.append(emit)
        return outs

    def forget(self, customer_id: str, at: int) -> list[Out]:
        """Delete the customer for good (a ``segflow forget`` erasure): its state (changelog
        tombstone), its last score (tombstone on ``segflow.scores``), its cached buckets and
        pending timers, and retire the id so that nothing recreates it (:class:`Retire`).
        Forgetting a forgotten id again is a no-op."""
        if customer_id in self.retired:
            return []
        self.retired.add(customer_id)
        self._urgent.pop(customer_id, None)
        self._cache.pop(customer_id, None)
        self._unsealed.pop(customer_id, None)
        if self._timer_at.pop(customer_id, None) is not None:
            self._timers = [x for x in self._timers if x[1] != customer_id]
            heapq.heapify(self._timers)
        return [
            StateWrite(customer_id, None),
            ScoreEmit(customer_id, None),
            Retire(customer_id, at),
        ]

    def release(self, customer_id: str) -> None:
        """Drop the customer's timer, cached buckets and deferred score without retiring the
        id: its state moved to another instance (a merge hand-off, or a revoked partition)."""
        self._urgent.pop(customer_id, None)
        self._cache.pop(customer_id, None)
        self._unsealed.pop(customer_id, None)
        self._timer_at.pop(customer_id, None)  # its heap entry is skipped as superseded

    def settle(self, get: Callable[[str], State | None], now_ms: int) -> list[Out]:
        """Score the customers whose urgent events or merges :meth:`on_event` /
        :meth:`on_merge` deferred (:attr:`defer_scores`), each once, as of its latest event
        (or the watermark, if later), on stacked arrays; call before the batch commits."""
        if not self._urgent:
            return []
        wm = self.watermark or 0
        due: list[tuple[str, State, bool]] = []
        for cid, force in self._urgent.items():
            st = get(cid)
            if st is None:
                continue
            st = dict(st)
            if cid in self._unsealed:
                self._unsealed[cid] = st
            due.append((cid, st, force))
        self._urgent.clear()
        scored = self.score_many([(st, max(st["last_event_ms"], wm)) for _, st, _ in due])
        outs: list[Out] = []
        for (cid, st, force), s in zip(due, scored, strict=True):
            emit = self._settle(st, s, now_ms, force=force)
            outs.append(StateWrite(cid, st))
            if emit is not None:
                outs.append(emit)
        return outs

    def seal(self) -> list[StateWrite]:
        """Compress the buckets of every customer changed since the last call into its state
        (in place) and return those states (see :attr:`pack_states`)."""
        outs = [StateWrite(cid, st) for cid, st in self._unsealed.items()]
        for cid in list(self._unsealed):
            self._seal_one(cid)
        return outs

    def _seal_one(self, customer_id: str) -> None:
        st = self._unsealed.pop(customer_id, None)
        if st is not None:
            b = self._cache[customer_id][1]
            blob = st["buckets"] = b.dump()
            self._cache[customer_id] = (blob, b)

    def buckets(self, customer_id: str, st: State) -> Buckets:
        """The customer's decompressed buckets, from the cache when they match ``st``."""
        hit = self._cache.get(customer_id)
        if hit is not None and hit[0] is st["buckets"]:
            return hit[1]
        b = Buckets.of(st)
        cache = self._cache
        if len(cache) >= self.cache_size:
            unsealed = self._unsealed
            for key in [k for k in list(cache)[: self.cache_size // 10] if k not in unsealed]:
                del cache[key]
        cache[customer_id] = (st["buckets"], b)
        return b

    # -- scoring -------------------------------------------------------------------------
    def score(self, st: State, as_of: int, b: Buckets | None = None) -> Scored:
        """Features and scores of one customer as of ``as_of`` (does not change anything)."""
        if b is None:
            b = self.buckets(st["customer_id"], st)
        return self._scored([st], [as_of], compute(st, as_of, b).vector[None, :])[0]

    def score_many(self, items: Sequence[tuple[State, int]]) -> list[Scored]:
        """:meth:`score` of many ``(state, as_of)`` at once (the same results, computed on
        stacked arrays: a refresh of thousands of customers costs far less per customer)."""
        out: list[Scored] = []
        for lo in range(0, len(items), 512):
            chunk = items[lo : lo + 512]
            states = [st for st, _ in chunk]
            as_ofs = [as_of for _, as_of in chunk]
            bs = [self.buckets(st["customer_id"], st) for st in states]
            out += self._scored(states, as_ofs, compute_many(states, as_ofs, bs))
        return out

    def _scored(
        self, states: Sequence[State], as_ofs: Sequence[int], rows: npt.NDArray[np.float64]
    ) -> list[Scored]:
        model, cfg = self.model, self.config
        self.fill_bgnbd(rows)
        churn, tops = model.predict_explain_matrix(_MI_NAMES, model_matrix(rows), cfg.top_k)
        eng = engagement_rows(rows)
        clusters = model.cluster_rows(cluster_rows(rows, eng)).tolist()
        prints = fingerprints(rows)
        ready = model.n_learned >= cfg.min_learned_for_stage
        out = []
        for i, (st, as_of) in enumerate(zip(states, as_ofs, strict=True)):
            vec = rows[i]
            p = float(churn[i])
            out.append(
                Scored(
                    as_of=as_of,
                    vector=vec,
                    churn=p,
                    engagement=float(eng[i]),
                    clv=clv(vec, p, cfg.clv_months, cfg.churn_horizon_days),
                    cluster=clusters[i],
                    stage=lifecycle(st, vec, p, ready, cfg),
                    top=tops[i],
                    fingerprint=prints[i],
                )
            )
        return out

    def fill_bgnbd(self, rows: npt.NDArray[np.float64]) -> None:
        """The ``bgnbd_*`` columns of feature rows (in place), from the latest BG/NBD fit and
        the rows' ``btyd_*`` summary (a customer without qualifying activity: as one whose
        first qualifying day is today)."""
        params = self.model.bgnbd or btyd.DEFAULT_PARAMS
        h = float(self.config.churn_horizon_days)
        x, tx = rows[:, _BT_X], rows[:, _BT_TX]
        t = np.maximum(rows[:, _BT_T], tx)
        rows[:, _BG_P_ALIVE] = btyd.p_alive(params, x, tx, t)
        rows[:, _BG_EXPECTED] = btyd.expected(params, x, tx, t, h)
        rows[:, _BG_P_NONE] = btyd.p_none(params, x, tx, t, h)

    def record(self, customer_id: str, s: Scored, now_ms: int) -> dict[str, Any]:
        """The CustomerScore record of a scored customer."""
        vec = s.vector
        values = np.round(vec, 4).tolist()
        features = dict(zip(FEATURE_NAMES, values, strict=True))
        # not a behavioural feature: how much of the churn score is still the prior (1 = no
        # label learned yet, 0.5 after PRIOR_STRENGTH labels), for rules that want a warm model
        features[PRIOR_SHARE_FEATURE] = round(self.model.prior_share(), 4)
        return {
            "customer_id": customer_id,
            "as_of": s.as_of,
            "churn_probability": round(s.churn, 4),
            "engagement_score": round(s.engagement, 2),
            "clv": round(s.clv, 2),
            "cluster": s.cluster,
            "lifecycle_stage": s.stage,
            "features": features,
            "top_features": [
                {"name": n, "value": values[FEATURE_INDEX[n]], "contribution": round(c, 4)}
                for n, c in s.top
            ],
            "model_version": self.model.version,
            "scored_at": now_ms,
            "cluster_description": self._descriptions.get(s.cluster, ""),
        }

    def _settle(self, st: State, s: Scored, now_ms: int, force: bool = False) -> ScoreEmit | None:
        """Record that ``st`` was scored (mutates ``st``: a fresh copy); emit if material."""
        self.scored += 1
        st["pending"] = False
        st["scored_as_of"] = s.as_of
        material = (
            force
            or st["emitted_as_of"] is None
            or s.fingerprint != st["emitted_fingerprint"]
            or s.stage != st["emitted_stage"]
            or s.cluster != st["emitted_cluster"]
            or abs(s.churn - st["emitted_churn"]) >= self.config.churn_delta
            or abs(s.engagement - st["emitted_engagement"]) >= self.config.engagement_delta
        )
        if not material:
            self._schedule(st["customer_id"], self._due(st))
            return None
        st["emitted_as_of"] = s.as_of
        st["emitted_fingerprint"] = s.fingerprint
        st["emitted_stage"] = s.stage
        st["emitted_cluster"] = s.cluster
        st["emitted_churn"] = s.churn
        st["emitted_engagement"] = s.engagement
        # after the stage: a customer just turned churned is next due on the weekly grid
        self._schedule(st["customer_id"], self._due(st))
        self.emitted += 1
        return ScoreEmit(st["customer_id"], self.record(st["customer_id"], s, now_ms))

    # -- timers --------------------------------------------------------------------------
    def _due(self, st: State) -> int:
        """When the customer should next be scored (event time)."""
        if st["pending"]:
            last = st["emitted_as_of"]
            return 0 if last is None else int(last) + self.config.min_emit_interval_ms
        every = self._every(st)
        scored = int(st["scored_as_of"] or st["last_event_ms"])
        return (scored // every + 1) * every

    def _every(self, st: State) -> int:
        cfg = self.config
        quiet = int(st["scored_as_of"] or st["last_event_ms"]) - int(st["last_event_ms"])
        if st["emitted_stage"] == "churned" or quiet >= cfg.slow_refresh_after_ms:
            return cfg.churned_refresh_interval_ms
        return cfg.refresh_interval_ms

    def _schedule(self, customer_id: str, due: int) -> None:
        if self._timer_at.get(customer_id) == due:
            return
        self._timer_at[customer_id] = due
        heapq.heappush(self._timers, (due, customer_id))

    def rebuild(
        self, states: Iterable[tuple[str, State]], retired: Iterable[str] | None = None
    ) -> None:
        """Recreate the timers from the states (after a restore or an abort) and, if given, the
        forgotten ids. The clock is not taken from the states: the newest customer may be far
        ahead of a partition that was behind, whose events would then look late; the inputs
        re-establish it."""
        self._cache.clear()  # may hold changes that were rolled back
        self._unsealed.clear()
        self._urgent.clear()
        if retired is not None:
            self.retired = set(retired)
        self._timers = [(self._due(st), cid) for cid, st in states]
        self._timer_at = {cid: due for due, cid in self._timers}
        heapq.heapify(self._timers)

    def flush(
        self,
        get: Callable[[str], State | None],
        states: Callable[[], Iterable[tuple[str, State]]],
        now_ms: int,
        out_of_time: Callable[[], bool] | None = None,
    ) -> list[Out]:
        """Time-driven work up to the watermark: score customers whose timer is due (pending
        ones and refreshes, up to ``max_scores_per_flush``), then learn from the labels that
        matured (see :meth:`mature` for ``out_of_time``)."""
        outs: list[Out] = self.settle(get, now_ms)
        if outs:  # the states just settled, before the caller has stored them
            get = _overlay({o.customer_id: o.state for o in outs if isinstance(o, StateWrite)}, get)
        if self._sources:
            self._advance(now_ms)
        wm = self.watermark
        if wm is None:
            return outs
        timers = self._timers
        budget = self.config.max_scores_per_flush
        due: list[tuple[str, State]] = []
        as_ofs: list[int] = []
        seen: set[str] = set()
        while timers and timers[0][0] <= wm and len(due) < budget:
            at, cid = heapq.heappop(timers)
            if cid in seen or self._timer_at.get(cid) != at:
                continue  # superseded: the customer's live timer is elsewhere in the heap
            del self._timer_at[cid]
            st = get(cid)
            if st is None:
                continue  # deleted since
            if self._due(st) > wm:  # its due time moved on (e.g. onto the weekly grid)
                self._schedule(cid, self._due(st))
                continue
            seen.add(cid)
            st = dict(st)
            if cid in self._unsealed:
                self._unsealed[cid] = st
            if st["pending"]:
                as_of = max(st["last_event_ms"], wm)
            else:  # a refresh: as of the latest grid time the watermark passed
                every = self._every(st)
                as_of = max(st["last_event_ms"], wm // every * every)
            due.append((cid, st))
            as_ofs.append(as_of)
        scored = self.score_many([(st, a) for (_, st), a in zip(due, as_ofs, strict=True)])
        for (cid, st), s in zip(due, scored, strict=True):
            emit = self._settle(st, s, now_ms)
            outs.append(StateWrite(cid, st))
            if emit is not None:
                outs.append(emit)
        self.snapshots(states)  # (their features do not depend on the scoring fields)
        self.mature(states, out_of_time)
        return outs

    # -- labels --------------------------------------------------------------------------
    def mature(
        self,
        states: Callable[[], Iterable[tuple[str, State]]],
        out_of_time: Callable[[], bool] | None = None,
    ) -> int:
        """Learn from every snapshot whose horizon is now behind the final watermark, day by
        day; with ``out_of_time`` (the shell's budget: True once it is spent) stop after the
        first day that ends with it spent, the rest in the next calls. Returns the number of
        examples learned."""
        fw = self.final_watermark
        if fw is None:
            return 0
        target = fw // DAY  # day boundaries up to target * DAY are final
        model = self.model
        if model.matured_through_day is None:
            model.matured_through_day = target
            return 0
        n = 0
        while model.matured_through_day < target:
            model.matured_through_day += 1
            n += self._learn_day(model.matured_through_day, states())
            if out_of_time is not None and out_of_time():
                break
        if n:
            self._descriptions = model.describe_clusters()
        return n

    def _learn_day(self, day: int, states: Iterable[tuple[str, State]]) -> int:
        """The day boundary ``day`` is final: label the snapshots of ``day - H`` (churned:
        no qualifying day in ``[day - H, day)``) and learn them (the held-back customers'
        only measure the scores as served); refit the BG/NBD if it is due."""
        cfg, model = self.config, self.model
        h = cfg.churn_horizon_days
        end = day * DAY
        due = model.pending.pop(day - h, None)
        want = {} if due is None else {cid: i for i, cid in enumerate(due.ids)}
        now_days = np.full(len(want), -1, dtype=np.int64)
        refit = model.bgnbd_day is None or day - model.bgnbd_day >= cfg.bgnbd_refit_days
        summary: list[tuple[float, float, float]] = []
        for cid, st in states:
            i = want.get(cid)
            if i is not None:
                now_days[i] = self.qualifying_days_before(st, day)
            first = st.get("q_first_ms")
            if refit and first is not None and first < end:
                f, last = first // DAY, int(st["q_last_ms"]) // DAY
                tx = float(last - f)
                summary.append((float(st["q_days"] - 1), tx, max(float(day - f), tx)))
        n = 0
        if due is not None:
            n = self._learn_snapshots(due, now_days, end)
        if refit and self.sink is not None:
            self.sink("summary", {"day": day, "rows": np.array(summary).reshape(-1, 3)})
        elif refit and len(summary) >= btyd.MIN_FIT_CUSTOMERS:
            a = np.array(summary)
            model.bgnbd = btyd.fit(a[:, 0], a[:, 1], a[:, 2], start=model.bgnbd)
            model.bgnbd_day = day
            model.suggested_horizon_days = self.suggested_horizon_days(states=None, gaps=a)
        return n

    def snapshots(self, states: Callable[[], Iterable[tuple[str, State]]]) -> int:
        """Take the training snapshots of the day boundaries the watermark passed since the
        last call: each customer on the days of its phase (one in ``snapshot_every_days``),
        its features and score as of that midnight. Only customers with no event after the
        boundary are taken here (their state is exactly what it was then); one whose event
        after the boundary came first was taken by :meth:`on_event`, from its state before
        that event. Returns the number of snapshots taken."""
        wm = self.watermark
        if wm is None:
            return 0
        hi = wm // DAY
        model, cfg = self.model, self.config
        lo = model.snapshot_day
        if lo is None:
            model.snapshot_day = hi
            return 0
        if hi <= lo:
            return 0
        every = cfg.snapshot_every_days
        todo: list[tuple[State, int]] = []
        n = 0
        for cid, st in states():
            n += 1
            todo += [(st, d) for d in self._snapshot_days(cid, st, lo, hi)]
        model.snapshot_day = hi
        cap = cfg.max_pending_labels / max(cfg.churn_horizon_days, 1)
        model.snapshot_rate = min(1.0, cap / max(1.0, n / every))
        model.observe_scores(self._snapshot(todo))
        self._descriptions = model.describe_clusters()
        return len(todo)

    def _snapshot_days(self, cid: str, st: State, lo: int, hi: int) -> list[int]:
        """The snapshot days ``d`` in ``(lo, hi]`` of the customer's phase that its state
        holds exactly (no event at or after ``d * DAY``), sampled at the snapshot rate."""
        every = self.config.snapshot_every_days
        phase = zlib.crc32(cid.encode()) % every
        s0 = max(lo + 1, int(st["last_event_ms"]) // DAY + 1)
        rate = int(self.model.snapshot_rate * 10_000)
        out = []
        for d in range(s0 + (phase - s0) % every, hi + 1, every):
            if rate >= 10_000 or zlib.crc32(f"{cid}:{d}".encode()) % 10_000 < rate:
                out.append(d)
        return out

    def _snapshot(self, todo: list[tuple[State, int]]) -> npt.NDArray[np.float64]:
        """Record training snapshots ``(state, day)``: the model input and churn score as
        served at the day boundary, and how many qualifying days the customer had before."""
        model, cfg = self.model, self.config
        scores = [np.zeros(0)]
        for lo in range(0, len(todo), 512):
            chunk = todo[lo : lo + 512]
            sts = [st for st, _ in chunk]
            bs = [self.buckets(st["customer_id"], st) for st in sts]
            rows = compute_many(sts, [d * DAY for _, d in chunk], bs)
            self.fill_bgnbd(rows)
            xm = model_matrix(rows)
            ps = model.predict_explain_matrix(_MI_NAMES, xm, 0)[0]
            crows = cluster_rows(rows, engagement_rows(rows))
            if self.sink is not None:
                self.sink("clusters", {"rows": crows})
            for cx in [] if self.sink is not None else crows.tolist():
                model.learn_cluster(dict(zip(_CLUSTER_NAMES, cx, strict=True)))
            for k, (st, d) in enumerate(chunk):
                cid = st["customer_id"]
                held = zlib.crc32(b"holdout:" + cid.encode()) % cfg.holdout_every == 0
                day = model.pending.get(d)
                if day is None:
                    day = model.pending[d] = Pending()
                day.add(
                    cid,
                    self.qualifying_days_before(st, d),
                    xm[k],
                    float(ps[k]),
                    held,
                    float(rows[k, _SINCE_Q]),
                )
            scores.append(ps)
        return np.concatenate(scores)

    def _learn_snapshots(self, due: Pending, now_days: npt.NDArray[np.int64], end: int) -> int:
        """Label matured snapshots and learn from those not held back; returns how many."""
        if self.sink is not None:
            keep = now_days >= 0  # not forgotten or merged away since
            idx = np.flatnonzero(keep)
            churned = now_days[idx] == np.asarray(due.q_days, dtype=np.int64)[idx]
            held = np.asarray(due.holdout, dtype=bool)[idx]
            self.sink(
                "examples",
                {
                    "end": end,
                    "x": np.array([due.x[i] for i in idx], dtype=np.float32).reshape(
                        -1, len(_MI_NAMES)
                    ),
                    "y": churned,
                    "p": np.asarray(due.p, dtype=np.float64)[idx],
                    "holdout": held,
                    "since": np.asarray(due.since, dtype=np.float64)[idx],
                },
            )
            return int((~held).sum())
        model = self.model
        n = 0
        for i in range(len(due.ids)):
            if now_days[i] < 0:
                continue  # the customer was forgotten or merged away since
            churned = bool(now_days[i] == due.q_days[i])
            p = float(due.p[i])
            if due.holdout[i]:
                model.observe_holdout(p, churned, float(due.since[i]))
                continue
            x = dict(zip(_MI_NAMES, due.x[i].astype(np.float64).tolist(), strict=True))
            model.learn(x, churned, at=end, p=p)
            n += 1
        return n

    def qualifying_days_before(self, st: State, day: int) -> int:
        """Distinct days with qualifying activity before the day boundary ``day`` (the
        summary's count less the days from ``day`` on that the buckets hold)."""
        total = int(st.get("q_days", 0))
        head = int(st["head_day"])
        if head < day or total == 0:
            return total
        b = self.buckets(st["customer_id"], st)
        slots = np.arange(max(day, head - RING + 1), head + 1) % RING
        sigs = self._qualifying_signals
        later = int(b.counts[slots][:, sigs].any(axis=1).sum())
        return total - later

    @property
    def _qualifying_signals(self) -> list[int]:
        return [
            EVENT_SIGNAL[k]
            for k in sorted(QUALIFYING[self.config.churn_activity])
            if k in EVENT_SIGNAL
        ]

    def suggested_horizon_days(
        self,
        states: Iterable[tuple[str, State]] | None = None,
        gaps: npt.NDArray[np.float64] | None = None,
    ) -> float:
        """A horizon H for this population: the 80th percentile of the mean gap between
        qualifying days of the customers with more than one (weighted by their gaps), rounded
        up to a week; 30 when no customer has two yet. ``gaps``: summaries ``(x, t_x, T)``."""
        if gaps is None:
            rows = [
                (float(st["q_days"] - 1), float(st["q_gap_sum"]), 0.0)
                for _, st in (states or [])
                if st.get("q_gaps")
            ]
            gaps = np.array(rows).reshape(-1, 3)
        x, tx = gaps[:, 0], gaps[:, 1]
        sel = x > 0
        if not sel.any():
            return 30.0
        mean = tx[sel] / x[sel]
        order = np.argsort(mean)
        w = np.cumsum(x[sel][order])
        q = float(mean[order][np.searchsorted(w, 0.8 * w[-1])])
        return float(max(7, math.ceil(q / 7) * 7))

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, name: str, now_ms: int) -> dict[str, Any]:
        """A ``io.segflow.ModelCheckpoint`` record of the current model."""
        m = self.model
        descriptions = m.describe_clusters()
        return {
            "model_name": name,
            "version": m.version,
            "created_at": m.created_at,
            "checkpointed_at": now_ms,
            "n_learned": m.n_learned,
            "matured_through_day": m.matured_through_day,
            "max_event_ms": self.max_event_ms,
            # undefined metrics (an AUC with one class so far) are left out
            "metrics": {k: v for k, v in m.quality().items() if v is not None},
            "clusters": [
                {
                    "cluster": k,
                    "description": descriptions.get(k, ""),
                    "centroid": centroid,
                }
                for k, centroid in sorted(m.centroids().items())
            ],
            "model": m.to_bytes(),
        }

    def restore(self, record: Mapping[str, Any]) -> None:
        """Resume from a checkpoint record. A model from before issue #17 (its classifier has
        no sign constraints) learned another label on other inputs: it is replaced by a new
        model (the BG/NBD prior until labels mature), not resumed."""
        model = ChurnModel.from_bytes(record["model"])
        if getattr(model.classifier, "signs", None) is None:
            model = new_model(created_at=int(record.get("created_at") or 0))
        self.model = model
        self._descriptions = self.model.describe_clusters()

    def pending_timers(self) -> int:
        return len(self._timers)


def adopt(scorer: Scorer, shared: ChurnModel) -> None:
    """Score with ``shared`` (a model version the deployment's learner published; not shared
    with anything else afterwards), keeping this scorer's own label bookkeeping: the snapshots
    waiting for their labels, the days snapshotted and matured, the tie metrics."""
    old = scorer.model
    for name in (
        "pending",
        "snapshot_day",
        "snapshot_rate",
        "matured_through_day",
        "tie_share",
        "mean_score",
    ):
        setattr(shared, name, getattr(old, name))
    scorer.model = shared
    scorer._descriptions = shared.describe_clusters()


def learn_from(
    model: ChurnModel, kind: str, payload: Mapping[str, Any], config: ScorerConfig
) -> int:
    """What a :attr:`Scorer.sink` sent, learned by the deployment's one learner into
    ``model``, exactly as a scorer without a sink learns it itself; returns the examples
    learned. ``summary``: BG/NBD summaries of every partition for one refit day, stacked."""
    if kind == "clusters":
        for cx in np.asarray(payload["rows"]).tolist():
            model.learn_cluster(dict(zip(_CLUSTER_NAMES, cx, strict=True)))
        return 0
    if kind == "summary":
        a, day = np.asarray(payload["rows"]).reshape(-1, 3), int(payload["day"])
        last = model.bgnbd_day  # scorers that hold an older version ask more often
        due = last is None or day - last >= config.bgnbd_refit_days
        if due and len(a) >= btyd.MIN_FIT_CUSTOMERS:
            model.bgnbd = btyd.fit(a[:, 0], a[:, 1], a[:, 2], start=model.bgnbd)
            model.bgnbd_day = day
            model.suggested_horizon_days = Scorer(config).suggested_horizon_days(gaps=a)
        return 0
    n = 0
    end = int(payload["end"])
    for x, y, p, held, since in zip(
        np.asarray(payload["x"], dtype=np.float64).tolist(),
        np.asarray(payload["y"]).tolist(),
        np.asarray(payload["p"]).tolist(),
        np.asarray(payload["holdout"]).tolist(),
        np.asarray(payload["since"]).tolist(),
        strict=True,
    ):
        if held:
            model.observe_holdout(float(p), bool(y), float(since))
            continue
        model.learn(dict(zip(_MI_NAMES, x, strict=True)), bool(y), at=end, p=float(p))
        n += 1
    return n


__all__ = [
    "CLUSTER_DIMS",
    "DAY",
    "HOUR",
    "DEFAULT_HIGH_VALUE_ZIPS",
    "MODEL_INPUTS",
    "NEVER_DAYS",
    "FORGET_EVENT",
    "STAGES",
    "Out",
    "Retire",
    "ScoreEmit",
    "Scored",
    "Scorer",
    "ScorerConfig",
    "StateWrite",
    "clv",
    "engagement",
    "fingerprint",
    "adopt",
    "learn_from",
    "lifecycle",
    "model_input",
]
