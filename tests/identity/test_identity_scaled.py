"""Identity as N instances (issue 15): front instances + one graph writer (+ a warm standby),
as real processes in their consumer groups on a real broker, fed by the customer simulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from segflow.runtime.leash import leashed
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import isolated_settings, produce, read_all, wait_until
from segflow.runtime.topics import TOPICS
from segflow.runtime.vault import Keyring, generate_key
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery, Malformed, NoiseConfig
from services.identity.app import MERGED_EVENT, IdentityService

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
NOISE = NoiseConfig(duplicates=0.03, late=0.01, out_of_order=0.02, malformed=0.003, blocked=0.01)
VAULT_KEY = generate_key()


def feed(s: Settings, customers: int, days: int, seed: int) -> tuple[list[Any], set[str]]:
    """The simulation as (key, value) records on the events topic; returns them and the ids
    of the valid events."""
    sim = Simulation(
        SimConfig(customers=customers, days=days, seed=seed, noise=NOISE, shared_device_rate=0.15)
    )
    serde = Serde.from_settings(s)
    records: list[Any] = []
    ids: set[str] = set()
    for item in sim.run():
        if isinstance(item, Malformed):
            records.append((item.key, item.value))
        else:
            assert isinstance(item, Delivery)
            ids.add(item.event["event_id"])
            records.append((item.key.encode(), serde.encode(TOPICS.events, item.event)))
    produce(s, TOPICS.events.name(s), records)
    return records, ids


def env_of(instance: str) -> dict[str, str]:
    return {
        **os.environ,
        "SEGFLOW_LOG_LEVEL": "WARNING",
        "SEGFLOW_INSTANCE_ID": instance,  # transactional.id <prefix>identity-<role>-<instance>
        "SEGFLOW_VAULT_KEY": VAULT_KEY,
        "SEGFLOW_SESSION_TIMEOUT_MS": "6000",
        "SEGFLOW_TRANSACTION_TIMEOUT_MS": "10000",
    }


def start(s: Settings, role: str, instance: str, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "services.identity", "--bootstrap", s.bootstrap_servers]
    cmd += ["--prefix", s.topic_prefix, "--role", role, *extra]
    return subprocess.Popen(leashed(cmd), cwd=ROOT, env=env_of(instance), stderr=subprocess.DEVNULL)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def identified(
    s: Settings, expected: int | None = None, marks: bool = False
) -> list[dict[str, Any]]:
    """The identified events (without identity's ``customer_merged`` records unless
    ``marks``), once at least ``expected`` of them are committed."""
    serde = Serde.from_settings(s)
    deadline = time.monotonic() + 90
    while True:
        out = [
            v
            for v in (
                serde.decode(TOPICS.identified, r.value)
                for r in read_all(s, TOPICS.identified.name(s), expected=expected, timeout=90)
            )
            if marks or v["event"]["event_type"] != MERGED_EVENT
        ]
        if expected is None or len(out) >= expected or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def merges(s: Settings) -> set[tuple[str, str]]:
    serde = Serde.from_settings(s)
    out = set()
    for r in read_all(s, TOPICS.merges.name(s)):
        m = serde.decode(TOPICS.merges, r.value)
        out |= {(a, m["survivor_id"]) for a in m["absorbed_ids"]}
    return out


def dlq_reasons(s: Settings) -> Counter[str]:
    serde = Serde.from_settings(s)
    return Counter(
        serde.decode(TOPICS.dlq, r.value)["reason"] for r in read_all(s, TOPICS.dlq.name(s))
    )


def active_writer(s: Settings) -> str | None:
    """The group.instance.id of the writer that holds the links partition, once the group
    has two members (the other is the standby)."""
    admin = AdminClient(s.kafka_config())
    [future] = admin.describe_consumer_groups([s.topic_prefix + "identity-writer"]).values()
    group = future.result(10)
    if len(group.members) < 2:
        return None
    for member in group.members:
        if member.assignment and member.assignment.topic_partitions:
            return str(member.group_instance_id)
    return None


def forget(s: Settings, cid: str, request_id: str, at: int) -> None:
    serde = Serde.from_settings(s)
    value = {
        "request_id": request_id,
        "customer_id": cid,
        "requested_at": at,
        "reason": None,
    }
    produce(s, TOPICS.forget.name(s), [(cid.encode(), serde.encode(TOPICS.forget, value))])


def test_two_fronts_and_a_writer_decide_what_one_instance_decides(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    serde = Serde.from_settings(s)
    records, valid = feed(s, customers=80, days=30, seed=21)
    procs = [
        start(s, "front", "0"),
        start(s, "front", "1"),
        start(s, "writer", "0"),
        start(s, "writer", "1"),
    ]
    try:
        out = identified(s, expected=len(valid))
        # a forget request, then an event of the forgotten customer's user id: dropped
        survivor = dict(merges(s))
        victim = next(v for v in out if v["event"].get("user_id"))
        cid = victim["customer_id"]
        while cid in survivor:
            cid = survivor[cid]
        forgotten_at = int(time.time() * 1000) - 60_000
        forget(s, cid, "fr-1", forgotten_at)
        wait_until(
            lambda: any(v["event"]["event_type"] == "customer_forgotten" for v in identified(s)),
            40,
            what="customer_forgotten",
        )
        late = {
            "event_id": "after-forget",
            "event_type": "login",
            "occurred_at": int(time.time() * 1000) - 30_000,
            "user_id": victim["event"]["user_id"],
        }
        again = {**late, "event_id": "after-forget-new-user", "user_id": "someone-new"}
        produce(
            s,
            TOPICS.events.name(s),
            [(b"x", serde.encode(TOPICS.events, e)) for e in (late, again)],
        )
        out = identified(s, expected=len(valid) + 2)
    finally:
        stop(procs)
    got = {v["event"]["event_id"]: v for v in out}
    assert Counter(v["event"]["event_id"] for v in out).most_common(1)[0][1] == 1
    assert set(got) == valid | {"fr-1", "after-forget-new-user"}  # duplicates dropped once
    assert all(v["event"]["email"] is None for v in out)

    # The reference: the one-process service over the same records, under the same keys:
    # both apply the events of different input partitions in the input order.
    by_id: dict[str, bytes] = {}
    for _key, value in records:
        try:
            eid = serde.decode(TOPICS.events, value)["event_id"]
        except Exception:  # noqa: BLE001 - malformed on purpose
            continue
        by_id.setdefault(eid, value)
    ref = isolated_settings(s.bootstrap_servers, "ref")
    keyring = Keyring.from_text(VAULT_KEY)

    def run(items: list[Any], topic: str = TOPICS.events.name(ref)) -> None:
        produce(ref, topic, items)
        service = IdentityService(ref, keyring=keyring)
        service.restore()
        service.loop().run(max_records=len(items), idle_timeout=15)

    run(records)
    forget(ref, cid, "fr-1", forgotten_at)
    service = IdentityService(ref, keyring=keyring)
    service.restore()
    service.loop().run(max_records=1, idle_timeout=15)
    run([(b"x", serde.encode(TOPICS.events, e)) for e in (late, again)])
    expected = {v["event"]["event_id"]: v for v in identified(ref, expected=len(got))}

    assert set(expected) == set(got)
    assert {e: v["customer_id"] for e, v in got.items()} == {
        e: v["customer_id"] for e, v in expected.items()
    }
    for e, v in got.items():  # the same identified events, bar the time they were made
        assert {**v, "identified_at": 0} == {**expected[e], "identified_at": 0}, e
    assert merges(s) == merges(ref) and merges(s)
    # and the same merge records in the identified partitions (the scorer's merge points)
    marks = [
        {
            v["event"]["event_id"]: {**v, "identified_at": 0}
            for v in identified(run_of, marks=True)
            if v["event"]["event_type"] == MERGED_EVENT
        }
        for run_of in (s, ref)
    ]
    assert marks[0] == marks[1] and len(marks[0]) == len(merges(s))
    assert dlq_reasons(s) == dlq_reasons(ref) and dlq_reasons(s)
    # no raw address between the stages: the link requests and the de-dup window hold
    # hashes, and the contact points only sealed
    emails = {
        e.strip().lower().encode()
        for v in by_id.values()
        if (e := serde.decode(TOPICS.events, v).get("email")) and "@" in e
    }
    assert emails
    between = [
        (r.key or b"") + (r.value or b"")
        for t in (TOPICS.identity_links, TOPICS.identity_dedup)
        for r in read_all(s, t.name(s))
    ]
    assert between and not any(a in b.lower() for b in between for a in emails)


def test_kill_9_of_a_front_and_of_the_active_writer_loses_and_doubles_nothing(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    _records, valid = feed(s, customers=40, days=20, seed=5)
    sink = TOPICS.identified.name(s)
    slow = ("--batch-size", "100", "--pre-commit-delay", "1")
    fronts = [start(s, "front", "0", *slow), start(s, "front", "1", *slow)]
    writers = {"0": start(s, "writer", "0", "--batch-size", "200", "--pre-commit-delay", "3")}
    try:
        wait_until(lambda: len(read_all(s, sink, timeout=30)) > 0, 60, what="first output")
        writers["1"] = start(s, "writer", "1")  # joins the group: a warm standby
        active = wait_until(lambda: active_writer(s), 30, what="a writer group of two")
        writer = writers[active.rsplit("-", 1)[1]]
        # each writer batch waits 3 s with its transaction open: the kill comes inside one
        os.kill(fronts[0].pid, signal.SIGKILL)
        os.kill(writer.pid, signal.SIGKILL)
        before = len(read_all(s, sink, timeout=30))
        assert 0 < before < len(valid), "the kills should come mid-stream"
        out = identified(s, expected=len(valid))
    finally:
        stop([*fronts, *writers.values()])
    ids = Counter(v["event"]["event_id"] for v in out)
    assert set(ids) == valid, "an event is missing"
    assert max(ids.values()) == 1, "an event appeared twice (read_committed)"
    raw = read_all(s, sink, expected=len(valid), isolation="read_uncommitted")
    assert len(raw) > len(valid), "the killed transactions' records should be there, aborted"
    for v in out:
        assert v["customer_id"].startswith("c-")
