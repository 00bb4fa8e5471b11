"""Identity decides the same way whatever order its input partitions are read in (issue 15):
the input order of services/identity/order.py, in process and on a real broker (2 front
processes and a graph writer against the one-process role with one partition delivered
late)."""

from __future__ import annotations

import random
import threading
import zlib
from typing import Any

import pytest

from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import isolated_settings, produce, read_all, wait_until
from segflow.runtime.topics import TOPICS
from segflow.runtime.vault import Keyring
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery, NoiseConfig
from services.identity.app import IdentityService, IdentitySettings
from services.identity.order import Merge, OrderClock
from tests.identity.test_identity_scaled import VAULT_KEY, identified, merges, start, stop


def released(sequences: dict[int, list[int]], seed: int) -> list[tuple[int, int]]:
    """(partition, offset) as a merge releases them when the partitions' events arrive in a
    random interleaving (then every partition goes idle)."""
    rng = random.Random(seed)
    clock, merge = OrderClock(), Merge()
    merge.expect(sequences)
    cursors = dict.fromkeys(sequences, 0)
    out = []
    while any(cursors[p] < len(seq) for p, seq in sequences.items()):
        p = rng.choice([p for p, seq in sequences.items() if cursors[p] < len(seq)])
        o = cursors[p]
        cursors[p] += 1
        merge.push(p, clock.stamp(p, sequences[p][o], now_ms=10**12), o, (p, o))
        out += [item for _p, _o, item in merge.ready()]
    for p in sequences:
        merge.mark_idle(p, clock.get(p))
    out += [item for _p, _o, item in merge.ready()]
    return out


def test_any_interleaving_of_the_partitions_releases_the_same_order() -> None:
    rng = random.Random(7)
    for case in range(50):
        sequences = {
            p: [rng.randrange(0, 1000) for _ in range(rng.randrange(0, 30))] for p in range(4)
        }
        orders = [released(sequences, seed) for seed in range(8)]
        assert all(order == orders[0] for order in orders), case
        assert sorted(orders[0]) == sorted(
            (p, o) for p, s in sequences.items() for o in range(len(s))
        )
        # each partition in its own order, late events at their partition's stream time
        clock = OrderClock()
        keys = sorted(
            (clock.stamp(p, t, now_ms=10**12), p, o)
            for p, s in sequences.items()
            for o, t in enumerate(s)
        )
        assert orders[0] == [(p, o) for _t, p, o in keys]


def partition_of(key: bytes, partitions: int = 4) -> int:
    """librdkafka's default partitioner (consistent_random: CRC32 of the key)."""
    return zlib.crc32(key) % partitions


def population(s: Settings, seed: int) -> list[tuple[bytes, bytes]]:
    """A simulation with shared devices and noise, under the producers' own keys."""
    noise = NoiseConfig(duplicates=0.03, late=0.01, out_of_order=0.02, blocked=0.01)
    sim = Simulation(
        SimConfig(customers=80, days=30, seed=seed, noise=noise, shared_device_rate=0.3)
    )
    serde = Serde.from_settings(s)
    return [
        (item.key.encode(), serde.encode(TOPICS.events, item.event))
        for item in sim.run()
        if isinstance(item, Delivery)
    ]


def ids_of(out: list[dict[str, Any]]) -> dict[str, str]:
    return {v["event"]["event_id"]: v["customer_id"] for v in out}


@pytest.mark.broker
def test_split_roles_and_one_process_read_late_give_the_same_ids_and_merges(
    kafka_settings: Settings,
) -> None:
    s = kafka_settings
    serde = Serde.from_settings(s)
    records = population(s, seed=11)
    valid = {serde.decode(TOPICS.events, v)["event_id"] for _k, v in records}
    assert len({partition_of(k) for k, _v in records}) == 4

    # 1. the split roles: 2 front processes and a writer, every partition there from the start
    produce(s, TOPICS.events.name(s), records)
    procs = [start(s, "front", "0"), start(s, "front", "1"), start(s, "writer", "0")]
    try:
        split = identified(s, expected=len(valid))
    finally:
        stop(procs)
    assert set(ids_of(split)) == valid

    # 2. the one-process role, partition 3 delivered after it read the three others
    ref = isolated_settings(s.bootstrap_servers, "late")
    early = [r for r in records if partition_of(r[0]) != 3]
    late = [r for r in records if partition_of(r[0]) == 3]
    produce(ref, TOPICS.events.name(ref), early)
    service = IdentityService(
        ref, IdentitySettings(order_idle_ms=60_000), keyring=Keyring.from_text(VAULT_KEY)
    )
    service.restore()
    loop = service.loop()
    runner = threading.Thread(target=loop.run, kwargs={"idle_timeout": 120})
    runner.start()
    try:
        wait_until(lambda: loop.processed >= len(early), 60, what="the early partitions read")
        # nothing applied yet: every event may come after one of the partition not read yet
        # (read to the end of every partition: up to 30 s on a loaded box, not a wait)
        assert read_all(ref, TOPICS.identified.name(ref), timeout=30) == []
        produce(ref, TOPICS.events.name(ref), late)
        wait_until(lambda: loop.processed >= len(records), 60, what="the late partition read")
    finally:
        # a clean stop applies what still waits for the idle time (60 s here), in order
        loop.stop()
        runner.join(60)
    one = identified(ref, expected=len(valid))

    # read in read order, the late partition's events would have been placed after all the
    # others: the same ids and merges say the graph applied the input order both times
    assert ids_of(one) == ids_of(split)
    assert merges(ref) == merges(s)
    assert merges(s), "the population should cause merges"
