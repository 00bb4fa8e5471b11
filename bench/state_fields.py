"""Changelog bytes per customer, per field: what each service's state record holds.

    .venv/bin/python bench/state_fields.py [--customers 300] [--days 60] [--seed 1]

Simulated customers go through the services' cores in one process (no broker): identity,
scorer and segmenter as ``bench/eval_segments.py`` chains them (event time, hourly ticks),
then the dispatcher's core over the resulting segment changes and identified events on an
event-time clock (the default playbooks and policy; a step that passes the policy is
settled ``sent`` at once with the endpoint's name and HTTP 202, as a live run records it).
At the end each service's state is what its changelog would hold (the latest value per key),
and every value is sized field by field against its Avro schema (the exact bytes of each
field in the binary encoding; arrays of records are split into their fields, map entries
are summed under ``name{}``; the 5-byte wire header and the key are listed apart).

Per customer means per customer id identity created (what bench_e2e.py divides by), and per
record (only customers the service holds state for). No Kafka, no timing: the numbers do
not depend on the machine's load.

Identity's de-duplication window is what the service keeps at the end: the event ids of the
last 7 days of event time (hours ending after the low watermark minus the window), both as
the ``e:<event_id>`` state entries of earlier releases and as the 8-byte hash chunks the
one-process role now writes to ``segflow.identity.dedup``: per input partition (here the
event id's CRC-32 modulo 4) and event-time hour, chunks of up to 256 ids, as the service
keeps them (it rewrites the open chunk with each batch's ids; key with a 6-digit offset).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.eval_segments import DEMO_NOISE, Pipeline  # noqa: E402
from segflow.runtime.serde import Serde  # noqa: E402
from segflow.runtime.settings import Settings  # noqa: E402
from segflow.runtime.topics import TOPICS, Topic  # noqa: E402
from segflow.sim.generator import SimConfig, Simulation  # noqa: E402
from services.dispatcher import core as dcore  # noqa: E402
from services.dispatcher import observing as dobserving  # noqa: E402
from services.dispatcher.playbooks import DEFAULT_DIR, Book, load_book  # noqa: E402
from services.identity.dedup import chunk_bytes  # noqa: E402
from services.identity.seen import dedup_key  # noqa: E402
from services.identity.window import CHUNK_IDS, HOUR_MS, chunk_key, hour_of  # noqa: E402
from services.scorer.core import ScorerConfig  # noqa: E402
from services.segmenter.app import DEFAULT_DEFINITIONS  # noqa: E402

HEADER = 5  # magic byte + schema id
MAP_ENTRY = "\x00"  # marks a per-key map entry total in a Sizes counter


# -- Avro sizes ----------------------------------------------------------------------------------
def varint_len(n: int) -> int:
    z = (n << 1) ^ (n >> 63)  # zig-zag
    size = 1
    while z >= 0x80:
        z >>= 7
        size += 1
    return size


_PY_TYPES: dict[str, tuple[type, ...]] = {
    "boolean": (bool,),
    "int": (int,),
    "long": (int,),
    "float": (float,),
    "double": (float,),
    "string": (str,),
    "enum": (str,),
    "bytes": (bytes,),
    "fixed": (bytes,),
    "array": (list, tuple),
    "record": (dict,),
    "map": (dict,),
}


def _branch(union: list[Any], value: Any) -> tuple[int, Any]:
    """The union branch fastavro writes ``value`` with (by Python type; first match)."""
    for i, t in enumerate(union):
        name = t if isinstance(t, str) else t.get("type")
        if value is None:
            if name == "null":
                return i, t
            continue
        if isinstance(value, bool) != (name == "boolean"):
            continue
        if isinstance(value, _PY_TYPES.get(name, ())):
            return i, t
    raise ValueError(f"no branch of {union} for {value!r}")


def size(schema: Any, value: Any, path: str = "", acc: Counter[str] | None = None) -> int:
    """Bytes of ``value`` in Avro's binary encoding of ``schema`` (expanded, no named
    references); with ``acc``, the bytes of every leaf field are added under its path (a
    union's branch index counts to the field; an array of records is split into its items'
    fields, ``name[].field``, plus its framing; a map is one entry ``name{}``)."""
    if isinstance(schema, list):
        i, branch = _branch(schema, value)
        if acc is not None:
            acc[path] += varint_len(i)
        return varint_len(i) + size(branch, value, path, acc)
    t = schema if isinstance(schema, str) else schema["type"]
    if isinstance(t, dict | list):
        return size(t, value, path, acc)
    n: int
    if t == "record":
        prefix = f"{path}." if path and not path.endswith(".") else path
        return sum(
            size(f["type"], value.get(f["name"], f.get("default")), f"{prefix}{f['name']}", acc)
            for f in schema["fields"]
        )
    if t == "null":
        n = 0
    elif t == "boolean":
        n = 1
    elif t in ("int", "long"):
        n = varint_len(int(value))
    elif t == "float":
        n = 4
    elif t == "double":
        n = 8
    elif t in ("string", "bytes"):
        raw = value.encode() if isinstance(value, str) else bytes(value)
        n = varint_len(len(raw)) + len(raw)
    elif t == "enum":
        n = varint_len(schema["symbols"].index(value))
    elif t == "fixed":
        n = int(schema["size"])
    elif t == "array":
        items = list(value)
        framing = varint_len(len(items)) + 1 if items else 1
        nested = acc is not None and _nested(schema["items"])
        inner = sum(size(schema["items"], v, f"{path}[]", acc if nested else None) for v in items)
        if nested:
            assert acc is not None
            acc[f"{path}[] (framing)"] += framing
            return framing + inner
        n = framing + inner
    elif t == "map":
        items = list(value.items())
        n = (varint_len(len(items)) + 1 if items else 1) + sum(
            size("string", k) + size(schema["values"], v) for k, v in items
        )
        if acc is not None:  # each key's entries too, listed apart (see Sizes.table)
            for k, v in items:
                acc[f"{MAP_ENTRY}{path}{{{k}}}"] += size("string", k) + size(schema["values"], v)
        path = f"{path}{{}}"
    else:
        raise ValueError(f"unsupported Avro type {t!r} at {path}")
    if acc is not None:
        acc[path] += n
    return n


def _nested(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "record"


class Sizes:
    """Per-field byte totals of one changelog."""

    def __init__(self, serde: Serde, topic: Topic) -> None:
        self.schema = serde.store.get(topic.value).schema
        self.fields: Counter[str] = Counter()
        self.records = 0
        self.total = 0

    def add(self, key: str, record: Mapping[str, Any]) -> None:
        self.records += 1
        self.fields["(key)"] += len(key.encode())
        self.fields["(wire header)"] += HEADER
        n = size(self.schema, record, "", self.fields)
        self.total += len(key.encode()) + HEADER + n

    def table(self, title: str, customers: int) -> str:
        lines = [
            f"\n{title}: {self.records:,} records, {self.total / max(customers, 1):,.0f} B per "
            f"customer id, {self.total / max(self.records, 1):,.0f} B per record",
            "| field | B per customer id | B per record | share |",
            "|---|---|---|---|",
        ]
        entries = [(k[1:], n) for k, n in self.fields.items() if k.startswith(MAP_ENTRY)]
        for name, n in sorted(self.fields.items(), key=lambda kv: -kv[1]):
            if n == 0 or name.startswith(MAP_ENTRY):
                continue
            lines.append(
                f"| `{name}` | {n / max(customers, 1):,.1f} | {n / max(self.records, 1):,.1f} "
                f"| {100 * n / max(self.total, 1):.1f} % |"
            )
        if entries:
            top = sorted(entries, key=lambda kv: -kv[1])[:15]
            lines.append(
                "map entries, largest first (B per customer id): "
                + ", ".join(f"`{k}` {n / max(customers, 1):,.1f}" for k, n in top)
            )
        return "\n".join(lines)


# -- the pipeline ---------------------------------------------------------------------------------
class Recording(Pipeline):
    """eval_segments' pipeline that also keeps the identified events (for the dispatcher)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.identified: list[dict[str, Any]] = []

    def event(self, event: dict[str, Any], delivered_at: int) -> None:
        eid = event.get("event_id")
        known = eid in self.obs.event_owner
        super().event(event, delivered_at)
        cid = self.obs.event_owner.get(eid) if not known else None
        if cid is not None:
            self.identified.append({"customer_id": cid, "event": event})


