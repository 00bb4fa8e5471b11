"""Scale-out numbers for the partitioned state of the segmenter, the scorer and the
dispatcher: changelog bytes per customer, and the time and memory to restore 1 M customers as
1 instance (4 partitions) or as one of 2 (2 partitions), which is what a restart or a
rebalance costs; and identity's (one instance: its graph is global), see below.

    .venv/bin/python bench/bench_scale.py [--customers 1000000] [--bootstrap HOST:PORT]
        [--services segmenter,scorer,dispatcher,identity] [--window-ids 8]

States are real. Segmenter: 2,000 template customers are evaluated by the segmenter's core
with the default definitions over 6 scores each (memberships, timers, the values the
definitions read), under 8-character ids. Scorer and dispatcher: the states their cores hold
at the end of ``bench/state_fields.py``'s in-process run (simulated customers through
identity, scorer, segmenter and the dispatcher's core with the default playbooks; 60 days),
under 18-character ids like identity's. The 1 M changelog records are those templates under
1 M distinct ids (the id is patched into the encoded bytes, so generating them costs no Avro
encoding). Each restore runs in a fresh process: the store's restore (read_committed, Avro
decode) plus the service's rebuild (segmenter: customers, timers, sizes, percentile columns;
scorer: its timers, forgotten and merged ids; dispatcher: decoded customers' due and retry
indexes), and its RSS growth (VmRSS after minus before). The machine's 1-minute load average
is printed next to every number. A private broker starts in a temporary folder unless
--bootstrap is given.

Identity (``--services identity``): its graph is one global table, restored whole by the
one-process service (and by the split roles' graph writer, active or standby), so it is
measured as 1 instance only. The graph is the profiles and identifier nodes of
``bench/state_fields.py``'s simulated customers (``p:`` and ``n:`` entries) under 1 M new
customer ids and new 24-hex-digit node hashes; the de-duplication window is
``--window-ids`` 8-byte hashes per customer (random) in chunks of 256 per input partition and
event-time hour over 7 days, as the one-process role writes them. The restore is the
service's: the graph store (Avro decode of every entry), then the window (chunks read and
every hash indexed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_segmenter import _fresh  # noqa: E402
from segflow.runtime.kafka import ensure_topics, make_producer  # noqa: E402
from segflow.runtime.serde import Serde  # noqa: E402
from segflow.runtime.settings import Settings  # noqa: E402
from segflow.runtime.state import partition_for  # noqa: E402
from segflow.runtime.testing import private_broker, unique_prefix  # noqa: E402
from segflow.runtime.topics import TOPICS, Topic  # noqa: E402
from services.segmenter import core  # noqa: E402
from services.segmenter.app import (  # noqa: E402
    CUSTOMER_RECORD,
    DEFAULT_DEFINITIONS,
    STATE_TOPIC,
    Segmenter,
    SegmenterConfig,
    serde_for,
)
from services.segmenter.dsl import DAY, parse  # noqa: E402

T0 = 1_700_000_000_000


def cid(i: int) -> str:
    return f"c{i:07d}"


def templates(n: int, settings: Settings) -> list[bytes]:
    """Encoded state records of ``n`` customers evaluated over 6 scores each, ids ``c{i:07d}``."""
    defs = parse(DEFAULT_DEFINITIONS.read_text())
    serde = serde_for(settings)
    rng = random.Random(11)
    out = []
    for i in range(n):
        st = None
        for day in range(6):
            fresh = _fresh(rng, slim=True)
            record = {
                **fresh,
                "customer_id": cid(i),
                "as_of": T0 + day * DAY,
                "model_version": "bench",
                "scored_at": 0,
            }
            score = core.Score.from_record(record, defs.features)
            st, _ = core.evaluate(st, score, defs, {})
        assert st is not None
        record = core.state_to_record(st)
        record["customer"] = (CUSTOMER_RECORD, record["customer"])
        out.append(serde.encode(STATE_TOPIC, record))
    return out


def produce_changelog(
    settings: Settings,
    topic: Topic,
    customers: int,
    temps: list[tuple[str, bytes]],
    new_id: Callable[[int], str],
) -> tuple[float, float]:
    """Produce ``customers`` records of ``topic``: template ``i % len(temps)`` with its id
    (every occurrence, same length) replaced by ``new_id(i)``. Returns (bytes per customer
    incl. key, seconds)."""
    name = topic.name(settings)
    ensure_topics(settings, topics=[], names={name: topic})
    producer = make_producer(settings)
    started = time.monotonic()
    total = 0
    for i in range(customers):
        old_id, template = temps[i % len(temps)]
        key = new_id(i).encode()
        assert len(key) == len(old_id.encode())
        value = template.replace(old_id.encode(), key)
        total += len(key) + len(value)
        while True:
            try:
                producer.produce(name, value, key, partition=partition_for(key, 4))
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(300)
    return total / customers, time.monotonic() - started


def fill(settings: Settings, customers: int, n_templates: int) -> tuple[float, float]:
    """Produce the segmenter's changelog; returns (bytes per customer incl. key, seconds)."""
    temps = templates(n_templates, settings)
    pairs = [(cid(j), t) for j, t in enumerate(temps)]
    return produce_changelog(settings, STATE_TOPIC, customers, pairs, cid)


