"""``segflow demo``: the whole product on the embedded default, in closed loop.

A real local Kafka broker, segflow's topics under a fresh prefix, the four services as
supervised processes, a local CRM/email/SMTP receiver, and the customer simulator: a week of
behaviour at a time goes to ``segflow.events``; the demo waits until every service has caught
up, feeds the week's dispatched actions back to the simulated customers (a re-engagement
email can rescue some of them), and moves on. The report compares what segflow did with the
simulator's ground truth, and ``demo-report.html`` draws segment sizes over time.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import os
import signal
import socket
import statistics
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from segflow.api import wiring
from segflow.receiver import Receiver, SMTPReceiver
from segflow.runtime.broker import LocalBroker, free_port
from segflow.runtime.kafka import ensure_topics, make_admin, wait_for_broker
from segflow.runtime.log import configure
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS, Topic
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery, NoiseConfig
from segflow.sim.sink import KafkaSink
from segflow.sim.truth import truth_records
from segflow.supervisor import Supervisor

DAY_MS = 86_400_000
WEEK_DAYS = 7


def say(text: str = "") -> None:
    print(text, flush=True)


class Tail:
    """Reads a topic incrementally from its beginning (read_committed, no consumer group)."""

    def __init__(self, settings: Settings, serde: Serde, topic: Topic) -> None:
        self.topic = topic
        self.serde = serde
        self.name = topic.name(settings)
        self.consumer = Consumer(
            {
                **settings.kafka_config(),
                "group.id": f"demo-tail-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        md = self.consumer.list_topics(self.name, timeout=10)
        self.partitions = sorted(md.topics[self.name].partitions)
        self.consumer.assign(
            [TopicPartition(self.name, p, OFFSET_BEGINNING) for p in self.partitions]
        )
        self.count = 0

    def poll(self, budget: float = 15.0) -> list[tuple[bytes | None, dict[str, Any]]]:
        """Everything up to the current end of the topic (or what ``budget`` seconds allow)."""
        out: list[tuple[bytes | None, dict[str, Any]]] = []
        ends = {}
        for p in self.partitions:
            high = _high(self.consumer, TopicPartition(self.name, p))
            ends[p] = high
        deadline = time.monotonic() + budget
        empty = 0
        while time.monotonic() < deadline:
            positions = self.consumer.position([TopicPartition(self.name, p) for p in ends])
            if all(
                tp.offset >= ends[tp.partition] or (tp.offset < 0 and ends[tp.partition] == 0)
                for tp in positions
            ):
                break
            msgs = self.consumer.consume(5000, 0.2)
            # The high watermark can include a transaction still open (a service's tick):
            # read_committed stops before it, so two empty polls in a row also end the read.
            empty = empty + 1 if not msgs else 0
            if empty >= 2:
                break
            for m in msgs:
                if m.error() or m.value() is None:
                    continue
                value = self.serde.decode(self.topic, m.value())
                value[RECORD_TS] = m.timestamp()[1]  # producer CreateTime, ms
                out.append((m.key(), value))
        self.count += len(out)
        return out

    def close(self) -> None:
        self.consumer.close()


RECORD_TS = "_record_ts"  # added to each record the demo reads: when it was produced


def _high(consumer: Consumer, tp: TopicPartition, timeout: float = 30.0) -> int:
    """High watermark, retried while a just-created partition has no leader yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=10)[1])
        except KafkaException as exc:
            if time.monotonic() > deadline or not (exc.args[0].retriable() or "LEADER" in str(exc)):
                raise
            time.sleep(0.2)


class LagProbe:
    """One admin client and one watermark consumer for many lag checks.

    Made once per wait (or per demo), not per check: the checks run every half second, and
    creating and closing a group consumer that often while the broker's coordinators are still
    loading (right after a fresh broker starts) is where librdkafka's main thread crashed
    (SIGSEGV at 0x58 in rdk:main; seen in the demo's first simulated week)."""

    def __init__(self, settings: Settings) -> None:
        self.admin = make_admin(settings)
        self.probe = Consumer(
            {**settings.kafka_config(), "group.id": f"demo-lag-{uuid.uuid4().hex[:6]}"}
        )
        self.parts: dict[str, list[TopicPartition]] = {}

    def lag(self, groups: dict[str, list[str]]) -> dict[str, int]:
        """Records each service's consumer group still has to read, per group."""
        out = {}
        for group, topics in groups.items():
            parts = []
            for name in topics:
                if name not in self.parts:
                    md = self.admin.list_topics(name, timeout=10)
                    self.parts[name] = [TopicPartition(name, p) for p in md.topics[name].partitions]
                parts += self.parts[name]
            lagging = 0
            committed = {
                (tp.topic, tp.partition): tp.offset for tp in _committed(self.admin, group, parts)
            }
            for tp in parts:
                high = _high(self.probe, tp)
                done = committed.get((tp.topic, tp.partition), -1)
                behind = max(0, high - max(done, 0))
                # A transaction's commit marker takes the offset after its last record and is
                # never "consumed": one offset behind on a transactional topic is caught up.
                lagging += behind if behind > 1 else 0
            out[group] = lagging
        return out

    def close(self) -> None:
        self.probe.close()


