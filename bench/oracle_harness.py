"""The segment oracle's harness (issue #17): the simulator's delivered events through identity,
scorer and segmenter in one process (``segment_pipeline.py``), keeping the raw events, the
scores (with their emission clock and order), the segment changes, the merges' instants and
order, and the segmenter's percentile grid step. Split out of ``segment_oracle.py`` (issue
#14's 600-line limit); the oracle side imports nothing from ``services``, only this harness
does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_DEFINITIONS = (
    Path(__file__).resolve().parents[1] / "services" / "segmenter" / "segments" / "default.yaml"
)


# -- the harness: the pipeline's memberships and the raw events -------------------------------
def run_pipeline(customers: int, days: int, seed: int) -> dict[str, Any]:
    """Simulate (demo noise) and run identity → scorer → segmenter in one process, keeping the
    raw delivered events, the scores and the segment changes."""
    from segment_pipeline import DEMO_NOISE, Pipeline

    from segflow.runtime.state import partition_for
    from segflow.runtime.topics import TOPICS
    from segflow.sim.generator import SimConfig, Simulation
    from segflow.sim.noise import Delivery
    from services.scorer.core import ScorerConfig

    class Recording(Pipeline):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.dead: set[str] = set()
            self.merge_at: dict[str, int] = {}
            self.merge_occ: dict[str, int] = {}  # the merge's event time (the segmenter's now)
            self.merge_seq: dict[str, int] = {}  # absorbed id -> the merge's seq
            self.merge_time: dict[str, int] = {}  # absorbed id -> the merge's occurred_at
            # the segmenter's pNN tables over time, any partition's (for the attribution only)
            self.thresholds: list[tuple[int, dict[tuple[str, float], float]]] = []
            self._seen: dict[int, Any] = {}

        def collect(self, outputs: Any) -> None:
            super().collect(outputs)
            for part, table in self.segmenter.tables.items():
                if self._seen.get(part) is not table:
                    self._seen[part] = table
                    self.thresholds.append((table.at, dict(table.values)))

        def event(self, event: dict[str, Any], delivered_at: int) -> None:
            before = sum(self.obs.dlq.values())
            super().event(event, delivered_at)
            if sum(self.obs.dlq.values()) != before:
                self.dead.add(event["event_id"])

        def merge(self, merge: dict[str, Any]) -> None:
            for a in merge["absorbed_ids"]:
                self.merge_at[a] = self.clock_ms
                # the segmenter's instant for the merge: its time or its partition's watermark
                wm = self.segmenter.watermarks.get(partition_for(a, TOPICS.scores.partitions), 0)
                self.merge_occ[a] = max(int(merge["occurred_at"]), wm)
            super().merge(merge)
            for a in merge["absorbed_ids"]:
                self.merge_seq[a] = self.seq
                self.merge_time[a] = int(merge["occurred_at"])

    config = SimConfig(customers=customers, days=days, seed=seed, noise=DEMO_NOISE)
    sim = Simulation(config)
    scorer_config = ScorerConfig()
    pipe = Recording(DEFAULT_DEFINITIONS, scorer_config)
    pipe.keep_scores = True
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def seen(item: Delivery) -> None:
        e = item.event
        rows.append(
            {
                "event_id": e["event_id"],
                "customer": item.customer,
                "event_type": e["event_type"],
                "occurred_at": int(e["occurred_at"]),
                "delivered_at": int(item.delivered_at),
                "amount": e.get("amount"),
                "sentiment": e.get("sentiment"),
                "escalated": bool(e.get("escalated")),
                "zip": (e.get("properties") or {}).get("zip"),
            }
        )

    pipe.drive(sim, seen)
    kept = SimpleNamespace(
        obs=pipe.obs,
        scores=dict(pipe.scores),
        merge_at=pipe.merge_at,
        merge_occ=pipe.merge_occ,
        dead=pipe.dead,
        thresholds=sorted(pipe.thresholds, key=lambda t: t[0]),
        merge_seq=pipe.merge_seq,
        merge_time=pipe.merge_time,
        refresh_ms=int(pipe.segmenter.config.percentile_refresh * 1000),
    )
    return {
        "config": config,
        "pipe": kept,
        "events": pd.DataFrame(rows),
        "zips": scorer_config.high_value_zips,
        "seconds": time.perf_counter() - started,
    }