def sim_id(i: int) -> str:
    """An id as long as identity's (``c-`` + 16 hex digits)."""
    return f"c-{i:016x}"


def sim_templates(settings: Settings, n: int, days: int) -> dict[str, list[tuple[str, bytes]]]:
    """Encoded scorer and dispatcher states of ``n`` simulated customers (state_fields.py)."""
    from bench.state_fields import simulate
    from services.dispatcher import core as dcore

    pipe, customers = simulate(n, days, seed=1)
    serde = Serde.from_settings(settings)
    scorer = [
        (k, serde.encode(TOPICS.scorer_state, st))
        for k, st in pipe.scorer_states.items()
        if len(k) == 18
    ]
    dispatcher = [
        (k, serde.encode(TOPICS.dispatcher_state, dcore.customer_record(c)))
        for k, c in customers.items()
        if len(k) == 18
    ]
    return {"scorer": scorer, "dispatcher": dispatcher}


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def restore(bootstrap: str, prefix: str, partitions: list[int]) -> dict[str, float]:
    """In this process: restore ``partitions`` as the segmenter does on assignment."""
    settings = Settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    seg = Segmenter(settings, SegmenterConfig())
    before = rss_kb()
    started = time.monotonic()
    seg.store.assigned = set()
    seg.store.on_assign(set(partitions))
    restored = time.monotonic()
    seg.on_assign(set(partitions))
    done = time.monotonic()
    return _numbers(partitions, len(seg.states), started, restored, done, before)


def _numbers(
    partitions: list[int], customers: int, started: float, restored: float, done: float, rss: int
) -> dict[str, float]:
    return {
        "partitions": len(partitions),
        "customers": customers,
        "store_restore_s": round(restored - started, 1),
        "rebuild_s": round(done - restored, 1),
        "total_s": round(done - started, 1),
        "rss_growth_mb": round((rss_kb() - rss) / 1024),
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }


def restore_scorer(bootstrap: str, prefix: str, partitions: list[int]) -> dict[str, float]:
    """In this process: restore ``partitions`` as a scorer instance does on assignment."""
    from services.scorer.app import ScorerService

    settings = Settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    svc = ScorerService(settings)
    svc.restore(states=False)  # the model (none here) and the empty timers, as at start
    before = rss_kb()
    started = time.monotonic()
    svc.states.assigned = set()
    svc.states.on_assign(set(partitions))
    restored = time.monotonic()
    svc.on_assign(set(partitions))
    done = time.monotonic()
    return _numbers(partitions, svc.customer_count(), started, restored, done, before)