def group_lag(settings: Settings, groups: dict[str, list[str]]) -> dict[str, int]:
    """Records each service's consumer group still has to read, per group (one-off check)."""
    admin = make_admin(settings)
    probe = Consumer({**settings.kafka_config(), "group.id": f"demo-lag-{uuid.uuid4().hex[:6]}"})
    try:
        out = {}
        for group, topics in groups.items():
            parts = []
            for name in topics:
                md = admin.list_topics(name, timeout=10)
                parts += [TopicPartition(name, p) for p in md.topics[name].partitions]
            lagging = 0
            committed = {
                (tp.topic, tp.partition): tp.offset for tp in _committed(admin, group, parts)
            }
            for tp in parts:
                high = _high(probe, tp)
                done = committed.get((tp.topic, tp.partition), -1)
                behind = max(0, high - max(done, 0))
                # A transaction's commit marker takes the offset after its last record and is
                # never "consumed": one offset behind on a transactional topic is caught up.
                lagging += behind if behind > 1 else 0
            out[group] = lagging
        return out
    finally:
        probe.close()


def _committed(admin: Any, group: str, parts: list[TopicPartition]) -> list[TopicPartition]:
    from confluent_kafka import ConsumerGroupTopicPartitions

    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, parts)])
    try:
        return list(futures[group].result(timeout=10).topic_partitions or [])
    except Exception:
        return []


@dataclass
class Observed:
    """What the demo read back from segflow's topics."""

    event_owner: dict[str, str] = field(default_factory=dict)  # event_id -> customer_id
    handle: dict[str, str] = field(default_factory=dict)  # customer_id -> an identifier
    merges: int = 0
    survivor: dict[str, str] = field(default_factory=dict)  # absorbed id -> survivor id

    def final_id(self, cid: str) -> str:
        """Follow merge chains (a → b, later b → c) to the surviving customer_id."""
        seen = 0
        while cid in self.survivor and seen < 100:
            cid = self.survivor[cid]
            seen += 1
        return cid

    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # latest per customer
    changes: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    dlq: Counter[str] = field(default_factory=Counter)
    # (customer_id, as_of) -> scored_at of the first score published for that event time
    scored_at: dict[tuple[str, int], int] = field(default_factory=dict)
    drain_seconds: list[float] = field(default_factory=list)  # per simulated week


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _metrics_ports(names: list[str], first: int | None, say: Any) -> dict[str, int]:
    """Consecutive /metrics ports from ``first`` (as ``segflow up`` gives them, so
    deploy/prometheus/prometheus-local.yml scrapes the demo too), or free ports when ``first``
    is None or one of them is taken (said, not fatal: the demo still runs)."""
    if first:
        wanted = {name: first + i for i, name in enumerate(names)}
        taken = [p for p in wanted.values() if not _port_free(p)]
        if not taken:
            return wanted
        say(f"      metrics ports {taken} are in use; the services get free ports instead")
    return {name: free_port() for name in names}


