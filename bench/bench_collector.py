"""Collector throughput on one core with batches of 100, and request latency.

    .venv/bin/python bench/bench_collector.py [--seconds 20] [--concurrency 8] [--bootstrap H:P]

Without --bootstrap it starts a private local broker in a temporary folder. The collector runs
as its own process (``python -m segflow.collector``) pinned to one CPU; this process posts
prepared ``/v1/batch`` bodies of 100 track calls (gzip off, basic auth, unique messageIds)
from ``--concurrency`` connections as fast as the collector answers. Every answer counted is
a 200, i.e. Kafka acknowledged the whole batch in a committed transaction. Prints events/s,
the collector's CPU-seconds per 1,000 events, request latency percentiles and the load average
(the machine is shared: numbers are under that load).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow.runtime.broker import free_port  # noqa: E402
from segflow.runtime.leash import leashed  # noqa: E402
from segflow.runtime.testing import isolated_settings, private_broker, read_all  # noqa: E402
from segflow.runtime.topics import TOPICS  # noqa: E402

KEY = "bench-key"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def body(n: int, start: int) -> bytes:
    now = int(time.time() * 1000)
    return json.dumps(
        {
            "batch": [
                {
                    "type": "track",
                    "event": "Order Completed" if i % 10 == 0 else "Feature Used",
                    "userId": f"u{(start + i) % 5000}",
                    "anonymousId": f"a{(start + i) % 7000}",
                    "messageId": f"bench-{start + i}",
                    "timestamp": now - 1000,
                    "context": {"device": {"id": f"d{(start + i) % 6000}"}},
                    "properties": {"feature": "reports", "revenue": 12.5, "plan": "pro"},
                }
                for i in range(n)
            ],
            "sentAt": now,
        }
    ).encode()


async def load(
    url: str, seconds: float, concurrency: int, size: int, bodies: list[bytes]
) -> tuple[int, list[float]]:
    latencies: list[float] = []
    sent = 0
    counter = 0
    stop_at = time.monotonic() + seconds
    token = base64.b64encode(f"{KEY}:".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": f"Basic {token}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent, counter
        while time.monotonic() < stop_at:
            data = bodies[counter % len(bodies)]
            counter += 1
            t0 = time.perf_counter()
            async with session.post(url, data=data, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"collector answered {r.status}: {await r.text()}")
            latencies.append(time.perf_counter() - t0)
            sent += size

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return sent, latencies


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--cpu", type=int, default=0, help="the CPU the collector is pinned to")
    parser.add_argument("--bootstrap")
    args = parser.parse_args()

    bootstrap, broker = private_broker(args.bootstrap)
    proc = None
    try:
        settings = isolated_settings(bootstrap, "bench-collector")
        port = free_port()
        env = {
            **os.environ,
            "SEGFLOW_BOOTSTRAP_SERVERS": bootstrap,
            "SEGFLOW_TOPIC_PREFIX": settings.topic_prefix,
            "SEGFLOW_COLLECTOR_PORT": str(port),
            "SEGFLOW_COLLECTOR_WRITE_KEYS": f"bench={KEY}",
            "SEGFLOW_COLLECTOR_RATE_PER_KEY": "1000000",
            "SEGFLOW_COLLECTOR_BURST_PER_KEY": "1000000",
        }
        proc = subprocess.Popen(
            leashed([sys.executable, "-m", "segflow.collector"]),  # dies with this bench
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {args.cpu}),
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening" not in line:
            raise SystemExit(f"the collector did not start: {line!r}")
        url = f"http://127.0.0.1:{port}/v1/batch"
        # Bodies prepared up front so the load generator spends its CPU on sending; after
        # 1,000 requests messageIds repeat (identity would drop those as duplicates).
        bodies = [body(args.batch, i * args.batch) for i in range(1000)]
        asyncio.run(load(url, 3.0, args.concurrency, args.batch, bodies))  # warm-up
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        sent, latencies = asyncio.run(load(url, args.seconds, args.concurrency, args.batch, bodies))
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
        load_avg = os.getloadavg()
        total = len(read_all(settings, TOPICS.events.name(settings), timeout=120))
        print(
            f"collector, one core (CPU {args.cpu}), batches of {args.batch}, "
            f"{args.concurrency} connections, {args.seconds:.0f} s:\n"
            f"  {sent / elapsed:,.0f} events/s acknowledged ({len(latencies):,} requests, "
            f"all 200); collector CPU {cpu / elapsed:.0%} of one core, "
            f"{1000 * cpu / sent * 1000:.1f} ms CPU per 1,000 events\n"
            f"  request latency p50 {pct(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {pct(latencies, 0.99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms\n"
            f"  {total:,} events on {TOPICS.events.name(settings)} (read_committed, warm-up "
            f"included)\n"
            f"  load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f} on "
            f"{os.cpu_count()} CPUs (shared machine: numbers are under this load)"
        )
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