def restore_dispatcher(bootstrap: str, prefix: str, partitions: list[int]) -> dict[str, float]:
    """In this process: restore ``partitions`` as a dispatcher instance does on assignment
    (the store's restore, then the due and retry indexes its next tick rebuilds)."""
    from services.dispatcher.adapters import PatternContacts
    from services.dispatcher.app import Dispatcher, DispatcherSettings

    settings = Settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    d = Dispatcher(
        settings,
        DispatcherSettings(group_id=prefix + "dispatcher"),
        contacts=PatternContacts("{customer_id}@example.invalid"),
    )
    try:
        before = rss_kb()
        started = time.monotonic()
        d.store.assigned = set()
        d.store.on_assign(set(partitions))
        restored = time.monotonic()
        d.on_assign(set(partitions))
        d._rebuild()
        done = time.monotonic()
        return _numbers(partitions, len(d.store), started, restored, done, before)
    finally:
        d.close()


def identity_templates(settings: Settings, n: int, days: int) -> list[list[tuple[str, bytes]]]:
    """Per simulated customer: its profile and node entries, encoded (state_fields.py)."""
    from bench.state_fields import simulate

    pipe, _ = simulate(n, days, seed=1)
    serde = Serde.from_settings(settings)
    out = []
    for key, value in pipe.graph.items():
        if value is None or not key.startswith("p:") or len(key) != 20:
            continue
        records = [(key, serde.encode(TOPICS.identity_state, value))]
        for node in value["identifiers"]:
            entry = pipe.graph.get("n:" + node)
            if entry is not None and len(node) == 26:
                records.append(("n:" + node, serde.encode(TOPICS.identity_state, entry)))
        out.append(records)
    return out