def run_demo(args: argparse.Namespace) -> int:
    from segflow.cli import available_services, external_bootstrap

    started = time.monotonic()
    configure("demo", level="ERROR", fmt="text")
    state_dir = Path(args.state_dir)
    broker: LocalBroker | None = None
    was_running = True
    prefix = f"demo-{time.strftime('%Y%m%d-%H%M%S')}."
    if external_bootstrap():
        settings = Settings(topic_prefix=prefix)
        say(f"[1/5] using the Kafka broker at {settings.bootstrap_servers}")
        wait_for_broker(settings)
    else:
        broker = LocalBroker(state_dir / "broker", port=args.port)
        was_running = broker.pid() is not None
        say(f"[1/5] starting a local Apache Kafka broker (KRaft) on {broker.bootstrap} ...")
        broker.start()
        settings = Settings(bootstrap_servers=broker.bootstrap, topic_prefix=prefix)
        say(f"      ready; data in {broker.data_dir}, log in {broker.log_file}")
    receiver = Receiver().start()
    smtp = SMTPReceiver().start()
    sup: Supervisor | None = None
    try:
        _drop_old_demo_topics(settings, prefix)
        ensure_topics(settings)
        say(f"[2/5] topics created under the prefix {prefix!r}")
        names = available_services()
        sup = Supervisor(
            state_dir / "logs" / prefix.rstrip("."),
            env=_service_env(settings, prefix, receiver, smtp),
        )
        metrics_ports = _metrics_ports(names, getattr(args, "metrics_port", None), say)
        api_ports = {name: free_port() for name in names}  # each service's query endpoint
        for name in names:
            port_env = wiring.service_env(name, api_ports[name])
            metrics_env = {"SEGFLOW_METRICS_PORT": str(metrics_ports[name])}
            sup.add_service(name, env={**metrics_env, **port_env})
        api_token, generated = wiring.demo_token()
        api_url = wiring.add_gateway(sup, api_ports, free_port(), api_token)
        sup.start_all()
        say(f"[3/5] services running: {', '.join(names)} (logs in {sup.log_dir})")
        say(
            "      metrics: "
            + ", ".join(f"{n} http://127.0.0.1:{metrics_ports[n]}/metrics" for n in names)
        )
        say(wiring.announce(api_url, api_token, generated))
        sim, observed, produced = _simulate(settings, args, sup, names)
        say("[5/5] report")
        report, summary = _report(
            sim, observed, produced, receiver, smtp, time.monotonic() - started
        )
        summary["api"] = wiring.demo_tour(api_url, api_token, say)
        report = report.replace("</body>", _kpi_html(summary["api"].get("kpis", [])) + "</body>")
        out = state_dir / "demo-report.html"
        out.write_text(report)
        (state_dir / "demo-summary.json").write_text(json.dumps(summary, indent=2))
        say(f"      HTML report with segment sizes over time: {out}")
        wiring.explore(api_url, api_token, generated, say)  # the console, while the stack runs
    finally:
        if sup is not None:
            sup.stop()
        receiver.stop()
        smtp.stop()
        if broker is not None and not args.keep_broker and not was_running:
            broker.stop()
            say("local broker stopped (use --keep-broker to leave it running)")
    return 0


def _drop_old_demo_topics(settings: Settings, keep_prefix: str) -> None:
    admin = make_admin(settings)
    old = [
        t
        for t in admin.list_topics(timeout=10).topics
        if t.startswith("demo-") and not t.startswith(keep_prefix)
    ]
    if old:
        for future in admin.delete_topics(old, operation_timeout=30).values():
            with contextlib.suppress(Exception):  # already gone
                future.result(timeout=30)


def _service_env(
    settings: Settings, prefix: str, receiver: Receiver, smtp: SMTPReceiver
) -> dict[str, str]:
    return {
        "SEGFLOW_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SEGFLOW_TOPIC_PREFIX": prefix,
        "SEGFLOW_LOG_LEVEL": "WARNING",
        "SEGFLOW_DISPATCHER_CLOCK": "event",
        "SEGFLOW_DISPATCHER_GROUP_ID": prefix + "dispatcher",
        "SEGFLOW_DISPATCHER_CRM_BASE_URL": receiver.url,
        "SEGFLOW_DISPATCHER_EMAIL_BASE_URL": receiver.url,
        "SEGFLOW_DISPATCHER_WEBHOOK_URL": receiver.url + "/webhook",
        "SEGFLOW_DISPATCHER_SMTP_PORT": str(smtp.port),
        "SEGFLOW_DISPATCHER_CONTACT_PATTERN": "{customer_id}@example.invalid",
        "SEGFLOW_SCORER_GROUP_ID": prefix + "scorer",
        # The demo delivers a simulated week in one burst after a pause; the scorer's clock
        # (slowest live partition) can then run a week ahead of a partition it has not read
        # yet, so allow more than a week of lateness here (see the scorer's README).
        "SEGFLOW_SCORER_ALLOWED_LATENESS_HOURS": "192",
    }


def _groups(settings: Settings, names: list[str]) -> dict[str, list[str]]:
    p = settings.topic_prefix
    inputs = {
        "identity": (p + "identity", [TOPICS.events]),
        "scorer": (p + "scorer", [TOPICS.identified, TOPICS.merges]),
        "segmenter": (p + "segmenter", [TOPICS.scores, TOPICS.merges]),
        "dispatcher": (p + "dispatcher", [TOPICS.segment_changes, TOPICS.identified]),
    }
    return {inputs[n][0]: [t.name(settings) for t in inputs[n][1]] for n in names if n in inputs}


