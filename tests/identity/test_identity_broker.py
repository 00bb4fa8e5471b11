"""The identity service on a real broker, fed by the customer simulator (issue 4, must-show)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from segflow.runtime.leash import leashed
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import partition_for
from segflow.runtime.testing import produce, read_all, wait_markers, wait_until
from segflow.runtime.topics import TOPICS
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery, Malformed, NoiseConfig
from segflow.sim.truth import truth_records
from services.identity.app import MERGED_EVENT, IdentityService, IdentitySettings, node_hasher
from services.identity.core import identifiers

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
NOISE = NoiseConfig(duplicates=0.02, late=0.01, out_of_order=0.02, malformed=0.002, blocked=0.01)


@dataclass
class Fed:
    """A simulation produced to the events topic: what went in, and the truth about it."""

    sim: Simulation
    truth_of: dict[str, str]  # event_id -> true customer
    malformed: int
    raw_emails: set[str]
    events: list[dict[str, Any]]
    records: int


def feed(settings: Settings, customers: int, days: int, shared: float, seed: int = 11) -> Fed:
    sim = Simulation(
        SimConfig(customers=customers, days=days, seed=seed, noise=NOISE, shared_device_rate=shared)
    )
    serde = Serde.from_settings(settings)
    truth_of: dict[str, str] = {}
    raw_emails: set[str] = set()
    records: list[tuple[bytes | None, bytes | None]] = []
    malformed = 0
    events = []
    for item in sim.run():
        if isinstance(item, Malformed):
            malformed += 1
            records.append((item.key, item.value))
            continue
        assert isinstance(item, Delivery)
        truth_of[item.event["event_id"]] = item.customer
        events.append(item.event)
        if item.event.get("email") and "@" in item.event["email"]:
            raw_emails.add(item.event["email"])
        records.append((item.key.encode(), serde.encode(TOPICS.events, item.event)))
    produce(settings, TOPICS.events.name(settings), records)
    return Fed(sim, truth_of, malformed, raw_emails, events, len(records))


def pairs(counts: Counter[Any]) -> int:
    return sum(n * (n - 1) // 2 for n in counts.values())


def check_merge_marks(
    records: list[tuple[Any, dict[str, Any]]], survivor: dict[str, str], cause: dict[str, str]
) -> None:
    """Every merge sits in the identified partitions' order (what the scorer's deterministic
    merges rely on): one ``customer_merged`` record keyed by each absorbed id, naming its
    survivor, after every other record of that id and before the merge-causing event when
    they share a partition; the merge-causing event carries the merge (its absorbed ids)."""
    marker = {}
    causing: dict[str, Any] = {}
    for r, v in records:
        if v["event"]["event_type"] == MERGED_EVENT:
            assert v["customer_id"] not in marker, "two customer_merged records for one id"
            assert v["merge"] == {
                "survivor_id": survivor[v["customer_id"]],
                "absorbed_ids": [v["customer_id"]],
            }
            marker[v["customer_id"]] = (r.partition, r.offset)
        elif v["merge"] is not None:
            assert v["merge"]["survivor_id"] == v["customer_id"]
            causing[v["event"]["event_id"]] = (r.partition, r.offset, v["merge"])
    assert set(marker) == set(survivor)
    for r, v in records:
        at = marker.get(v["customer_id"])
        if at is not None and v["event"]["event_type"] != MERGED_EVENT:
            assert (r.partition, r.offset) < at, "a record of an absorbed id after its merge"
    for absorbed, event_id in cause.items():
        part, offset, mark = causing[event_id]
        assert absorbed in mark["absorbed_ids"] and mark["survivor_id"] == survivor[absorbed]
        if marker[absorbed][0] == part:
            assert marker[absorbed][1] < offset


def stitching(settings: Settings, fed: Fed, expected: int) -> dict[str, Any]:
    """Read the committed outputs; pairwise precision/recall of customer ids vs the truth."""
    serde = Serde.from_settings(settings)
    # (expected counts events, not the customer_merged records beside them: without the
    # markers of the run's last transaction the count could be reached before its events)
    wait_markers(settings, TOPICS.identified.name(settings))
    out = read_all(settings, TOPICS.identified.name(settings), expected=expected, timeout=90)
    records = [(r, serde.decode(TOPICS.identified, r.value)) for r in out]
    survivor = {}
    cause = {}
    for r in read_all(settings, TOPICS.merges.name(settings)):
        m = serde.decode(TOPICS.merges, r.value)
        assert r.key is not None and r.key.decode() in m["absorbed_ids"]
        assert m["in_identified"] is True
        for absorbed in m["absorbed_ids"]:
            survivor[absorbed] = m["survivor_id"]
            cause[absorbed] = m["event_id"]
    check_merge_marks(records, survivor, cause)
    identified = [(r.key, v) for r, v in records if v["event"]["event_type"] != MERGED_EVENT]

    def resolve(cid: str) -> str:
        while cid in survivor:
            cid = survivor[cid]
        return cid

    final = {v["event"]["event_id"]: resolve(v["customer_id"]) for _, v in identified}
    cells = Counter((fed.truth_of[e], c) for e, c in final.items())
    tp = pairs(cells)
    return {
        "identified": identified,
        "ids": Counter(v["event"]["event_id"] for _, v in identified),
        "final": final,
        "precision": tp / max(1, pairs(Counter(final.values()))),
        "recall": tp / max(1, pairs(Counter(fed.truth_of[e] for e in final))),
        "merges": len(survivor),
    }


def test_simulated_customers_are_stitched_with_high_precision_and_recall(
    kafka_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    s = kafka_settings
    fed = feed(s, customers=150, days=60, shared=0.15)
    unique = len(fed.truth_of)
    service = IdentityService(s)
    service.restore()
    assert service.loop().run(max_records=fed.records, idle_timeout=20) == fed.records

    got = stitching(s, fed, unique)
    # every valid event once (the simulator's duplicates are dropped on purpose), none missing
    assert set(got["ids"]) == set(fed.truth_of) and max(got["ids"].values()) == 1
    # keyed by customer_id; the raw email never travels on, its keyed hash does
    for key, value in got["identified"]:
        assert key.decode() == value["customer_id"] and value["event"]["email"] is None
    with_email = [v for _, v in got["identified"] if v["email_hash"]]
    assert with_email and all(len(v["email_hash"]) == 64 for v in with_email)
    state_bytes = b"".join(
        (r.key or b"") + (r.value or b"") for r in read_all(s, TOPICS.identity_state.name(s))
    )
    out_bytes = b"".join(
        r.value or b"" for r in read_all(s, TOPICS.identified.name(s), expected=unique)
    )
    leaked = [e for e in fed.raw_emails if e.encode() in state_bytes or e.encode() in out_bytes]
    assert leaked == []
    # malformed records are dead-lettered with a reason; the service kept running
    letters = [
        Serde.from_settings(s).decode(TOPICS.dlq, r.value)
        for r in read_all(s, TOPICS.dlq.name(s), expected=fed.malformed)
    ]
    assert len(letters) == fed.malformed > 0
    assert {d["reason"] for d in letters} <= {"undecodable", "unknown_schema_id"}

    # customers sharing a device stay apart
    truth = {t["customer"]: t for t in truth_records(fed.sim)}
    shared: dict[str, list[str]] = defaultdict(list)
    for key, t in truth.items():
        for d in t["identity"]["shared_device_ids"]:
            shared[d].append(key)
    user_profile: dict[str, set[str]] = defaultdict(set)
    for _, v in got["identified"]:
        uid = v["event"]["user_id"]
        if uid:
            user_profile[uid].add(got["final"][v["event"]["event_id"]])
    pairs_checked = 0
    for members in shared.values():
        uids = [truth[m]["identity"]["user_id"] for m in members]
        if len(uids) == 2 and all(u in user_profile for u in uids):
            pairs_checked += 1
            assert user_profile[uids[0]].isdisjoint(user_profile[uids[1]])
    assert pairs_checked >= 5
    # every user's logged-in events end under one customer id
    assert all(len(v) == 1 for v in user_profile.values())

    # identifier-level check against the truth clusters, through the restored state: a
    # customer's strong identifiers share a profile whenever the stream linked them at all
    restored = IdentityService(s)
    restored.restore()
    h = node_hasher(s.hash_secret.get_secret_value())
    owner = {k[2:]: v["customer_id"] for k, v in restored.store.items() if k.startswith("n:")}
    linkable = stream_components(fed, restored, {d for d in shared})
    split = unlinked = 0
    for t in truth.values():
        ident = t["identity"]
        own = [f"u:{h('user_id', ident['user_id'])}"] if ident["user_id"] else []
        own += [f"e:{h('email', e)}" for e in ident["emails"]]
        own = [n for n in own if n in owner]
        if len({linkable(n) for n in own}) > 1:
            unlinked += 1  # nothing in the stream ties them together (noise, no login yet)
        elif len({owner[n] for n in own}) > 1:
            split += 1
    assert split == 0, f"{split} customers' linked strong identifiers are split"

    with capsys.disabled():
        print(
            f"\nidentity stitching on {len(truth)} simulated customers, {unique} events, "
            f"{len(shared)} shared devices: pairwise precision {got['precision']:.4f}, "
            f"recall {got['recall']:.4f}, merges {got['merges']}, "
            f"customers whose strong ids the stream never linked {unlinked}"
        )
    assert got["precision"] >= 0.99 and got["recall"] >= 0.99


def stream_components(fed: Fed, service: IdentityService, shared: set[str]) -> Any:
    """Union-find over each event's usable identifiers, shared devices left out: what a
    perfect stitcher could know from the stream."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    hasher = node_hasher(service.settings.hash_secret.get_secret_value())
    shared_nodes = {f"d:{hasher('device_id', d)}" for d in shared}
    for item in fed.events:
        nodes = [n for n in identifiers(item, service.rules, hasher) if n not in shared_nodes]
        for n in nodes[1:]:
            parent[find(n)] = find(nodes[0])
    return find


