"""Identity's latency, events -> identified, with live traffic (the one-process role).

    .venv/bin/python bench/identity_latency.py [--rate 200] [--seconds 30] [--bootstrap HOST:PORT]

Produces ``--rate`` events per second for ``--seconds``, each under its own customer's key
(the 4 input partitions), stamped with the time it is produced, to the one-process identity
service running in this process; reads ``segflow.events.identified`` (read_committed) and
prints p50 / p99 / max of (time the identified event is read - its ``occurred_at``). The
input order (services/identity/README.md) makes an event wait for every input partition to
show a later one, or to be idle for ``SEGFLOW_IDENTITY_ORDER_IDLE_MS``.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow.runtime.kafka import make_consumer, make_producer  # noqa: E402
from segflow.runtime.serde import Serde  # noqa: E402
from segflow.runtime.testing import isolated_settings, private_broker  # noqa: E402
from segflow.runtime.topics import TOPICS  # noqa: E402
from services.identity.app import IdentityService  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--customers", type=int, default=500)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    bootstrap, broker = private_broker(args.bootstrap)
    try:
        return run(args, bootstrap)
    finally:
        if broker is not None:
            broker.stop()


def run(args: argparse.Namespace, bootstrap: str) -> int:
    s = isolated_settings(bootstrap, "idlat")
    serde = Serde.from_settings(s)
    service = IdentityService(s)
    service.restore()
    loop = service.loop()
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    consumer = make_consumer(s, "idlat-reader", **{"isolation.level": "read_committed"})
    consumer.subscribe([TOPICS.identified.name(s)])
    producer = make_producer(s)
    rng = random.Random(1)
    latencies: list[float] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            msg = consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            value = serde.decode(TOPICS.identified, msg.value())
            if value["event"]["event_type"] == "page_view":
                latencies.append(time.time() * 1000 - value["event"]["occurred_at"])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(5)  # the group joins (not measured)
    n = int(args.rate * args.seconds)
    start = time.monotonic()
    for i in range(n):
        due = start + i / args.rate
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        c = rng.randrange(args.customers)
        event = {
            "event_id": f"lat-{i}",
            "event_type": "page_view",
            "occurred_at": int(time.time() * 1000),
            "user_id": f"u{c}",
            "anonymous_id": f"a{c}",
        }
        producer.produce(
            TOPICS.events.name(s), serde.encode(TOPICS.events, event), key=f"u{c}".encode()
        )
        producer.poll(0)
    producer.flush(30)
    deadline = time.monotonic() + 60
    while len(latencies) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    loop.stop()
    runner.join(60)
    reader.join(5)
    consumer.close()
    got = sorted(latencies)
    if not got:
        print("no identified events read")
        return 1

    def pct(q: float) -> float:
        return got[min(len(got) - 1, int(q * len(got)))]

    print(
        f"{len(got)}/{n} events at {args.rate:g}/s over 4 partitions: events -> identified "
        f"p50 {pct(0.5):,.0f} ms, p99 {pct(0.99):,.0f} ms, max {got[-1]:,.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