def _simulate(
    settings: Settings, args: argparse.Namespace, sup: Supervisor, names: list[str]
) -> tuple[Simulation, Observed, dict[str, Any]]:
    serde = Serde.from_settings(settings)
    noise = NoiseConfig(
        duplicates=0.01, late=0.01, out_of_order=0.02, malformed=0.001, blocked=0.01
    )
    config = SimConfig(customers=args.customers, days=args.days, seed=args.seed, noise=noise)
    say(
        f"[4/5] simulating {config.customers:,} customers over {config.days} days (seed "
        f"{config.seed}), a week at a time, in closed loop with the dispatcher ..."
    )
    sim = Simulation(config)
    sink = KafkaSink.from_settings(settings)
    tails = {
        t.key_name: Tail(settings, serde, t)
        for t in (
            TOPICS.identified,
            TOPICS.merges,
            TOPICS.scores,
            TOPICS.segment_changes,
            TOPICS.dispatch_results,
            TOPICS.dlq,
        )
    }
    obs = Observed()
    truth_of: dict[str, str] = {}
    produced: dict[str, Any] = {
        "events": 0,
        "malformed": 0,
        "applied": 0,
        "rescued": 0,
        "timeline": [],
    }
    groups = _groups(settings, names)
    lags = LagProbe(settings)
    t0 = time.monotonic()
    week = 0
    try:
        while not (sim.finished and not sim.pending):
            items = sim.step(WEEK_DAYS)
            for item in items:
                if type(item) is Delivery:
                    truth_of[item.event["event_id"]] = item.customer
            sink.write(items)
            sink.producer.flush(30)
            week += 1
            if getattr(args, "chaos", False) and week <= len(names):
                victim = names[week - 1]
                pid = sup.pids().get(victim)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    say(f"      chaos: kill -9 {victim} (pid {pid}) mid-stream")
            flushed = time.monotonic()
            _wait_caught_up(settings, groups, sup, timeout=args.step_timeout, probe=lags)
            obs.drain_seconds.append(time.monotonic() - flushed)
            _read(tails, obs)
            for action in _new_actions(obs, produced):
                ident = obs.handle.get(action["customer_id"])
                if ident is None:
                    continue
                outcome = sim.apply_action(ident, action)
                produced["applied"] += outcome.applied
                produced["rescued"] += outcome.rescued
            sizes = _sizes(obs.changes)
            produced["timeline"].append((sim.day, dict(sizes)))
            named = [(seg, n) for seg, n in sizes.most_common() if not seg.startswith("Lifecycle:")]
            largest = ", ".join(f"{seg} {n}" for seg, n in named[:4] if n)
            say(
                f"      day {sim.day:>3}/{config.days}: {sink.events:,} events, "
                f"{len(obs.event_owner):,} identified "
                f"({len(set(obs.event_owner.values())):,} customer ids), "
                f"{tails['scores'].count:,} scores, {len(obs.changes):,} segment changes, "
                f"{sum(1 for r in obs.results if r['status'] == 'sent'):,} actions sent; "
                f"caught up {obs.drain_seconds[-1]:.1f}s after the week was produced "
                f"({time.monotonic() - t0:.0f}s)"
                + (f"\n        largest: {largest}" if largest else "")
            )
        stats = sink.close()
        _wait_caught_up(settings, groups, sup, timeout=args.step_timeout, probe=lags)
        _read(tails, obs)
    finally:
        for tail in tails.values():
            tail.close()
        lags.close()
    produced.update(
        events=stats.events,
        malformed=stats.malformed,
        seconds=time.monotonic() - t0,
        truth_of=truth_of,
    )
    return sim, obs, produced


def _wait_caught_up(
    settings: Settings,
    groups: dict[str, list[str]],
    sup: Supervisor,
    timeout: float,
    probe: LagProbe | None = None,
) -> None:
    own = probe is None
    lags = probe or LagProbe(settings)
    try:
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline:
            for name in sup.check():
                say(f"      ({name} exited and was restarted; see its log)")
            lag = lags.lag(groups)
            quiet = quiet + 1 if sum(lag.values()) == 0 else 0
            if quiet >= 2:  # twice in a row: downstream outputs of the last batch are read too
                return
            time.sleep(0.5)
        say(f"      (pipeline still behind after {timeout:.0f}s: {lag}; carrying on)")
    finally:
        if own:
            lags.close()


