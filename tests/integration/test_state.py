"""Changelog-backed state: what a service restores is what its committed outputs saw."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from segflow.runtime.leash import leashed
from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.testing import produce_events, read_all
from segflow.runtime.topics import TOPICS

pytestmark = pytest.mark.broker


def score(customer: str, count: float) -> dict[str, Any]:
    return {
        "customer_id": customer,
        "as_of": 0,
        "churn_probability": 0.0,
        "engagement_score": 0.0,
        "clv": 0.0,
        "lifecycle_stage": "prospect",
        "features": {"events": count},
        "model_version": "test",
        "scored_at": 0,
    }


class Counter:
    """Counts events per user in a changelog store (a stand-in for a real service's state).

    Stops its loop once the store has counted ``target`` events in total.
    """

    def __init__(self, store: ChangelogStore, target: int | None = None) -> None:
        self.store = store
        self.target = target
        self.loop: ProcessingLoop | None = None

    def __call__(self, record: Incoming) -> list[Output]:
        user = record.value["user_id"]
        old = self.store.get(user)
        n = (old["features"]["events"] if old else 0.0) + 1
        out = [self.store.put(user, score(user, n))]
        if self.target is not None and self.loop is not None and total(self.store) >= self.target:
            self.loop.stop()
        return out


def total(store: ChangelogStore) -> float:
    return sum(v["features"]["events"] for _, v in store.items())


def run_counter(
    settings: Settings, group: str, target: int | None, pre_commit_delay: float = 0.0
) -> ChangelogStore:
    """Restore, then count until the store holds ``target`` events (None: run until killed)."""
    store = ChangelogStore(settings, TOPICS.scores)
    store.restore()
    config = LoopConfig(
        service="counter",
        group_id=group,
        sources={TOPICS.events.name(settings): TOPICS.events},
        transactional_id=group + "-tx",
        batch_size=100,
        pre_commit_delay=pre_commit_delay,
    )
    counter = Counter(store, target)
    loop = ProcessingLoop(settings, config, counter, hooks=store)
    counter.loop = loop
    if target is None or total(store) < target:
        loop.run(idle_timeout=None if target is None else 60)
    return store


def counter_main(bootstrap: str, prefix: str, group: str) -> None:
    """The counter as its own process (killed with -9 by a test)."""
    settings = Settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    run_counter(settings, group, None, pre_commit_delay=0.5)


def events(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"e{i}",
            "event_type": "login",
            "occurred_at": 1_700_000_000_000 + i,
            "user_id": f"u{i % 37}",
        }
        for i in range(start, start + n)
    ]


def test_state_survives_a_restart_and_continues_where_it_left_off(kafka_settings: Settings) -> None:
    s = kafka_settings
    group = s.topic_prefix + "g"
    produce_events(s, TOPICS.events.name(s), events(2000))
    first = run_counter(s, group, 2000)
    assert sum(v["features"]["events"] for _, v in first.items()) == 2000

    produce_events(s, TOPICS.events.name(s), events(1000, start=2000))
    second = run_counter(s, group, 3000)  # as a new process would: restore, consume the rest

    want = {f"u{u}": sum(1 for i in range(3000) if i % 37 == u) for u in range(37)}
    assert {k: v["features"]["events"] for k, v in second.items()} == want


def test_kill_9_mid_transaction_leaves_state_and_outputs_consistent(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    group = s.topic_prefix + "g"
    produce_events(s, TOPICS.events.name(s), events(3000))
    script = (
        "import sys; sys.path.insert(0, 'tests/integration')\n"
        "from test_state import counter_main\n"
        f"counter_main({s.bootstrap_servers!r}, {s.topic_prefix!r}, {group!r})\n"
    )
    proc = subprocess.Popen(
        leashed([sys.executable, "-c", script]), stderr=subprocess.PIPE, text=True
    )
    # Kill -9 once some batches are committed and more are in flight (0.5 s before each commit).
    deadline = time.monotonic() + 60
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        committed = len(read_all(s, TOPICS.scores.name(s), timeout=30))
        if committed >= 300:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the counter died on its own: {proc.communicate()[1][-1500:]}"
    assert committed >= 300, "the counter committed nothing within 60 s"
    proc.kill()
    proc.wait(10)
    restored = ChangelogStore(s, TOPICS.scores)
    restored.restore()
    assert 0 < total(restored) < 3000, "the kill should land mid-stream"

    store = run_counter(s, group, 3000)
    want = {f"u{u}": sum(1 for i in range(3000) if i % 37 == u) for u in range(37)}
    assert {k: v["features"]["events"] for k, v in store.items()} == want
