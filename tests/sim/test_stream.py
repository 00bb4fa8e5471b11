"""The delivered stream: determinism, the event contract, identities and noise rates."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import fastavro

from segflow.events import EVENT_TYPES, validate_event
from segflow.sim.generator import DAY, SimConfig, Simulation
from segflow.sim.identities import BLOCKED_VALUES, event_key, normalize_email
from segflow.sim.noise import Delivery, Malformed, NoiseConfig
from segflow.sim.sink import to_record

SCHEMA = fastavro.parse_schema(
    json.loads(
        (
            Path(__file__).resolve().parents[2] / "schemas" / "io.segflow.BehaviorEvent.avsc"
        ).read_text()
    )
)


def _within(observed: int, n: int, rate: float) -> bool:
    """``observed`` successes of ``n`` trials agree with ``rate`` (4.5 standard deviations)."""
    return abs(observed - n * rate) <= 4.5 * math.sqrt(n * rate * (1 - rate)) + 1


def test_same_seed_same_stream_and_step_size_does_not_matter() -> None:
    noise = NoiseConfig(duplicates=0.05, late=0.05, out_of_order=0.05, malformed=0.02, blocked=0.05)
    config = SimConfig(customers=60, days=20, seed=3, noise=noise)
    weekly = list(Simulation(config).run(window_days=7))
    sim = Simulation(config)
    daily = list(sim.run(window_days=1))
    assert weekly == daily
    assert len(weekly) > 1000
    other = list(Simulation(SimConfig(customers=60, days=20, seed=4, noise=noise)).run())
    assert [i.key for i in other[:50]] != [i.key for i in weekly[:50]]


def test_a_customer_does_not_depend_on_population_size_or_noise() -> None:
    small = Simulation(SimConfig(customers=10, days=15, seed=8))
    big = Simulation(
        SimConfig(customers=40, days=15, seed=8, noise=NoiseConfig(late=0.2, duplicates=0.1))
    )

    def first(sim: Simulation) -> list[str]:
        return sorted(
            i.event["event_id"]
            for i in sim.run()
            if isinstance(i, Delivery) and i.customer == "c0000003"
        )

    mine = first(small)
    assert mine and mine == sorted(set(first(big)))


def test_every_event_meets_the_contract_and_encodes_as_avro(noisy_run: Any) -> None:
    items = noisy_run.items
    assert all(a.delivered_at <= b.delivered_at for a, b in zip(items, items[1:], strict=False))
    end = noisy_run.sim.config.end_ms
    buf = io.BytesIO()
    for item in items:
        if isinstance(item, Delivery):
            ev = item.event
            validate_event(ev, now_ms=end, max_future_ms=2 * DAY)
            assert ev["event_type"] in EVENT_TYPES
            assert item.key == event_key(ev) and item.key not in BLOCKED_VALUES
            assert isinstance(ev["occurred_at"], int)
            fastavro.schemaless_writer(buf, SCHEMA, to_record(ev))


def test_identifiers_belong_to_the_true_customer_except_shared_devices(clean_run: Any) -> None:
    owner: dict[str, str] = {}
    shared: dict[str, set[str]] = {}
    for key, t in clean_run.truth.items():
        ident = t["identity"]
        own = [
            ident["user_id"],
            *ident["emails"],
            *ident["anonymous_ids"],
            *(d for d in ident["device_ids"] if d not in ident["shared_device_ids"]),
        ]
        for value in own:
            if value is not None:
                assert value not in owner, f"{value} is in two clusters"
                owner[value] = key
        for d in ident["shared_device_ids"]:
            shared.setdefault(d, set()).add(key)
    assert shared and all(len(v) == 2 for v in shared.values())
    seen_shared = set()
    for key, events in clean_run.by_customer.items():
        for ev in events:
            for field in ("user_id", "anonymous_id", "device_id", "email"):
                value = ev.get(field)
                if value is None:
                    continue
                if field == "email":
                    value = normalize_email(value)
                if value in shared:
                    assert key in shared[value]
                    seen_shared.add(value)
                else:
                    assert owner.get(value) == key, (field, value, key)
    assert seen_shared, "no shared device was ever used"


def test_identity_patterns_appear(clean_run: Any) -> None:
    events = [e for evs in clean_run.by_customer.values() for e in evs]
    anonymous = [
        e
        for e in events
        if e.get("anonymous_id") and not e.get("user_id") and e["event_type"] == "page_view"
    ]
    stitches = [e for e in events if e["event_type"] == "login" and e.get("anonymous_id")]
    email_only = [
        e
        for e in events
        if e["event_type"] == "email_click"
        and set(k for k in ("user_id", "anonymous_id", "device_id") if e.get(k)) == set()
    ]
    shouted = [e for e in events if e.get("email") and e["email"] != normalize_email(e["email"])]
    assert anonymous and stitches and email_only and shouted
    multi_device = [t for t in clean_run.truth.values() if len(t["identity"]["device_ids"]) > 1]
    assert len(multi_device) > len(clean_run.truth) / 3


def test_noise_rates_are_as_asked(noisy_run: Any) -> None:
    cfg = noisy_run.sim.config.noise
    deliveries = [i for i in noisy_run.items if isinstance(i, Delivery)]
    originals = [i for i in deliveries if i.noise != "duplicate"]
    n = len(originals)
    assert n > 15_000
    tags = Counter(i.noise for i in deliveries)
    assert _within(tags["duplicate"], n, cfg.duplicates)
    assert _within(tags["late"], n, cfg.late)
    assert _within(tags["out_of_order"], n, cfg.out_of_order)
    malformed = [i for i in noisy_run.items if isinstance(i, Malformed)]
    assert _within(len(malformed), n, cfg.malformed)
    eligible = [i for i in originals if i.event.get("user_id") or i.event.get("anonymous_id")]
    blocked = [
        i for i in eligible if {i.event.get("device_id"), i.event.get("email")} & BLOCKED_VALUES
    ]
    assert _within(len(blocked), len(eligible), cfg.blocked)


def test_noise_is_observable_in_the_stream(noisy_run: Any) -> None:
    first_seen: dict[str, int] = {}
    watermark = 0
    behind: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for pos, item in enumerate(noisy_run.items):
        if isinstance(item, Malformed):
            try:
                record = json.loads(item.value)
            except ValueError:
                continue
            assert not (
                isinstance(record, dict)
                and record.get("event_id")
                and isinstance(record.get("occurred_at"), int)
                and any(record.get(k) for k in ("user_id", "anonymous_id", "email"))
            )
            continue
        ev = item.event
        if item.noise == "duplicate":
            assert ev["event_id"] in first_seen and first_seen[ev["event_id"]] < pos
        else:
            assert ev["event_id"] not in first_seen
            first_seen[ev["event_id"]] = pos
        counts[item.noise or "clean"] += 1
        if ev["occurred_at"] < watermark:
            behind[item.noise or "clean"] += 1
        if item.noise == "late":
            assert item.delivered_at - ev["occurred_at"] >= 3_600_000
        watermark = max(watermark, ev["occurred_at"])
    # late events almost always arrive behind newer ones; clean ones arrive in order unless a
    # customer's own clock put them behind another event of the same instant's neighbours
    assert behind["late"] >= 0.95 * counts["late"]
    assert behind["out_of_order"] >= 0.5 * counts["out_of_order"]
    assert behind["clean"] == 0
