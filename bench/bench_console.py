"""Time the segmenter's console reads over 100,000 customers (the server side of the console's
Segments and Segment pages; the gateway adds one HTTP hop on top).

    .venv/bin/python bench/bench_console.py [--customers 100000]

Prints the median and max of 5 runs per route, with the load average (the machine is shared:
numbers are under load)."""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import time

from segflow.api.internal import Routes
from services.segmenter import api as segmenter_api
from services.segmenter import core
from services.segmenter.app import DEFAULT_DEFINITIONS, load_definitions

HOUR = 3_600_000


class Fake:
    def __init__(self, n: int) -> None:
        rnd = random.Random(7)
        self.defs = load_definitions(DEFAULT_DEFINITIONS)
        names = [s.name for s in self.defs.segments]
        self.watermark = 1_800_000_000_000
        self.statuses: dict[str, object] = {}
        self.states: dict[str, core.CustomerState] = {}
        self.sizes: dict[str, int] = {}
        for i in range(n):
            cid = f"c-{i:016x}"
            mems = {}
            for name in rnd.sample(names, 3):
                active = rnd.random() < 0.7
                entered = self.watermark - rnd.randrange(0, 30 * 24 * HOUR)
                exited = None if active else entered + rnd.randrange(1, 48 * HOUR)
                mems[name] = core.Membership(name, active, 1, entered, exited)
                if active:
                    self.sizes[name] = self.sizes.get(name, 0) + 1
            values = {"churn_probability": rnd.random()}
            self.states[cid] = core.CustomerState(cid, self.watermark, values, mems)

    def segment_sizes(self) -> dict[str, int]:
        return {s.name: self.sizes.get(s.name, 0) for s in self.defs.segments}

    def explain(self, customer_id: str) -> None:
        return None


def dispatch(routes: Routes, path: str, query: dict[str, str]) -> tuple[int, object]:
    """Answer ``path`` as the internal API would, without the HTTP server."""
    for pattern, fn in routes._routes:
        rx = "^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(pattern)) + "$"
        m = re.match(rx, path)
        if m:
            return routes.answer(pattern, fn, m.groupdict(), query)
    raise KeyError(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--customers", type=int, default=100_000)
    args = p.parse_args()
    started = time.perf_counter()
    fake = Fake(args.customers)
    print(f"built {args.customers:,} customers in {time.perf_counter() - started:.1f}s")
    routes: Routes = segmenter_api.routes(fake)  # type: ignore[arg-type]
    biggest = max(fake.sizes, key=lambda n: fake.sizes[n])
    plans = {
        "Segments page: /segments": ("/segments", {}),
        "Segments page: /console/flow?hours=24": ("/console/flow", {"hours": "24"}),
        "Segment page: /console/flow?hours=72": ("/console/flow", {"hours": "72"}),
        f"Segment page: members sorted by churn ({fake.sizes[biggest]:,})": (
            f"/console/segments/{biggest}/members",
            {"sort": "churn", "limit": "25"},
        ),
        "Segment page: members filtered by id": (
            f"/console/segments/{biggest}/members",
            {"q": "00ab", "limit": "25"},
        ),
        "Customer page: /console/customers/<id>/memberships": (
            "/console/customers/c-0000000000000001/memberships",
            {},
        ),
    }
    for label, (path, query) in plans.items():
        times = []
        for _ in range(5):
            t = time.perf_counter()
            status, _body = dispatch(routes, path, query)
            times.append(time.perf_counter() - t)
            assert status == 200, (path, status)
        print(
            f"{label:60} median {1000 * statistics.median(times):7.1f} ms  "
            f"max {1000 * max(times):7.1f} ms  (load average {os.getloadavg()[0]:.1f})"
        )


if __name__ == "__main__":
    main()