def _read(tails: dict[str, Tail], obs: Observed) -> None:
    for _ in range(3):
        for _key, ev in tails["identified"].poll():
            cid = ev["customer_id"]
            e = ev["event"]
            obs.event_owner[e["event_id"]] = cid
            ident = e.get("user_id") or e.get("anonymous_id") or e.get("device_id")
            if ident and (cid not in obs.handle or e.get("user_id")):
                obs.handle[cid] = ident
        for _key, merge in tails["merges"].poll():
            obs.merges += 1
            for absorbed in merge["absorbed_ids"]:
                obs.survivor[absorbed] = merge["survivor_id"]
        for _key, score in tails["scores"].poll():
            obs.scores[score["customer_id"]] = score
            obs.scored_at.setdefault((score["customer_id"], score["as_of"]), score["scored_at"])
        obs.changes += [c for _k, c in tails["segment_changes"].poll()]
        obs.results += [r for _k, r in tails["dispatch_results"].poll()]
        for _key, letter in tails["dlq"].poll():
            obs.dlq[letter["reason"]] += 1


def _new_actions(obs: Observed, produced: dict[str, Any]) -> list[dict[str, Any]]:
    start = produced.get("actions_seen", 0)
    produced["actions_seen"] = len(obs.results)
    return [r for r in obs.results[start:] if r["status"] in ("sent", "holdout")]


def _sizes(changes: list[dict[str, Any]]) -> Counter[str]:
    members: dict[str, set[str]] = defaultdict(set)
    for c in changes:
        if c["transition"] in ("entered",):
            members[c["segment"]].add(c["customer_id"])
        elif c["transition"] in ("exited", "re_engaged"):
            members[c["segment"]].discard(c["customer_id"])
    return Counter({s: len(m) for s, m in members.items()})


