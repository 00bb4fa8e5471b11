"""Percentile thresholds per scores partition (issue #15): two segmenter processes, each
owning some partitions, hold the same ``pNN`` table for each partition as one process holding
all of them — the nearest-rank percentiles of the partition's customers' latest values when
its scores reached the grid instant, computed here from the scores."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from segflow.runtime.broker import free_port
from segflow.runtime.leash import leashed
from segflow.runtime.settings import Settings
from segflow.runtime.state import partition_for
from segflow.runtime.testing import isolated_settings, produce
from segflow.runtime.topics import TOPICS
from services.segmenter.app import serde_for

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000
DEFS = """version: "1"
segments:
  - name: HighValue
    priority: 10
    enter: {feature: clv, op: ">=", value: p80}
    exit: {feature: clv, op: "<", value: p70}
  - name: Risky
    priority: 5
    enter: {feature: churn_probability, op: ">=", value: p50}
"""
CUSTOMERS = 240
PARTITIONS = TOPICS.scores.partitions


def score(cid: str, as_of: int, churn: float, clv: float) -> dict[str, Any]:
    return {
        "customer_id": cid,
        "as_of": as_of,
        "churn_probability": churn,
        "engagement_score": 50.0,
        "clv": clv,
        "cluster": None,
        "lifecycle_stage": "loyal",
        "features": {},
        "model_version": "test",
        "scored_at": int(time.time() * 1000),
    }


def scores() -> list[dict[str, Any]]:
    """Two scores per customer an hour apart (the second is the one that counts), then one
    score per partition two hours later: it reaches the next grid instant, so the table is
    computed over every customer's second score."""
    rng = random.Random(15)
    out = []
    for k in range(2):
        for i in range(CUSTOMERS):
            churn = round(rng.random(), 2)  # ties across partitions
            out.append(
                score(f"c{i:04d}", T0 + k * 3_600_000, churn, round(rng.lognormvariate(4, 1), 3))
            )
    late: dict[int, str] = {}
    for i in range(CUSTOMERS):  # a customer of each partition, scored again at T0 + 3 h
        late.setdefault(partition_for(f"c{i:04d}", PARTITIONS), f"c{i:04d}")
    for cid in late.values():
        out.append(score(cid, T0 + 3 * 3_600_000, 0.5, 1.0))
    return out


def nearest_rank(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(max(1, math.ceil(pct / 100 * len(ordered))), len(ordered)) - 1]


def test_two_instances_hold_each_partitions_table_as_one_does(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    records = scores()
    second = [r for r in records if r["as_of"] == T0 + 3_600_000]
    want: dict[str, dict[str, float]] = {}
    for part in range(PARTITIONS):
        mine = [r for r in second if partition_for(r["customer_id"], PARTITIONS) == part]
        want[str(part)] = {
            "churn_probability p50": nearest_rank([r["churn_probability"] for r in mine], 50),
            "clv p70": nearest_rank([r["clv"] for r in mine], 70),
            "clv p80": nearest_rank([r["clv"] for r in mine], 80),
        }
    defs = tmp_path / "segments.yaml"
    defs.write_text(DEFS)
    solo = isolated_settings(kafka_bootstrap, "pop-solo")
    duo = isolated_settings(kafka_bootstrap, "pop-duo")
    for s in (solo, duo):
        serde = serde_for(s)
        produce(
            s,
            TOPICS.scores.name(s),
            [(r["customer_id"].encode(), serde.encode(TOPICS.scores, r)) for r in records],
        )
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []

    def start(s: Settings, instance: str) -> None:
        port = free_port()
        env = {
            **os.environ,
            "SEGFLOW_BOOTSTRAP_SERVERS": s.bootstrap_servers,
            "SEGFLOW_TOPIC_PREFIX": s.topic_prefix,
            "SEGFLOW_INSTANCE_ID": instance,
            "SEGFLOW_LOG_LEVEL": "WARNING",
            "SEGFLOW_SEGMENTER_DEFINITIONS": str(defs),
            "SEGFLOW_SEGMENTER_PERCENTILE_REFRESH": "3600",
            "SEGFLOW_SEGMENTER_TICK_INTERVAL": "0.2",
            "SEGFLOW_SEGMENTER_HTTP_PORT": str(port),
        }
        cmd = [sys.executable, "-m", "services.segmenter"]
        procs.append(subprocess.Popen(leashed(cmd), cwd=ROOT, env=env, stderr=subprocess.DEVNULL))
        ports.append(port)

    def get(port: int, path: str) -> dict[str, Any] | None:
        try:
            return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).json()
        except httpx.HTTPError:
            return None

    start(solo, "0")
    start(duo, "0")
    start(duo, "1")
    try:
        deadline = time.monotonic() + 60
        tables: list[dict[str, Any]] = []
        held: list[Any] = []

        def settled() -> bool:
            return (
                held[0] == CUSTOMERS
                and None not in held[1:]
                and 0 < held[1] < CUSTOMERS
                and held[1] + held[2] == CUSTOMERS
                and tables[0] == want
                and {**tables[1], **tables[2]} == want
            )

        while time.monotonic() < deadline:
            for p in procs:
                assert p.poll() is None, "a segmenter process exited"
            health = [get(port, "/health") for port in ports]
            held = [h["customers"] if h else None for h in health]
            seen = [get(port, "/percentiles") for port in ports]
            tables = [
                {part: t["thresholds"] for part, t in (s or {}).get("partitions", {}).items()}
                for s in seen
            ]
            if settled():
                break
            time.sleep(0.5)
        # one process holds every partition; the two split them and hold the same tables
        assert held[0] == CUSTOMERS
        assert 0 < held[1] < CUSTOMERS and held[1] + held[2] == CUSTOMERS
        assert tables[0] == want
        assert not tables[1].keys() & tables[2].keys()
        assert {**tables[1], **tables[2]} == want
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