def produce_identity(
    settings: Settings, customers: int, temps: list[list[tuple[str, bytes]]], window_ids: int
) -> tuple[float, float, float]:
    """Identity's graph (template customers under new ids and node hashes) and its window;
    returns (graph B per customer, window B per customer, seconds)."""
    graph, dedup = TOPICS.identity_state, TOPICS.identity_dedup
    names = {t.name(settings): t for t in (graph, dedup)}
    ensure_topics(settings, topics=[], names=names)
    producer = make_producer(settings)
    serde = Serde.from_settings(settings)

    def send(topic: str, key: bytes, value: bytes, partition: int) -> None:
        while True:
            try:
                producer.produce(topic, value, key, partition=partition)
                return
            except BufferError:
                producer.poll(0.05)

    started = time.monotonic()
    graph_bytes = 0
    gname = graph.name(settings)
    for i in range(customers):
        records = temps[i % len(temps)]
        swaps = [(records[0][0][2:].encode(), sim_id(i).encode())]
        swaps += [
            (k[4:].encode(), f"{i:016x}{j:08x}".encode()) for j, (k, _) in enumerate(records[1:])
        ]
        for key, value in records:
            k, v = key.encode(), value
            for old, new in swaps:
                k, v = k.replace(old, new), v.replace(old, new)
            graph_bytes += len(k) + len(v)
            send(gname, k, v, partition_for(k, 4))
    rng = random.Random(7)
    total_ids = customers * window_ids
    slots = [(p, T0 - T0 % 3_600_000 + h * 3_600_000) for h in range(168) for p in range(4)]
    per_slot = -(-total_ids // len(slots))
    dedup_bytes = 0
    dname = dedup.name(settings)
    left = total_ids
    for p, hour in slots:
        offset = 0
        todo = min(per_slot, left)
        left -= todo
        while todo > 0:
            n = min(256, todo)
            key = f"{p}:{hour}:{1_000_000 + offset}".encode()
            value = serde.encode(dedup, {"hour": hour, "hashes": rng.randbytes(8 * n)})
            dedup_bytes += len(key) + len(value)
            send(dname, key, value, p)
            offset += n
            todo -= n
    producer.flush(300)
    return graph_bytes / customers, dedup_bytes / customers, time.monotonic() - started


def restore_identity(bootstrap: str, prefix: str, partitions: list[int]) -> dict[str, float]:
    """In this process: what the one-process identity service's restore does (the graph,
    then the de-duplication window; no vault)."""
    from services.identity.app import IdentityService

    os.environ.pop("SEGFLOW_VAULT_KEY", None)
    settings = Settings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    svc = IdentityService(settings)
    before = rss_kb()
    started = time.monotonic()
    svc.store.restore()
    restored = time.monotonic()
    graph_rss = rss_kb()
    svc.seen.restore(svc.store.items())
    done = time.monotonic()
    out = _numbers(partitions, sum(1 for k in svc.store if k[:2] == "p:"), started, restored,
                   done, before)  # fmt: skip
    out["graph_rss_growth_mb"] = round((graph_rss - before) / 1024)
    out["window_rss_growth_mb"] = round((rss_kb() - graph_rss) / 1024)
    out["graph_entries"] = len(svc.store)
    out["window_ids"] = len(svc.seen)
    return out


RESTORES: dict[str, Callable[[str, str, list[int]], dict[str, float]]] = {
    "segmenter": restore,
    "scorer": restore_scorer,
    "dispatcher": restore_dispatcher,
    "identity": restore_identity,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--templates", type=int, default=2000, help="segmenter templates")
    parser.add_argument(
        "--sim-customers", type=int, default=300, help="simulated customers (scorer, dispatcher)"
    )
    parser.add_argument("--sim-days", type=int, default=60)
    parser.add_argument("--services", default="segmenter,scorer,dispatcher")
    parser.add_argument(
        "--window-ids", type=int, default=8, help="identity: event ids per customer in 7 days"
    )
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--restore", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--service", default="segmenter", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.restore is not None:
        parts = [int(p) for p in args.restore.split(",")]
        print(json.dumps(RESTORES[args.service](args.bootstrap, args.prefix, parts)))
        return 0
    services = [x for x in args.services.split(",") if x]
    unknown = set(services) - set(RESTORES)
    if unknown:
        parser.error(f"--services: unknown {sorted(unknown)}; expected some of {sorted(RESTORES)}")
    bootstrap, broker = private_broker(args.bootstrap)
    try:
        settings = Settings(bootstrap_servers=bootstrap, topic_prefix=unique_prefix("scale"))
        sims: dict[str, list[tuple[str, bytes]]] = {}
        if {"scorer", "dispatcher"} & set(services):
            sims = sim_templates(settings, args.sim_customers, args.sim_days)
        for service in services:
            if service == "identity":
                temps = identity_templates(settings, args.sim_customers, args.sim_days)
                graph_b, window_b, seconds = produce_identity(
                    settings, args.customers, temps, args.window_ids
                )
                print(
                    f"identity changelogs: {args.customers:,} customers from {len(temps):,} "
                    f"templates: graph {graph_b:,.0f} B per customer, window "
                    f"{window_b:,.0f} B per customer ({args.window_ids} ids), produced in "
                    f"{seconds:.0f} s (load average {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
                out = subprocess.run(
                    [sys.executable, __file__, "--restore", "0,1,2,3", "--service", service,
                     "--bootstrap", bootstrap, "--prefix", settings.topic_prefix],
                    capture_output=True, text=True, check=True, env=os.environ,
                )  # fmt: skip
                result = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"identity restore as its 1 instance (graph, then window): {result}")
                continue
            if service == "segmenter":
                per_customer, seconds = fill(settings, args.customers, args.templates)
            else:
                topic = TOPICS.scorer_state if service == "scorer" else TOPICS.dispatcher_state
                per_customer, seconds = produce_changelog(
                    settings, topic, args.customers, sims[service], sim_id
                )
            templates_n = args.templates if service == "segmenter" else len(sims[service])
            print(
                f"{service} changelog: {args.customers:,} customers from {templates_n:,} "
                f"templates, {per_customer:,.0f} B per customer (key + Avro value), produced "
                f"in {seconds:.0f} s (load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )
            for parts in ("0,1,2,3", "0,1"):
                out = subprocess.run(
                    [sys.executable, __file__, "--restore", parts, "--service", service,
                     "--bootstrap", bootstrap, "--prefix", settings.topic_prefix],
                    capture_output=True, text=True, check=True, env=os.environ,
                )  # fmt: skip
                result = json.loads(out.stdout.strip().splitlines()[-1])
                role = (
                    "1 instance (4 partitions)" if parts == "0,1,2,3" else "1 of 2 (2 partitions)"
                )
                print(f"{service} restore as {role}: {result}", flush=True)
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (numbers measured under load)")
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
