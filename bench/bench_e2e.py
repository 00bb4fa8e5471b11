"""End to end: the four services as processes on one machine with the broker on it.

    .venv/bin/python bench/bench_e2e.py [--customers 10000] [--step-seconds 20]
        [--start-rate 500] [--max-rate 16000] [--latency-seconds 30] [--bootstrap HOST:PORT]

A private Kafka broker (unless --bootstrap), segflow's topics under a fresh prefix, the
identity, scorer, segmenter and dispatcher services as supervised processes
(``python -m services.<name>``, as ``segflow up`` and the demo run them) and the local API
receiver as its own process (``--api-latency`` per request, 50 ms by default). Simulated
customers' events are re-timed to the wall clock and produced at a fixed rate.

1. **Sustainable rate.** From ``--start-rate`` the rate doubles every ``--step-seconds`` while
   the pipeline keeps up: at the end of a step every service's consumer lag is under
   ``--max-lag-seconds`` of input and did not grow over the step's second half; then one
   bisection step between the last good and the first bad rate. Processed records/s per
   service in the first overloaded step show where the pipeline saturates.
2. **Latency at half that rate** for ``--latency-seconds``: produced event → segment change,
   and produced event → action dispatched. An event's ``occurred_at`` is its produce time (the
   feeder re-times it to the millisecond it produces it); a segment change caused by a score
   carries the score's ``as_of``, which is the event time of the customer's latest event, so
   ``change.occurred_at`` is that event's produce time (changes whose ``occurred_at`` is no
   produced event's time, e.g. timer-driven ones, are left out). Neither CustomerScore nor
   SegmentChange carries the causing event's id (check ``schemas/``), so this is the match.
   Two clocks for "segment change emitted": the SegmentChange record's timestamp (producer
   CreateTime) and the moment a read_committed consumer in this process received it
   (after the segmenter's transaction committed). Action: a ``sent`` DispatchResult of a step
   due at once (``due_at`` = the entering change's time): its ``dispatched_at`` (the API call
   started) and its record timestamp (answer recorded).
3. **Memory and state**: peak RSS per process (VmHWM from /proc), CPU seconds per process
   (per produced event, and per input record each service committed: the number to compare
   between services and runs on a shared machine, where wall-clock rates are noisy), and the
   state changelog topics' compacted size (latest value per key) per customer.

The default contact policy's quiet hours are removed for the run (they would hold emails
until 08:00 local time, which is a policy delay, not pipeline latency). Ends with a table
and one JSON line. Numbers are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # noqa: E402

from segflow import stack  # noqa: E402
from segflow.cli import SCALABLE  # noqa: E402
from segflow.demo import _high  # noqa: E402
from segflow.runtime.broker import free_port  # noqa: E402
from segflow.runtime.lag import LagProbe  # noqa: E402
from segflow.runtime.serde import Serde  # noqa: E402
from segflow.runtime.settings import Settings  # noqa: E402
from segflow.runtime.testing import isolated_settings, private_broker  # noqa: E402
from segflow.runtime.topics import TOPICS, Topic  # noqa: E402
from segflow.sim.generator import SimConfig, Simulation  # noqa: E402
from segflow.sim.noise import Delivery  # noqa: E402
from segflow.sim.sink import KafkaSink, Pacer, retime  # noqa: E402
from segflow.supervisor import SERVICES, Supervisor  # noqa: E402
from services.dispatcher.playbooks import DEFAULT_DIR  # noqa: E402

#: Each service's consumer group (under the topic prefix) and input topics.
#: The bench runs the four services of the event path (not the attributes service, which
#: only folds identify traits: no bench event is one).
INPUTS: dict[str, tuple[str, tuple[Topic, ...]]] = {
    s.name: (s.name, s.inputs)
    for s in stack.SERVICES  # group = <prefix><name>
    if s.name in SERVICES
}
STATE_TOPICS = (
    TOPICS.identity_state,
    TOPICS.scorer_state,
    TOPICS.scorer_model,
    TOPICS.segmenter_state,
    TOPICS.dispatcher_state,
)
TARGET_RATE = 10_000
TARGET_P99_MS = 1000


def say(text: str = "") -> None:
    print(text, flush=True)


# -- feeding -----------------------------------------------------------------------------------
class Feeder:
    """Simulated events, re-timed to the wall clock, produced at a fixed rate."""

    def __init__(self, settings: Settings, customers: int, seed: int) -> None:
        self.sink = KafkaSink.from_settings(settings, create=False)
        self.customers = customers
        self.seed = seed
        self.stream = self._events()
        self.produced = 0

    def _events(self) -> Iterator[Delivery]:
        seed = self.seed
        while True:  # a fresh population (new ids) when a span runs out
            sim = Simulation(SimConfig(customers=self.customers, days=365, seed=seed))
            for item in sim.run(1):  # one simulated day at a time: short generation bursts
                if type(item) is Delivery:
                    yield item
            seed += 1

    def run(self, rate: float, seconds: float) -> tuple[int, float, list[int]]:
        """Produce at ``rate`` for ``seconds``; returns (events, seconds taken, the
        millisecond timestamps used, one per batch)."""
        pacer = Pacer(rate)
        batch = max(1, int(rate / 100))
        times: list[int] = []
        started = time.monotonic()
        deadline = started + seconds
        n = 0
        stream = self.stream
        while time.monotonic() < deadline:
            items = [next(stream) for _ in range(batch)]
            now_ms = int(time.time() * 1000)
            self.sink.write([retime(item, now_ms) for item in items])
            times.append(now_ms)
            n += len(items)
            pacer.pace(len(items))
        self.sink.producer.flush(30)
        self.produced += n
        return n, time.monotonic() - started, times


# -- consumer lag --------------------------------------------------------------------------------
class LagMonitor:
    """Samples each service's committed offsets and its input topics' ends in a thread."""

    def __init__(self, settings: Settings, every: float = 2.0) -> None:
        # One probe (segflow.runtime.lag: consumers of each group, never the Admin API's
        # ListConsumerGroupOffsets, which crashes librdkafka while coordinators load), used by
        # the sampling thread and by wait_drained: one thread at a time, under a lock.
        self.probe = LagProbe(settings)
        self.groups = {
            service: (settings.topic_prefix + group, [t.name(settings) for t in topics])
            for service, (group, topics) in INPUTS.items()
        }
        self.every = every
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lag")

    def sample(self) -> dict[str, tuple[int, int]]:
        """Per service: (records behind, records committed) over its input partitions."""
        out = {}
        with self._probe_lock:
            for service, (group, topics) in self.groups.items():
                parts = [tp for name in topics for tp in self.probe.partitions(group, name)]
                committed = self.probe.committed(group, parts)
                behind = done = 0
                for tp in parts:
                    high = self.probe.high(group, tp)
                    c = max(committed.get((tp.topic, tp.partition), 0), 0)
                    gap = max(0, high - c)
                    behind += gap if gap > 1 else 0  # a transaction marker is never consumed
                    done += c
                out[service] = (behind, done)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                s = self.sample()
            except Exception as exc:  # a slow broker: skip one sample
                say(f"      (lag sample failed: {exc})")
                s = None
            if s is not None:
                with self._lock:
                    self.samples.append((time.monotonic(), s))
            self._stop.wait(self.every)

    def start(self) -> LagMonitor:
        self._thread.start()
        return self

    def between(self, t0: float, t1: float) -> list[tuple[float, dict[str, tuple[int, int]]]]:
        with self._lock:
            return [s for s in self.samples if t0 <= s[0] <= t1]

    def latest(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return self.samples[-1][1] if self.samples else {}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with self._probe_lock:
            self.probe.close()

    def wait_drained(self, timeout: float, after: float | None = None) -> bool:
        """Until every service has nothing left to read (twice in a row)."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline:
            s = self.sample()
            quiet = quiet + 1 if all(b == 0 for b, _ in s.values()) else 0
            if quiet >= 2:
                return True
            time.sleep(0.5)
        return False


