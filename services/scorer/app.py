"""Scorer shell: the shared loop around :class:`services.scorer.core.Scorer`.

Consumes identified events and identity merges, keeps per-customer state in the
``scorer_state`` changelog and the model in ``scorer_model``, produces ``segflow.scores``.
Everything a handler call changes (state, scores) commits with its input offsets in one
transaction; the tick (timers, label maturation, checkpoints) commits in its own.

Runs as N instances of one consumer group: the state changelog is co-partitioned with the
inputs, an instance restores the partitions it is assigned and drops those revoked. A merge
whose absorbed id and survivor are owned by different instances moves the absorbed state
through ``scorer.handoff`` (keyed by the survivor, a third co-partitioned input): the
absorbed id's owner writes its tombstones, a ``merged:<id>`` marker and the hand-off in one
transaction; the survivor's owner merges it, writes the state and commits the hand-off's
offset in one transaction. Where the merge lands among the customers' records is fixed by
identity's merge marks in the identified partitions (:mod:`services.scorer.handoff`). Later
events for the absorbed id are forwarded to the survivor.

One churn model for the deployment: every instance sends each identified partition's
contribution per event-time day (cluster inputs, matured examples, BG/NBD summaries:
``Scorer.sweep``, ``Scorer.sink``) to the one-partition ``scorer.examples``; the instance that
owns its partition 0 (the range assignor gives it the same member as partition 0 of the
inputs) learns a day once every partition completed it (services/scorer/shared.py) and
publishes version ``churn.shared.<day>`` and its own state ``churn.learner`` to
``scorer.model``, in the same transaction as the contributions' offsets; every instance tails
that topic, keeps the recent versions and scores as of day D with version D - 1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from confluent_kafka import Consumer

from segflow.runtime.kafka import ensure_topics
from segflow.runtime.loop import HoldPartition, Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.records import merge_headers
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore, partition_for
from segflow.runtime.topics import TOPICS
from services.scorer.clock import PartitionClock
from services.scorer.core import (
    Out,
    Retire,
    ScoreEmit,
    Scorer,
    StateWrite,
)
from services.scorer.features import State, new_state, upgrade
from services.scorer.handoff import HELD_KEY as HELD_KEY
from services.scorer.handoff import MERGED_KEY as MERGED_KEY
from services.scorer.handoff import WAIT_KEY as WAIT_KEY
from services.scorer.handoff import Merges
from services.scorer.metrics import (
    CHECKPOINTS,
    CUSTOMERS,
    DRIFTS,
    EMITTED,
    FORGOTTEN,
    LABELS,
    LEARNER,
    MODEL_QUALITY,
    RETIRED_DROPS,
    SCORED,
    TIMERS,
    WATERMARK,
)
from services.scorer.metrics import FORWARDED as FORWARDED
from services.scorer.metrics import HANDOFFS as HANDOFFS
from services.scorer.metrics import PARKED as PARKED
from services.scorer.settings import ScorerSettings as ScorerSettings
from services.scorer.shared import SharedLearner
from services.scorer.sharing import LEARNER_KEY as LEARNER_KEY
from services.scorer.sharing import SHARED_MODEL as SHARED_MODEL
from services.scorer.sharing import SharedModel

log = logging.getLogger("segflow.scorer")

#: State-changelog key prefix of a forgotten customer id's marker (``retired:<customer_id>``,
#: a ScorerState with nothing but the id and when it was forgotten): the id is never profiled
#: again, even by an event or merge already in flight when the forget arrived.
RETIRED_KEY = "retired:"
#: State-changelog key of input partition ``p``'s event-time clock (``clock:<p>``, in
#: partition ``p``; :func:`clock_record`): a new owner of the partition continues from it.
CLOCK_KEY = "clock:"
#: Prefixes of the state keys that are not customers (retired, merged-away, waiting and held
#: ids, the partitions' clocks).
MARKERS = (RETIRED_KEY, MERGED_KEY, WAIT_KEY, HELD_KEY, CLOCK_KEY)


def clock_record(part: int, c: PartitionClock) -> State:
    """Partition ``part``'s clock as a ScorerState (``last_event_ms`` = the clock,
    ``first_seen_ms`` = the reorder floor, ``q_days`` = records in the floor's current
    block, ``q_first_ms`` / ``q_last_ms`` = the current and previous block's oldest event;
    ``emitted_stage`` = ``clock``)."""
    st = new_state(f"{CLOCK_KEY}{part}", c.floor)
    st.update(last_event_ms=c.latest, q_days=c.n, q_first_ms=c.cur, q_last_ms=c.prev)
    st["emitted_stage"] = "clock"
    return st


def clock_of(st: State) -> PartitionClock:
    """The inverse of :func:`clock_record`."""
    return PartitionClock(
        latest=int(st["last_event_ms"]),
        floor=int(st["first_seen_ms"]),
        n=int(st["q_days"]),
        cur=st["q_first_ms"],
        prev=st["q_last_ms"],
    )


class ScorerService(Merges, SharedModel):
    """Handler, tick and abort hook of the scorer on the shared loop (merges and hand-offs:
    :class:`services.scorer.handoff.Merges`)."""

    def __init__(
        self,
        settings: Settings,
        options: ScorerSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.options = options or ScorerSettings()
        self.clock = clock
        # Partitioned like the inputs: under a consumer group an instance holds the partitions
        # it is assigned (on_assign / on_revoke); without one (tools, tests) all of them.
        self.states = ChangelogStore(settings, TOPICS.scorer_state)
        self.models = ChangelogStore(settings, TOPICS.scorer_model)
        self.serde = Serde.from_settings(settings)
        #: Merged-away ids this instance holds markers for: absorbed id -> survivor id.
        self.merged: dict[str, str] = {}
        self.waiting: set[str] = set()
        self.held: set[str] = set()
        self.holding: dict[int, tuple[str, list[str]]] = {}
        self.forwarded = 0
        #: The learner of the shared model (owns partition 0 of scorer.examples).
        self.learner = False
        self._learned_in_batch = False
        self._learned_uncommitted = False
        self._examples_out: list[Output] = []
        self._learner: SharedLearner | None = None
        self._versions_out: list[tuple[int, bytes]] = []
        self._idle_from: tuple[int | None, float] = (None, clock())
        self._holds: dict[tuple[str, int], int] = {}
        self._holds_new: dict[tuple[str, int], int] = {}
        self._tail: Consumer | None = None
        # States are compressed once per transaction (before_commit / end of tick), not per event.
        # Urgent customers are scored once per batch, together, just before the commit.
        self.scorer = Scorer(self.options.core(), pack_states=False, defer_scores=True)
        parts = self.states.partitions  # co-partitioned with the identified topic
        if self.options.shared_model:
            self.scorer.sink = self._sink
            self.scorer.version_lag_days = self.options.shared_model_lag_days
            self.scorer.partition_states = lambda p: (
                (k, v) for k, v in self.customers() if partition_for(k, parts) == p
            )
        self.scorer.store = self.states.get  # timers the watermark passed fire together
        self.scorer.partition_of = lambda cid: partition_for(cid, parts)
        self._dirty: set[str] = set()
        self._identified = TOPICS.identified.name(settings)
        self._handoff_topic = TOPICS.scorer_handoff.name(settings)
        # SEGFLOW_INSTANCE_ID (stable per instance) names the transactional id and checkpoint
        iid = settings.instance_id
        self.instance = (
            self.options.instance
            if iid is None
            else iid
            if iid.startswith("scorer")  # a StatefulSet pod name: scorer-0, scorer-1
            else f"scorer-{iid}"
        )
        self.model_key = f"churn.{self.instance}"
        self._last_checkpoint = clock()
        self._checkpointed_n = -1
        self._counted = (0, 0, 0)

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def restore(self, states: bool = True) -> None:
        """Load state and the latest model checkpoint; rebuild the timers. ``states=False``
        (an instance of a consumer group): the customers' partitions are restored when the
        group assigns them (:meth:`on_assign`)."""
        if states:
            self.states.restore()
        self.models.restore()
        record = self.models.get(self.model_key)
        if record is not None:
            self.scorer.restore(record)
            self._checkpointed_n = int(record["n_learned"])
        else:
            self.scorer.model.created_at = self._now()
        self._adopt_stored()
        self.scorer.retired = set(self._retired())
        self.merged = self._merged()
        self._marks()
        upgraded = sum(upgrade(st) for _, st in self.customers())  # 120-day ring states
        self.scorer.rebuild(self._timed(), self.scorer.retired)
        self._load_clocks()
        log.info(
            "scorer restored",
            extra={
                "fields": {
                    "customers": self.customer_count(),
                    "model": self.scorer.model.version,
                    "max_event_ms": self.scorer.max_event_ms,
                    "upgraded_states": upgraded,
                    "forgotten_ids": len(self.scorer.retired),
                }
            },
        )

    def customers(self) -> Iterator[tuple[str, State]]:
        """The customers' states (the store without the forgotten or merged ids' markers,
        the parked and held merges' records and the partitions' clocks)."""
        return ((k, v) for k, v in self.states.items() if not k.startswith(MARKERS))

    def _timed(self) -> Iterator[tuple[str, State]]:
        """The customers whose timers run (not those parked at a merge)."""
        waiting = self.waiting
        return ((k, v) for k, v in self.customers() if k not in waiting)

    def customer_count(self) -> int:
        n = len(self.scorer.retired) + len(self.merged) + len(self.waiting) + len(self.held)
        return len(self.states) - n - len(self._clock_keys())

    def _clock_keys(self) -> dict[int, str]:
        """The partitions whose clock the store holds (``clock:<p>`` keys), by partition."""
        keys = (f"{CLOCK_KEY}{p}" for p in range(self.states.partitions))
        return {p: k for p, k in enumerate(keys) if k in self.states}

    def _load_clocks(self) -> None:
        """Every partition this instance reads gets the clock its changelog holds (exactly
        what the last owner committed; none: nothing read from it yet), the others none."""
        owned = self.states.assigned
        parts = range(self.states.partitions)
        stored = self._clock_keys()
        clocks: dict[Any, PartitionClock | None] = {}
        for p in parts:
            mine = p in stored and (owned is None or p in owned)
            st = self.states.get(stored[p]) if mine else None
            clocks[p] = None if st is None else clock_of(st)
        self.scorer.restore_clocks(clocks)

    def _clocks_out(self) -> Iterator[Output]:
        """The clocks the batch moved, each into its partition's changelog (in the batch's
        transaction)."""
        for p, c in sorted(self.scorer.moved_clocks().items()):
            yield self.states.put(f"{CLOCK_KEY}{p}", clock_record(p, c), partition=p)

    def _retired(self) -> list[str]:
        n = len(RETIRED_KEY)
        return [k[n:] for k in self.states.table if k.startswith(RETIRED_KEY)]

    def _merged(self) -> dict[str, str]:
        n, table = len(MERGED_KEY), self.states.table
        return {k[n:]: str(v["customer_id"]) for k, v in table.items() if k.startswith(MERGED_KEY)}

    # -- partitions (loop hooks, after the store's) ----------------------------------------
    def on_assign(self, partitions: set[int]) -> None:
        """The store restored ``partitions``: rebuild timers, forgotten and merged ids over
        what this instance owns now; each partition's clock from its changelog, as the last
        owner committed it. Partition 0 makes it the learner: it resumes from the last
        published model."""
        self._reload()
        self._load_clocks()
        if 0 in partitions and self.options.shared_model:
            self.learner = True
            self.models.restore()  # what the previous learner committed, with its offsets
            self._adopt_stored()
            self._load_learner()
            LEARNER.set(1)
            log.info(
                "churn-model learner",
                extra={
                    "fields": {"instance": self.instance, "labels": self.scorer.model.n_learned}
                },
            )
            if self.states.on_committed is not None:  # the API's view (api.py): this model
                self.states.on_committed(())

    def on_revoke(self, partitions: set[int]) -> None:
        """The store dropped ``partitions`` (another instance owns them now): their customers'
        timers, cached buckets and clocks go too."""
        self.scorer.drop_sources(partitions)
        self.holding = {p: h for p, h in self.holding.items() if p not in partitions}
        self._holds_revoked(partitions)
        self._reload()
        if 0 in partitions:
            self.learner = False
            LEARNER.set(0)

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
            self._tail = None

    def _reload(self) -> None:
        self.merged = self._merged()
        self._marks()
        for _, st in self.customers():
            upgrade(st)  # 120-day ring states
        self.scorer.rebuild(self._timed(), self._retired())

    # -- loop callbacks ------------------------------------------------------------------
    def before_commit(self) -> Iterator[Output]:
        """The batch's urgent customers and the timers its records passed scored (on stacked
        arrays), its score records in the order of the records that made them due, then its
        changed states, compressed and written once each."""
        yield from self._outputs(self.scorer.settle(self.states.get, self._now()))
        yield from self._sealed()
        yield from self._clocks_out()
        yield from self._examples()
        yield from self._published()

    def releases(self) -> list[tuple[str, int]]:
        """Loop hook: the held identified partitions that may go on, for either reason a
        partition is held (a merge's hand-offs, :meth:`Merges.releases`; the shared model's
        version, :meth:`SharedModel.releases`). One held for both is released by each in turn
        and re-read: the record that held it holds it again while the other is missing."""
        return [*Merges.releases(self), *SharedModel.releases(self)]

    def handle(self, record: Incoming) -> Iterator[Output]:
        kind = record.topic.key_name
        if kind == TOPICS.identified.key_name and self._version_hold(record):
            raise HoldPartition("version")  # (before anything changed but the sweep it would do)
        now = self._now()
        self.scorer.next_record()
        if kind == TOPICS.merges.key_name:
            yield from self._merge(record.value, now)
        elif kind == TOPICS.scorer_handoff.key_name:
            yield from self._handed(record.value, record.partition, now)
        elif kind == TOPICS.scorer_examples.key_name:
            self._learn(record.value)
        else:
            yield from self._route(record.value, record.raw, record.partition, now, False)

    def tick(self) -> Iterator[Output]:
        self._follow()
        now = self._now()
        deadline = time.perf_counter() + self.options.label_seconds_per_tick
        outs = self.scorer.flush(
            self.states.get,
            self.customers,
            now,
            out_of_time=lambda: time.perf_counter() >= deadline,
        )
        yield from self._outputs(outs)
        yield from self._sealed()
        yield from self._examples()
        self._idle_rule()
        yield from self._published()
        model = self.scorer.model
        if (
            model.n_learned != self._checkpointed_n
            and self.clock() - self._last_checkpoint >= self.options.checkpoint_seconds
        ):
            yield self.models.put(self.model_key, self.scorer.checkpoint(self.model_key, now))
            self._checkpointed_n = model.n_learned
            self._last_checkpoint = self.clock()
            CHECKPOINTS.inc()
        self._export()

    def checkpoint_now(self) -> Output:
        """A checkpoint Output (for shutdown or tests)."""
        return self.models.put(self.model_key, self.scorer.checkpoint(self.model_key, self._now()))

    def on_commit(self) -> None:
        self._learned_uncommitted = False
        self._holds_committed(True)

    def on_abort(self) -> None:
        """The stores rolled back: timers and cached buckets must follow them."""
        self._dirty.clear()
        self._holds_committed(False)
        self.merged = self._merged()
        self._marks()
        self.scorer.rebuild(self._timed(), self._retired())
        self._load_clocks()  # as committed: the rolled-back records come again
        self._examples_out.clear()
        if self._learned_uncommitted:
            # the contributions come again: back to the learner committed with the offsets
            self._learned_in_batch = self._learned_uncommitted = False
            self._versions_out.clear()
            self._load_learner()

    def _sealed(self) -> Iterator[Output]:
        self.scorer.seal()
        states = self.states
        for cid in self._dirty:
            st = states.get(cid)
            if st is not None:
                yield states.put(cid, st)
        self._dirty.clear()

    def _outputs(self, outs: Iterable[Out]) -> Iterator[Output]:
        states = self.states
        for out in outs:
            if isinstance(out, StateWrite):
                if out.state is None:
                    self._dirty.discard(out.customer_id)
                    yield states.delete(out.customer_id)
                else:  # written once per transaction, by _sealed()
                    states.put(out.customer_id, out.state)
                    self._dirty.add(out.customer_id)
            elif isinstance(out, ScoreEmit):
                # a merged-away id's tombstone says where it went (the segmenter retires it
                # there, after all its scores: services/segmenter/README.md)
                headers = None if out.merged is None else merge_headers(*out.merged)
                yield Output(TOPICS.scores, out.customer_id, out.score, headers=headers)
            elif isinstance(out, Retire):
                marker = new_state(out.customer_id, out.at)
                marker["emitted_stage"] = "forgotten"
                key = RETIRED_KEY + out.customer_id  # in the customer's partition
                yield states.put(key, marker, partition=self._part(out.customer_id))
                log.info("customer forgotten", extra={"fields": {"customer_id": out.customer_id}})

    def _export(self) -> None:
        sc = self.scorer
        for name, value in sc.model.quality().items():
            if name not in ("n_learned", "drifts"):  # undefined (one class only): NaN
                MODEL_QUALITY.labels(name).set(math.nan if value is None else value)
        LABELS.set(sc.model.n_learned)
        DRIFTS.set(sc.model.drifts)
        scored, emitted, dropped = self._counted
        SCORED.inc(sc.scored - scored)
        EMITTED.inc(sc.emitted - emitted)
        RETIRED_DROPS.inc(sc.dropped_retired - dropped)
        self._counted = (sc.scored, sc.emitted, sc.dropped_retired)
        if sc.watermark is not None:
            WATERMARK.set(sc.watermark / 1000)
        CUSTOMERS.set(self.customer_count())
        FORGOTTEN.set(len(sc.retired))
        TIMERS.set(sc.pending_timers())


def build_loop(settings: Settings, service: ScorerService) -> ProcessingLoop:
    """The processing loop of one scorer instance (call ``service.restore()`` first)."""
    opts = service.options
    handoff = TOPICS.scorer_handoff.name(settings)
    examples = TOPICS.scorer_examples.name(settings)
    ensure_topics(
        settings,
        topics=[],
        names={handoff: TOPICS.scorer_handoff, examples: TOPICS.scorer_examples},
    )
    config = LoopConfig(
        service="scorer",
        group_id=opts.group_id,
        sources={
            TOPICS.identified.name(settings): TOPICS.identified,
            TOPICS.merges.name(settings): TOPICS.merges,
            handoff: TOPICS.scorer_handoff,
            **({examples: TOPICS.scorer_examples} if opts.shared_model else {}),
        },
        uncopartitioned=(examples,),
        transactional_id=f"{opts.group_id}-{service.instance}",
        batch_size=opts.batch_size,
        tick_interval=opts.tick_seconds,
        pre_commit_delay=opts.pre_commit_delay,
    )
    return ProcessingLoop(
        settings,
        config,
        service.handle,
        hooks=[service.states, service.models, service],
        tick=service.tick,
    )
