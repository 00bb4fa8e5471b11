"""N instances of one service in one consumer group, as separate processes on a real broker.

The same input is run through 1 instance and through 2 (then through 2 with one killed with
``kill -9`` mid-stream and a third added): what comes out on the output topics
(read_committed) must be the same multiset, i.e. nothing lost, nothing doubled, no timer fired
twice or lost, whichever instance owned which partition when.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from segflow.receiver import Receiver
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import partition_for
from segflow.runtime.testing import isolated_settings, produce, read_all
from segflow.runtime.topics import TOPICS
from services.dispatcher.core import idempotency_key

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
DAY = 86_400_000
T0 = 1_772_452_800_000  # 2026-03-02 12:00 UTC

DEFS = """version: "scale"
segments:
  - name: High
    priority: 10
    enter: {feature: x, op: ">=", value: 0.8}
    exit: {feature: x, op: "<", value: 0.5}
    min_dwell: 2d
    re_engaged_when: {feature: y, op: ">", value: 0}
  - name: Low
    priority: 5
    enter: {feature: x, op: "<", value: 0.2}
    ttl: 3d
"""

PLAYBOOK = """\
playbook: P
segment: S
steps:
  - {id: mail, channel: email, template: d-1, subject: "Hi"}
  - {id: task, channel: crm_task, subject: "Call"}
---
policy: {default_timezone: UTC}
"""


class Fleet:
    """Service processes started by a test; every one is killed when the test ends."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, module: str, s: Settings, instance: str, env: dict[str, str]) -> None:
        full = {
            **os.environ,
            "SEGFLOW_BOOTSTRAP_SERVERS": s.bootstrap_servers,
            "SEGFLOW_TOPIC_PREFIX": s.topic_prefix,
            "SEGFLOW_INSTANCE_ID": instance,
            # A killed member's partitions move after 6 s; its open transaction is aborted
            # by the broker after 10 s (the defaults, 45 s and 60 s, would only be slower).
            "SEGFLOW_SESSION_TIMEOUT_MS": "6000",
            "SEGFLOW_TRANSACTION_TIMEOUT_MS": "10000",
            "SEGFLOW_LOG_LEVEL": "INFO",
            **env,
        }
        name = f"{module}-{s.topic_prefix}{instance}"
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[instance] = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env=full, stderr=log, stdout=log
        )

    def kill(self, instance: str) -> None:
        proc = self.procs.pop(instance)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def check_alive(self) -> None:
        for instance, proc in self.procs.items():
            assert proc.poll() is None, f"instance {instance} exited with {proc.returncode}"

    def owned(self, s: Settings) -> dict[str, set[int]]:
        """Per instance of ``s``'s run, every partition it was assigned at some point (from
        the instances' own JSON logs)."""
        out: dict[str, set[int]] = {}
        for path in self.logs.glob(f"*-{s.topic_prefix}*.log"):
            instance = path.stem.rsplit(s.topic_prefix, 1)[1]
            for line in path.read_text(errors="replace").splitlines():
                if '"partitions assigned"' in line:
                    out.setdefault(instance, set()).update(json.loads(line)["partitions"])
        return out

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.procs.clear()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.stop()


