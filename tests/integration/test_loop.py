"""The shared consume → handle → produce loop on a real broker (issue 2, must-show a–d)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from segflow.runtime import metrics
from segflow.runtime.broker import LocalBroker, free_port
from segflow.runtime.leash import leashed
from segflow.runtime.loop import LoopConfig, ProcessingLoop
from segflow.runtime.passthrough import copier
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import (
    create_topic,
    isolated_settings,
    produce,
    produce_events,
    read_all,
    wait_until,
)
from segflow.runtime.topics import TOPICS

pytestmark = pytest.mark.broker

BASE_MS = 1_763_000_000_000


def make_events(n: int, keys: int = 50, start: int = 0) -> list[dict[str, Any]]:
    """n valid events over ``keys`` users, with a per-user sequence number in properties."""
    seq: Counter[str] = Counter()
    out = []
    for i in range(start, start + n):
        user = f"u{i % keys}"
        seq[user] += 1
        out.append(
            {
                "event_id": f"e{i}",
                "event_type": ("login", "page_view", "purchase", "feature_use")[i % 4],
                "occurred_at": BASE_MS + i * 1000,
                "user_id": user,
                "amount": float(i % 97) if i % 4 == 2 else None,
                "properties": {"seq": str(seq[user]), "zip": str(10000 + i % 13)},
            }
        )
    return out


def run_loop(settings: Settings, source: str, sink: str, group: str, n: int) -> ProcessingLoop:
    config = LoopConfig(service="test", group_id=group, sources={source: TOPICS.events})
    loop = ProcessingLoop(settings, config, copier(sink))  # type: ignore[arg-type]
    loop.run(max_records=n, idle_timeout=30)
    return loop


def decoded(settings: Settings, records: list[Any]) -> list[dict[str, Any]]:
    serde = Serde.from_settings(settings)
    return [serde.decode(TOPICS.events, r.value) for r in records]


def passthrough_cmd(
    settings: Settings, source: str, sink: str, group: str, *extra: str
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "segflow.runtime.passthrough",
        "--bootstrap",
        settings.bootstrap_servers,
        "--prefix",
        settings.topic_prefix,
        "--source",
        source,
        "--sink",
        sink,
        "--group",
        group,
        "--transactional-id",
        f"{group}-tx",
        *extra,
    ]


def test_10k_events_pass_through_identical_and_in_order_per_key(kafka_settings: Settings) -> None:
    s = kafka_settings
    source, sink = TOPICS.events.name(s), create_topic(s, s.topic_prefix + "copy", TOPICS.events)
    events = make_events(10_000)
    produce_events(s, source, events)

    loop = run_loop(s, source, sink, s.topic_prefix + "g", 10_000)

    assert loop.processed == 10_000
    out = read_all(s, sink, expected=10_000)
    assert len(out) == 10_000
    by_key: dict[bytes | None, list[dict[str, Any]]] = defaultdict(list)
    for rec, value in zip(out, decoded(s, out), strict=True):
        by_key[rec.key].append(value)
    expected_by_key: dict[bytes, list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        expected_by_key[ev["user_id"].encode()].append(ev)
    assert set(by_key) == set(expected_by_key)
    for key, got in by_key.items():
        want = expected_by_key[key]  # type: ignore[index]
        assert [g["event_id"] for g in got] == [w["event_id"] for w in want], key
        for g, w in zip(got, want, strict=True):
            assert {k: v for k, v in g.items() if v is not None and v != {}} == {
                k: v for k, v in w.items() if v is not None and v != {}
            }
    assert read_all(s, TOPICS.dlq.name(s)) == []


def test_malformed_records_go_to_dlq_with_reason_and_good_events_still_arrive(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    serde = Serde.from_settings(s)
    sink = create_topic(s, s.topic_prefix + "copy", TOPICS.events)
    good = make_events(300)
    valid_body = serde.encode(TOPICS.events, good[0])
    wrong_id = b"\x00\x00\x00\x00\x63" + valid_body[5:]
    truncated = valid_body[:9]  # header + the first bytes of event_id only
    no_identifier = serde.encode(
        TOPICS.events,
        {"event_id": "bad-ident", "event_type": "login", "occurred_at": BASE_MS},
    )
    future = serde.encode(
        TOPICS.events,
        {
            "event_id": "bad-future",
            "event_type": "login",
            "user_id": "u1",
            "occurred_at": int(time.time() * 1000) + 30 * 86400 * 1000,
        },
    )
    bad = {
        100: (b"garbage", b"{not avro at all}", "undecodable"),
        150: (b"wrong-id", wrong_id, "unknown_schema_id"),
        200: (b"truncated", truncated, "undecodable"),
        250: (b"no-ident", no_identifier, "no_identifier"),
        275: (b"future", future, "future_event"),
    }
    stream: list[tuple[bytes | None, bytes | None]] = []
    for i, ev in enumerate(good):
        if i in bad:
            stream.append(bad[i][:2])
        stream.append((ev["user_id"].encode(), serde.encode(TOPICS.events, ev)))
    # All on one partition so source offsets are predictable.
    one = create_topic(s, s.topic_prefix + "events1", TOPICS.events, partitions=1)
    produce(s, one, stream)

    before = dlq_count("test", "unknown_schema_id")
    run_loop(s, one, sink, s.topic_prefix + "g", len(stream))
    assert dlq_count("test", "unknown_schema_id") == before + 1
    # ... and SREs see it on /metrics.
    port = free_port()
    metrics.serve(port)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'segflow_dlq_records_total{reason="unknown_schema_id",service="test"}' in text

    out = decoded(s, read_all(s, sink, expected=len(good)))
    assert sorted(e["event_id"] for e in out) == sorted(e["event_id"] for e in good)
    letters = [serde.decode(TOPICS.dlq, r.value) for r in read_all(s, TOPICS.dlq.name(s), 5)]
    assert len(letters) == 5
    offsets = {i + n for n, i in enumerate(sorted(bad))}  # each bad record shifts later ones
    got = {(dl["original_key"], dl["reason"], dl["source_offset"]) for dl in letters}
    want = {
        (bad[i][0], bad[i][2], off) for i, off in zip(sorted(bad), sorted(offsets), strict=True)
    }
    assert got == want
    for dl in letters:
        assert dl["source_topic"] == one and dl["source_partition"] == 0
        assert dl["service"] == "test" and dl["detail"]
        sent = {key: value for key, value, _ in bad.values()}
        assert dl["original_value"] == sent[dl["original_key"]]


def test_broker_killed_mid_run_and_restarted_loses_nothing(own_broker: LocalBroker) -> None:
    """The broker dies under a running loop; a supervisor (here, the test) restarts whatever
    exits; when the broker is back every event arrives exactly once."""
    s = isolated_settings(own_broker.bootstrap, "brokerkill")
    source, sink = TOPICS.events.name(s), create_topic(s, s.topic_prefix + "copy", TOPICS.events)
    group = s.topic_prefix + "g"
    first, second = make_events(3000), make_events(3000, start=3000)
    produce_events(s, source, first)
    cmd = passthrough_cmd(s, source, sink, group, "--batch-size", "100", "--stuck-timeout", "20")
    # Slow batches (each transaction held open 0.3 s) so that the kill lands inside one; a
    # process restarted after the outage runs at full speed (that the loop survives the
    # outage, restarted or not, is what is tested; 60 batches of 0.3 s would be 18 s).
    supervisor = Supervisor([*cmd, "--pre-commit-delay", "0.3"], restart=cmd)
    try:
        # Wait until the loop is demonstrably mid-stream, then kill the broker under it.
        wait_until(lambda: 0 < len(read_all(s, sink, timeout=30)) < 3000, 60)
        own_broker.kill()
        time.sleep(2)  # the outage itself
        own_broker.start()
        produce_events(s, source, second)
        out = read_all(s, sink, expected=6000, timeout=180, on_idle=supervisor.check)
    finally:
        supervisor.stop()
    ids = Counter(e["event_id"] for e in decoded(s, out))
    assert len(ids) == 6000, f"missing {6000 - len(ids)}; restarts: {supervisor.exits}"
    assert max(ids.values()) == 1, "an event appeared twice on a read_committed consumer"


class Supervisor:
    """Keeps one loop process running, restarting it when it exits (as `segflow up` will)."""

    def __init__(self, cmd: list[str], restart: list[str] | None = None) -> None:
        self.cmd = restart or cmd  # what a restart runs
        self.exits: list[int] = []
        self.proc = subprocess.Popen(leashed(cmd), stderr=subprocess.DEVNULL)

    def check(self) -> None:
        code = self.proc.poll()
        if code is not None:
            self.exits.append(code)
            self.proc = subprocess.Popen(leashed(self.cmd), stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def test_kill_9_mid_transaction_then_restart_gives_each_input_exactly_once(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    s = kafka_settings
    source, sink = TOPICS.events.name(s), create_topic(s, s.topic_prefix + "copy", TOPICS.events)
    group = s.topic_prefix + "g"
    events = make_events(5000)
    produce_events(s, source, events)
    cmd = passthrough_cmd(s, source, sink, group, "--batch-size", "500")
    proc = subprocess.Popen(leashed([*cmd, "--pre-commit-delay", "5"]), stderr=subprocess.DEVNULL)
    # Uncommitted output visible to read_uncommitted = a transaction is open: kill -9 now.
    wait_until(lambda: len(read_all(s, sink, timeout=5, isolation="read_uncommitted")) > 0, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert read_all(s, sink, timeout=30) == [], "nothing was committed before the kill"

    # Restarted with the same transactional.id: it fences the killed one, whose open
    # transaction is aborted at once, and processes everything; stopped (SIGTERM, as a
    # supervisor stops it) once all 5000 are committed, it exits cleanly. (It used to stop
    # on 8 s without input, 8 s of waiting for nothing.)
    log = tmp_path / "restarted.log"
    with log.open("wb") as out:
        restarted = subprocess.Popen(leashed(cmd), stderr=out)
    try:
        read_all(s, sink, expected=5000, timeout=180)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(60)
    assert restarted.returncode == 0, log.read_text(errors="replace")[-2000:]

    committed = read_all(s, sink, expected=5000)
    ids = Counter(e["event_id"] for e in decoded(s, committed))
    assert set(ids) == {e["event_id"] for e in events}
    assert max(ids.values()) == 1
    raw = read_all(s, sink, expected=5000, isolation="read_uncommitted")
    assert len(raw) > 5000, "the killed transaction's records should be in the log, aborted"


def dlq_count(service: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "segflow_dlq_records_total", {"service": service, "reason": reason}
    )
    return value or 0.0


def test_tick_outputs_commit_without_input(kafka_settings: Settings) -> None:
    s = kafka_settings
    source, sink = TOPICS.events.name(s), create_topic(s, s.topic_prefix + "ticks", TOPICS.events)
    ticks = iter(range(1000))

    def tick() -> list[Any]:
        from segflow.runtime.loop import Output

        i = next(ticks)
        ev = make_events(1, start=i)[0]
        return [Output(TOPICS.events, ev["user_id"], ev, topic_name=sink)]

    config = LoopConfig(
        service="ticker",
        group_id=s.topic_prefix + "g",
        sources={source: TOPICS.events},
        tick_interval=0.2,
        transactional_id=s.topic_prefix + "tx",
    )
    loop = ProcessingLoop(s, config, copier(sink), tick=tick)  # type: ignore[arg-type]
    loop.run(idle_timeout=2.0)
    out = read_all(s, sink)
    assert len(out) >= 5  # about one per 0.2 s over ~2 s of idling, each committed
    ids = sorted((e["event_id"] for e in decoded(s, out)), key=lambda x: int(x[1:]))
    assert ids == [f"e{i}" for i in range(len(out))]  # every tick's output, once


def test_before_commit_outputs_join_each_batch_transaction(kafka_settings: Settings) -> None:
    s = kafka_settings
    source = TOPICS.events.name(s)
    sink = create_topic(s, s.topic_prefix + "copy", TOPICS.events)
    summary = create_topic(s, s.topic_prefix + "summary", TOPICS.events, partitions=1)
    produce_events(s, source, make_events(1000))

    class BatchSummary:
        """One summary record per batch: how many events the batch carried."""

        def __init__(self) -> None:
            self.seen = 0
            self.batches = 0

        def count(self, record: Any) -> list[Any]:
            self.seen += 1
            return list(copier(sink)(record))  # type: ignore[operator]

        def before_commit(self) -> list[Any]:
            from segflow.runtime.loop import Output

            self.batches += 1
            ev = {
                **make_events(1, start=100_000 + self.batches)[0],
                "properties": {"batch_events": str(self.seen)},
            }
            self.seen = 0
            return [Output(TOPICS.events, "summary", ev, topic_name=summary)]

        def on_commit(self) -> None:
            pass

        def on_abort(self) -> None:
            pass

    hook = BatchSummary()
    config = LoopConfig(
        service="summary",
        group_id=s.topic_prefix + "g",
        sources={source: TOPICS.events},
        batch_size=100,
        transactional_id=s.topic_prefix + "tx",
    )
    loop = ProcessingLoop(s, config, hook.count, hooks=[hook])  # type: ignore[arg-type]
    loop.run(max_records=1000, idle_timeout=30)

    summaries = decoded(s, read_all(s, summary, expected=hook.batches))
    assert len(summaries) == hook.batches >= 10  # one per batch of at most 100
    assert sum(int(e["properties"]["batch_events"]) for e in summaries) == 1000


def example_score() -> dict[str, Any]:
    """A valid CustomerScore for customer ``c1``."""
    return {
        "customer_id": "c1",
        "as_of": 1,
        "churn_probability": 0.5,
        "engagement_score": 50.0,
        "clv": 10.0,
        "lifecycle_stage": "loyal",
        "features": {},
        "model_version": "m",
        "scored_at": 2,
    }


def test_tombstones_on_a_compacted_input_are_skipped_not_dead_lettered(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    scores = TOPICS.scores.name(s)
    serde = Serde.from_settings(s)
    example = example_score()
    produce(s, scores, [(b"c1", serde.encode(TOPICS.scores, example)), (b"c1", None)])
    seen: list[Any] = []
    config = LoopConfig(
        service="tomb",
        group_id=s.topic_prefix + "g",
        sources={scores: TOPICS.scores},
        transactional_id=s.topic_prefix + "tx",
    )
    loop = ProcessingLoop(s, config, lambda r: seen.append(r.value) or [])  # type: ignore[arg-type]
    assert loop.run(max_records=2, idle_timeout=20) == 2
    assert [v["customer_id"] for v in seen] == ["c1"]
    assert read_all(s, TOPICS.dlq.name(s)) == []


def test_work_under_way_is_finished_and_committed_before_a_rebalance_takes_partitions_away(
    kafka_settings: Settings,
) -> None:
    """A hook with ``before_revoke`` finishes its work under way when a second member joins,
    and the tick that follows commits it while the partitions are still this member's: the
    joiner, when its assignment arrives, already reads it (read_committed). Not on close."""
    import threading

    from confluent_kafka import Consumer

    from segflow.runtime.loop import Output

    s = kafka_settings
    source = TOPICS.events.name(s)
    sink = create_topic(s, s.topic_prefix + "finished", TOPICS.events)
    group = s.topic_prefix + "g"

    class Work:
        """One piece of work under way per owned partition, finished only before a revoke."""

        def __init__(self) -> None:
            self.under_way: set[int] = set()
            self.finished: list[int] = []
            self.revokes: list[set[int]] = []

        def on_assign(self, partitions: set[int]) -> None:
            self.under_way |= partitions

        def before_revoke(self, partitions: set[int], timeout: float) -> int:
            self.revokes.append(set(partitions))
            self.finished += sorted(self.under_way & partitions)
            self.under_way -= partitions
            return 0

        def tick(self) -> list[Any]:
            done, self.finished = self.finished, []
            return [
                Output(TOPICS.events, f"p{p}", make_events(1, start=p)[0], topic_name=sink)
                for p in done
            ]

        def on_commit(self) -> None:
            pass

        def on_abort(self) -> None:
            pass

    work = Work()
    config = LoopConfig(
        service="revoker",
        group_id=group,
        sources={source: TOPICS.events},
        tick_interval=3600,  # no tick but the first, the revoke's and the final one
        transactional_id=s.topic_prefix + "tx",
    )
    loop = ProcessingLoop(s, config, copier(sink), hooks=[work], tick=work.tick)  # type: ignore[arg-type]
    runner = threading.Thread(target=loop.run)
    runner.start()
    joiner = Consumer(
        {
            **s.kafka_config(),
            "group.id": group,
            "partition.assignment.strategy": "range",
            "enable.auto.commit": False,
        }
    )
    seen_at_assign: list[list[str]] = []
    try:
        deadline = time.monotonic() + 60
        while not loop.assigned:
            assert time.monotonic() < deadline, "the loop was never assigned partitions"
            time.sleep(0.1)
        owned = set(loop.assigned)

        def on_assign(_c: Any, parts: list[Any]) -> None:
            if parts:  # what the revoked member committed is readable by now
                seen_at_assign.append([str(r.key) for r in read_all(s, sink, timeout=30)])

        joiner.subscribe([source], on_assign=on_assign)
        while not seen_at_assign:
            assert time.monotonic() < deadline, "the joiner was never assigned partitions"
            joiner.poll(0.2)
        loop.stop()
        runner.join(60)
        assert not runner.is_alive()
    finally:
        loop.stop()
        runner.join(60)
        joiner.close()
    assert work.revokes and work.revokes[0] == owned  # eager: everything, once, not on close
    assert len(work.revokes) == 1, work.revokes
    keys = sorted(r.key for r in read_all(s, sink, timeout=30))
    assert len(keys) == len(owned) == len(set(keys))  # each finished piece committed once
    assert len(seen_at_assign[0]) == len(owned), seen_at_assign
