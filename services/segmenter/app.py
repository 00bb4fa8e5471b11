"""The segmenter's shell: the shared loop over scores and merges, around :mod:`core`.

State is a :class:`~segflow.runtime.state.ChangelogStore` on the compacted
``segflow.segmenter.state`` topic (customers keyed by id, segment statuses by
``segment:<name>``); its changes commit in the same Kafka transaction as the segment changes
and the consumed offsets. They are coalesced: the handler only marks what changed, and the
loop's ``before_commit`` hook (or the end of a tick) writes each changed key once per
transaction, so a customer scored five times in a batch costs one changelog record.
Event-time timers (dwell, cooldown, sustain, TTL, recency crossings, deprecation) fire from the
loop's ``tick`` once the watermark passes them; a timer that changes nothing but the next timer
is not written (after a restore it fires again, to the same nothing).

Partitioned for N instances of one consumer group: a customer's state, timers and event-time
watermark (the highest ``as_of`` seen on its partition) belong to its partition, so results
do not depend on which instance owns it or how many run. On assignment the store restores
only the assigned partitions and their customers and timers are rebuilt; on revoke they are
dropped. Segment statuses (deprecation) are kept per partition (``segment:<name>@<p>``), and
so are percentile thresholds: each partition's ``pNN`` table is recomputed from its customers
when its records reach the next instant of an event-time grid (every ``percentile_refresh``
seconds of event time), kept in the changelog (``thresholds@<p>``) and restored with the
partition (:mod:`services.segmenter.population`, README.md).
Scores are decoded with only the features the definitions read
(:class:`~segflow.runtime.projection.MapProjection`). The definitions file is polled for
changes; an invalid version is logged with its lines and fields and the running version stays.

Faust was the planned runtime; see README.md for why this runs on the shared loop instead.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from segflow.errors import InvalidRecord
from segflow.runtime.kafka import ensure_topics
from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.projection import MapProjection
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.tables import GlobalTable
from segflow.runtime.topics import TOPICS, Topic
from services.segmenter import core, customers, merging, shared
from services.segmenter.customers import RETIRED_KEY
from services.segmenter.dsl import Definitions
from services.segmenter.metrics import (
    ATTRIBUTE_UPDATES,
    DEFINITIONS,
    EVAL_LAG,
    FLAPS,
    LOOKUP_LOADS,
    MISSING_FEATURES,
    RETIRED_SCORES,
    SEGMENT_SIZE,
    TRANSITIONS,
    WATERMARK,
    check_features,
    count_change,
)
from services.segmenter.population import TABLE_KEY, Table, Thresholds
from services.segmenter.quantiles import Column
from services.segmenter.settings import DEFAULT_DEFINITIONS as DEFAULT_DEFINITIONS
from services.segmenter.settings import SegmenterConfig as SegmenterConfig
from services.segmenter.shared import load_definitions

log = logging.getLogger("segflow.segmenter")
#: The metrics this service exports (metrics.py), held here too for tests/deploy's checks.
METRICS = (ATTRIBUTE_UPDATES, FLAPS, LOOKUP_LOADS, MISSING_FEATURES, TRANSITIONS)

SEGMENT_KEY = "segment:"
#: The customer branch of the state record's union, named for fastavro's tuple notation.
CUSTOMER_RECORD = "io.segflow.SegmenterCustomer"

#: The changelog topic of memberships, timers and segment statuses.
STATE_TOPIC: Topic = TOPICS.segmenter_state

#: Score fields that may legitimately be absent (the cluster is nullable).
OPTIONAL_FIELDS = frozenset({"cluster"})


def serde_for(settings: Settings) -> Serde:
    """The shared serde."""
    return Serde.from_settings(settings)


class Segmenter:
    """Handler, tick and loop hooks around the pure core."""

    def __init__(
        self,
        settings: Settings,
        config: SegmenterConfig,
        serde: Serde | None = None,
        clock: Any = time.time,
    ) -> None:
        self.settings = settings
        self.config = config
        self.clock = clock
        self.serde = serde or serde_for(settings)
        # Encoded: the store keeps each record's bytes (the segmenter's own CustomerState is
        # the decoded copy), so a customer is held once in memory and restored without a
        # second decode.
        self.store = ChangelogStore(settings, STATE_TOPIC, serde=self.serde, encoded=True)
        self.defs = load_definitions(config.definitions)
        self._mtime = config.definitions.stat().st_mtime_ns
        DEFINITIONS.labels("loaded").inc()
        self.states: dict[str, core.CustomerState] = {}
        self.retired: dict[str, str] = {}  # customer id -> "merged" or "forgotten"
        #: Per partition: absorbed id -> (survivor, merge time), waiting for its tombstone.
        self.merging: dict[int, dict[str, tuple[str, int]]] = {}
        #: Segment statuses per partition (deprecation is decided per partition).
        self.part_statuses: dict[int, dict[str, core.SegmentStatus]] = {}
        #: Per scores partition: its pNN table in force, and its customers' pNN feature values.
        self.tables: dict[int, Table] = {}
        self.population: dict[int, dict[str, Column]] = {}
        #: Per partition, merged-away ids whose values count in tables up to the merge's time.
        self.leaving: dict[int, dict[str, int]] = {}
        self._unwritten_tables: set[int] = set()
        self.sizes: dict[str, int] = {}
        #: Event-time watermark per partition: the highest ``as_of`` seen on it.
        self.watermarks: dict[int, int] = {}
        self._committed_watermarks: dict[int, int] = {}
        self._timers: dict[int, list[tuple[int, str]]] = {}  # per partition: (due, customer)
        self._assigned_once = False
        self._reeval: deque[str] = deque()
        self._dirty: set[str] = set()  # keys changed since the last commit (for on_abort)
        self._unwritten: dict[str, int] = {}  # customer -> partition, written before the commit
        self._unwritten_segments: dict[tuple[int, str], None] = {}  # segment statuses, likewise
        self._m_transitions: dict[tuple[str, str], Any] = {}
        self._m_sizes: dict[str, Any] = {}
        self._needed_for: Definitions | None = None
        self._needed: frozenset[str] = frozenset()
        self._reported_missing: set[str] = set()
        self._n_scores = 0
        self._last_reload = 0.0
        self.scores_topic = TOPICS.scores.name(settings)
        self.merges_topic = TOPICS.merges.name(settings)
        self.forget_topic = TOPICS.forget.name(settings)
        self.attributes_topic = TOPICS.attributes.name(settings)
        #: Lookup tables (segflow.lookups), read whole by every instance: name -> key -> value.
        self.lookups: dict[str, dict[str, str]] = {}
        self.lookup_versions: dict[str, int] = {}
        self._lookup_reader: GlobalTable | None = None
        #: Whether the tick follows segflow.lookups (set by build_loop; in-process pipelines
        #: without a broker, such as replay and the benches, call ``apply_lookups`` themselves).
        self.follow_lookups = False
        self._lookup_retry_at = 0.0
        self.score_decoder = MapProjection(
            self.serde, TOPICS.scores, "features", self.defs.features
        )
        #: Told at each commit which customers it changed (None after a restore, assignment
        #: or revocation: any may have): how the internal API publishes its view (api.py).
        self.on_committed: Callable[[Iterable[str] | None], None] | None = None

    # -- start ---------------------------------------------------------------------------
    def restore(self, create: bool = True) -> int:
        """Load the changelog; rebuild caches, timers, sizes and percentile thresholds.

        ``create=False`` (read-only callers such as ``segflow explain``) does not create the
        changelog topic: the caller checks it exists first.
        """
        if create:
            name = STATE_TOPIC.name(self.settings)
            ensure_topics(self.settings, topics=[], names={name: STATE_TOPIC})
        n = self.store.restore()
        self.rebuild()
        return n

    def rebuild(self, partitions: set[int] | None = None) -> None:
        """Caches, timers, watermarks, sizes and the committed percentile tables from the
        store's table (of ``partitions`` only, when given: newly assigned ones)."""
        store = self.store
        for key in list(store):
            if partitions is None or store.partition_of(key) in partitions:
                self._load(key, store.get(key))
        for key in list(self.states):
            part = store.partition_of(key)
            if partitions is not None and part not in partitions:
                continue
            st = self.states[key]
            if st.as_of > self.watermarks.get(part, 0):
                self.watermarks[part] = st.as_of
            if st.next_timer is not None:
                heapq.heappush(self._timers.setdefault(part, []), (st.next_timer, key))
        self._committed_watermarks = dict(self.watermarks)
        self._recount()
        if self.on_committed is not None:
            self.on_committed(None)

    def _recount(self) -> None:
        self.sizes = {}
        for st in self.states.values():
            for name in st.active():
                self.sizes[name] = self.sizes.get(name, 0) + 1
        for name in self.defs.by_name:
            SEGMENT_SIZE.labels(name).set(self.sizes.get(name, 0))

    # -- partitions (loop hooks) -------------------------------------------------------------
    def on_assign(self, partitions: set[int]) -> None:
        """The store restored ``partitions``: rebuild their customers, timers and statuses."""
        if not self._assigned_once:  # anything loaded before the group assigned is stale
            self._assigned_once = True
            self.states.clear()
            self.retired.clear()
            self.merging.clear()
            self.part_statuses.clear()
            self.watermarks.clear()
            self._timers.clear()
            self.population.clear()
            self.leaving.clear()
            self.tables.clear()
        self.rebuild(partitions)

    def on_revoke(self, partitions: set[int]) -> None:
        """Another instance owns ``partitions`` now: drop their customers, timers, statuses."""
        part_of = self.store.partition_of
        for cid in [c for c in self.states if part_of(c) in partitions]:
            del self.states[cid]
        for cid in [c for c in self.retired if part_of(RETIRED_KEY + c) in partitions]:
            del self.retired[cid]
        for part in partitions:
            self._timers.pop(part, None)
            self.merging.pop(part, None)
            self.watermarks.pop(part, None)
            self._committed_watermarks.pop(part, None)
            self.part_statuses.pop(part, None)
            self.population.pop(part, None)
            self.leaving.pop(part, None)
            self.tables.pop(part, None)
        self._recount()
        if self.on_committed is not None:
            self.on_committed(None)

    @property
    def watermark(self) -> int:
        """This instance's event-time clock: the minimum over the partitions it has seen data
        on (0 before any)."""
        return min(self.watermarks.values(), default=0)

    @property
    def statuses(self) -> dict[str, core.SegmentStatus]:
        """One status per segment for queries: deprecated only where every partition is."""
        out: dict[str, core.SegmentStatus] = {}
        for part in sorted(self.part_statuses):
            for name, st in self.part_statuses[part].items():
                if name not in out or (out[name].deprecated and not st.deprecated):
                    out[name] = st
        return out

    def _load(self, key: str, record: dict[str, Any] | None) -> None:
        if key.startswith(merging.MERGING_KEY):
            merging.load(self.merging, key, self.store.partition_of(key), record)
            return
        if key.startswith(RETIRED_KEY):
            cid, part = key[len(RETIRED_KEY) :], self.store.partition_of(key)
            if record is None:
                self.retired.pop(cid, None)
                shared.linger(self, cid, part, {}, None)
            else:
                self.retired[cid] = (record.get("segment") or {}).get("segment") or "merged"
                kept = record.get("customer")
                if kept:
                    shared.linger(self, cid, part, kept["numbers"], int(kept["as_of"]))
            return
        if key.startswith(SEGMENT_KEY):
            name, at, digits = key[len(SEGMENT_KEY) :].rpartition("@")
            if at and digits.isdigit():
                part = int(digits)
            else:  # written before statuses were per partition
                name, part = key[len(SEGMENT_KEY) :], self.store.partition_of(key)
            statuses = self.part_statuses.setdefault(part, {})
            if record is None:
                statuses.pop(name, None)
            else:
                statuses[name] = core.status_from_record(record)
            return
        if key.startswith(TABLE_KEY):
            part = int(key[len(TABLE_KEY) :])
            if record is None:
                self.tables.pop(part, None)
            else:
                self.tables[part] = Table.from_record(record)
            return
        part = self.store.partition_of(key)
        old = self.states.pop(key, None)
        if old is not None:
            self._index(old, part, remove=True)
        if record is not None:
            st = core.state_from_record(record)
            self.states[key] = st
            self._index(st, part)

    def _index(self, st: core.CustomerState, part: int, remove: bool = False) -> None:
        population = self.population.setdefault(part, {})
        for feature, _ in self.defs.percentiles:
            column = population.get(feature)
            if column is None:
                column = population[feature] = Column()
            value = st.values.get(feature)
            if remove or not isinstance(value, float):
                column.discard(st.customer_id)
            else:
                column.set(st.customer_id, value)

    # -- handler -------------------------------------------------------------------------
    def __call__(self, record: Incoming) -> Iterator[Output]:
        part = record.partition
        if record.topic_name == self.merges_topic:
            yield from customers.merge(self, record.value, part)
            return
        if record.topic_name == self.forget_topic:
            yield from customers.forget(self, record.value, part)
            return
        if record.topic_name == self.attributes_topic:
            yield from customers.attributes(self, record.key, record.value, part)
            return
        value = record.value
        if value is None:  # a score tombstone (asked of the loop): a merge retires the id here
            yield from customers.tombstoned(self, record.key, record.headers, part)
            return
        try:
            score = core.Score.from_record(value, self.defs.features)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRecord(f"CustomerScore unusable: {exc}", reason="invalid_score") from exc
        self._n_scores += 1
        if self.merging.get(part):  # merges whose tombstone is overdue: the fallback
            yield from customers.overdue(self, part, score.as_of)
        if self.defs.percentiles:  # the partition's next pNN table, when this reaches its grid
            yield from shared.advance_grid(self, part, score.as_of)
        if self._n_scores % 16 == 0:  # a sample is enough for a histogram and the check
            scored_at = value.get("scored_at")
            if scored_at:
                EVAL_LAG.observe(max(0.0, self.clock() - scored_at / 1000))
            check_features(self, score, OPTIONAL_FIELDS)
        why = self.retired.get(score.customer_id)
        if why is not None:
            RETIRED_SCORES.labels(why).inc()
            return
        if score.as_of > self.watermarks.get(part, 0):
            self.watermarks[part] = score.as_of
        old = self.states.get(score.customer_id)
        thresholds = self.thresholds_for(part)
        new, changes = core.evaluate(old, score, self.defs, thresholds, self.lookups)
        yield from self._apply(old, new, changes, part)

    def thresholds_for(self, part: int) -> Thresholds:
        """The ``pNN`` thresholds in force on ``part`` (none before its first table)."""
        table = self.tables.get(part)
        return table.values if table is not None else {}

    def _follow_lookups(self) -> None:
        shared.follow_lookups(self)

    def apply_lookups(self, changed: dict[str, dict[str, Any] | None]) -> None:
        shared.apply_lookups(self, changed)

    def _apply(
        self,
        old: core.CustomerState | None,
        new: core.CustomerState,
        changes: list[core.Change],
        part: int,
    ) -> Iterator[Output]:
        if new == old:
            return
        cid = new.customer_id
        self.states[cid] = new
        self._dirty.add(cid)
        if self.defs.percentiles:
            self._index(new, part)
        if new.next_timer is not None and (old is None or old.next_timer != new.next_timer):
            heapq.heappush(self._timers.setdefault(part, []), (new.next_timer, cid))
        self._unwritten[cid] = part
        yield from self._emit(changes, part)

    def _emit(self, changes: list[core.Change], part: int) -> Iterator[Output]:
        if not changes:
            return
        statuses, extra = core.track_statuses(self.part_statuses.get(part, {}), changes, self.defs)
        self.part_statuses[part] = statuses
        for c in changes:
            if c.transition == core.ENTERED:
                self._unwritten_segments[(part, c.segment)] = None
        emitted_at = int(self.clock() * 1000)
        topic = TOPICS.segment_changes
        for c in [*changes, *extra]:
            self._count(c)
            yield Output(topic, c.customer_id or c.segment, c.to_record(emitted_at))

    def _count(self, c: core.Change) -> None:
        count_change(self, c)

    # -- tick: reloads, thresholds, timers, deprecation --------------------------------------
    def tick(self) -> Iterable[Output]:
        now = self.clock()
        if now - self._last_reload >= self.config.reload_interval:
            self._last_reload = now
            self.reload()
        self._follow_lookups()
        out: list[Output] = []
        budget = self._fire_timers(out, self.config.max_timers_per_tick)
        part_of = self.store.partition_of
        while self._reeval and budget > 0:
            cid = self._reeval.popleft()
            st = self.states.get(cid)
            if st is not None:
                budget -= 1
                part = part_of(cid)
                now_p = max(self.watermarks.get(part, 0), st.as_of)
                thresholds = self.thresholds_for(part)
                new, changes = core.advance(st, now_p, self.defs, thresholds, self.lookups)
                out.extend(self._apply(st, new, changes, part))
        for part, watermark in self.watermarks.items():
            if not watermark:
                continue
            statuses, changes = core.expire(self.part_statuses.get(part, {}), watermark, self.defs)
            self.part_statuses[part] = statuses
            # One deprecation per partition: the partition in the entry (and change) id.
            changes = [replace(c, entry_id=f"{c.entry_id}@{part}") for c in changes]
            for c in changes:
                self._unwritten_segments[(part, c.segment)] = None
            out.extend(self._emit(changes, part))
            for name in statuses:
                if self._status_key(name, part) not in self.store:
                    self._unwritten_segments[(part, name)] = None
        WATERMARK.set(self.watermark)
        out.extend(self.before_commit())  # the tick's transaction gets no loop hook
        return out

    def _fire_timers(
        self, out: list[Output], budget: int, before: tuple[int, int] | None = None
    ) -> int:
        """Fire the timers due by each partition's watermark (``before=(p, t)``: partition
        ``p``'s due before ``t``), at their own instants, up to ``budget`` of them; returns
        what is left of it."""
        parts = self._timers if before is None else {before[0]: self._timers.get(before[0], [])}
        for part, timers in parts.items():
            watermark = self.watermarks.get(part, 0) if before is None else before[1] - 1
            thresholds = self.thresholds_for(part)
            while timers and timers[0][0] <= watermark and budget > 0:
                due, cid = heapq.heappop(timers)
                st = self.states.get(cid)
                if st is None or st.next_timer != due:
                    continue  # superseded
                budget -= 1
                new, changes, persist = core.fire_timer(
                    st, due, self.defs, thresholds, self.lookups
                )
                if not persist:  # only the next timer moved: kept in memory, not written
                    self.states[cid] = new
                    if new.next_timer is not None:
                        heapq.heappush(timers, (new.next_timer, cid))
                    continue
                out.extend(self._apply(st, new, changes, part))
        return budget

    def reload(self) -> bool:
        return shared.reload(self)

    # -- loop hooks ----------------------------------------------------------------------
    def before_commit(self) -> Iterator[Output]:
        """The changelog records of everything changed in this transaction, one per key."""
        store = self.store
        for cid, part in self._unwritten.items():
            st = self.states.get(cid)
            if st is not None:
                record = core.state_to_record(st)
                # The record with its union branch named: fastavro then skips trying each
                # branch of the union (a third of the encoding time of a state record).
                record["customer"] = (CUSTOMER_RECORD, record["customer"])
                yield store.put(cid, record, part)
            elif cid in store:
                yield store.delete(cid)
        self._unwritten.clear()
        for part, name in self._unwritten_segments:
            status = self.part_statuses.get(part, {}).get(name)
            if status is not None:
                record = core.status_to_record(status)
                yield store.put(self._status_key(name, part), record, part)
        self._unwritten_segments.clear()
        for part in sorted(self._unwritten_tables):
            table = self.tables.get(part)
            if table is not None:
                yield store.put(f"{TABLE_KEY}{part}", table.to_record(), part)
        self._unwritten_tables.clear()

    @staticmethod
    def _status_key(name: str, part: int) -> str:
        return f"{SEGMENT_KEY}{name}@{part}"

    def on_commit(self) -> None:
        if self.on_committed is not None:
            self.on_committed(self._dirty)
        self._dirty.clear()
        self._committed_watermarks = dict(self.watermarks)

    def on_abort(self) -> None:
        """The store already rolled back its table: rebuild what changed from it."""
        self._unwritten.clear()
        self._unwritten_segments.clear()
        self._unwritten_tables.clear()
        for key in self._dirty:
            self._load(key, self.store.get(key))
            st = self.states.get(key)
            if st is not None and st.next_timer is not None:
                part = self.store.partition_of(key)
                heapq.heappush(self._timers.setdefault(part, []), (st.next_timer, key))
        self._dirty.clear()
        self.part_statuses = {}
        self.tables = {}
        for k in [k for k in self.store if k.startswith((SEGMENT_KEY, TABLE_KEY))]:
            self._load(k, self.store.get(k))
        self.watermarks = dict(self._committed_watermarks)
        self._recount()

    # -- queries (HTTP, CLI) ---------------------------------------------------------------
    def segment_sizes(self) -> dict[str, int]:
        return {name: self.sizes.get(name, 0) for name in self.defs.by_name}

    def members(self, segment: str, limit: int = 1000) -> list[str]:
        out = []
        for cid, st in list(self.states.items()):
            m = st.memberships.get(segment)
            if m is not None and m.active:
                out.append(cid)
                if len(out) >= limit:
                    break
        return sorted(out)

    def explain(self, customer_id: str) -> dict[str, Any] | None:
        st = self.states.get(customer_id)
        if st is None:
            return None
        return {
            "customer_id": customer_id,
            "definition_version": self.defs.version,
            "as_of": st.as_of,
            "primary_segment": st.primary,
            "segments": core.explain_customer(
                st,
                max(self.watermarks.get(self.store.partition_of(customer_id), 0), st.as_of),
                self.defs,
                self.thresholds_for(self.store.partition_of(customer_id)),
                self.lookups,
            ),
        }


