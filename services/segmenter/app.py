"""The segmenter's shell: the shared loop over scores and merges, around :mod:`core`.

State is a :class:`~segflow.runtime.state.ChangelogStore` on the compacted
``segflow.segmenter.state`` topic (customers keyed by id, segment statuses by
``segment:<name>``); its changes commit in the same Kafka transaction as the segment changes
and the consumed offsets. Event-time timers (dwell, cooldown, sustain, TTL, recency crossings,
deprecation) fire from the loop's ``tick`` once the watermark (the highest ``as_of`` seen)
passes them. The definitions file is polled for changes; an invalid version is logged with
its lines and fields and the running version stays.

Faust was the planned runtime; see README.md for why this runs on the shared loop instead.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from pydantic_settings import BaseSettings, SettingsConfigDict

from segflow.errors import InvalidRecord
from segflow.runtime.kafka import ensure_topics
from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.topics import TOPICS, Topic
from services.segmenter import core
from services.segmenter.dsl import DAY, DefinitionError, Definitions, parse

log = logging.getLogger("segflow.segmenter")

HERE = Path(__file__).resolve().parent
DEFAULT_DEFINITIONS = HERE / "segments" / "default.yaml"
SEGMENT_KEY = "segment:"

#: The changelog topic of memberships, timers and segment statuses.
STATE_TOPIC: Topic = TOPICS.segmenter_state

SEGMENT_SIZE = Gauge("segflow_segment_size", "Current members per segment", ["segment"])
TRANSITIONS = Counter("segflow_segment_transitions_total", "Membership changes by transition",
                      ["segment", "transition"])
FLAPS = Counter("segflow_segment_flaps_total",
                "Exits within the flap window (max of min_dwell and 1 day) of the entry",
                ["segment"])
EVAL_LAG = Histogram("segflow_segmenter_evaluation_lag_seconds",
                     "Processing time from a score being produced to its evaluation",
                     buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
WATERMARK = Gauge("segflow_segmenter_watermark_ms", "Event-time watermark (highest as_of)")
DEFINITIONS = Counter("segflow_segmenter_definitions_total", "Definition loads by outcome",
                      ["outcome"])


class SegmenterConfig(BaseSettings):
    """The segmenter's own settings (``SEGFLOW_SEGMENTER_*``)."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_SEGMENTER_", extra="ignore")

    definitions: Path = DEFAULT_DEFINITIONS
    group_id: str = "segmenter"
    instance: str = "segmenter-0"  # transactional.id and static group member id
    reload_interval: float = 2.0  # seconds between mtime polls of the definitions file
    percentile_refresh: float = 60.0  # seconds between recomputations of pNN thresholds
    tick_interval: float = 0.5
    batch_size: int = 2000
    max_timers_per_tick: int = 20000
    http_port: int | None = None
    pre_commit_delay: float = 0.0  # fault injection for tests (widens the open transaction)


def serde_for(settings: Settings) -> Serde:
    """The shared serde."""
    return Serde.from_settings(settings)