# -- the report ----------------------------------------------------------------------------
def _pairwise(owner: dict[str, str], truth_of: dict[str, str]) -> tuple[float, float]:
    """Pairwise precision and recall of event → customer stitching against the truth."""
    cells: Counter[tuple[str, str]] = Counter()
    for event_id, cid in owner.items():
        true = truth_of.get(event_id)
        if true is not None:
            cells[(cid, true)] += 1

    def pairs(counts: Any) -> int:
        return sum(n * (n - 1) // 2 for n in counts)

    by_pred: Counter[str] = Counter()
    by_true: Counter[str] = Counter()
    for (cid, true), n in cells.items():
        by_pred[cid] += n
        by_true[true] += n
    tp = pairs(cells.values())
    pred, true_pairs = pairs(by_pred.values()), pairs(by_true.values())
    return (tp / pred if pred else 1.0), (tp / true_pairs if true_pairs else 1.0)


def _segment_quality(
    obs: Observed, produced: dict[str, Any], truth: list[dict[str, Any]], end_ms: int
) -> list[tuple[str, float | None, float | None, float | None, int]]:
    """Per segment: time-overlap precision and recall vs the truth, median onset → entered."""
    owner_votes: dict[str, Counter[str]] = defaultdict(Counter)
    for event_id, cid in obs.event_owner.items():
        true = produced["truth_of"].get(event_id)
        if true is not None:
            owner_votes[obs.final_id(cid)][true] += 1
    true_of_cid = {cid: votes.most_common(1)[0][0] for cid, votes in owner_votes.items()}
    # Stays per customer id first (a merged-away id and its survivor can both be in a segment
    # for a while), then united per true customer: one id's exit never closes another id's
    # stay, and overlapping stays are not counted twice.
    stays: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
    for c in sorted(obs.changes, key=lambda c: c["occurred_at"]):
        spans = stays[(c["customer_id"], c["segment"])]
        if c["transition"] == "entered":
            spans.append([c["occurred_at"], end_ms])
        elif c["transition"] in ("exited", "re_engaged") and spans and spans[-1][1] == end_ms:
            spans[-1][1] = c["occurred_at"]
    predicted: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
    for (cid, seg), spans in stays.items():
        true = true_of_cid.get(obs.final_id(cid))
        if true is not None:
            predicted[(true, seg)].extend(spans)
    for key, spans in predicted.items():
        spans.sort()
        united: list[list[int]] = []
        for b, e in spans:
            if united and b <= united[-1][1]:
                united[-1][1] = max(united[-1][1], e)
            elif e > b:
                united.append([b, e])
        predicted[key] = united
    actual: dict[tuple[str, str], list[list[int]]] = {}
    for t in truth:
        for seg, spans in t["segments"].items():
            actual[(t["customer"], seg)] = [[s, e if e is not None else end_ms] for s, e in spans]
    rows = []
    for seg in sorted({s for (_c, s) in actual}):
        overlap = pred_total = true_total = 0
        delays: list[float] = []
        for (cust, s), spans in actual.items():
            if s != seg:
                continue
            mine = predicted.get((cust, seg), [])
            true_total += sum(e - b for b, e in spans)
            for b, e in spans:
                for pb, pe in mine:
                    overlap += max(0, min(e, pe) - max(b, pb))
                entered = [pb for pb, pe in mine if pe > b and pb < e + 14 * DAY_MS]
                if entered:
                    delays.append(max(0, min(entered) - b) / DAY_MS)
        for (_cust, s), mine in predicted.items():
            if s == seg:
                pred_total += sum(e - b for b, e in mine)
        precision = overlap / pred_total if pred_total else None
        recall = overlap / true_total if true_total else None
        median = statistics.median(delays) if delays else None
        rows.append((seg, precision, recall, median, sum(1 for k in predicted if k[1] == seg)))
    return rows


def _auc(pairs: list[tuple[float, bool]]) -> float | None:
    pos = [p for p, y in pairs if y]
    neg = [p for p, y in pairs if not y]
    if not pos or not neg:
        return None
    ranked = sorted(pairs, key=lambda t: t[0])
    rank_sum = 0.0
    i = 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        avg = (i + j + 1) / 2
        rank_sum += avg * sum(1 for k in range(i, j) if ranked[k][1])
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "  n/a"
    return f"{x * 100:5.1f}%" if pct else f"{x:5.1f}"


def _report(
    sim: Simulation,
    obs: Observed,
    produced: dict[str, Any],
    receiver: Receiver,
    smtp: SMTPReceiver,
    total: float,
) -> tuple[str, dict[str, Any]]:
    truth = truth_records(sim)
    end_ms = sim.config.end_ms
    summary: dict[str, Any] = {"dlq": dict(obs.dlq), "malformed": produced["malformed"]}
    personas = Counter(t["persona"] for t in truth)
    churned = {t["customer"] for t in truth if t["churn_at"] is not None}
    say("=" * 72)
    say(
        f"customers: {len(truth):,} ({len(churned):,} churn during the span); "
        + ", ".join(f"{p} {n}" for p, n in personas.most_common())
    )
    say(
        f"events: {produced['events']:,} produced (+{produced['malformed']:,} malformed) in "
        f"{produced['seconds']:.0f}s = {produced['events'] / produced['seconds']:,.0f} events/s "
        "through the whole pipeline, closed loop"
    )
    say("dead-lettered: " + (", ".join(f"{r} {n}" for r, n in obs.dlq.most_common()) or "none"))
    final_owner = {e: obs.final_id(c) for e, c in obs.event_owner.items()}
    precision, recall = _pairwise(final_owner, produced["truth_of"])
    summary.update(precision=precision, recall=recall, identified=len(obs.event_owner))
    say(
        f"identity: {len(set(final_owner.values())):,} customer ids for {len(truth):,} "
        f"true customers; {obs.merges:,} merges; pairwise precision {precision:.4f}, "
        f"recall {recall:.4f}"
    )
    auc = None
    if obs.scores:
        true_of: dict[str, str | None] = {}
        for event_id, cid in obs.event_owner.items():
            true_of.setdefault(cid, produced["truth_of"].get(event_id))
        auc = _auc(
            [
                (s["churn_probability"], true_of.get(cid) in churned)
                for cid, s in obs.scores.items()
                if true_of.get(cid)
            ]
        )
        say(
            f"scores: {len(obs.scores):,} customers scored; final churn probability vs true "
            f"churn: AUC {_fmt(auc, pct=False) if auc is None else f'{auc:.3f}'}"
        )
    say("segments (time overlap with the ground truth; median days from true onset to entered):")
    say(f"  {'segment':26} {'members':>7} {'precision':>9} {'recall':>7} {'onset→entered':>13}")
    final = _sizes(obs.changes)
    for seg, p, r, med, _n in _segment_quality(obs, produced, truth, end_ms):
        say(
            f"  {seg:26} {final.get(seg, 0):7,} {_fmt(p):>9} {_fmt(r):>7} "
            f"{_fmt(med, pct=False) + ' d' if med is not None else 'n/a':>13}"
        )
    other = sorted(s for s in final if not any(s == t for t in truth[0]["segments"]))
    if other:
        say("  also: " + ", ".join(f"{s} {final[s]}" for s in other))
    transitions = Counter(c["transition"] for c in obs.changes)
    say("changes: " + ", ".join(f"{k} {v:,}" for k, v in transitions.most_common()))
    status = Counter(r["status"] for r in obs.results)
    say(
        "dispatch decisions: "
        + (", ".join(f"{k} {v:,}" for k, v in status.most_common()) or "none")
    )
    sent = [r for r in obs.results if r["status"] == "sent"]
    by_channel = Counter((r["channel"], r.get("variant") or "-") for r in sent)
    for (channel, variant), n in sorted(by_channel.items()):
        say(f"  sent {channel:20} variant {variant:8} {n:6,}")
    holdout_keys = {r["idempotency_key"] for r in obs.results if r["status"] == "holdout"}
    effects = set(receiver.effects()) | {m["key"] for m in smtp.messages}
    sent_keys = Counter(r["idempotency_key"] for r in sent)
    twice = sum(1 for n in sent_keys.values() if n > 1)
    missing = set(sent_keys) - effects
    say(
        f"receiver: {len(effects):,} distinct actions took effect ({len(smtp.unique()):,} by "
        f"SMTP); {receiver.replays():,} repeated requests absorbed by idempotency keys; "
        f"'sent' results without an effect: {len(missing)}; keys reported sent twice: {twice}; "
        f"holdout contacted: {len(holdout_keys & effects)}"
    )
    summary.update(
        sent=len(sent_keys),
        effects=len(effects),
        sent_twice=twice,
        missing=len(missing),
        holdout=len(holdout_keys),
        holdout_contacted=len(holdout_keys & effects),
    )
    undecided = _undecided(obs)
    say(
        f"every triggering segment change decided: {len(undecided) == 0} "
        f"({len(undecided)} of the changes a playbook triggers on have no dispatch result)"
    )
    summary["undecided"] = len(undecided)
    latency = _latencies(obs)
    for line in _latency_lines(latency):
        say(line)
    summary["latency"] = latency
    say(
        f"closed loop: {produced['applied']:,} actions reached simulated customers, "
        f"{produced['rescued']:,} customers rescued by treatment"
    )
    say(f"total {total:.0f}s")
    summary.update(auc=auc, rescued=produced["rescued"], applied=produced["applied"])
    return _html(produced["timeline"], obs, precision, recall, auc), summary


def _undecided(obs: Observed) -> list[dict[str, Any]]:
    """Changes a default playbook triggers on (its segment, one of its transitions) that got no
    DispatchResult of that playbook for their stay: an action decided late is still decided;
    one never decided is lost."""
    from services.dispatcher.playbooks import DEFAULT_DIR, load_book

    book = load_book([DEFAULT_DIR])
    decided = {(r["entry_id"], r["playbook"]) for r in obs.results}
    return [
        c
        for c in obs.changes
        for pb in book.for_segment(c["segment"])
        if c["transition"] in pb.triggers and (c["entry_id"], pb.name) not in decided
    ]


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)

    def pick(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"n": len(values), "p50": pick(0.5), "p99": pick(0.99), "max": values[-1]}


