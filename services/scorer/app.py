"""Scorer shell: the shared loop around :class:`services.scorer.core.Scorer`.

Consumes identified events and identity merges, keeps per-customer state in the
``scorer_state`` changelog and the model in ``scorer_model``, produces ``segflow.scores``.
Everything a handler call changes (state, scores) commits with its input offsets in one
transaction; the tick (timers, label maturation, checkpoints) commits in its own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import Counter, Gauge
from pydantic_settings import BaseSettings, SettingsConfigDict

from segflow.runtime.loop import BatchInfo, Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.topics import TOPICS
from services.scorer.core import (
    DAY,
    HOUR,
    Out,
    Retire,
    ScoreEmit,
    Scorer,
    ScorerConfig,
    StateWrite,
)
from services.scorer.features import State, new_state, upgrade

log = logging.getLogger("segflow.scorer")

#: State-changelog key prefix of a forgotten customer id's marker (``retired:<customer_id>``,
#: a ScorerState with nothing but the id and when it was forgotten): the id is never profiled
#: again, even by an event or merge already in flight when the forget arrived.
RETIRED_KEY = "retired:"

MODEL_QUALITY = Gauge(
    "segflow_scorer_model_quality",
    "Prequential churn-model quality on matured labels (roc_auc, log_loss, calibration_error, "
    "positive_rate)",
    ["metric"],
)
LABELS = Gauge("segflow_scorer_labels_learned", "Matured churn labels the model learned from")
DRIFTS = Gauge("segflow_scorer_drift_detected", "ADWIN drift detections on the model's log loss")
SCORED = Counter("segflow_scorer_scored_total", "Customers scored (events, timers, merges)")
EMITTED = Counter("segflow_scorer_scores_emitted_total", "CustomerScore records produced")
CHECKPOINTS = Counter("segflow_scorer_checkpoints_total", "Model checkpoints written")
WATERMARK = Gauge("segflow_scorer_watermark_seconds", "Event-time watermark (epoch seconds)")
CUSTOMERS = Gauge("segflow_scorer_customers", "Customers with state")
TIMERS = Gauge("segflow_scorer_timers", "Scheduled scoring timers (pending and refreshes)")
FORGOTTEN = Gauge("segflow_scorer_forgotten_ids", "Customer ids forgotten (retired for good)")
RETIRED_DROPS = Counter(
    "segflow_scorer_retired_drops_total", "Events and merges dropped for a forgotten customer id"
)


class ScorerSettings(BaseSettings):
    """The scorer's own settings (``SEGFLOW_SCORER_*`` environment variables)."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_SCORER_", extra="ignore")

    instance: str = "scorer-0"
    group_id: str = "segflow-scorer"
    allowed_lateness_hours: float = 48.0
    watermark_delay_seconds: float = 300.0
    max_future_hours: float = 24.0
    churn_horizon_days: int = 30  # H: churn = no qualifying activity in the next H days
    churn_activity: str = "any"  # qualifying activity: purchase, login or any
    min_emit_interval_seconds: float = 300.0
    refresh_hours: float = 24.0
    checkpoint_seconds: float = 60.0
    tick_seconds: float = 1.0
    # bounded work per tick (input waits while it runs): the rest is done in the next ticks
    max_scores_per_tick: int = 5000
    label_seconds_per_tick: float = 1.0  # label days learned until this is spent (>= 1 day)
    batch_size: int = 2000
    high_value_zips: str = ""  # deprecated: the zip_income lookup table (issue 19)
    reorder_records: int = 2000  # records of one partition that may arrive out of time order
    source_idle_seconds: float = 30.0  # an input partition without a lag report stops
    # holding the event-time clock back after this long without events
    pre_commit_delay: float = 0.0  # fault injection for tests: widen the open-transaction window
    http_port: int | None = None  # internal query endpoint (services/scorer/api.py)

    def core(self) -> ScorerConfig:
        return ScorerConfig(
            allowed_lateness_ms=int(self.allowed_lateness_hours * HOUR),
            watermark_delay_ms=int(self.watermark_delay_seconds * 1000),
            max_future_ms=int(self.max_future_hours * HOUR),
            churn_horizon_days=self.churn_horizon_days,
            churn_activity=self.churn_activity,
            min_emit_interval_ms=int(self.min_emit_interval_seconds * 1000),
            refresh_interval_ms=max(1, int(self.refresh_hours * HOUR)),
            churned_refresh_interval_ms=7 * DAY,
            source_idle_ms=int(self.source_idle_seconds * 1000),
            reorder_records=self.reorder_records,
            max_scores_per_flush=self.max_scores_per_tick,
            high_value_zips=frozenset(z.strip() for z in self.high_value_zips.split(",") if z),
        )


