"""Scorer core (pure): event-time features, online churn scoring, coalesced emission.

The shell hands every identified event to :meth:`Scorer.on_event` with the customer's state
(a dict shaped like ``io.segflow.ScorerState``, see :mod:`services.scorer.features`) and gets
back the new state and the outputs to produce; it calls :meth:`Scorer.flush` on every tick.
Time is an argument everywhere: ``now_ms`` (processing time) only stamps ``scored_at`` and
rejects events from the future; everything else runs on event time.

Event time
    Every input partition has its own clock (:class:`services.scorer.clock.PartitionClock`),
    a function of that partition's records in order, like a Kafka Streams task's stream
    time: the newest ``occurred_at`` read from it. A customer's timers (pending scores,
    refreshes) fire when its partition's **watermark**, ``clock - watermark_delay_ms`` (the
    out-of-orderness we wait for), passes their due time, or before the customer's next
    event or merge, whichever comes first. The partition's **final watermark** is its
    *reorder floor* (the oldest event of its last ``reorder_records``, never backwards) minus
    ``allowed_lateness_ms``: an older event is rejected (``too_late``, dead-lettered); a later
    one lands in its own day bucket however late it comes. The shell keeps each partition's
    clock in that partition's changelog, so a new owner continues where the old one
    committed. Training snapshots and labels: each partition's own clock with one model for N
    instances (:mod:`services.scorer.days`), else the instance's (``max_event_ms``).

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
    With ``defer_scores`` (the service) score outputs are held until :meth:`Scorer.settle`,
    before the commit, which releases them in the order of the records that made them due.

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
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from services.scorer import btyd
from services.scorer.clock import EventClock as EventClock
from services.scorer.clock import PartitionClock
from services.scorer.config import DEFAULT_HIGH_VALUE_ZIPS as DEFAULT_HIGH_VALUE_ZIPS
from services.scorer.config import FORGET_EVENT as FORGET_EVENT
from services.scorer.config import STAGES as STAGES
from services.scorer.config import URGENT_TYPES as URGENT_TYPES
from services.scorer.config import Out as Out
from services.scorer.config import Retire as Retire
from services.scorer.config import ScoreEmit as ScoreEmit
from services.scorer.config import ScorerConfig as ScorerConfig
from services.scorer.config import StateWrite as StateWrite
from services.scorer.days import SharedDays as SharedDays
from services.scorer.days import adopt as adopt
from services.scorer.features import (
    DAY,
    FEATURE_INDEX,
    FEATURE_NAMES,
    HOUR,
    NEVER_DAYS,
    QUALIFYING,
    Buckets,
    State,
    apply_event,
    compute,
    compute_many,
    high_value_zip,
    new_state,
)
from services.scorer.labels import Labels as Labels
from services.scorer.labels import Pending as Pending
from services.scorer.merge import merge_into
from services.scorer.model import CLUSTER_DIMS, ChurnModel
from services.scorer.timers import Timers as Timers
from services.scorer.view import (
    _BG_EXPECTED,
    _BG_P_ALIVE,
    _BG_P_NONE,
    _BT_T,
    _BT_TX,
    _BT_X,
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
from services.scorer.view import Scored as Scored
from services.scorer.view import lifecycle as lifecycle
from services.scorer.view import model_matrix as model_matrix
from services.scorer.view import new_model as new_model


@dataclass
class Scorer(Timers, SharedDays):
    """The scorer's process-wide state: event-time clock, model, timers (rebuildable)."""

    config: ScorerConfig
    model: ChurnModel = field(default_factory=new_model)
    #: Per input partition: its event-time clock.
    clocks: dict[Any, PartitionClock] = field(default_factory=dict)
    _moved: set[Any] = field(default_factory=set)
    #: A customer id's input partition (the shell's); None: one for all (tools, tests).
    partition_of: Callable[[str], Any] | None = None
    _timers: dict[Any, list[tuple[int, str]]] = field(default_factory=dict)
    #: Each customer's one live timer (the heaps may hold superseded ones, skipped).
    _timer_at: dict[str, int] = field(default_factory=dict)
    _timer_from: dict[str, tuple[int, int]] = field(default_factory=dict)
    _pos: int = 0
    _passes: dict[Any, list[tuple[int, int]]] = field(default_factory=dict)
    _held: list[tuple[tuple[int, int, int, str], ScoreEmit]] = field(default_factory=list)
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
    #: exactly-once outputs, without per-event numpy work on one-row arrays); a later-read
    #: event of the customer first scores it, without that event (as scoring inside
    #: :meth:`on_event` would). Score outputs are then held until :meth:`settle`, which
    #: releases them in the order of the records that made them due.
    defer_scores: bool = False
    #: Customers to score at :meth:`settle`: (True: emit even if nothing moved, after a
    #: merge; the instant to score as of; the position of the event or merge).
    _urgent: dict[str, tuple[bool, int, int]] = field(default_factory=dict)
    #: Forgotten customer ids (see :meth:`forget`); the shell restores them.
    retired: set[str] = field(default_factory=set)
    #: Events and merges dropped because their customer id was forgotten.
    dropped_retired: int = 0
    #: None: this scorer learns its own model. Set (N instances, one model): each partition's
    #: contribution per day goes to ``sink("day", payload)`` (services.scorer.days) for the
    #: one learner, and scores use the versions it publishes.
    sink: Callable[[str, dict[str, Any]], None] | None = None
    #: With a sink: the shared model's versions received, by day (:meth:`model_for`).
    versions: dict[int, ChurnModel] = field(default_factory=dict)
    version_lag_days: int = 1
    keep_versions: int = 32
    early_scores: int = 0  # scorings before their version came (they used the newest)
    partition_states: Callable[[Any], Iterable[tuple[str, State]]] | None = None
    _swept: dict[Any, int] = field(default_factory=dict)  # (services.scorer.days)
    _rate: dict[Any, float] = field(default_factory=dict)
    _initial: ChurnModel | None = None

    def __post_init__(self) -> None:  # the clusters' descriptions from the first score on
        self.model.cluster_rows(np.zeros((1, len(CLUSTER_DIMS))))  # River draws centres lazily
        self._descriptions = self._descriptions or self.model.describe_clusters()

    # -- events --------------------------------------------------------------------------
    def on_event(
        self,
        state: State | None,
        customer_id: str,
        event: Mapping[str, Any],
        now_ms: int,
        source: Any = 0,
        admitted: bool = False,
    ) -> tuple[State | None, list[Out]]:
        """Apply one event to the customer's state; score at once if the event is urgent.

        A ``customer_forgotten`` event deletes the customer (:meth:`forget`); an event for a
        forgotten id is dropped (state None, no output). Raises
        :class:`~segflow.errors.InvalidRecord` (dead-lettered by the shell) for an event from
        the future (``future_event``), older than the allowed lateness (``too_late``) or
        without a customer id (``missing_field``). ``admitted``: :meth:`admit` already
        checked the event and moved the clock with it when it was read (an event the shell
        parked behind a merge and applies now).
        """
        if not admitted:
            self.admit(customer_id, event, now_ms, source)
        else:
            self._pos += 1
        kind = str(event["event_type"])
        if kind == FORGET_EVENT:  # stamped in processing time: not a clock reading
            return None, self.forget(customer_id, int(event.get("occurred_at") or 0))
        if customer_id in self.retired:
            self.dropped_retired += 1  # never dead-lettered: it would keep the person's data
            return None, []
        t = int(event["occurred_at"])
        # what was due before this event is scored first, as of its own instant
        state, outs = self.fire_before(customer_id, state, t, now_ms)
        st = new_state(customer_id, t) if state is None else dict(state)
        prev_active = st["last_active_ms"]
        b = self.buckets(customer_id, st)
        part = self.part(customer_id) if self.sink is not None else None
        sd = self.model.snapshot_day if part is None else self._swept.get(part)
        if state is not None and sd is not None and t // DAY > sd:
            # the first event after a snapshot day the watermark has not passed yet: snapshot
            # the state before it (exactly as of that midnight)
            due = self._snapshot_days(customer_id, state, sd, t // DAY, part)
            if due:
                self._snapshot_early(state, due, part)
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
        if urgent and self.defer_scores:  # as of its latest event (later ones fire it first)
            self._urgent[customer_id] = (False, int(st["last_event_ms"]), self._pos)
        elif urgent:
            scored = self.score(st, int(st["last_event_ms"]), b)
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
        self,
        get: Callable[[str], State | None],
        merge: Mapping[str, Any],
        now_ms: int,
        elsewhere: Collection[str] = (),
    ) -> list[Out]:
        """Fold the absorbed customers' states into the survivor's, delete theirs (state and
        score tombstones; the ids ``elsewhere`` got their score tombstones from their owner)
        and rescore the survivor. Replaying a merge is a no-op."""
        survivor_id = str(merge["survivor_id"])
        outs: list[Out] = []
        self._pos += 1
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
        at = int(merge.get("occurred_at") or 0)  # the survivor's scores due before it first:
        survivor, outs = self.fire_before(survivor_id, survivor, at, now_ms)
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
            if absorbed_id not in elsewhere:
                outs += self.tombstone(absorbed_id, (survivor_id, at))
        if not merged or survivor is None:
            return outs
        for absorbed_id in merge["absorbed_ids"]:
            self._urgent.pop(absorbed_id, None)
        # the merged customer is scored as of its latest event or the merge, if later
        as_of = max(int(survivor["last_event_ms"]), at)
        if self.defer_scores:
            self._urgent[survivor_id] = (True, as_of, self._pos)
            outs.append(StateWrite(survivor_id, survivor))
            return outs
        scored = self.score(survivor, as_of)
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
        self._timer_from.pop(customer_id, None)
        if self._timer_at.pop(customer_id, None) is not None:
            part = self.part(customer_id)
            heap = [x for x in self._timers.get(part, ()) if x[1] != customer_id]
            heapq.heapify(heap)
            self._timers[part] = heap
        return [
            StateWrite(customer_id, None),
            *self._emit(ScoreEmit(customer_id, None), (self._pos, 1)),
            Retire(customer_id, at),
        ]

    def release(self, customer_id: str) -> None:
        """Drop the customer's timer, cached buckets and deferred score without retiring the
        id: its state moved to another instance (a merge hand-off, or a revoked partition)."""
        self._urgent.pop(customer_id, None)
        self._cache.pop(customer_id, None)
        self._unsealed.pop(customer_id, None)
        self._timer_at.pop(customer_id, None)  # its heap entry is skipped as superseded
        self._timer_from.pop(customer_id, None)

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
        if self.sink is not None and self.versions:
            groups: dict[int, list[int]] = {}
            for i, as_of in enumerate(as_ofs):
                groups.setdefault(id(self.model_for(as_of)), []).append(i)
            if len(groups) > 1:
                parts: dict[int, Scored] = {}
                for idx in groups.values():
                    sub = self._scored(
                        [states[i] for i in idx], [as_ofs[i] for i in idx], rows[idx]
                    )
                    parts.update(zip(idx, sub, strict=True))
                return [parts[i] for i in range(len(as_ofs))]
        model, cfg = self.model_for(as_ofs[0]) if as_ofs else self.model, self.config
        self.fill_bgnbd(rows, model)
        churn, tops = model.predict_explain_matrix(_MI_NAMES, model_matrix(rows), cfg.top_k)
        eng = engagement_rows(rows)
        clusters = model.cluster_rows(cluster_rows(rows, eng)).tolist()
        prints = fingerprints(rows)
        ready = model.n_learned >= cfg.min_learned_for_stage
        descriptions = None if model is self.model else model.describe_clusters()
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
                    model=model,
                    descriptions=descriptions,
                )
            )
        return out

    def fill_bgnbd(self, rows: npt.NDArray[np.float64], model: ChurnModel | None = None) -> None:
        """The ``bgnbd_*`` columns of feature rows (in place), from the BG/NBD fit of
        ``model`` (None: the latest) and the rows' ``btyd_*`` summary (a customer without
        qualifying activity: as one whose first qualifying day is today)."""
        params = (model or self.model).bgnbd or btyd.DEFAULT_PARAMS
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
        model = self.model if s.model is None else s.model
        features[PRIOR_SHARE_FEATURE] = round(model.prior_share(), 4)
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
            "model_version": model.version,
            "scored_at": now_ms,
            "cluster_description": (s.descriptions or self._descriptions).get(s.cluster, ""),
        }

    def _settle(
        self,
        st: State,
        s: Scored,
        now_ms: int,
        force: bool = False,
        at: tuple[int, int] | None = None,
    ) -> ScoreEmit | None:
        """Record that ``st`` was scored (mutates ``st``: a fresh copy); emit if material
        (held until :meth:`settle` with ``defer_scores``, at ``at``: see :meth:`_emit`;
        None: the current record's score)."""
        at = (self._pos, 1) if at is None else at
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
            self._schedule(st["customer_id"], self._due(st), at)
            return None
        st["emitted_as_of"] = s.as_of
        st["emitted_fingerprint"] = s.fingerprint
        st["emitted_stage"] = s.stage
        st["emitted_cluster"] = s.cluster
        st["emitted_churn"] = s.churn
        st["emitted_engagement"] = s.engagement
        # after the stage: a customer just turned churned is next due on the weekly grid
        self._schedule(st["customer_id"], self._due(st), at)
        self.emitted += 1
        emit = ScoreEmit(st["customer_id"], self.record(st["customer_id"], s, now_ms))
        held = self._emit(emit, at, s.as_of)
        return emit if held else None

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, name: str, now_ms: int, model: ChurnModel | None = None) -> dict[str, Any]:
        """A ``io.segflow.ModelCheckpoint`` record of ``model`` (None: the current model)."""
        m = self.model if model is None else model
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
        """Resume from a checkpoint record. A model from before issue #17 (no sign constraints:
        another label, other inputs) is replaced by a new one (the prior), not resumed."""
        model = ChurnModel.from_bytes(record["model"])
        if getattr(model.classifier, "signs", None) is None:
            model = new_model(created_at=int(record.get("created_at") or 0))
        self.model = model
        self._descriptions = self.model.describe_clusters()

    def pending_timers(self) -> int:
        return sum(len(heap) for heap in self._timers.values())


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
    "lifecycle",
    "model_input",
]