# -- reading the outputs as they commit ---------------------------------------------------------
@dataclass
class Seen:
    arrived_ms: int
    timestamp_ms: int
    value: dict[str, Any]


@dataclass
class Tail:
    """Reads segment changes and dispatch results (read_committed) as they are committed."""

    settings: Settings
    changes: list[Seen] = field(default_factory=list)
    results: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.serde = Serde.from_settings(self.settings)
        self.topics = {
            TOPICS.segment_changes.name(self.settings): (TOPICS.segment_changes, self.changes),
            TOPICS.dispatch_results.name(self.settings): (TOPICS.dispatch_results, self.results),
        }
        self.consumer = Consumer(
            {
                **self.settings.kafka_config(),
                "group.id": f"bench-tail-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        parts = []
        for name in self.topics:
            md = self.consumer.list_topics(name, timeout=10)
            parts += [TopicPartition(name, p, OFFSET_BEGINNING) for p in md.topics[name].partitions]
        self.consumer.assign(parts)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tail")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for m in self.consumer.consume(1000, 0.05):
                arrived = int(time.time() * 1000)
                if m.error() or m.value() is None:
                    continue
                topic, sink = self.topics[m.topic()]  # type: ignore[index]
                sink.append(Seen(arrived, m.timestamp()[1], self.serde.decode(topic, m.value())))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


# -- per-process numbers -------------------------------------------------------------------------
def proc_numbers(pid: int | None) -> dict[str, float | None]:
    """Peak RSS (MB, VmHWM) and CPU seconds (user + system) of a live process."""
    if pid is None:
        return {"peak_rss_mb": None, "cpu_s": None}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return {"peak_rss_mb": None, "cpu_s": None}
    hwm = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0
    )
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return {"peak_rss_mb": round(hwm / 1024, 1), "cpu_s": round(cpu, 1)}


def state_sizes(settings: Settings) -> dict[str, dict[str, int]]:
    """Per state topic: keys and bytes (key + value) of the latest value per key, i.e. the
    size compaction converges to; identity's event de-duplication window (``e:`` keys)
    apart from its graph."""
    out: dict[str, dict[str, int]] = {}
    consumer = Consumer(
        {
            **settings.kafka_config(),
            "group.id": f"bench-state-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        for topic in STATE_TOPICS:
            name = topic.name(settings)
            md = consumer.list_topics(name, timeout=10)
            parts = [TopicPartition(name, p) for p in md.topics[name].partitions]
            ends = {tp.partition: _high(consumer, tp) for tp in parts}
            consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in ends])
            latest: dict[bytes, int] = {}
            idle = time.monotonic()
            while time.monotonic() - idle < 3:
                msgs = consumer.consume(10000, 0.2)
                if msgs:
                    idle = time.monotonic()
                for m in msgs:
                    if m.error():
                        continue
                    key, value = m.key() or b"", m.value()
                    if value is None:
                        latest.pop(key, None)
                    else:
                        latest[key] = len(key) + len(value)
                positions = consumer.position([TopicPartition(name, p) for p in ends])
                if all(tp.offset >= ends[tp.partition] - 1 for tp in positions):
                    break
            if topic is TOPICS.identity_state:
                dedup = {k: v for k, v in latest.items() if k.startswith(b"e:")}
                graph = {k: v for k, v in latest.items() if not k.startswith(b"e:")}
                out["identity.state (graph)"] = {
                    "keys": len(graph),
                    "bytes": sum(graph.values()),
                    "profiles": sum(1 for k in graph if k.startswith(b"p:")),
                }
                out["identity.state (dedup window)"] = {
                    "keys": len(dedup),
                    "bytes": sum(dedup.values()),
                }
            else:
                out[topic.suffix] = {"keys": len(latest), "bytes": sum(latest.values())}
    finally:
        consumer.close()
    return out


def log_bytes(data_dir: Path, name: str) -> int:
    """Bytes of a topic's log segments on disk (before compaction; no index files)."""
    return sum(f.stat().st_size for f in data_dir.glob(f"{name}-*/*.log"))


# -- statistics ----------------------------------------------------------------------------------
def pct(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (units per second)."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


@dataclass
class Step:
    rate: float
    produced: int
    seconds: float
    lag_end: dict[str, int]
    lag_growth: dict[str, float]  # records/s over the second half
    processed: dict[str, float]  # committed records/s per service over the step
    ok: bool

    @property
    def achieved(self) -> float:
        return self.produced / self.seconds if self.seconds else 0.0


def run_step(
    feeder: Feeder, lag: LagMonitor, rate: float, seconds: float, max_lag_s: float
) -> Step:
    t0 = time.monotonic()
    n, took, _ = feeder.run(rate, seconds)
    time.sleep(lag.every * 1.5)  # one more sample at the end of the step
    t1 = time.monotonic()
    samples = lag.between(t0, t1)
    half = t0 + (t1 - t0) / 2
    end = samples[-1][1] if samples else {}
    growth = {svc: slope([(t, s[svc][0]) for t, s in samples if t >= half]) for svc in INPUTS}
    processed = {}
    if len(samples) >= 2:
        (ta, a), (tb, b) = samples[0], samples[-1]
        processed = {svc: (b[svc][1] - a[svc][1]) / (tb - ta) for svc in INPUTS}
    lag_end = {svc: end.get(svc, (0, 0))[0] for svc in INPUTS}
    bound = max(1000.0, rate * max_lag_s)
    ok = (
        bool(samples)
        and n / took >= 0.9 * rate
        and all(lag_end[svc] <= bound for svc in INPUTS)
        and all(growth[svc] <= 0.05 * rate for svc in INPUTS)
    )
    return Step(rate, n, took, lag_end, growth, processed, ok)


def show_step(step: Step) -> None:
    lags = ", ".join(f"{s} {step.lag_end[s]:,} ({step.lag_growth[s]:+,.0f}/s)" for s in INPUTS)
    proc = ", ".join(f"{s} {v:,.0f}/s" for s, v in step.processed.items())
    say(
        f"      {step.rate:>8,.0f}/s asked, {step.achieved:,.0f}/s produced: "
        f"{'keeps up' if step.ok else 'FALLS BEHIND'}; lag {lags}"
    )
    say(f"                processed (committed records/s): {proc}")


# -- the run -------------------------------------------------------------------------------------
def playbooks_without_quiet_hours() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="segflow-bench-playbooks-"))
    for f in DEFAULT_DIR.glob("*.yaml"):
        text = f.read_text()
        if f.name == "policy.yaml":
            text = "\n".join(
                line for line in text.splitlines() if not line.strip().startswith("quiet_hours:")
            )
        (folder / f.name).write_text(text)
    return folder


