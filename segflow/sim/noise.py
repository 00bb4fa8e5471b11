"""Delivery noise: duplicates, late and out-of-order delivery, malformed records, blocked ids.

All rates are per original event and mutually independent draws from the customer's own noise
stream, so switching noise on or off never changes the underlying behaviour:

* ``duplicates``: the same event (same ``event_id``) is delivered a second time, 0–5 minutes
  after the first copy (``Delivery.noise == "duplicate"`` on the copy);
* ``late``: the event is delivered 1–36 hours after it occurred (``"late"``);
* ``out_of_order``: the event is delivered 5 seconds to 10 minutes after it occurred, behind
  events that occurred later (``"out_of_order"``); late and out-of-order are exclusive;
* ``malformed``: a broken record (:class:`Malformed`) is emitted beside the event;
* ``blocked``: a placeholder such as ``unknown`` replaces the event's device id or email; only
  events that also carry a user_id or anonymous_id are eligible, so the key stays a real id.

Every other event is delivered at the instant it occurred.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from json import encoder as _json_encoder
from typing import Any, NamedTuple

from segflow.sim.identities import BLOCKED_DEVICE_IDS, BLOCKED_EMAILS, event_key

SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

DUPLICATE_DELAY = (0, 5 * MINUTE)
LATE_DELAY = (1 * HOUR, 36 * HOUR)
OUT_OF_ORDER_DELAY = (5 * SECOND, 10 * MINUTE)

MALFORMED_KINDS = ("truncated_json", "missing_fields", "wrong_types", "not_json", "bad_framing")

# The C encoder built once (json.dumps builds one per call); no circularity checks: events are
# flat dicts of str, int, float, bool and a str map.
_C_MAKE_ENCODER: Any = getattr(_json_encoder, "c_make_encoder", None)
_ENCODE: Any = (
    _C_MAKE_ENCODER(
        None, None, _json_encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    if _C_MAKE_ENCODER is not None
    else None
)
_FALLBACK = json.JSONEncoder(separators=(",", ":"))


@dataclass(frozen=True)
class NoiseConfig:
    """Per-event probabilities of each kind of noise (all zero: a clean, in-order stream)."""

    duplicates: float = 0.0
    late: float = 0.0
    out_of_order: float = 0.0
    malformed: float = 0.0
    blocked: float = 0.0

    def __post_init__(self) -> None:
        for name in ("duplicates", "late", "out_of_order", "malformed", "blocked"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"noise rate {name}={value} is not in [0, 1]")
        if self.late + self.out_of_order > 1.0:
            raise ValueError("late + out_of_order must not exceed 1")

    @property
    def active(self) -> bool:
        """Whether any noise is asked for.

        >>> NoiseConfig().active, NoiseConfig(late=0.01).active
        (False, True)
        """
        return any((self.duplicates, self.late, self.out_of_order, self.malformed, self.blocked))


class Delivery(NamedTuple):
    """One event as delivered: its Kafka key, the record, and (truth only) its true customer."""

    delivered_at: int
    key: str
    event: dict[str, Any]
    customer: str
    noise: str | None


class Malformed(NamedTuple):
    """A broken record that sinks write as-is (bytes; never valid JSON events or Avro)."""

    delivered_at: int
    key: bytes | None
    value: bytes
    kind: str
    customer: str


Item = Delivery | Malformed


def encode_json(event: dict[str, Any]) -> str:
    """Compact JSON text of an event.

    >>> encode_json({"event_id": "e1", "occurred_at": 5})
    '{"event_id":"e1","occurred_at":5}'
    """
    if _ENCODE is None:
        return _FALLBACK.encode(event)
    return "".join(_ENCODE(event, 0))


def malformed_value(event: dict[str, Any], kind: str) -> bytes:
    """Bytes of a broken record of ``kind`` derived from ``event``; never contains a newline.

    None of them is valid Confluent-framed Avro (the framed kind names an unknown schema id),
    and none is a valid JSON event.

    >>> ev = {"event_id": "e1", "event_type": "login", "occurred_at": 5}
    >>> malformed_value(ev, "not_json")
    b'<html><head><title>502 Bad Gateway</title></head></html>'
    >>> malformed_value(ev, "missing_fields")
    b'{"event_type":"login","occurred_at":5}'
    """
    if kind == "truncated_json":
        text = encode_json(event)
        return text[: max(1, len(text) // 2)].encode()
    if kind == "missing_fields":
        kept = {
            k: v
            for k, v in event.items()
            if k not in ("event_id", "user_id", "anonymous_id", "device_id", "email")
        }
        return encode_json(kept).encode()
    if kind == "wrong_types":
        broken = dict(event)
        broken["occurred_at"] = f"{event.get('occurred_at')} ms"
        broken["amount"] = "twelve"
        return encode_json(broken).encode()
    if kind == "not_json":
        return b"<html><head><title>502 Bad Gateway</title></head></html>"
    if kind == "bad_framing":
        return b"\x00\x7f\x7f\x7f\x7fnot-an-avro-body"
    raise ValueError(f"unknown malformed kind {kind!r}")


def deliver(
    events: list[dict[str, Any]],
    cidx: int,
    customer: str,
    rng_random: Any,
    config: NoiseConfig,
    seq: int,
    out: list[tuple[int, int, int, Item]],
) -> int:
    """Append ``(delivered_at, cidx, seq, item)`` for each event (and its noise) to ``out``.

    Returns the next sequence number. ``rng_random`` is the ``random`` method of the
    customer's noise stream; it is not called when no noise is configured.

    >>> out: list = []
    >>> deliver([{"event_id": "e", "occurred_at": 7, "user_id": "u"}], 0, "c0", None,
    ...         NoiseConfig(), 0, out)
    1
    >>> out[0][3].key, out[0][3].delivered_at
    ('u', 7)
    """
    append = out.append
    if not config.active:
        for ev in events:
            t = ev["occurred_at"]
            key = (
                ev.get("user_id")
                or ev.get("anonymous_id")
                or ev.get("device_id")
                or ev.get("email")
                or ""
            )
            append((t, cidx, seq, Delivery(t, key, ev, customer, None)))
            seq += 1
        return seq
    dup = config.duplicates
    late = config.late
    ooo_edge = late + config.out_of_order
    bad = config.malformed
    blocked = config.blocked
    for ev in events:
        if blocked and rng_random() < blocked and (ev.get("user_id") or ev.get("anonymous_id")):
            if ev.get("email") is None or rng_random() < 0.5:
                ev["device_id"] = BLOCKED_DEVICE_IDS[int(rng_random() * len(BLOCKED_DEVICE_IDS))]
            else:
                ev["email"] = BLOCKED_EMAILS[int(rng_random() * len(BLOCKED_EMAILS))]
        t = ev["occurred_at"]
        key = event_key(ev)
        r = rng_random()
        noise: str | None = None
        at = t
        if r < late:
            noise = "late"
            at = t + LATE_DELAY[0] + int(rng_random() * (LATE_DELAY[1] - LATE_DELAY[0]))
        elif r < ooo_edge:
            noise = "out_of_order"
            at = (
                t
                + OUT_OF_ORDER_DELAY[0]
                + int(rng_random() * (OUT_OF_ORDER_DELAY[1] - OUT_OF_ORDER_DELAY[0]))
            )
        append((at, cidx, seq, Delivery(at, key, ev, customer, noise)))
        seq += 1
        if dup and rng_random() < dup:
            again = at + int(rng_random() * DUPLICATE_DELAY[1])
            append((again, cidx, seq, Delivery(again, key, ev, customer, "duplicate")))
            seq += 1
        if bad and rng_random() < bad:
            kind = MALFORMED_KINDS[int(rng_random() * len(MALFORMED_KINDS))]
            append(
                (
                    at,
                    cidx,
                    seq,
                    Malformed(at, key.encode(), malformed_value(ev, kind), kind, customer),
                )
            )
            seq += 1
    return seq