ENDPOINT = {"email": "email", "smtp": "smtp", "webhook": "webhook"}


def run_dispatcher(
    changes: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]], book: Book, end: int
) -> dict[str, dcore.Customer]:
    """Changes and events through the dispatcher's core in event time; in-flight steps are
    settled ``sent`` at once (endpoint, 202), due steps promoted as the clock passes them."""
    inputs: list[tuple[int, int, int, Mapping[str, Any]]] = [
        (int(e["event"]["occurred_at"]), 0, i, e) for i, e in enumerate(events)
    ]
    inputs += [(int(c["occurred_at"]), 1, i, c) for i, c in enumerate(changes)]
    inputs.sort(key=lambda x: x[:3])
    customers: dict[str, dcore.Customer] = {}
    due: list[tuple[int, str]] = []
    now = 0

    def keep(old: dcore.Customer | None, new: dcore.Customer) -> None:
        for a in dcore.in_flight(new):
            ok = dcore.Outcome("sent", 202, ENDPOINT.get(a.channel, "crm"), dispatched_at=now)
            new, _ = dcore.record_outcome(new, a.key, ok, now, book)
        if new is not old:
            customers[new.customer_id] = new
            nd = dcore.next_due(new)
            if nd is not None:
                heapq.heappush(due, (nd, new.customer_id))

    def promote(until: int) -> None:
        seen: set[str] = set()
        while due and due[0][0] <= until:
            _, cid = heapq.heappop(due)
            c = customers.get(cid)
            if c is None or cid in seen:
                continue
            seen.add(cid)
            new, _ = dcore.promote(c, until, book)
            keep(c, dcore.prune(new, until, book) if new is not c else new)

    for at, kind, _, value in inputs:
        now = max(now, at)
        promote(now)
        if kind == 0:
            obs = dcore.Observation.from_record(value)
            old = customers.get(obs.customer_id)
            maybe, _ = dobserving.observe(old, obs, now, book)
            if maybe is not None:
                keep(old, maybe)
        else:
            change = dcore.SegmentChange.from_record(value)
            old = customers.get(change.customer_id)
            new, _ = dcore.decide(old, change, now, book)
            keep(old, new)
    promote(max(now, end))
    return customers