def _latencies(obs: Observed) -> dict[str, dict[str, float] | None]:
    """Processing-time latencies between the stages the demo can join, in seconds.

    * score → segment change: a change caused by a score carries the score's ``as_of`` as its
      ``occurred_at``; ``emitted_at`` minus that score's ``scored_at`` (timer-driven changes
      have no score and are left out);
    * segment change → dispatch decision: when the first DispatchResult of a stay
      (``entry_id``) was produced minus the ``entered`` change's ``emitted_at`` (a delayed step
      is decided at once and reported ``scheduled``, so this is the dispatcher's reaction, not
      the playbook's delay; ``decided_at`` itself is pipeline time, not processing time);
    * drain: from the last event of a simulated week produced to every service caught up.

    The demo produces a simulated week at once, so these include queueing behind that burst;
    event → segment change at a steady rate is ``bench/bench_e2e.py``'s measurement.
    """
    to_change = [
        (c["emitted_at"] - obs.scored_at[key]) / 1000
        for c in obs.changes
        if (key := (c["customer_id"], c["occurred_at"])) in obs.scored_at
    ]
    entered = {c["entry_id"]: c["emitted_at"] for c in obs.changes if c["transition"] == "entered"}
    first: dict[str, int] = {}
    for r in obs.results:
        if r["entry_id"] in entered:
            t = r[RECORD_TS]
            first[r["entry_id"]] = min(first.get(r["entry_id"], t), t)
    to_decision = [(t - entered[e]) / 1000 for e, t in first.items()]
    return {
        "score_to_change_s": _quantiles(to_change),
        "change_to_decision_s": _quantiles(to_decision),
        "week_drain_s": _quantiles(obs.drain_seconds),
    }


