"""What publishing the scorer's internal API view at each commit costs (services/scorer/api.py).

The real ``ScorerService`` handler (in process, no Kafka) holds ``--customers`` customers; each
batch gives ``k`` of them one event each, then ``before_commit`` and the commit hooks run as
the loop runs them. Printed per ``k``:

* the publication at the commit (``ScorerPublisher.committed``: a copy of each changed state,
  the swap, the model reference), beside the batch's handler + ``before_commit`` time;
* the same when the model learned during the batch (its frozen copy is made again);
* a rebuild of the whole view (what a restore, an assignment or a revocation costs).

    .venv/bin/python bench/bench_scorer_snapshot.py [--customers 50000] [--batches 15]

The machine is shared: the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_snapshot import load, ms  # noqa: E402  (one way to print a timing)
from segflow.runtime.records import Incoming  # noqa: E402
from segflow.runtime.settings import Settings  # noqa: E402
from segflow.runtime.topics import TOPICS  # noqa: E402
from services.scorer import api  # noqa: E402
from services.scorer.app import ScorerService  # noqa: E402
from services.scorer.core import MODEL_INPUTS  # noqa: E402
from services.scorer.features import DAY, MINUTE  # noqa: E402

T0 = 1_704_067_200_000
KINDS = ("login", "page_view", "session_start", "feature_use", "email_open")


def event(cid: str, kind: str, t: int, eid: str) -> Incoming:
    ev = {"event_id": eid, "event_type": kind, "occurred_at": t}
    value = {"customer_id": cid, "event": ev, "email_hash": None, "identified_at": t}
    return Incoming(TOPICS.identified, "identified", 0, 0, cid, value, None, [])


class Timed:
    """Times each call of the publisher's hook."""

    def __init__(self, publisher: api.ScorerPublisher) -> None:
        self.publisher = publisher
        self.samples: list[float] = []
        self.keys = 0

    def __call__(self, keys: Iterable[str] | None) -> None:
        t = time.perf_counter()
        self.keys += len(list(keys or ()))  # timers firing may change more than k states
        self.publisher.committed(keys)
        self.samples.append(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=50_000)
    ap.add_argument("--batches", type=int, default=15)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="bench-snap.")
    svc = ScorerService(settings, clock=lambda: (T0 + 60 * DAY) / 1000)
    svc.scorer.sink = None
    ids = [f"c-{i:08x}" for i in range(args.customers)]
    rnd = random.Random(7)
    t = T0
    started = time.perf_counter()
    for i, cid in enumerate(ids):  # one committed event per customer, in batches of 2,000
        list(svc.handle(event(cid, rnd.choice(KINDS), t + i, f"s{i}")))
        if i % 2000 == 1999 or i == len(ids) - 1:
            list(svc.before_commit())
            svc.states.on_commit()
    model = svc.scorer.model
    for j in range(300):  # a model that learned something
        x = {name: float((j * 7 + k) % 11) for k, (name, _) in enumerate(MODEL_INPUTS)}
        model.learn(x, j % 3 == 0)
    print(f"{args.customers} customers loaded in {time.perf_counter() - started:.1f} s ({load()})")

    t0 = time.perf_counter()
    publisher = api.ScorerPublisher(svc)  # the first view: every state copied
    first = time.perf_counter() - t0
    timed = Timed(publisher)
    svc.states.on_committed = timed
    reader = publisher.table.read  # a request now and then, as the API makes

    seq = 0
    t = T0 + DAY
    for k in (10, 100, 1000, 5000):
        for learn in (False, True):
            handle, pub, changed = [], [], []
            for _ in range(args.batches):
                chosen = rnd.sample(ids, k)
                b0 = time.perf_counter()
                for cid in chosen:
                    t += MINUTE // 10
                    seq += 1
                    list(svc.handle(event(cid, rnd.choice(KINDS), t, f"b{seq}")))
                if learn:
                    model.learn({name: 1.0 for name, _ in MODEL_INPUTS}, seq % 2 == 0)
                list(svc.before_commit())
                handle.append(time.perf_counter() - b0)
                timed.samples.clear()
                timed.keys = 0
                svc.states.on_commit()
                pub.append(sum(timed.samples))
                changed.append(timed.keys)
                with reader():
                    pass
            what = "model learned (frozen again)" if learn else "model unchanged"
            per = statistics.median(p / max(1, n) for p, n in zip(pub, changed, strict=True))
            print(
                f"k={k:5d} customers with an event, {statistics.median(changed):.0f} states "
                f"changed (median), {what}: publication {ms(pub)} ({per * 1e6:.1f} us per "
                f"changed state); batch handler + before_commit {ms(handle)} ({load()})"
            )
    t0 = time.perf_counter()
    frozen = api.FrozenModel.of(model, svc.scorer._descriptions)
    freeze = time.perf_counter() - t0
    t0 = time.perf_counter()
    frozen.scorer(svc.scorer)
    scorer = time.perf_counter() - t0
    rebuilds = []
    for _ in range(3):
        t0 = time.perf_counter()
        publisher.committed(None)
        rebuilds.append(time.perf_counter() - t0)
    print(
        f"first view {first * 1000:.0f} ms; rebuild of {args.customers} customers (restore, "
        f"assignment, revocation) {ms(rebuilds)}; a frozen model {freeze * 1000:.2f} ms + its "
        f"scorer {scorer * 1000:.2f} ms ({load()})"
    )


if __name__ == "__main__":
    main()
