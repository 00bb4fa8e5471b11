"""Cost of a lookup table change in the segmenter: how long until every touched customer is
re-evaluated, with the default segments (ReEngageAtRisk reads lookup.zip_income(attr.zip)).

    .venv/bin/python bench/bench_lookups.py [--customers 100000] [--touched 0.1]

Builds ``--customers`` customers in one in-process segmenter shell (no broker: the shell's
tick, state records and change records as in the service, without Kafka), each with a zip
attribute and one at-risk score, then loads a zip_income table marking ``--touched`` of the
zips high and ticks until the re-evaluation queue is empty. Prints the time to find the
touched customers (a scan of the instance's customers), the time to re-evaluate them, and
the entries they produce; the load average beside it (a shared machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow.runtime.settings import Settings  # noqa: E402
from services.segmenter import core  # noqa: E402
from services.segmenter.app import Segmenter, SegmenterConfig  # noqa: E402

T0 = 1_700_000_000_000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--touched", type=float, default=0.1)
    args = ap.parse_args()
    seg = Segmenter(Settings(bootstrap_servers="127.0.0.1:1"), SegmenterConfig())
    seg.watermarks = {p: T0 for p in range(4)}
    features = {"days_since_open": 20.0, "days_since_purchase": 10.0, "cart_views_14d": 5.0}
    zips = 1000
    t = time.perf_counter()
    for i in range(args.customers):
        cid = f"c{i}"
        st, _ = core.set_attributes(None, cid, {"zip": f"{i % zips:05d}"}, T0, seg.defs)
        score = core.Score(cid, T0, {**features, "lifecycle_stage": "at_risk"})
        st, _ = core.evaluate(st, score, seg.defs)
        seg.states[cid] = st
    built = time.perf_counter() - t
    high = {f"{z:05d}": "high" for z in range(int(zips * args.touched))}
    t = time.perf_counter()
    seg.apply_lookups({"zip_income": {"name": "zip_income", "version": 1, "entries": high}})
    scan = time.perf_counter() - t
    queued = len(seg._reeval)
    entered = 0
    t = time.perf_counter()
    while seg._reeval:
        for out in seg.tick():
            if out.topic.key_name == "segment_changes" and out.value["transition"] == "entered":
                entered += out.value["segment"] == "ReEngageAtRisk"
    reeval = time.perf_counter() - t
    load = os.getloadavg()
    print(
        f"{args.customers:,} customers (built in {built:.1f}s), table change touching "
        f"{queued:,}: scan {scan * 1000:.0f} ms, re-evaluation {reeval:.2f}s "
        f"({queued / reeval:,.0f} customers/s), {entered:,} entered ReEngageAtRisk; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (shared machine)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
