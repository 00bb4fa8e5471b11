"""What publishing the internal API's view at each commit costs (segflow/runtime/snapshot.py).

1. ``Published.publish`` with ``k`` changed keys over ``n`` entries, beside the naive copy of
   the whole table it replaces;
2. the segmenter: batches of scores through the real handler and ``before_commit``, then the
   commit hooks, with the API's view published at each commit (``services/segmenter/api.py``)
   and, alternately, without: the publication's own time and the batch time either way. The
   publication's time includes freeing the superseded customer states its copies held last
   (work the handler does itself without a publisher), so compare the batch times.

    .venv/bin/python bench/bench_snapshot.py [--customers 100000] [--batches 20]

The machine is shared: the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow.runtime.loop import Incoming  # noqa: E402
from segflow.runtime.settings import Settings  # noqa: E402
from segflow.runtime.snapshot import Published  # noqa: E402
from segflow.runtime.topics import TOPICS  # noqa: E402
from services.segmenter import api  # noqa: E402
from services.segmenter.app import DEFAULT_DEFINITIONS, Segmenter, SegmenterConfig  # noqa: E402


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def ms(samples: list[float]) -> str:
    return (
        f"min {min(samples) * 1000:.2f} / median {statistics.median(samples) * 1000:.2f} / "
        f"max {max(samples) * 1000:.2f} ms"
    )


def raw(n: int, k: int, rounds: int = 20) -> None:
    rnd = random.Random(1)
    keys = [f"c-{i:012x}" for i in range(n)]
    table = {key: (key, i) for i, key in enumerate(keys)}
    published: Published[tuple[str, int], int] = Published(table, 0)
    evolve, copy = [], []
    for r in range(rounds):
        changes = {key: (key, r) for key in rnd.sample(keys, k)}
        with published.read():  # a request now and then
            pass
        t = time.perf_counter()
        published.publish(changes, r)
        evolve.append(time.perf_counter() - t)
        t = time.perf_counter()
        whole = dict(table)
        whole.update(changes)
        copy.append(time.perf_counter() - t)
    print(
        f"n={n:>9,} k={k:>5,}: publish {ms(evolve)}; whole-dict copy {ms(copy)}  ({load()})",
        flush=True,
    )


def score(cid: str, at: int, rnd: random.Random) -> Incoming:
    features = {
        "days_since_open": rnd.uniform(0, 40),
        "days_since_login": rnd.uniform(0, 40),
        "days_since_purchase": rnd.uniform(0, 200),
        "purchases_30d": float(rnd.randrange(0, 5)),
        "opens_7d": float(rnd.randrange(0, 10)),
        "logins_7d": float(rnd.randrange(0, 10)),
    }
    value = {
        "customer_id": cid,
        "as_of": at,
        "churn_probability": rnd.random(),
        "engagement_score": rnd.uniform(0, 100),
        "clv": rnd.uniform(0, 2000),
        "cluster": None,
        "lifecycle_stage": "loyal",
        "features": features,
        "model_version": "b",
        "scored_at": 0,
    }
    return Incoming(TOPICS.scores, "bench.scores", 0, 0, cid, value, None, [])


def segmenter(customers: int, batches: int, batch_size: int) -> None:
    rnd = random.Random(2)
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="bench.")
    with tempfile.TemporaryDirectory() as tmp:
        defs = Path(tmp) / "s.yaml"
        defs.write_text(DEFAULT_DEFINITIONS.read_text())
        config = SegmenterConfig(definitions=defs, reload_interval=3600, percentile_refresh=3600)
        seg = Segmenter(settings, config)
        ids = [f"c-{i:012x}" for i in range(customers)]
        t0 = 1_800_000_000_000
        started = time.perf_counter()
        for i, cid in enumerate(ids):
            list(seg(score(cid, t0 + i, rnd)))
            if i % batch_size == batch_size - 1:
                list(seg.before_commit())
                seg.store.on_commit()
                seg.on_commit()
        list(seg.before_commit())
        seg.store.on_commit()
        seg.on_commit()
        print(
            f"segmenter: {customers:,} customers loaded in {time.perf_counter() - started:.1f}s",
            flush=True,
        )
        publisher = api.ViewPublisher(seg)  # the API's publisher, as api.serve attaches it
        committed = publisher.committed
        with_view, without, publish = [], [], []

        def timed(keys: object) -> None:
            t = time.perf_counter()
            committed(keys)  # type: ignore[arg-type]
            publish.append(time.perf_counter() - t)

        for b in range(batches * 2):
            on = b % 2 == 0
            seg.on_committed = timed if on else None
            at = t0 + customers + b * 1000
            t = time.perf_counter()
            for cid in rnd.sample(ids, batch_size):
                list(seg(score(cid, at, rnd)))
            list(seg.before_commit())
            seg.store.on_commit()
            seg.on_commit()  # publishes the view (every other batch)
            (with_view if on else without).append(time.perf_counter() - t)
        seg.on_committed = committed
        seg.on_commit()
        with publisher.read() as view:
            assert len(view.states) == customers
        share = statistics.median(publish) / statistics.median(with_view) * 100
        print(
            f"segmenter, {customers:,} customers, batches of {batch_size:,} scores: "
            f"publishing the view {ms(publish)} ({share:.1f} % of a batch); batch with it "
            f"{ms(with_view)}, without {ms(without)}  ({load()})",
            flush=True,
        )


def main() -> None:
    logging.disable(logging.WARNING)  # the segmenter's missing-feature warnings
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--raw-max", type=int, default=1_000_000, help="largest n for the raw part")
    args = p.parse_args()
    print(f"numbers under load (shared machine); {load()}", flush=True)
    for n in (100_000, args.raw_max):
        for k in (200, 2000):
            raw(n, k)
    segmenter(args.customers, args.batches, args.batch_size)


if __name__ == "__main__":
    main()