def service_env(settings: Settings, receiver_url: str, playbooks: Path) -> dict[str, str]:
    p = settings.topic_prefix
    return {
        "SEGFLOW_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SEGFLOW_TOPIC_PREFIX": p,
        "SEGFLOW_LOG_LEVEL": "WARNING",
        **stack.group_env(settings),
        "SEGFLOW_DISPATCHER_PLAYBOOKS": str(playbooks),
        "SEGFLOW_DISPATCHER_CRM_BASE_URL": receiver_url,
        "SEGFLOW_DISPATCHER_EMAIL_BASE_URL": receiver_url,
        "SEGFLOW_DISPATCHER_WEBHOOK_URL": receiver_url + "/webhook",
        "SEGFLOW_DISPATCHER_CONTACT_PATTERN": "{customer_id}@example.invalid",
    }


def wait_receiver(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def receiver_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats", timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def latencies(tail: Tail, times: set[int], t0_ms: int, t1_ms: int) -> dict[str, Any]:
    changes = [
        c
        for c in tail.changes
        if t0_ms <= c.value["occurred_at"] <= t1_ms
        and c.value["customer_id"]
        and c.value["occurred_at"] in times
    ]
    record = [c.timestamp_ms - c.value["occurred_at"] for c in changes]
    visible = [c.arrived_ms - c.value["occurred_at"] for c in changes]
    sent = [
        r
        for r in tail.results
        if r.value["status"] == "sent"
        and r.value.get("due_at") in times
        and t0_ms <= r.value["due_at"] <= t1_ms
        and r.value.get("dispatched_at")
    ]
    dispatched = [r.value["dispatched_at"] - r.value["due_at"] for r in sent]
    answered = [r.timestamp_ms - r.value["due_at"] for r in sent]

    def summary(xs: list[int]) -> dict[str, Any]:
        return {
            "n": len(xs),
            "p50_ms": pct(xs, 50),
            "p99_ms": pct(xs, 99),
            "max_ms": max(xs) if xs else None,
        }

    return {
        "segment_change_record_ts": summary(record),
        "segment_change_visible": summary(visible),
        "action_dispatched": summary(dispatched),
        "action_result_record_ts": summary(answered),
    }


def stages(settings: Settings, times: set[int], t0_ms: int, t1_ms: int) -> dict[str, Any]:
    """Where the time goes: produced event → identified event and → score (record
    timestamps), for the records of the latency phase."""
    serde = Serde.from_settings(settings)
    consumer = Consumer(
        {
            **settings.kafka_config(),
            "group.id": f"bench-stages-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    out: dict[str, list[int]] = {"identified": [], "scored": []}
    try:
        for topic, key in ((TOPICS.identified, "identified"), (TOPICS.scores, "scored")):
            name = topic.name(settings)
            md = consumer.list_topics(name, timeout=10)
            starts = consumer.offsets_for_times(
                [TopicPartition(name, p, t0_ms) for p in md.topics[name].partitions], 10
            )
            ends = {tp.partition: _high(consumer, tp) for tp in starts}
            consumer.assign([tp for tp in starts if tp.offset >= 0])
            idle = time.monotonic()
            while time.monotonic() - idle < 2:
                msgs = consumer.consume(5000, 0.2)
                if msgs:
                    idle = time.monotonic()
                for m in msgs:
                    value = m.value()
                    if m.error() or value is None:
                        continue
                    r = serde.decode(topic, value)
                    at = r["event"]["occurred_at"] if key == "identified" else r["as_of"]
                    if t0_ms <= at <= t1_ms and at in times:
                        out[key].append(m.timestamp()[1] - at)
                done = consumer.position([TopicPartition(name, p) for p in ends])
                if all(tp.offset >= ends[tp.partition] - 1 for tp in done):
                    break
            consumer.unassign()
    finally:
        consumer.close()
    return {k: {"n": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99)} for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bootstrap", help="use this broker instead of a private one")
    parser.add_argument("--customers", type=int, default=10_000, help="simulated population")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--start-rate", type=float, default=500.0, help="events/s to start at")
    parser.add_argument("--max-rate", type=float, default=16_000.0, help="stop doubling here")
    parser.add_argument("--step-seconds", type=float, default=20.0)
    parser.add_argument(
        "--max-lag-seconds",
        type=float,
        default=5.0,
        help="'keeps up': lag under this many seconds of input at a step's end",
    )
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument(
        "--api-latency",
        type=float,
        default=0.05,
        help="seconds the local CRM/email receiver takes per request",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="seconds for the rate search (the rest of the run is setup, "
        "the latency phase and the state read)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="instances of each scalable service (segmenter, dispatcher), one group each",
    )
    args = parser.parse_args()

    started = time.monotonic()
    say(f"[1/6] broker: {'at ' + args.bootstrap if args.bootstrap else 'starting a private one'}")
    bootstrap, broker = private_broker(args.bootstrap)
    sup: Supervisor | None = None
    lag: LagMonitor | None = None
    tail: Tail | None = None
    tail_stopped = False
    finished = False
    playbooks = playbooks_without_quiet_hours()
    logs = Path(tempfile.mkdtemp(prefix="segflow-bench-e2e-logs-"))
    try:
        settings = isolated_settings(bootstrap, "e2e")
        port = free_port()
        sup = Supervisor(logs, env={"PYTHONPATH": str(ROOT)})
        sup.add(
            "receiver",
            [
                sys.executable,
                "-m",
                "segflow.receiver",
                "--port",
                str(port),
                "--latency",
                str(args.api_latency),
            ],
        )
        env = service_env(settings, f"http://127.0.0.1:{port}", playbooks)
        for name in SERVICES:
            sup.add_service(name, env={**env, "SEGFLOW_INSTANCE_ID": "0"})
            for n in range(1, args.replicas if name in SCALABLE else 1):
                sup.add(
                    f"{name}-{n}",
                    [sys.executable, "-m", f"services.{name}"],
                    {**env, "SEGFLOW_INSTANCE_ID": str(n)},
                )
        sup.start_all()
        wait_receiver(port)
        say(
            f"[2/6] services started: {', '.join(SERVICES)} + receiver (logs in {logs}); "
            f"topics under {settings.topic_prefix!r}"
        )
        feeder = Feeder(settings, args.customers, args.seed)
        lag = LagMonitor(settings)
        tail = Tail(settings)
        feeder.run(200, 2.0)  # warm up: every service joins its group and commits once
        if not lag.wait_drained(120):
            say("      (services did not catch up with the warm-up in 120 s; see their logs)")
        lag.start()
        pids = {**sup.pids(), "broker (java)": broker.pid() if broker is not None else None}
        cpu0 = {name: proc_numbers(pid)["cpu_s"] for name, pid in pids.items()}
        done0 = {name: done for name, (_, done) in lag.sample().items()}
        events0 = feeder.produced
        measured_from = time.monotonic()
        say(
            f"[3/6] rate search: {args.step_seconds:.0f} s per step, 'keeps up' = lag under "
            f"{args.max_lag_seconds:.0f} s of input at the end and not growing"
        )
        steps: list[Step] = []
        rate = args.start_rate
        good: Step | None = None
        bad: Step | None = None
        search_end = time.monotonic() + args.budget
        while rate <= args.max_rate and time.monotonic() + args.step_seconds < search_end:
            step = run_step(feeder, lag, rate, args.step_seconds, args.max_lag_seconds)
            steps.append(step)
            show_step(step)
            for name in sup.check():
                say(f"      ({name} exited and was restarted)")
            if step.ok:
                good = step if good is None or step.rate > good.rate else good
            else:
                bad = step if bad is None or step.rate < bad.rate else bad
                if not lag.wait_drained(45):
                    say("      (backlog not drained in 45 s)")
            if bad is not None and good is not None:
                if bad.rate / good.rate <= 1.3:
                    break
                rate = (good.rate + bad.rate) / 2
            elif bad is not None:
                rate = bad.rate / 2
                if rate < 50:
                    break
            else:
                rate *= 2
        sustained = good.rate if good is not None else None
        say(
            f"      sustainable: {sustained:,.0f} events/s"
            if sustained
            else "      no rate tried kept up"
        )

        lat_rate = (sustained or args.start_rate) / 2
        if not lag.wait_drained(45):
            say("      (pipeline still behind before the latency phase)")
        say(f"[4/6] latency at {lat_rate:,.0f} events/s for {args.latency_seconds:.0f} s")
        t0_ms = int(time.time() * 1000)
        n, took, times = feeder.run(lat_rate, args.latency_seconds)
        t1_ms = int(time.time() * 1000)
        drained = lag.wait_drained(45)
        time.sleep(3)  # the dispatcher calls the API on its next ticks after committing
        lat = latencies(tail, set(times), t0_ms, t1_ms)
        lat["stages"] = stages(settings, set(times), t0_ms, t1_ms)
        lat["rate"] = lat_rate
        lat["drained"] = drained

        say("[5/6] memory and CPU per process")
        procs = {name: proc_numbers(pid) for name, pid in pids.items()}
        done1 = {name: done for name, (_, done) in lag.sample().items()}
        events = feeder.produced - events0
        for name, p in procs.items():  # CPU per input record the service committed
            cpu, before = p["cpu_s"], cpu0.get(name)
            records = done1.get(name, 0) - done0.get(name, 0)
            p["records"] = records if name in done1 else None
            p["cpu_us_per_record"] = (
                None
                if cpu is None or before is None or name not in done1 or records <= 0
                else round((cpu - before) * 1e6 / records, 1)
            )
        for name, p in procs.items():  # CPU per event since the warm-up (idle ticks included)
            cpu, before = p["cpu_s"], cpu0.get(name)
            p["cpu_ms_per_event"] = (
                None
                if cpu is None or before is None or not events
                else round((cpu - before) * 1000 / events, 3)
            )
        busy = sum(
            (p["cpu_s"] or 0.0) - (cpu0.get(n) or 0.0) for n, p in procs.items() if p["cpu_s"]
        )
        cores_used = busy / (time.monotonic() - measured_from)
        restarts = {c.name: c.restarts for c in sup.children.values() if c.restarts}
        rstats = receiver_stats(port)
        say("[6/6] state per customer (reading the changelog topics)")
        lag.stop()
        lag = None
        tail.stop()
        tail_stopped = True
        sizes = state_sizes(settings)
        customers = sizes.get("identity.state (graph)", {}).get("profiles", 0)
        disk = {}
        if broker is not None:
            disk = {t.suffix: log_bytes(broker.data_dir, t.name(settings)) for t in STATE_TOPICS}
        total_state = sum(v["bytes"] for v in sizes.values())
        graph_state = total_state - sizes.get("identity.state (dedup window)", {}).get("bytes", 0)
        summary = {
            "bench": "e2e",
            "customers_simulated": args.customers,
            "customers_identified": customers,
            "events_produced": feeder.produced,
            "sustained_events_per_s": sustained,
            "target_events_per_s": TARGET_RATE,
            "steps": [
                {
                    "rate": s.rate,
                    "produced_per_s": round(s.achieved),
                    "keeps_up": s.ok,
                    "lag_end": s.lag_end,
                    "lag_growth_per_s": {k: round(v) for k, v in s.lag_growth.items()},
                    "processed_per_s": {k: round(v) for k, v in s.processed.items()},
                }
                for s in steps
            ],
            "latency": lat,
            "target_p99_ms": TARGET_P99_MS,
            "processes": procs,
            "cores_used_by_segflow": round(cores_used, 2),
            "restarts": restarts,
            "receiver": rstats,
            "segment_changes_seen": len(tail.changes),
            "dispatch_results_seen": len(tail.results),
            "state": sizes,
            "state_bytes_per_customer": round(total_state / customers) if customers else None,
            "state_bytes_per_customer_without_dedup": (
                round(graph_state / customers) if customers else None
            ),
            "state_log_bytes_on_disk_uncompacted": disk,
            "seconds": round(time.monotonic() - started),
            "cpus": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
        }
        report(summary)
        say(json.dumps(summary, separators=(",", ":")))
        finished = True
    finally:
        if lag is not None:
            lag.stop()
        if tail is not None and not tail_stopped:
            tail.stop()
        if sup is not None:
            sup.stop()
        if broker is not None:
            broker.stop()
            shutil.rmtree(broker.home.parent, ignore_errors=True)  # private_broker's temp dir
        shutil.rmtree(playbooks, ignore_errors=True)
        if finished:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            say(f"services' logs kept in {logs}")
    return 0


def report(s: dict[str, Any]) -> None:
    def ms(x: Any) -> str:
        return "n/a" if x is None else f"{x:,.0f} ms"

    say("=" * 78)
    sustained = s["sustained_events_per_s"]
    say(
        f"sustained through all four services: "
        f"{'none' if sustained is None else f'{sustained:,.0f}'} events/s "
        f"(target {s['target_events_per_s']:,}); {s['cpus']} CPUs, load average "
        f"{s['loadavg_1m']:.1f} at the end"
    )
    over = [st for st in s["steps"] if not st["keeps_up"]]
    if over:
        first = min(over, key=lambda st: st["rate"])
        say(
            f"  at {first['rate']:,.0f}/s offered (falls behind), committed records/s: "
            + ", ".join(f"{k} {v:,}" for k, v in first["processed_per_s"].items())
        )
    lat = s["latency"]
    say(f"latency at {lat['rate']:,.0f} events/s (event produced →):")
    rows = [
        ("segment change, record timestamp", lat["segment_change_record_ts"]),
        ("segment change, visible (read_committed)", lat["segment_change_visible"]),
        ("action dispatched (API call started)", lat["action_dispatched"]),
        ("action result recorded", lat["action_result_record_ts"]),
    ]
    say(f"  {'':42} {'n':>7} {'p50':>10} {'p99':>10} {'max':>10}")
    for label, row in rows:
        say(
            f"  {label:42} {row['n']:>7,} {ms(row['p50_ms']):>10} {ms(row['p99_ms']):>10} "
            f"{ms(row['max_ms']):>10}"
        )
    st = lat["stages"]
    say(
        f"  stages (record timestamps): identified p50 {ms(st['identified']['p50_ms'])} p99 "
        f"{ms(st['identified']['p99_ms'])}; scored p50 {ms(st['scored']['p50_ms'])} p99 "
        f"{ms(st['scored']['p99_ms'])} (n {st['scored']['n']:,})"
    )
    say(
        f"  (target p99 to segment change: {s['target_p99_ms']:,} ms"
        + ("" if lat["drained"] else "; pipeline not drained after the phase")
        + ")"
    )
    say(
        f"  {'process':16} {'peak RSS':>10} {'CPU s':>8} {'CPU ms/event':>13} "
        f"{'records in':>11} {'CPU us/record':>14}"
    )
    for name, p in s["processes"].items():
        rss = "n/a" if p["peak_rss_mb"] is None else f"{p['peak_rss_mb']:,.0f} MB"
        cpu = "n/a" if p["cpu_s"] is None else f"{p['cpu_s']:,.1f}"
        per = "n/a" if p["cpu_ms_per_event"] is None else f"{p['cpu_ms_per_event']:.3f}"
        recs = "" if p.get("records") is None else f"{p['records']:,}"
        per_rec = "" if p.get("cpu_us_per_record") is None else f"{p['cpu_us_per_record']:,.0f}"
        say(f"  {name:16} {rss:>10} {cpu:>8} {per:>13} {recs:>11} {per_rec:>14}")
    say(
        f"  (CPU since the warm-up, idle ticks included, so not linear in the rate; these "
        f"processes used {s['cores_used_by_segflow']:.2f} of {s['cpus']} cores on average)"
    )
    if s["restarts"]:
        say(f"  restarted during the run: {s['restarts']}")
    say(f"state (compacted: latest value per key) for {s['customers_identified']:,} customers:")
    for topic, v in s["state"].items():
        each = v["bytes"] / s["customers_identified"] if s["customers_identified"] else 0
        say(f"  {topic:30} {v['keys']:>9,} keys {v['bytes']:>12,} B  {each:>8,.0f} B/customer")
    say(
        f"  total {s['state_bytes_per_customer']:,} B/customer "
        f"({s['state_bytes_per_customer_without_dedup']:,} without identity's 7-day event "
        "de-duplication window, which grows with events, not customers)"
        if s["state_bytes_per_customer"] is not None
        else "  no customers identified"
    )
    r = s["receiver"]
    say(
        f"receiver: {r['effects']:,} actions took effect, {r['requests']:,} requests, "
        f"{r['replays']:,} replays; events produced {s['events_produced']:,}; "
        f"run {s['seconds']} s"
    )


if __name__ == "__main__":
    sys.exit(main())
