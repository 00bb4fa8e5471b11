"""Deployment-wide percentile thresholds (issue #15): two segmenter processes, each owning
part of the customers, use the same ``pNN`` thresholds as one process holding all of them —
the nearest-rank percentiles of every customer's latest value, computed here from the scores."""

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


def scores() -> list[dict[str, Any]]:
    rng = random.Random(15)
    out = []
    for i in range(CUSTOMERS):
        for k in range(2):  # the second score is the one that counts
            out.append(
                {
                    "customer_id": f"c{i:04d}",
                    "as_of": T0 + k * 3_600_000,
                    "churn_probability": round(rng.random(), 2),  # ties across partitions
                    "engagement_score": 50.0,
                    "clv": round(rng.lognormvariate(4, 1), 3),
                    "cluster": None,
                    "lifecycle_stage": "loyal",
                    "features": {},
                    "model_version": "test",
                    "scored_at": int(time.time() * 1000),
                }
            )
    return out


def nearest_rank(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(max(1, math.ceil(pct / 100 * len(ordered))), len(ordered)) - 1]


def test_two_instances_use_the_thresholds_of_one(kafka_bootstrap: str, tmp_path: Path) -> None:
    records = scores()
    latest = {r["customer_id"]: r for r in records}  # as_of order: the last one wins
    want = {
        "churn_probability p50": nearest_rank(
            [r["churn_probability"] for r in latest.values()], 50
        ),
        "clv p70": nearest_rank([r["clv"] for r in latest.values()], 70),
        "clv p80": nearest_rank([r["clv"] for r in latest.values()], 80),
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
            "SEGFLOW_SEGMENTER_PERCENTILE_REFRESH": "1",
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
        seen: list[Any] = []
        while time.monotonic() < deadline:
            for p in procs:
                assert p.poll() is None, "a segmenter process exited"
            health = [get(port, "/health") for port in ports]
            seen = [get(port, "/percentiles") for port in ports]
            held = [h["customers"] if h else None for h in health]
            if (
                held[0] == CUSTOMERS
                and None not in held[1:]
                and 0 < held[1] < CUSTOMERS  # type: ignore[operator]
                and held[1] + held[2] == CUSTOMERS  # type: ignore[operator]
                and all(t is not None and t["thresholds"] == want for t in seen)
            ):
                break
            time.sleep(0.5)
        # one process holds every customer; the two split them and still agree with it
        assert held[0] == CUSTOMERS
        assert 0 < held[1] < CUSTOMERS and held[1] + held[2] == CUSTOMERS  # type: ignore[operator]
        assert [t["thresholds"] if t else None for t in seen] == [want, want, want]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
