"""Dispatcher delivery throughput against an API that answers in 50 ms, and duplicates.

    .venv/bin/python bench/bench_dispatcher.py [--actions 20000] [--latency 0.05]
        [--concurrency 256] [--bootstrap HOST:PORT]

Loads ``--actions`` SegmentChange ``entered`` records (one customer each) for a one-step
email playbook, runs the dispatcher (exactly-once loop, in this process) against the local
receiver (segflow/receiver.py, its own process, ``--latency`` per request), and
prints delivered actions/s, the receiver's raw request count, and the duplicates it counted
(requests for an idempotency key that had already taken effect). Without --bootstrap it
starts a private local broker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import REGISTRY  # noqa: E402

from segflow.runtime.broker import free_port  # noqa: E402
from segflow.runtime.leash import leashed  # noqa: E402
from segflow.runtime.serde import Serde  # noqa: E402
from segflow.runtime.testing import isolated_settings, private_broker, produce  # noqa: E402
from segflow.runtime.topics import TOPICS  # noqa: E402
from services.dispatcher.app import Dispatcher, DispatcherSettings  # noqa: E402
from services.dispatcher.playbooks import load_book  # noqa: E402

PLAYBOOK = """\
playbook: Bench
segment: Bench
defaults: {first_name: there}
steps:
  - {id: mail, channel: email, template: d-bench, subject: "Hi {{first_name}}"}
---
policy: {default_timezone: UTC}
"""


def stats(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats", timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=20_000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=2000)
    parser.add_argument("--bootstrap")
    parser.add_argument("--profile", help="write a cProfile of the dispatcher loop here")
    args = parser.parse_args()

    bootstrap, broker = private_broker(args.bootstrap)
    port = free_port()
    receiver = subprocess.Popen(
        leashed(
            [
                sys.executable,
                "-m",
                "segflow.receiver",
                "--port",
                str(port),
                "--latency",
                str(args.latency),
            ]
        ),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    assert receiver.stdout is not None
    receiver.stdout.readline()  # "receiver on ..." once it listens
    try:
        s = isolated_settings(bootstrap, "bench")
        serde = Serde.from_settings(s)
        folder = Path(tempfile.mkdtemp(prefix="segflow-bench-playbooks-"))
        (folder / "bench.yaml").write_text(PLAYBOOK)
        now = int(time.time() * 1000)
        t0 = time.perf_counter()
        produce(
            s,
            TOPICS.segment_changes.name(s),
            (
                (
                    f"b{i:07d}".encode(),
                    serde.encode(
                        TOPICS.segment_changes,
                        {
                            "change_id": f"b{i:07d}:Bench:{now}:entered",
                            "customer_id": f"b{i:07d}",
                            "segment": "Bench",
                            "transition": "entered",
                            "entry_id": f"b{i:07d}:{now}",
                            "definition_version": "bench@1",
                            "occurred_at": now,
                            "emitted_at": now,
                            "explanation": [],
                        },
                    ),
                )
                for i in range(args.actions)
            ),
        )
        print(
            f"loaded {args.actions} segment changes in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
        url = f"http://127.0.0.1:{port}"
        cfg = DispatcherSettings(
            group_id=s.topic_prefix + "dispatcher",
            crm_base_url=url,
            email_base_url=url,
            webhook_url=url + "/webhook",
            contact_pattern="{customer_id}@example.invalid",
            concurrency=args.concurrency,
            max_batch=args.max_batch,
            tick_interval=0.05,
            http_timeout=10.0,
        )
        d = Dispatcher(s, cfg, book=load_book([folder]))
        d.restore()
        loop = d.loop()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.time()
        finished: dict[str, float] = {}

        def watch() -> None:
            deadline = time.monotonic() + 600
            st = stats(port)
            while st["effects"] < args.actions and time.monotonic() < deadline:
                time.sleep(0.5)
                st = stats(port)
            finished["at"] = time.time()
            loop.stop()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        if args.profile:
            import cProfile

            cProfile.runctx("loop.run()", globals(), {"loop": loop}, args.profile)
        else:
            loop.run()
        watcher.join()
        elapsed = finished["at"] - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        d.close()
        st = stats(port)
        wait = {
            sample.name: sample.value
            for m in REGISTRY.collect()
            if m.name == "segflow_dispatch_start_wait_seconds"
            for sample in m.samples
        }
        if wait.get("segflow_dispatch_start_wait_seconds_count"):
            n = wait["segflow_dispatch_start_wait_seconds_count"]
            print(
                f"calls recorded as started before they were made: {int(n)}, waiting "
                f"{wait['segflow_dispatch_start_wait_seconds_sum'] / n * 1000:.1f} ms on average "
                "for the tick's commit"
            )
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        span = (st["last"] or 0) - (st["first"] or 0)
        print(
            f"dispatcher: {int(st['effects'])} actions delivered in {elapsed:.1f}s from start "
            f"= {st['effects'] / elapsed:,.0f} actions/s; first-to-last delivery "
            f"{span:.1f}s = {st['effects'] / max(span, 1e-9):,.0f} actions/s "
            f"(API latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}); "
            f"receiver saw {int(st['requests'])} requests, duplicates {int(st['replays'])}; "
            f"dispatcher process CPU {cpu:.1f}s; {os.cpu_count()} cores, broker and receiver "
            f"on the same machine"
        )
    finally:
        receiver.terminate()
        receiver.wait(10)
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
