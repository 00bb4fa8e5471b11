"""The in-process pipeline of the segment benches: the simulator's delivered events through
the identity core, the scorer core and the segmenter's shell (``Segmenter`` without Kafka),
each record on its key's partition, ticked every simulated hour (split out of
``eval_segments.py``, issue #14; used by it and by ``segment_oracle.py``).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow.demo import Observed  # noqa: E402
from segflow.errors import InvalidRecord  # noqa: E402
from segflow.runtime.loop import Incoming  # noqa: E402
from segflow.runtime.settings import Settings  # noqa: E402
from segflow.runtime.state import partition_for  # noqa: E402
from segflow.runtime.topics import TOPICS  # noqa: E402
from segflow.sim.generator import HOUR  # noqa: E402
from segflow.sim.noise import Delivery, NoiseConfig  # noqa: E402
from services.identity import core as identity  # noqa: E402
from services.identity.app import node_hasher  # noqa: E402
from services.scorer.core import ScoreEmit, Scorer, ScorerConfig, StateWrite  # noqa: E402
from services.segmenter.app import Segmenter, SegmenterConfig  # noqa: E402

DEMO_NOISE = NoiseConfig(
    duplicates=0.01, late=0.01, out_of_order=0.02, malformed=0.001, blocked=0.01
)


class Pipeline:
    """identity → scorer → segmenter, in one process, in delivery order."""

    def __init__(self, definitions: Path, scorer_config: ScorerConfig) -> None:
        self.rules = identity.Rules()
        self.hasher = node_hasher("eval-segments")
        self.id_cache: dict[tuple[str, str], str] = {}
        self.graph: dict[str, Any] = {}
        self.scorer = Scorer(scorer_config)
        self.scorer_states: dict[str, dict[str, Any]] = {}
        self.clock_ms = 0
        settings = Settings(topic_prefix="eval.")
        self.segmenter = Segmenter(
            settings,
            # pNN tables per partition every hour of event time (the service's default)
            SegmenterConfig(definitions=definitions, reload_interval=1e12),
            clock=lambda: self.clock_ms / 1000,
        )
        self.scores_topic = self.segmenter.scores_topic
        self.merges_topic = self.segmenter.merges_topic
        self.obs = Observed()
        self.scores: dict[str, list[dict[str, Any]]] = defaultdict(list)  # for --why
        self.keep_scores = False
        self.n_scores = 0
        self.seq = 0  # records given to the segmenter (their order on each partition)

    # -- stages ---------------------------------------------------------------------------
    def event(self, event: dict[str, Any], delivered_at: int) -> None:
        self.clock_ms = max(self.clock_ms, delivered_at)
        ids = identity.identifiers(event, self.rules, self.hasher, self.id_cache)
        if not ids:
            return
        step = identity.link(
            self.graph,
            identity.IdentityInput(event["event_id"], event["occurred_at"], ids),
            self.rules,
        )
        if step.customer_id is None:
            return  # duplicate
        identity.apply(self.graph, step.writes)
        cid = step.customer_id
        for outcome in step.outcomes:
            if isinstance(outcome, identity.Merged):
                for absorbed in outcome.absorbed:
                    self.merge(
                        {
                            "survivor_id": outcome.survivor,
                            "absorbed_ids": [absorbed],
                            "occurred_at": outcome.occurred_at,
                        }
                    )
        self.obs.event_owner[event["event_id"]] = cid
        try:
            st, outs = self.scorer.on_event(self.scorer_states.get(cid), cid, event, delivered_at)
        except InvalidRecord as exc:  # too late / from the future: the service dead-letters it
            self.obs.dlq[exc.reason] += 1
            return
        self.scorer_states[cid] = st
        self.scored(outs)

    def merge(self, merge: dict[str, Any]) -> None:
        self.obs.merges += 1
        for absorbed in merge["absorbed_ids"]:
            self.obs.survivor[absorbed] = merge["survivor_id"]
        self.scored(self.scorer.on_merge(self.scorer_states.get, merge, self.clock_ms))
        self.segment(self.merges_topic, merge)

    def scored(self, outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite):
                if o.state is None:
                    self.scorer_states.pop(o.customer_id, None)
                else:
                    self.scorer_states[o.customer_id] = o.state
            elif isinstance(o, ScoreEmit) and o.score is not None:
                self.n_scores += 1
                self.segment(self.scores_topic, o.score)
                if self.keep_scores:
                    self.scores[o.customer_id].append(self.compact(o.score))

    def compact(self, score: dict[str, Any]) -> dict[str, Any]:
        """A score reduced to what the definitions read (memory: ~50k scores are kept)."""
        used = self.segmenter.defs.features
        values: dict[str, Any] = {
            k: float(v) for k, v in (score.get("features") or {}).items() if k in used
        }
        for k in ("churn_probability", "engagement_score", "clv", "cluster"):
            if score.get(k) is not None:
                values[k] = float(score[k])
        if score.get("lifecycle_stage"):
            values["lifecycle_stage"] = str(score["lifecycle_stage"])
        # "at": the harness clock when the score was emitted (its order against merges);
        # "seq": its place in the segmenter's input (its partition's order)
        return {"as_of": score["as_of"], "at": self.clock_ms, "seq": self.seq, "values": values}

    def segment(self, topic_name: str, value: dict[str, Any]) -> None:
        topic = TOPICS.merges if topic_name == self.merges_topic else TOPICS.scores
        # on the partition its key has (merges are keyed by the absorbed id): the segmenter's
        # watermarks, timers and pNN tables are per partition
        key = str(value["absorbed_ids"][0] if topic is TOPICS.merges else value["customer_id"])
        part = partition_for(key, TOPICS.scores.partitions)
        self.seq += 1
        record = Incoming(topic, topic_name, part, 0, key, value, None, [])
        self.collect(self.segmenter(record))

    def tick(self) -> None:
        self.scored(
            self.scorer.flush(
                self.scorer_states.get, lambda: self.scorer_states.items(), self.clock_ms
            )
        )
        self.collect(self.segmenter.tick())

    def drive(
        self, sim: Any, seen: Callable[[Any], None] | None = None, *, to_end: bool = True
    ) -> None:
        """Feed ``sim``'s delivered events a week at a time, ticking every simulated hour
        before the events delivered after it (``seen(item)`` first, for a bench's own rows);
        with ``to_end`` the hours up to an hour past the simulation's end are ticked too."""
        config = sim.config
        next_tick = config.start_ms + HOUR
        while not (sim.finished and not sim.pending):
            for item in sim.step(7):
                if type(item) is not Delivery:
                    continue
                while item.delivered_at >= next_tick:
                    next_tick = self._tick_at(next_tick)
                if seen is not None:
                    seen(item)
                self.event(item.event, item.delivered_at)
        while to_end and next_tick <= config.end_ms + HOUR:
            next_tick = self._tick_at(next_tick)

    def _tick_at(self, at: int) -> int:
        self.clock_ms = max(self.clock_ms, at)
        self.tick()
        return at + HOUR

    def collect(self, outputs: Any) -> None:
        """One "transaction": the outputs, the loop's before_commit hook, the commit."""
        for out in [*outputs, *self.segmenter.before_commit()]:
            if out.topic is TOPICS.segment_changes:
                self.obs.changes.append(out.value)
        self.segmenter.store.on_commit()
        self.segmenter.on_commit()