def simulate(customers: int, days: int, seed: int) -> tuple[Recording, dict[str, dcore.Customer]]:
    """The simulated population through identity, scorer, segmenter (``Recording``, with
    their states) and the dispatcher's core (its customers)."""
    config = SimConfig(customers=customers, days=days, seed=seed, noise=DEMO_NOISE)
    sim = Simulation(config)
    pipe = Recording(DEFAULT_DEFINITIONS, ScorerConfig())
    pipe.drive(sim)
    book = load_book([DEFAULT_DIR])
    return pipe, run_dispatcher(pipe.obs.changes, pipe.identified, book, config.end_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    pipe, customers = simulate(args.customers, args.days, args.seed)

    serde = Serde.from_settings(Settings())
    ids = {cid for cid in pipe.obs.event_owner.values()}
    n_ids = len(ids)
    print(
        f"{args.customers} simulated customers x {args.days} days (seed {args.seed}, demo "
        f"noise): {n_ids:,} customer ids, {len(pipe.identified):,} identified events, "
        f"{len(pipe.obs.changes):,} segment changes"
    )

    identity = Sizes(serde, TOPICS.identity_state)
    old_window = Sizes(serde, TOPICS.identity_state)  # e:<event_id> entries (earlier releases)
    window = Sizes(serde, TOPICS.identity_dedup)  # 8-byte hashes in chunks (now)
    seen = {k: v for k, v in pipe.graph.items() if v is not None and k.startswith("e:")}
    horizon = max((int(v["created_at"]) for v in seen.values()), default=0) - 7 * 86_400_000
    digest_key = dedup_key("bench")
    chunks: dict[tuple[int, int], list[int]] = {}
    for key, value in pipe.graph.items():
        if value is None:
            continue
        if key not in seen:
            identity.add(key, value)
            continue
        hour = hour_of(int(value["created_at"]))
        if hour + HOUR_MS <= horizon:
            continue  # expired by the service's window
        old_window.add(key, value)
        eid = key[2:].encode()
        h = hashlib.blake2b(eid, key=digest_key, digest_size=8).digest()
        chunks.setdefault((zlib.crc32(eid) % 4, hour), []).append(int.from_bytes(h, "big"))
    for (part, hour), hashes in sorted(chunks.items()):
        for i in range(0, len(hashes), CHUNK_IDS):
            piece = chunk_bytes(hashes[i : i + CHUNK_IDS])
            window.add(chunk_key(part, hour, 100_000 + i), {"hour": hour, "hashes": piece})
    scorer = Sizes(serde, TOPICS.scorer_state)
    for cid, st in pipe.scorer_states.items():
        scorer.add(cid, st)
    segmenter = Sizes(serde, TOPICS.segmenter_state)
    for key, raw in pipe.segmenter.store.table.items():
        segmenter.add(
            key, serde.decode(TOPICS.segmenter_state, raw) if isinstance(raw, bytes) else raw
        )
    dispatcher = Sizes(serde, TOPICS.dispatcher_state)
    actions: Counter[str] = Counter()
    for cid, c in customers.items():
        dispatcher.add(cid, dcore.customer_record(c))
        actions.update(a.status for a in c.actions)

    total = 0
    for title, s in (
        ("identity graph", identity),
        ("identity de-duplication window, e:<event_id> entries (earlier releases)", old_window),
        ("identity de-duplication window, 8-byte hash chunks (now)", window),
        ("scorer", scorer),
        ("segmenter", segmenter),
        ("dispatcher", dispatcher),
    ):
        print(s.table(title, n_ids))
        if s is not window and s is not old_window:
            total += s.total
    print(f"\ndispatcher ledger entries by status: {dict(actions.most_common())}")
    per = max(n_ids, 1)
    print(
        f"\nde-duplication window: {old_window.records:,} event ids in the last 7 days; "
        f"{old_window.total / max(old_window.records, 1):,.1f} B per id as e: entries, "
        f"{window.total / max(old_window.records, 1):,.1f} B per id as hash chunks"
    )
    print(
        f"total without the de-duplication window: {total / per:,.0f} B per customer id; "
        f"with it as e: entries (earlier releases): {(total + old_window.total) / per:,.0f} B; "
        f"with it as hash chunks (now): {(total + window.total) / per:,.0f} B"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