def _latency_lines(latency: dict[str, dict[str, float] | None]) -> list[str]:
    names = {
        "score_to_change_s": "score → segment change",
        "change_to_decision_s": "segment change → dispatch decision",
        "week_drain_s": "simulated week produced → all caught up",
    }
    out = ["latency (processing time, seconds; each simulated week is produced at once):"]
    for key, label in names.items():
        q = latency.get(key)
        out.append(
            f"  {label:40} "
            + (
                f"p50 {q['p50']:.2f}  p99 {q['p99']:.2f}  max {q['max']:.2f}  (n={q['n']:,})"
                if q
                else "n/a"
            )
        )
    return out


def _kpi_html(kpis: list[dict[str, Any]]) -> str:
    """The API's KPI rows as an HTML table (uplift = conversion minus the holdout's)."""
    if not kpis:
        return "<h2>Campaign KPIs</h2><p>No KPI rows (no actions decided).</p>"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    rows = []
    for k in kpis:
        ci = k.get("uplift_ci")
        uplift = (
            f"{100 * k['uplift']:+.1f} pts [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
            if k.get("uplift") is not None and ci
            else "-"
        )
        cells = [
            k["segment"],
            k["playbook"],
            k["variant"],
            f"{k.get('assigned', 0):,}",
            f"{k.get('sent', 0):,}",
            pct(k.get("conversion_rate")),
            pct(k.get("churn_rate")),
            uplift,
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "segment",
            "playbook",
            "variant",
            "assigned",
            "sent",
            "conversion",
            "churn",
            "uplift vs holdout [95% CI]",
        )
    )
    return (
        "<h2>Campaign KPIs</h2><p>Conversion and churn per assigned customer (intention to "
        "treat); uplift is conversion minus the playbook's holdout, with its 95% interval.</p>"
        f"<table border=1 cellpadding=3 style='border-collapse:collapse;font-size:12px'>"
        f"<tr>{head}</tr>{''.join(rows)}</table>"
    )


def _html(
    timeline: list[tuple[int, dict[str, int]]],
    obs: Observed,
    precision: float,
    recall: float,
    auc: float | None,
) -> str:
    segments = sorted({s for _d, sizes in timeline for s in sizes})
    width, height = 760, 320
    top = max([1] + [n for _d, sizes in timeline for n in sizes.values()])
    days = max([1] + [d for d, _s in timeline])
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    lines = []
    for i, seg in enumerate(segments):
        pts = " ".join(
            f"{40 + d / days * (width - 200):.1f},"
            f"{height - 30 - sizes.get(seg, 0) / top * (height - 50):.1f}"
            for d, sizes in timeline
        )
        color = palette[i % len(palette)]
        lines.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        lines.append(
            f'<text x="{width - 150}" y="{20 + 14 * i}" fill="{color}" '
            f'font-size="11">{html.escape(seg)}</text>'
        )
    svg = (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f'<line x1="40" y1="{height - 30}" x2="{width - 160}" y2="{height - 30}" '
        f'stroke="#999"/><line x1="40" y1="10" x2="40" y2="{height - 30}" stroke="#999"/>'
        f'<text x="42" y="14" font-size="11">{top} members</text>'
        f'<text x="{width - 200}" y="{height - 12}" font-size="11">day {days}</text>'
        + "".join(lines)
        + "</svg>"
    )
    status = Counter(r["status"] for r in obs.results)
    return (
        "<!doctype html><meta charset=utf-8><title>segflow demo report</title>"
        "<body style='font-family:sans-serif;max-width:800px;margin:2em auto'>"
        "<h1>segflow demo report</h1><h2>Segment sizes over simulated time</h2>"
        + svg
        + f"<p>Identity stitching: pairwise precision {precision:.4f}, recall {recall:.4f}.</p>"
        + (f"<p>Churn AUC (final score vs true churn): {auc:.3f}</p>" if auc is not None else "")
        + "<p>Dispatch decisions: "
        + html.escape(json.dumps(dict(status)))
        + "</p><pre>"
        + html.escape("\n".join(_latency_lines(_latencies(obs))))
        + "</pre></body>"
    )