class ScorerService:
    """Handler, tick and abort hook of the scorer on the shared loop."""

    def __init__(
        self,
        settings: Settings,
        options: ScorerSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.options = options or ScorerSettings()
        self.clock = clock
        # Not partition-aware yet (merges move state between customers of any partition):
        # one scorer instance restores every partition.
        self.states = ChangelogStore(settings, TOPICS.scorer_state, partitioned=False)
        self.models = ChangelogStore(settings, TOPICS.scorer_model)
        # States are compressed once per transaction (before_commit / end of tick), not per event.
        # Urgent customers are scored once per batch, together, just before the commit.
        self.scorer = Scorer(self.options.core(), pack_states=False, defer_scores=True)
        self._dirty: set[str] = set()
        self._identified = TOPICS.identified.name(settings)
        self.model_key = f"churn.{self.options.instance}"
        self._last_checkpoint = clock()
        self._checkpointed_n = -1
        self._counted = (0, 0, 0)

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def restore(self) -> None:
        """Load state and the latest model checkpoint; rebuild the timers."""
        self.states.restore()
        self.models.restore()
        record = self.models.get(self.model_key)
        if record is not None:
            self.scorer.restore(record)
            self._checkpointed_n = int(record["n_learned"])
        else:
            self.scorer.model.created_at = self._now()
        self.scorer.retired = set(self._retired())
        upgraded = sum(upgrade(st) for _, st in self.customers())  # 120-day ring states
        self.scorer.rebuild(self.customers(), self.scorer.retired)
        self.scorer.expect_sources(range(TOPICS.identified.partitions), self._now())
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
        """The customers' states (the store without the forgotten ids' markers)."""
        if not self.scorer.retired:
            return self.states.items()
        return ((k, v) for k, v in self.states.items() if not k.startswith(RETIRED_KEY))

    def customer_count(self) -> int:
        return len(self.states) - len(self.scorer.retired)

    def _retired(self) -> list[str]:
        n = len(RETIRED_KEY)
        return [k[n:] for k in self.states.table if k.startswith(RETIRED_KEY)]

    # -- loop callbacks ------------------------------------------------------------------
    def before_batch(self, batch: BatchInfo) -> None:
        """Tell the clock which identified partitions have records in this batch or unread
        ones, so a burst read from one of them cannot make the others' events late."""
        name = self._identified
        self.scorer.on_batch(
            {p: n for (t, p), n in batch.counts.items() if t == name},
            {p: lag for (t, p), lag in batch.lag.items() if t == name},
            self._now(),
        )

    def before_commit(self) -> Iterator[Output]:
        """The batch's urgent customers scored (once each, on stacked arrays), then its
        changed states, compressed and written once each."""
        yield from self._outputs(self.scorer.settle(self.states.get, self._now()))
        yield from self._sealed()

    def handle(self, record: Incoming) -> Iterator[Output]:
        now = self._now()
        if record.topic.key_name == TOPICS.merges.key_name:
            outs = self.scorer.on_merge(self.states.get, record.value, now)
        else:
            value = record.value
            cid = value["customer_id"]
            _, outs = self.scorer.on_event(
                self.states.get(cid), cid, value["event"], now, source=record.partition
            )
        yield from self._outputs(outs)

    def tick(self) -> Iterator[Output]:
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
        pass

    def on_abort(self) -> None:
        """The stores rolled back: timers and cached buckets must follow them."""
        self._dirty.clear()
        self.scorer.rebuild(self.customers(), self._retired())

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
                yield Output(TOPICS.scores, out.customer_id, out.score)
            elif isinstance(out, Retire):
                marker = new_state(out.customer_id, out.at)
                marker["emitted_stage"] = "forgotten"
                yield states.put(RETIRED_KEY + out.customer_id, marker)
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
    config = LoopConfig(
        service="scorer",
        group_id=opts.group_id,
        sources={
            TOPICS.identified.name(settings): TOPICS.identified,
            TOPICS.merges.name(settings): TOPICS.merges,
        },
        transactional_id=f"{opts.group_id}-{opts.instance}",
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
