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
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from bench.e2e_parts import (  # noqa: E402
    STATE_TOPICS,
    Feeder,
    LagMonitor,
    Step,
    Tail,
    log_bytes,
    pct,
    proc_numbers,
    run_step,
    say,
    show_step,
    state_sizes,
)
from segflow import stack  # noqa: E402
from segflow.cli import replica_counts  # noqa: E402
from segflow.demo import _high  # noqa: E402
from segflow.runtime.broker import free_port  # noqa: E402
from segflow.runtime.serde import Serde  # noqa: E402
from segflow.runtime.settings import Settings  # noqa: E402
from segflow.runtime.testing import isolated_settings, private_broker  # noqa: E402
from segflow.runtime.topics import TOPICS  # noqa: E402
from segflow.supervisor import SERVICES, Supervisor  # noqa: E402
from services.dispatcher.playbooks import DEFAULT_DIR  # noqa: E402
from services.identity.app import MERGED_EVENT  # noqa: E402

TARGET_RATE = 10_000
TARGET_P99_MS = 1000


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


def service_env(
    settings: Settings, receiver_url: str, playbooks: Path, log_level: str = "WARNING"
) -> dict[str, str]:
    p = settings.topic_prefix
    return {
        "SEGFLOW_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SEGFLOW_TOPIC_PREFIX": p,
        "SEGFLOW_LOG_LEVEL": log_level,
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
                    if key == "identified" and r["event"]["event_type"] == MERGED_EVENT:
                        continue  # identity's merge mark, not an event
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
        help="instances of each scalable service (scorer, segmenter, dispatcher), one group "
        "each; identity as N front-stage processes plus the graph writer, active and standby "
        "(as `segflow up --replicas N`)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="the services' SEGFLOW_LOG_LEVEL (INFO shows holds, releases, rebalances; the "
        "logs stay in the folder step 2 names)",
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
        env = service_env(settings, f"http://127.0.0.1:{port}", playbooks, args.log_level)
        # the processes `segflow up --replicas N` runs (identity split into N fronts and
        # the graph writer, active and standby, when N > 1)
        procs = stack.processes(replica_counts(list(SERVICES), args.replicas, []))
        for proc in procs:
            sup.add(proc.name, [sys.executable, "-m", proc.module], {**env, **proc.env})
        sup.start_all()
        wait_receiver(port)
        say(
            f"[2/6] services started: {', '.join(p.name for p in procs)} + receiver "
            f"(logs in {logs}); topics under {settings.topic_prefix!r}"
        )
        feeder = Feeder(settings, args.customers, args.seed)
        lag = LagMonitor(
            settings,
            groups={
                p.name: (p.group(settings), p.input_names(settings))
                for p in procs
                if p.instance == 0
            },
        )
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
        graph_state = (
            total_state
            - sizes.get("identity.state (dedup window)", {}).get("bytes", 0)
            - sizes.get(TOPICS.identity_dedup.suffix, {}).get("bytes", 0)
        )
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