def service_cmd(s: Settings, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "services.identity",
        "--bootstrap",
        s.bootstrap_servers,
        "--prefix",
        s.topic_prefix,
        *extra,
    ]


def test_kill_9_mid_stream_then_restart_gives_each_event_exactly_once(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    fed = feed(s, customers=60, days=30, shared=0.1, seed=5)
    unique = len(fed.truth_of)
    env = {**os.environ, "SEGFLOW_LOG_LEVEL": "WARNING"}
    sink = TOPICS.identified.name(s)
    proc = subprocess.Popen(
        leashed(service_cmd(s, "--batch-size", "100", "--pre-commit-delay", "5")),
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Some batches committed, then a transaction open (its records visible only to
        # read_uncommitted): kill -9 now, mid-stream.
        wait_until(lambda: len(read_all(s, sink, timeout=30)) > 0, 60)
        wait_until(
            lambda: (
                len(read_all(s, sink, timeout=5, isolation="read_uncommitted"))
                > len(read_all(s, sink, timeout=30))
            ),
            30,
            interval=0.05,
        )
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    before = len(read_all(s, sink, timeout=30))
    assert 0 < before < unique

    restarted = subprocess.run(
        service_cmd(s, "--idle-timeout", "5"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restarted.returncode == 0, restarted.stderr[-2000:]

    got = stitching(s, fed, unique)
    assert set(got["ids"]) == set(fed.truth_of), "an event is missing"
    assert max(got["ids"].values()) == 1, "an event appeared twice (read_committed)"
    raw = read_all(s, sink, expected=unique, isolation="read_uncommitted")
    assert len(raw) > unique, "the killed transaction's records should be in the log, aborted"
    # merges committed before the crash were kept: the stitching is as good as without a crash
    assert got["precision"] >= 0.99 and got["recall"] >= 0.98


def test_restart_keeps_customer_ids_and_drops_duplicates_across_it(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    serde = Serde.from_settings(s)
    base = int(time.time() * 1000) - 3_600_000
    first = [
        {
            "event_id": "e1",
            "event_type": "page_view",
            "occurred_at": base,
            "anonymous_id": "a1",
            "device_id": "d1",
        },
        {
            "event_id": "e2",
            "event_type": "login",
            "occurred_at": base + 1000,
            "user_id": "u1",
            "anonymous_id": "a1",
            "email": " Ana@Example.ORG",
        },
    ]
    second = [
        first[1],  # a duplicate delivered after the restart
        {
            "event_id": "e3",
            "event_type": "email_open",
            "occurred_at": base + 2000,
            "email": "ana@example.org",
        },
        {
            "event_id": "e4",
            "event_type": "login",
            "occurred_at": base + 3000,
            "user_id": "unknown",
            "device_id": "0",
        },  # nothing usable: DLQ no_identifier
        {
            "event_id": "e5",
            "event_type": "login",
            "occurred_at": base + 86_400_000 * 3,
            "user_id": "u1",
        },  # three days ahead: DLQ future_event
    ]
    topic = TOPICS.events.name(s)

    def run_once(events: list[dict[str, Any]]) -> None:
        produce(s, topic, ((b"k", serde.encode(TOPICS.events, e)) for e in events))
        service = IdentityService(s)
        service.restore()
        service.loop().run(idle_timeout=3)

    run_once(first)
    run_once(second)
    out = [
        serde.decode(TOPICS.identified, r.value)
        for r in read_all(s, TOPICS.identified.name(s), expected=3)
    ]
    assert sorted(v["event"]["event_id"] for v in out) == ["e1", "e2", "e3"]
    assert len({v["customer_id"] for v in out}) == 1
    letters = [
        serde.decode(TOPICS.dlq, r.value) for r in read_all(s, TOPICS.dlq.name(s), expected=2)
    ]
    assert sorted(d["reason"] for d in letters) == ["future_event", "no_identifier"]


def test_upgrade_keeps_deduplicating_remembered_ids_and_catches_duplicates_across_keys(
    kafka_settings: Settings,
) -> None:
    """A restart of a deployment whose identity.state holds ``e:<event_id>`` entries (the
    window of earlier releases): those ids stay duplicates, are moved into hashed chunks of
    segflow.identity.dedup, and an id seen under one key is a duplicate under another key."""
    s = kafka_settings
    serde = Serde.from_settings(s)
    base = int(time.time() * 1000) - 3_600_000
    legacy = {"kind": "seen", "created_at": base}
    produce(
        s, TOPICS.identity_state.name(s), [(b"e:old", serde.encode(TOPICS.identity_state, legacy))]
    )
    keys = [b"k0", *(f"k{i}".encode() for i in range(1, 50))]
    other = next(k for k in keys if partition_for(k, 4) != partition_for(b"k0", 4))

    def event(eid: str, t: int) -> bytes:
        return serde.encode(
            TOPICS.events,
            {"event_id": eid, "event_type": "login", "occurred_at": t, "user_id": "u1"},
        )

    def run_once(records: list[tuple[bytes, bytes]]) -> None:
        produce(s, TOPICS.events.name(s), records)
        service = IdentityService(s)
        service.restore()
        service.loop().run(idle_timeout=3)

    run_once(
        [
            (b"k0", event("old", base)),
            (b"k0", event("n1", base + 1)),
            (other, event("n1", base + 1)),
        ]
    )
    latest: dict[bytes, bytes | None] = {}
    for r in read_all(s, TOPICS.identity_state.name(s)):
        latest[r.key] = r.value
    assert b"e:old" in latest and latest[b"e:old"] is None  # tombstoned: moved into a chunk
    assert not any(k.startswith(b"e:") for k, v in latest.items() if v is not None)
    chunks = [
        bytes(serde.decode(TOPICS.identity_dedup, r.value)["hashes"])
        for r in read_all(s, TOPICS.identity_dedup.name(s))
        if r.value is not None
    ]
    assert sum(len(c) for c in chunks) == 16  # "old" and "n1", 8 bytes each

    run_once(
        [
            (other, event("old", base)),
            (b"k0", event("n1", base + 1)),
            (other, event("n2", base + 2)),
        ]
    )
    out = [
        serde.decode(TOPICS.identified, r.value)["event"]["event_id"]
        for r in read_all(s, TOPICS.identified.name(s), expected=2)
    ]
    assert sorted(out) == ["n1", "n2"]


def test_expired_window_hours_are_tombstoned_where_their_chunks_are(
    kafka_settings: Settings,
) -> None:
    """An hour that left the window is gone from the compacted identity.dedup (its tombstone
    in its chunk's partition): a restart accepts its event id again, a recent one not."""
    s = kafka_settings
    serde = Serde.from_settings(s)
    now = int(time.time() * 1000)
    old_at = now - 3 * 86_400_000
    hour = old_at - old_at % 3_600_000

    def misplaced(k: bytes) -> bool:
        # the old chunk's key "<partition>:<hour>:<offset 0>" hashes to another partition
        # than the event's, so a tombstone sent by key hash would not delete it
        p = partition_for(k, 4)
        return partition_for(f"{p}:{hour}:0", 4) != p

    key = next(k for k in (f"k{i}".encode() for i in range(100)) if misplaced(k))

    def event(eid: str, t: int) -> bytes:
        return serde.encode(
            TOPICS.events,
            {"event_id": eid, "event_type": "login", "occurred_at": t, "user_id": "u1"},
        )

    def run_once(records: list[tuple[bytes, bytes]]) -> list[str]:
        produce(s, TOPICS.events.name(s), records)
        service = IdentityService(s, IdentitySettings(dedup_window_days=1))
        service.restore()
        before = len(read_all(s, TOPICS.identified.name(s)))
        service.loop().run(idle_timeout=3)
        out = read_all(s, TOPICS.identified.name(s))[before:]
        return [serde.decode(TOPICS.identified, r.value)["event"]["event_id"] for r in out]

    assert run_once([(key, event("old", old_at)), (key, event("new", now))]) == ["old", "new"]
    live: dict[tuple[int, bytes], bytes | None] = {}
    for r in read_all(s, TOPICS.identity_dedup.name(s)):
        assert r.key is not None
        live[(r.partition, r.key)] = r.value
    chunks = {k: v for k, v in live.items() if v is not None}
    # the old hour's chunk is gone; the new one is in the event's partition
    assert list(chunks) == [
        (partition_for(key, 4), f"{partition_for(key, 4)}:{now - now % 3_600_000}:1".encode())
    ]
    assert run_once([(key, event("old", old_at)), (key, event("new", now))]) == ["old"]