def settled(
    read: Callable[[], list[Any]], fleet: Fleet, quiet: float = 4.0, timeout: float = 120.0
) -> list[Any]:
    """Poll ``read`` until what it returns is non-empty and unchanged for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last: list[Any] = []
    since = time.monotonic()
    while time.monotonic() < deadline:
        fleet.check_alive()
        now = read()
        if len(now) != len(last):
            last, since = now, time.monotonic()
        elif last and time.monotonic() - since >= quiet:
            return last
        time.sleep(0.5)
    raise AssertionError(f"output still changing after {timeout}s ({len(last)} records)")


# -- segmenter -----------------------------------------------------------------------------
def scores(customers: int, days: int, seed: int = 7) -> list[dict[str, Any]]:
    """Daily scores of every customer, in event-time order (interleaved customers)."""
    rng = random.Random(seed)
    out = []
    for d in range(days):
        for i in range(customers):
            out.append(
                {
                    "customer_id": f"c{i:03d}",
                    "as_of": T0 + d * DAY + i * 1000,
                    "churn_probability": 0.1,
                    "engagement_score": 50.0,
                    "clv": 10.0,
                    "cluster": None,
                    "lifecycle_stage": "loyal",
                    "features": {"x": rng.random(), "y": 1.0 if rng.random() < 0.2 else 0.0},
                    "model_version": "test",
                    "scored_at": T0,
                }
            )
    return out


def merges(pairs: list[tuple[str, str]], at: int) -> list[dict[str, Any]]:
    return [
        {
            "merge_id": f"m-{absorbed}",
            "survivor_id": survivor,
            "absorbed_ids": [absorbed],
            "cause_identifier_type": "user_id",
            "cause_identifier_hash": "h",
            "event_id": f"e-{absorbed}",
            "occurred_at": at,
            "merged_at": at,
        }
        for survivor, absorbed in pairs
    ]


def send(
    s: Settings, topic: Any, records: list[dict[str, Any]], key: Callable[[dict[str, Any]], str]
) -> None:
    serde = Serde.from_settings(s)
    produce(s, topic.name(s), [(key(r).encode(), serde.encode(topic, r)) for r in records])


def by_customer(r: dict[str, Any]) -> str:
    return str(r["customer_id"])


def by_absorbed(r: dict[str, Any]) -> str:
    return str(r["absorbed_ids"][0])


def changes(s: Settings) -> list[tuple[Any, ...]]:
    serde = Serde.from_settings(s)
    out = []
    for r in read_all(s, TOPICS.segment_changes.name(s), idle=1.0, timeout=30):
        c = serde.decode(TOPICS.segment_changes, r.value)
        out.append((c["customer_id"], c["segment"], c["transition"], c["occurred_at"]))
    return out


def segmenter_env(defs: Path, **extra: str) -> dict[str, str]:
    return {
        "SEGFLOW_SEGMENTER_DEFINITIONS": str(defs),
        "SEGFLOW_SEGMENTER_TICK_INTERVAL": "0.2",
        "SEGFLOW_SEGMENTER_PERCENTILE_REFRESH": "3600",
        **extra,
    }


# Absorbed ids on a different partition from their survivor, and on the same one.
def merge_pairs(customers: int) -> list[tuple[str, str]]:
    ids = [f"c{i:03d}" for i in range(customers)]
    part = {c: partition_for(c, TOPICS.scores.partitions) for c in ids}
    cross = [(a, b) for a, b in zip(ids[::2], ids[1::2], strict=False) if part[a] != part[b]]
    same = [(a, b) for a in ids for b in ids if a < b and part[a] == part[b]]
    return cross[:4] + same[:2]


def run_segmenters(
    bootstrap: str, label: str, fleet: Fleet, defs: Path, instances: list[str], data: list[Any]
) -> list[tuple[Any, ...]]:
    s = isolated_settings(bootstrap, label)
    send(s, TOPICS.scores, data, by_customer)
    for inst in instances:
        fleet.start("services.segmenter", s, inst, segmenter_env(defs))
    settled(lambda: changes(s), fleet)
    last_day = max(r["as_of"] for r in data)
    send(s, TOPICS.merges, merges(merge_pairs(120), last_day), by_absorbed)
    out = settled(lambda: changes(s), fleet)
    fleet.stop()
    owned = fleet.owned(s)
    assert sorted(owned) == sorted(instances) and all(owned.values()), owned
    return out


def test_two_segmenters_emit_exactly_what_one_does(
    kafka_bootstrap: str, fleet: Fleet, tmp_path: Path
) -> None:
    defs = tmp_path / "segments.yaml"
    defs.write_text(DEFS)
    data = scores(120, 12)
    one = run_segmenters(kafka_bootstrap, "seg-one", fleet, defs, ["0"], data)
    two = run_segmenters(kafka_bootstrap, "seg-two", fleet, defs, ["0", "1"], data)
    kinds = Counter(c[2] for c in one)
    # The run exercises scores, timers (min_dwell, ttl) and merges across partitions.
    assert kinds["entered"] > 100 and kinds["exited"] > 50, kinds
    assert any(c[2] == "exited" for c in one if c[1] == "Low"), "no ttl timer fired"
    assert Counter(one) == Counter(two)