def build_loop(settings: Settings, config: SegmenterConfig) -> tuple[Segmenter, ProcessingLoop]:
    """Restore state and wire the segmenter into the shared loop."""
    segmenter = Segmenter(settings, config)
    segmenter.follow_lookups = True
    # The changelog exists before the group assigns partitions; their state is restored then
    # (on_assign), only for the partitions this instance owns.
    name = STATE_TOPIC.name(settings)
    ensure_topics(
        settings,
        topics=[],
        names={
            name: STATE_TOPIC,
            segmenter.attributes_topic: TOPICS.attributes,
            TOPICS.lookups.name(settings): TOPICS.lookups,
        },
    )
    instance = settings.instance_id
    loop_config = LoopConfig(
        service="segmenter",
        group_id=settings.topic_prefix + config.group_id,
        sources={
            segmenter.scores_topic: TOPICS.scores,
            segmenter.merges_topic: TOPICS.merges,
            segmenter.forget_topic: TOPICS.forget,
            segmenter.attributes_topic: TOPICS.attributes,
        },
        transactional_id=settings.topic_prefix
        + (f"{config.group_id}-{instance}" if instance is not None else config.instance),
        batch_size=config.batch_size,
        tick_interval=config.tick_interval,
        pre_commit_delay=config.pre_commit_delay,
        # A score carries every feature the scorer computes; only those the definitions read
        # are decoded (most of a score's decoding time otherwise).
        decoders={segmenter.scores_topic: segmenter.score_decoder},
        # the scorer's score tombstone of a merged-away id retires it (merging.py)
        tombstones=(segmenter.scores_topic,),
    )
    loop = ProcessingLoop(
        settings,
        loop_config,
        segmenter,
        serde=segmenter.serde,
        hooks=[segmenter.store, segmenter],
        tick=segmenter.tick,
    )
    return segmenter, loop
