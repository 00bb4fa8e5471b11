"""Identity service throughput on one core, exactly-once, fed by the customer simulator; and
state bytes per customer.

    .venv/bin/python bench/bench_identity.py [--customers 2000] [--days 30] [--bootstrap HOST:PORT]

Without --bootstrap it starts a private local broker in a temporary folder. Prints:
the pure core's events/s (hash + link, no Kafka), the service's events/s through the shared
loop (decode, validate, link, encode outputs and state changes, one transaction per batch),
and the identity state per customer (graph and de-duplication window, as changelog bytes).

Then the same events through the scaled design (issue 15), each stage alone in this process:
the front stage (``FrontService``: validate, hash, de-duplicate, link requests) and the graph
writer (``GraphWriter``: link requests -> identified events, merges, state), as CPU per event
and events per CPU-second (the writer's is the deployment's ceiling: there is one); the
writer's pure graph step alone; and the de-duplication window's changelog bytes and memory
per remembered event id, one-instance service (global window) vs front stage
(8-byte hashes in chunks).
"""

from __future__ import annotations

import argparse
import heapq
import logging
import os
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow.runtime.serde import Serde  # noqa: E402
from segflow.runtime.testing import (  # noqa: E402
    isolated_settings,
    private_broker,
    produce,
    read_all,
)
from segflow.runtime.topics import TOPICS  # noqa: E402
from segflow.sim.generator import SimConfig, Simulation  # noqa: E402
from segflow.sim.identities import event_key  # noqa: E402
from segflow.sim.noise import Delivery, NoiseConfig  # noqa: E402
from services.identity import core  # noqa: E402
from services.identity.app import IdentityService, node_hasher  # noqa: E402
from services.identity.dedup import Window, chunk_bytes  # noqa: E402
from services.identity.front import FrontService  # noqa: E402
from services.identity.window import SeenWindow
from services.identity.writer import GraphWriter  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--bootstrap")
    parser.add_argument("--batch-size", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    sim = Simulation(
        SimConfig(
            customers=args.customers,
            days=args.days,
            seed=1,
            noise=NoiseConfig(duplicates=0.01, blocked=0.005),
        )
    )
    # Shift event time so the newest event is an hour old (within the allowed future skew).
    events = [item.event for item in sim.run() if isinstance(item, Delivery)]
    shift = int(time.time() * 1000) - 3_600_000 - max(e["occurred_at"] for e in events)
    for e in events:
        e["occurred_at"] += shift
    n = len(events)

    # 1. the pure core alone
    rules = core.Rules()
    hasher = node_hasher("bench-secret")
    cache: dict[tuple[str, str], str] = {}
    state: dict[str, core.Entry] = {}
    t0 = time.perf_counter()
    for e in events:
        ids = core.identifiers(e, rules, hasher, cache)
        step = core.link(state, core.IdentityInput(e["event_id"], e["occurred_at"], ids), rules)
        core.apply(state, step.writes)
    core_s = time.perf_counter() - t0
    print(
        f"core (identifiers + link, no Kafka): {n} events in {core_s:.2f}s = "
        f"{n / core_s:,.0f} events/s ({core_s / n * 1e6:.1f} us/event)"
    )

    bootstrap, broker = private_broker(args.bootstrap)
    try:
        s = isolated_settings(bootstrap, "benchid")
        serde = Serde.from_settings(s)
        t0 = time.perf_counter()
        produce(
            s,
            TOPICS.events.name(s),
            ((event_key(e).encode(), serde.encode(TOPICS.events, e)) for e in events),
        )
        print(f"loaded {n} events in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

        service = IdentityService(s)
        service.restore()
        loop = service.loop(batch_size=args.batch_size)
        c0, t0 = cpu(), time.perf_counter()
        done = loop.run(max_records=n, idle_timeout=20)
        elapsed, used = time.perf_counter() - t0, cpu() - c0
        print(
            f"identity service, exactly-once: {done} events in {elapsed:.2f}s = "
            f"{done / elapsed:,.0f} events/s (process CPU {used:.1f}s = {done / used:,.0f} "
            f"events per CPU-second; {os.cpu_count()} cores, broker on the same machine; "
            "includes group join and the first transaction)"
        )

        graph = sum(
            len(key.encode()) + len(serde.encode(TOPICS.identity_state, value))
            for key, value in service.store.items()
        )
        # the window: chunks of 8-byte id hashes on segflow.identity.dedup (encoded bytes)
        seen = sum(len(k.encode()) + len(v) for k, v in service.seen.store.table.items())
        customers = args.customers
        per_day = n / customers / args.days
        print(
            f"state per customer ({customers} customers, {per_day:.1f} events/customer/day): "
            f"graph {graph / customers:,.0f} B, de-duplication window "
            f"{seen / customers:,.0f} B ({len(service.store)} graph entries, "
            f"{len(service.seen)} ids; changelog bytes: key + Avro value)"
        )
        old_seen = seen
        old_ids = len(service.seen)

        # 2. the scaled design: front stage, then graph writer, each alone
        s2 = isolated_settings(bootstrap, "benchsplit")
        produce(
            s2,
            TOPICS.events.name(s2),
            ((event_key(e).encode(), serde.encode(TOPICS.events, e)) for e in events),
        )
        front = FrontService(s2)
        floop = front.loop(batch_size=args.batch_size)
        c0, t0 = cpu(), time.perf_counter()
        done = floop.run(max_records=n, idle_timeout=20)
        elapsed, used = time.perf_counter() - t0, cpu() - c0
        print(
            f"front stage (1 instance, 4 partitions): {done} events in {elapsed:.2f}s, "
            f"process CPU {used:.1f}s = {used / done * 1e6:.0f} us/event "
            f"({done / used:,.0f} events per CPU-second)"
        )
        # what the front's ticks write once its partitions are idle (the writer's input order
        # then applies every request, services/identity/README.md, Input order)
        idle = {"event_id": "", "occurred_at": 0, "source_offset": -1, "idle": True}
        produce(
            s2,
            TOPICS.identity_links.name(s2),
            [
                (None, serde.encode(TOPICS.identity_links, {**idle, "source_partition": p}))
                for p in range(TOPICS.events.partitions)
            ],
        )
        links = read_all(s2, TOPICS.identity_links.name(s2))
        writer = GraphWriter(s2)
        writer.restore()
        wloop = writer.loop(batch_size=args.batch_size)
        c0, t0 = cpu(), time.perf_counter()
        done = wloop.run(max_records=len(links), idle_timeout=20)
        elapsed, used = time.perf_counter() - t0, cpu() - c0
        print(
            f"graph writer (the one active instance): {done} link requests in {elapsed:.2f}s = "
            f"{done / elapsed:,.0f}/s, process CPU {used:.1f}s = {used / done * 1e6:.0f} us/event "
            f"= ceiling {done / used:,.0f} events per CPU-second"
        )
        requests = [serde.decode(TOPICS.identity_links, r.value) for r in links]
        state2: dict[str, core.Entry] = {}
        t0 = time.perf_counter()
        for r in requests:
            if r["forget_customer_id"] is None and not r["idle"]:  # events, not marks
                item = core.IdentityInput(r["event_id"], r["occurred_at"], tuple(r["identifiers"]))
                step = core.link(state2, item, rules, dedup=False)
                core.apply(state2, step.writes)
        pure = time.perf_counter() - t0
        print(
            f"graph step alone (core.link, no Kafka): {len(requests) / pure:,.0f} events/s "
            f"({pure / len(requests) * 1e6:.1f} us/event)"
        )
        table = front.dedup.store.table
        new_seen = sum(len(k.encode()) + len(v) for k, v in table.items())
        new_ids = len(front.dedup)
        print(
            f"de-duplication window, changelog bytes per customer: one-instance service "
            f"{old_seen / customers:,.0f} B ({old_ids} ids, {old_seen / max(1, old_ids):.0f} B/id)"
            f"; front stage {new_seen / customers:,.0f} B ({new_ids} ids in {len(table)} chunks, "
            f"{new_seen / max(1, new_ids):.0f} B/id)"
        )
        print(memory_per_id(200_000))
    finally:
        if broker is not None:
            broker.stop()
    return 0


def memory_per_id(count: int) -> str:
    """Python heap per remembered event id: the one-instance service's global window
    (:class:`~services.identity.window.SeenWindow`) vs the front's per-partition window, each
    with its chunk bytes; and the ``e:`` entries (state table value + heap index) the
    one-instance service kept before session 7, for comparison."""
    ids = [f"evt-{i:012d}-{i * 7919 % 1000003:07d}" for i in range(count)]
    base = 1_764_000_000_000

    def measure(fill: Callable[[], object]) -> float:
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        kept = fill()
        size = sum(x.size for x in tracemalloc.take_snapshot().compare_to(before, "filename"))
        tracemalloc.stop()
        del kept
        return size / count

    def legacy() -> object:
        table, heap = {}, []
        for i, e in enumerate(ids):
            at = base + i * 1000
            table["e:" + e] = {"kind": "seen", "created_at": at}
            heapq.heappush(heap, (at, e))
        return table, heap

    def global_window() -> object:
        window = SeenWindow(7 * 86_400_000)
        for i, e in enumerate(ids):
            window.add(i % 4, hash(e) & (2**64 - 1), base + i * 1000, i)
        return window, [h for *_, h in window.pending_chunks()]

    def front_window() -> object:
        window = Window(7 * 86_400_000)
        for i, e in enumerate(ids):
            window.add(i % 4, hash(e) & (2**64 - 1), base + i * 1000, i)
        return window, [chunk_bytes(h) for *_, h in window.pending_chunks()]

    old, one, front = measure(legacy), measure(global_window), measure(front_window)
    return (
        f"memory per remembered id ({count:,} ids, tracemalloc, ids' own strings excluded): "
        f"one-instance service {one:.0f} B (its former e: entries {old:.0f} B), "
        f"front stage {front:.0f} B"
    )


if __name__ == "__main__":
    sys.exit(main())
