"""Changelog-backed state: what a service restores is what its committed outputs saw."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.testing import produce_events
from segflow.runtime.topics import TOPICS

pytestmark = pytest.mark.broker


def score(customer: str, count: float) -> dict[str, Any]:
    return {"customer_id": customer, "as_of": 0, "churn_probability": 0.0,
            "engagement_score": 0.0, "clv": 0.0, "lifecycle_stage": "prospect",
            "features": {"events": count}, "model_version": "test", "scored_at": 0}


class Counter:
    """Counts events per user in a changelog store (a stand-in for a real service's state)."""

    def __init__(self, store: ChangelogStore) -> None:
        self.store = store

    def __call__(self, record: Incoming) -> list[Output]:
        user = record.value["user_id"]
        old = self.store.get(user)
        n = (old["features"]["events"] if old else 0.0) + 1
        return [self.store.put(user, score(user, n))]


def run_counter(settings: Settings, group: str, n: int) -> ChangelogStore:
    store = ChangelogStore(settings, TOPICS.scores)
    store.restore()
    config = LoopConfig(service="counter", group_id=group,
                        sources={TOPICS.events.name(settings): TOPICS.events},
                        transactional_id=group + "-tx", batch_size=300)
    ProcessingLoop(settings, config, Counter(store), hooks=store).run(max_records=n,
                                                                        idle_timeout=15)
    return store


def events(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"event_id": f"e{i}", "event_type": "login", "occurred_at": 1_700_000_000_000 + i,
             "user_id": f"u{i % 37}"} for i in range(start, start + n)]


def test_state_survives_a_restart_and_continues_where_it_left_off(kafka_settings: Settings) -> None:
    s = kafka_settings
    group = s.topic_prefix + "g"
    produce_events(s, TOPICS.events.name(s), events(2000))
    first = run_counter(s, group, 2000)
    assert sum(v["features"]["events"] for _, v in first.items()) == 2000

    produce_events(s, TOPICS.events.name(s), events(1000, start=2000))
    second = run_counter(s, group, 1000)  # a new process: restores, then consumes the rest

    want = {f"u{u}": sum(1 for i in range(3000) if i % 37 == u) for u in range(37)}
    assert {k: v["features"]["events"] for k, v in second.items()} == want


def test_kill_9_mid_transaction_leaves_state_and_outputs_consistent(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    group = s.topic_prefix + "g"
    produce_events(s, TOPICS.events.name(s), events(3000))
    script = (
        "import sys, time\n"
        "sys.path.insert(0, 'tests/integration')\n"
        "from test_state import *\n"
        "from segflow.runtime.settings import Settings\n"
        f"s = Settings(bootstrap_servers={s.bootstrap_servers!r}, topic_prefix={s.topic_prefix!r})\n"
        "store = ChangelogStore(s, TOPICS.scores); store.restore()\n"
        f"config = LoopConfig(service='counter', group_id={group!r}, sources={{TOPICS.events.name(s): TOPICS.events}},\n"
        f"    transactional_id={group + '-tx'!r}, batch_size=300, pre_commit_delay=0.5)\n"
        "ProcessingLoop(s, config, Counter(store), hooks=store).run()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    from segflow.runtime.testing import read_all

    # Kill once some batches are committed and more are in flight.
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(read_all(s, TOPICS.scores.name(s), idle=0.2, timeout=3)) >= 300:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait(10)

    store = run_counter(s, group, 3000)
    want = {f"u{u}": sum(1 for i in range(3000) if i % 37 == u) for u in range(37)}
    assert {k: v["features"]["events"] for k, v in store.items()} == want
