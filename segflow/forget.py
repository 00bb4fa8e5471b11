"""``segflow forget CUSTOMER_ID``: forget one customer everywhere (a GDPR erasure request).

The request goes to ``segflow.forget.requests`` keyed by the customer id. The identity
service erases the profile and its identifiers (keeping keyed hashes of the user_id and
email as do-not-relink markers, so the person's later events are dropped rather than
profiled again), tombstones the customer's record in the contact vault (the only copy of its
data key: the encrypted addresses are crypto-shredded, physically once the broker compacts
``segflow.contacts.vault``, within ``max.compaction.lag.ms``) and emits a
``customer_forgotten`` event on the identified topic, in the customer's partition order after
every earlier event. Downstream, the scorer drops the
customer's features, the segmenter exits every membership with reason ``forgotten`` and
drops its state, and the dispatcher cancels pending steps and suppresses contact for good.

What Kafka retention still holds: raw events already on ``segflow.events`` (until their
retention expires) and the audit records on ``segflow.dispatch.results``; nothing there is
rewritten.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from confluent_kafka import KafkaException

from segflow.runtime.kafka import make_producer
from segflow.runtime.serde import Serde, encode_key
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS


def request(customer_id: str, reason: str | None, now_ms: int) -> dict[str, object]:
    """The ForgetRequest record for one customer."""
    if not customer_id.strip():
        raise ValueError("customer id is empty")
    return {
        "request_id": f"fr-{uuid.uuid4().hex[:16]}",
        "customer_id": customer_id.strip(),
        "requested_at": now_ms,
        "reason": reason,
    }


def send(settings: Settings, record: dict[str, object], timeout: float = 30.0) -> None:
    """Write the request and wait until the broker has it (raises on failure)."""
    serde = Serde.from_settings(settings)
    topic = TOPICS.forget
    errors: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    producer = make_producer(settings)
    try:
        producer.produce(
            topic.name(settings),
            serde.encode(topic, record),
            encode_key(topic, str(record["customer_id"])),
            on_delivery=delivered,
        )
        left = producer.flush(timeout)
    finally:
        producer.close()
    if left or errors:
        raise RuntimeError(errors[0] if errors else f"not acknowledged within {timeout:.0f}s")


def cmd_forget(args: argparse.Namespace) -> int:
    from segflow.runtime.local import settings_for

    try:
        record = request(args.customer_id, args.reason, int(time.time() * 1000))
    except ValueError as exc:
        print(f"segflow forget: {exc}", file=sys.stderr)
        return 2
    settings = settings_for(args.port)
    try:
        send(settings, record)
    except (RuntimeError, KafkaException) as exc:
        print(f"segflow forget: request not written: {exc}", file=sys.stderr)
        return 1
    print(
        f"forget request {record['request_id']} for {record['customer_id']} written to "
        f"{TOPICS.forget.name(settings)}; identity erases the profile and passes it on to "
        "the scorer, segmenter and dispatcher, and shreds its contact-vault key"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "forget", help="forget a customer everywhere (profile, state, pending actions)"
    )
    p.add_argument("customer_id", help="the customer_id to forget")
    p.add_argument("--reason", help="audit note, e.g. a ticket number (never PII)")
    p.set_defaults(func=cmd_forget)
