"""The measuring parts of bench/bench_e2e.py: the feeder, consumer lag, tails of the output
topics, per-process numbers (RSS, CPU, state sizes) and the rate steps (moved out of it
unchanged; run ``bench/bench_e2e.py``)."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # noqa: E402

from segflow import stack  # noqa: E402
from segflow.demo import _high  # noqa: E402
from segflow.runtime.lag import LagProbe  # noqa: E402
from segflow.runtime.serde import Serde  # noqa: E402
from segflow.runtime.settings import Settings  # noqa: E402
from segflow.runtime.topics import TOPICS, Topic  # noqa: E402
from segflow.sim.generator import SimConfig, Simulation  # noqa: E402
from segflow.sim.noise import Delivery  # noqa: E402
from segflow.sim.sink import KafkaSink, Pacer, retime  # noqa: E402
from segflow.supervisor import SERVICES  # noqa: E402

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
    TOPICS.identity_dedup,  # the split identity's front stage (bench_e2e --replicas N > 1)
    TOPICS.scorer_state,
    TOPICS.scorer_model,
    TOPICS.segmenter_state,
    TOPICS.dispatcher_state,
)


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

    def __init__(
        self,
        settings: Settings,
        every: float = 2.0,
        groups: dict[str, tuple[str, list[str]]] | None = None,
    ) -> None:
        # One probe (segflow.runtime.lag: consumers of each group, never the Admin API's
        # ListConsumerGroupOffsets, which crashes librdkafka while coordinators load), used by
        # the sampling thread and by wait_drained: one thread at a time, under a lock.
        self.probe = LagProbe(settings)
        # name -> (consumer group, its input topics); default: one group per service
        self.groups = groups or {
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
                # records a read_committed reader can still read: transaction markers and
                # aborted records (a kill -9 inside a transaction) are not lag
                per_partition = self.probe.behind(group, parts).values()
                behind = sum(left for left, _ in per_partition)
                done = sum(max(c, 0) for _, c in per_partition)
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
    names = list(lag.groups)
    growth = {svc: slope([(t, s[svc][0]) for t, s in samples if t >= half]) for svc in names}
    processed = {}
    if len(samples) >= 2:
        (ta, a), (tb, b) = samples[0], samples[-1]
        processed = {svc: (b[svc][1] - a[svc][1]) / (tb - ta) for svc in names}
    lag_end = {svc: end.get(svc, (0, 0))[0] for svc in names}
    bound = max(1000.0, rate * max_lag_s)
    ok = (
        bool(samples)
        and n / took >= 0.9 * rate
        and all(lag_end[svc] <= bound for svc in names)
        and all(growth[svc] <= 0.05 * rate for svc in names)
    )
    return Step(rate, n, took, lag_end, growth, processed, ok)


def show_step(step: Step) -> None:
    lags = ", ".join(f"{s} {n:,} ({step.lag_growth[s]:+,.0f}/s)" for s, n in step.lag_end.items())
    proc = ", ".join(f"{s} {v:,.0f}/s" for s, v in step.processed.items())
    say(
        f"      {step.rate:>8,.0f}/s asked, {step.achieved:,.0f}/s produced: "
        f"{'keeps up' if step.ok else 'FALLS BEHIND'}; lag {lags}"
    )
    say(f"                processed (committed records/s): {proc}")