def load_definitions(path: Path) -> Definitions:
    """Parse a definitions file (raises DefinitionError with every problem)."""
    return parse(path.read_text())


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
        self.store = ChangelogStore(settings, STATE_TOPIC, serde=self.serde)
        self.defs = load_definitions(config.definitions)
        self._mtime = config.definitions.stat().st_mtime_ns
        DEFINITIONS.labels("loaded").inc()
        self.states: dict[str, core.CustomerState] = {}
        self.statuses: dict[str, core.SegmentStatus] = {}
        self.thresholds: dict[tuple[str, float], float] = {}
        self.population: dict[str, dict[str, float]] = {}
        self.sizes: dict[str, int] = {}
        self.watermark = 0
        self._committed_watermark = 0
        self._timers: list[tuple[int, str]] = []
        self._reeval: deque[str] = deque()
        self._dirty: set[str] = set()
        self._m_transitions: dict[tuple[str, str], Any] = {}
        self._n_scores = 0
        self._last_reload = 0.0
        self._last_refresh = 0.0
        self.scores_topic = TOPICS.scores.name(settings)
        self.merges_topic = TOPICS.merges.name(settings)

    # -- start ---------------------------------------------------------------------------
    def restore(self) -> int:
        """Load the changelog; rebuild caches, timers, sizes and percentile thresholds."""
        name = STATE_TOPIC.name(self.settings)
        ensure_topics(self.settings, topics=[], names={name: STATE_TOPIC})
        n = self.store.restore()
        for key, record in self.store.items():
            self._load(key, record)
        for key in list(self.states):
            st = self.states[key]
            self.watermark = max(self.watermark, st.as_of)
            if st.next_timer is not None:
                heapq.heappush(self._timers, (st.next_timer, key))
        self._committed_watermark = self.watermark
        self.sizes = {}
        for st in self.states.values():
            for name in st.active():
                self.sizes[name] = self.sizes.get(name, 0) + 1
        for name in self.defs.by_name:
            SEGMENT_SIZE.labels(name).set(self.sizes.get(name, 0))
        self._refresh_thresholds()
        return n

    def _load(self, key: str, record: dict[str, Any] | None) -> None:
        if key.startswith(SEGMENT_KEY):
            name = key[len(SEGMENT_KEY):]
            if record is None:
                self.statuses.pop(name, None)
            else:
                self.statuses[name] = core.status_from_record(record)
            return
        old = self.states.pop(key, None)
        if old is not None:
            self._index(old, remove=True)
        if record is not None:
            st = core.state_from_record(record)
            self.states[key] = st
            self._index(st)

    def _index(self, st: core.CustomerState, remove: bool = False) -> None:
        for feature, _ in self.defs.percentiles:
            column = self.population.setdefault(feature, {})
            value = st.values.get(feature)
            if remove or not isinstance(value, float):
                column.pop(st.customer_id, None)
            else:
                column[st.customer_id] = value

    # -- handler -------------------------------------------------------------------------
    def __call__(self, record: Incoming) -> Iterator[Output]:
        if record.topic_name == self.merges_topic:
            yield from self._merge(record.value)
            return
        value = record.value
        try:
            score = core.Score.from_record(value)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRecord(f"CustomerScore unusable: {exc}", reason="invalid_score") from exc
        self._n_scores += 1
        scored_at = value.get("scored_at")
        if scored_at and self._n_scores % 16 == 0:  # a sample is enough for a histogram
            EVAL_LAG.observe(max(0.0, self.clock() - scored_at / 1000))
        if score.as_of > self.watermark:
            self.watermark = score.as_of
        old = self.states.get(score.customer_id)
        new, changes = core.evaluate(old, score, self.defs, self.thresholds)
        yield from self._apply(old, new, changes)

    def _merge(self, merge: dict[str, Any]) -> Iterator[Output]:
        survivor = str(merge["survivor_id"])
        now = max(int(merge.get("occurred_at") or 0), self.watermark)
        for absorbed in merge.get("absorbed_ids") or []:
            if absorbed == survivor:
                continue
            st = self.states.get(absorbed)
            if st is None:
                continue
            changes = core.absorb(st, survivor, now, self.defs)
            yield from self._emit(changes)
            self._index(st, remove=True)
            del self.states[absorbed]
            self._dirty.add(absorbed)
            yield self.store.delete(absorbed)
        st = self.states.get(survivor)
        if st is not None:
            new, changes = core.advance(st, now, self.defs, self.thresholds)
            yield from self._apply(st, new, changes)

    def _apply(
        self, old: core.CustomerState | None, new: core.CustomerState, changes: list[core.Change]
    ) -> Iterator[Output]:
        if new == old:
            return
        cid = new.customer_id
        self.states[cid] = new
        self._dirty.add(cid)
        if self.defs.percentiles:
            self._index(new)
        if new.next_timer is not None and (old is None or old.next_timer != new.next_timer):
            heapq.heappush(self._timers, (new.next_timer, cid))
        yield self.store.put(cid, core.state_to_record(new))
        yield from self._emit(changes)

    def _emit(self, changes: list[core.Change]) -> Iterator[Output]:
        if not changes:
            return
        self.statuses, extra = core.observe(self.statuses, changes, self.defs)
        if any(c.transition == core.ENTERED for c in changes):
            for c in changes:
                if c.transition == core.ENTERED:
                    st = self.statuses[c.segment]
                    yield self.store.put(SEGMENT_KEY + c.segment, core.status_to_record(st))
        emitted_at = int(self.clock() * 1000)
        topic = TOPICS.segment_changes
        for c in [*changes, *extra]:
            self._count(c)
            yield Output(topic, c.customer_id or c.segment, c.to_record(emitted_at))

    def _count(self, c: core.Change) -> None:
        key = (c.segment, c.transition)
        counter = self._m_transitions.get(key)
        if counter is None:
            counter = self._m_transitions[key] = TRANSITIONS.labels(*key)
        counter.inc()
        if c.transition == core.ENTERED:
            self.sizes[c.segment] = self.sizes.get(c.segment, 0) + 1
        elif c.transition in (core.EXITED, core.RE_ENGAGED):
            self.sizes[c.segment] = max(0, self.sizes.get(c.segment, 0) - 1)
            seg = self.defs.by_name.get(c.segment)
            window = max(seg.min_dwell_ms if seg else 0, DAY)
            if c.dwell_ms is not None and c.dwell_ms < window:
                FLAPS.labels(c.segment).inc()
        else:
            return
        SEGMENT_SIZE.labels(c.segment).set(self.sizes[c.segment])

    # -- tick: reloads, thresholds, timers, deprecation --------------------------------------
    def tick(self) -> Iterable[Output]:
        now = self.clock()
        if now - self._last_reload >= self.config.reload_interval:
            self._last_reload = now
            self.reload()
        if self.defs.percentiles and now - self._last_refresh >= self.config.percentile_refresh:
            self._last_refresh = now
            self._refresh_thresholds()
        out: list[Output] = []
        budget = self.config.max_timers_per_tick
        while self._reeval and budget > 0:
            cid = self._reeval.popleft()
            st = self.states.get(cid)
            if st is not None:
                budget -= 1
                new, changes = core.advance(st, max(self.watermark, st.as_of), self.defs,
                                            self.thresholds)
                out.extend(self._apply(st, new, changes))
        while self._timers and self._timers[0][0] <= self.watermark and budget > 0:
            due, cid = heapq.heappop(self._timers)
            st = self.states.get(cid)
            if st is None or st.next_timer != due:
                continue  # superseded
            budget -= 1
            new, changes = core.advance(st, due, self.defs, self.thresholds)
            if new == st:  # nothing changed: make sure the timer does not fire again
                new = core.CustomerState(**{**st.__dict__, "next_timer": None})
            out.extend(self._apply(st, new, changes))
        if self.watermark:
            self.statuses, changes = core.expire(self.statuses, self.watermark, self.defs)
            for c in changes:
                st2 = self.statuses[c.segment]
                out.append(self.store.put(SEGMENT_KEY + c.segment, core.status_to_record(st2)))
            out.extend(self._emit(changes))
            for name, status in self.statuses.items():
                if SEGMENT_KEY + name not in self.store:
                    out.append(self.store.put(SEGMENT_KEY + name, core.status_to_record(status)))
        WATERMARK.set(self.watermark)
        return out

    def reload(self) -> bool:
        """Load the definitions file if it changed; keep the running version if invalid."""
        path = self.config.definitions
        try:
            mtime = path.stat().st_mtime_ns
        except OSError as exc:
            log.warning("definitions unreadable", extra={"fields": {"error": str(exc)}})
            return False
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            defs = load_definitions(path)
        except DefinitionError as exc:
            DEFINITIONS.labels("rejected").inc()
            for p in exc.problems:
                log.error("definition rejected", extra={"fields": {
                    "file": str(path), "line": p.line, "field": p.field, "error": p.message,
                    "running_version": self.defs.version}})
            return False
        if defs.version == self.defs.version:
            return False
        DEFINITIONS.labels("loaded").inc()
        log.info("definitions loaded", extra={"fields": {
            "version": defs.version, "previous": self.defs.version,
            "segments": len(defs.segments)}})
        self.defs = defs
        for st in self.states.values():
            self._index(st)
        self._refresh_thresholds()
        self._reeval.extend(self.states)
        return True

    def _refresh_thresholds(self) -> None:
        self.thresholds = core.percentile_thresholds(
            self.defs, {f: self.population.get(f, {}).values() for f, _ in self.defs.percentiles}
        )

    # -- loop hooks ----------------------------------------------------------------------
    def on_commit(self) -> None:
        self._dirty.clear()
        self._committed_watermark = self.watermark

    def on_abort(self) -> None:
        """The store already rolled back its table: rebuild what changed from it."""
        for key in self._dirty:
            self._load(key, self.store.get(key))
            st = self.states.get(key)
            if st is not None and st.next_timer is not None:
                heapq.heappush(self._timers, (st.next_timer, key))
        self._dirty.clear()
        self.statuses = {
            k[len(SEGMENT_KEY):]: core.status_from_record(v)
            for k, v in self.store.items() if k.startswith(SEGMENT_KEY)
        }
        self.watermark = self._committed_watermark
        self.sizes = {}
        for st in self.states.values():
            for name in st.active():
                self.sizes[name] = self.sizes.get(name, 0) + 1

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
            "segments": core.explain_customer(st, max(self.watermark, st.as_of), self.defs,
                                              self.thresholds),
        }


def build_loop(settings: Settings, config: SegmenterConfig) -> tuple[Segmenter, ProcessingLoop]:
    """Restore state and wire the segmenter into the shared loop."""
    segmenter = Segmenter(settings, config)
    segmenter.restore()
    loop_config = LoopConfig(
        service="segmenter",
        group_id=settings.topic_prefix + config.group_id,
        sources={segmenter.scores_topic: TOPICS.scores, segmenter.merges_topic: TOPICS.merges},
        transactional_id=settings.topic_prefix + config.instance,
        batch_size=config.batch_size,
        tick_interval=config.tick_interval,
        pre_commit_delay=config.pre_commit_delay,
    )
    loop = ProcessingLoop(settings, loop_config, segmenter, serde=segmenter.serde,
                          hooks=[segmenter.store, segmenter], tick=segmenter.tick)
    return segmenter, loop
