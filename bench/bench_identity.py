"""Identity service throughput on one core, exactly-once, fed by the customer simulator; and
state bytes per customer.

    .venv/bin/python bench/bench_identity.py [--customers 2000] [--days 30] [--bootstrap HOST:PORT]

Without --bootstrap it starts a private local broker in a temporary folder. Prints:
the pure core's events/s (hash + link, no Kafka), the service's events/s through the shared
loop (decode, validate, link, encode outputs and state changes, one transaction per batch),
and the identity state per customer (graph and de-duplication window, as changelog bytes).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow.runtime.serde import Serde  # noqa: E402
from segflow.runtime.testing import isolated_settings, private_broker, produce  # noqa: E402
from segflow.runtime.topics import TOPICS  # noqa: E402
from segflow.sim.generator import SimConfig, Simulation  # noqa: E402
from segflow.sim.identities import event_key  # noqa: E402
from segflow.sim.noise import Delivery, NoiseConfig  # noqa: E402
from services.identity import core  # noqa: E402
from services.identity.app import IdentityService, node_hasher  # noqa: E402


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

        graph = seen = 0
        for key, value in service.store.items():
            size = len(key.encode()) + len(serde.encode(TOPICS.identity_state, value))
            if key.startswith("e:"):
                seen += size
            else:
                graph += size
        customers = args.customers
        per_day = n / customers / args.days
        print(
            f"state per customer ({customers} customers, {per_day:.1f} events/customer/day): "
            f"graph {graph / customers:,.0f} B, de-duplication window "
            f"{seen / customers:,.0f} B ({len([k for k, _ in service.store.items()])} "
            f"entries, changelog bytes: key + Avro value)"
        )
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
