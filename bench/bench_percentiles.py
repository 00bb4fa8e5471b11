"""pNN thresholds: a whole-population sort per refresh (before) vs selection (now), and the
kept-sorted structure that was tried and rejected (sortedcontainers, if installed).

    .venv/bin/python bench/bench_percentiles.py [--customers 100000 1000000] [--updates 200000]

For each population size, one run, side by side:
* refresh: seconds to compute the default segments' pNN thresholds (3 features) — the loop
  stalls this long at each grid instant of a partition's event time (``percentile_refresh``,
  1 h; over that partition's customers, a quarter of a deployment's) — by sorting every
  value (before) and by :meth:`Column.nearest_rank` (numpy selection, now);
* update: microseconds per score update to keep the population current for the 3 features:
  a dict write (before), :meth:`Column.set` (now), a SortedList remove + add (rejected).
Prints the load average: run it alone.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.segmenter.quantiles import Column  # noqa: E402

FEATURES = {
    "clv": [80.0, 70.0],
    "engagement_score": [50.0, 40.0],
    "churn_probability": [80.0, 70.0],
}


def _sorted_lists(dicts: dict[str, dict[str, float]]) -> Any:
    try:
        from sortedcontainers import SortedList
    except ImportError:
        return None
    return {f: SortedList(d.values()) for f, d in dicts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--updates", type=int, default=200_000)
    args = parser.parse_args()
    rng = random.Random(7)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(
        f"{'customers':>10} | refresh of 3 features: {'sort all':>9} {'selection':>10} | "
        f"per update: {'dict':>7} {'Column':>7} {'SortedList':>10}"
    )
    for n in args.customers:
        ids = [f"c{i}" for i in range(n)]
        dicts = {f: {c: rng.random() for c in ids} for f in FEATURES}
        columns = {f: Column() for f in FEATURES}
        for f, d in dicts.items():
            for c, v in d.items():
                columns[f].set(c, v)

        started = time.perf_counter()
        before = {}
        for f, d in dicts.items():
            data = sorted(d.values())
            for p in FEATURES[f]:
                before[(f, p)] = data[max(1, math.ceil(p / 100 * len(data))) - 1]
        t_sort = time.perf_counter() - started
        started = time.perf_counter()
        after = {(f, p): columns[f].nearest_rank(p) for f in FEATURES for p in FEATURES[f]}
        t_select = time.perf_counter() - started
        assert before == after, (before, after)

        picks = [(rng.choice(ids), rng.random()) for _ in range(args.updates)]
        started = time.perf_counter()
        for c, v in picks:
            for d in dicts.values():
                d[c] = v
        t_dict = (time.perf_counter() - started) / args.updates
        started = time.perf_counter()
        for c, v in picks:
            for col in columns.values():
                col.set(c, v)
        t_col = (time.perf_counter() - started) / args.updates
        lists, t_sl = _sorted_lists(dicts), float("nan")
        if lists is not None:
            current = {f: dict(d) for f, d in dicts.items()}
            started = time.perf_counter()
            for c, v in picks:
                for f, sl in lists.items():
                    sl.remove(current[f][c])
                    sl.add(v)
                    current[f][c] = v
            t_sl = (time.perf_counter() - started) / args.updates
        print(
            f"{n:>10,} | {'':>22} {t_sort:>7.3f} s {t_select:>8.3f} s | "
            f"{'':>11} {t_dict * 1e6:>4.1f} µs {t_col * 1e6:>4.1f} µs {t_sl * 1e6:>7.1f} µs"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f} (2-core box; others' work included)")


if __name__ == "__main__":
    main()
