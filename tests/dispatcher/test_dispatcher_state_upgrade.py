"""The dispatcher's changelog across the upgrade to the compact customer record.

Records the version before wrote (every text in place, under the archived schema's id in
``schemas/archive/v1/``) must still be read: a restarted dispatcher decodes them into the
same ledger, retries its in-flight actions with the same idempotency keys, promotes its due
steps, and writes the customer back in the compact form.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_writer

from segflow.receiver import Receiver
from segflow.runtime.kafka import ensure_topics
from segflow.runtime.serde import SCHEMAS_DIR, SchemaStore, Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import produce, read_all, wait_until
from segflow.runtime.topics import TOPICS
from services.dispatcher import core
from services.dispatcher.app import Dispatcher, DispatcherSettings
from services.dispatcher.core import Action, Assignment, Customer
from services.dispatcher.playbooks import load_book

ARCHIVED = SCHEMAS_DIR / "archive" / "v1" / "io.segflow.DispatcherStateEntry.avsc"
NOON = 1_772_452_800_000  # 2026-03-02 12:00 UTC
HOUR = 3_600_000


def keys(cid: str, at: int) -> tuple[str, str]:
    entry = f"{cid}:S:{at}"
    return (
        core.idempotency_key(cid, "P", "mail", entry, at),
        core.idempotency_key(cid, "P", "task", entry, at),
    )


def old_record(cid: str, at: int = NOON, mail_status: str = "sent") -> dict[str, Any]:
    """A customer as the version before wrote it (the old schema's example, adapted): a
    playbook run entered at ``at``, its mail step ``mail_status``, its task step due an hour
    later."""
    entry = f"{cid}:S:{at}"
    mail, task = keys(cid, at)
    sent = mail_status == "sent"
    common = {
        "customer_id": cid, "playbook": "P", "segment": "S", "entry_id": entry, "variant": "A",
        "priority": 100, "campaign_id": "camp", "decided_at": at, "reason": None,
    }  # fmt: skip
    return {
        "kind": "customer",
        "customer_id": cid,
        "suppressions": ["bounced"],
        "timezone": "Europe/Berlin",
        "attrs": {"first_name": "Ada"},
        "last_engagement_at": None,
        "sends": [{"channel": "crm_task", "at": at + 400, "key": mail}],
        "actions": [
            {
                **common,
                "key": mail,
                "step": "mail",
                "channel": "crm_task",
                "due_at": at,
                "status": mail_status,
                "attempt": 1,
                "retry_at": 0,
                "settled_at": at + 500 if sent else None,
                "dispatched_at": at + 470 if sent else None,
                "http_status": 202 if sent else None,
                "endpoint": "crm" if sent else None,
                "features": {"opens_drop": "-0.72"},
            },
            {
                **common,
                "key": task,
                "step": "task",
                "channel": "crm_task",
                "due_at": at + HOUR,
                "status": "scheduled",
                "attempt": 0,
                "retry_at": 0,
                "settled_at": None,
                "dispatched_at": None,
                "http_status": None,
                "endpoint": None,
                "features": {},
            },
        ],  # fmt: skip
        "assignments": [
            {
                "playbook": "P",
                "segment": "S",
                "entry_id": entry,
                "variant": "A",
                "campaign_id": "camp",
                "decided_at": at,
                "counted": ["assigned", "sent"],
            }
        ],  # fmt: skip
        "segment": None,
        "playbook": None,
        "variant": None,
        "counts": {},
        "clock_ms": None,
    }


def old_bytes(record: dict[str, Any]) -> bytes:
    """``record`` on the wire as the version before produced it (its schema's id)."""
    version = SchemaStore._load(ARCHIVED)
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, version.local_id))
    schemaless_writer(buf, version.parsed, record)
    return buf.getvalue()


def test_the_archived_schema_is_the_one_the_version_before_wrote() -> None:
    old = json.loads(ARCHIVED.read_text())
    names = [f["name"] for f in old["fields"]]
    assert "actions" in names and "ledger" not in names and "strings" not in names


def test_a_record_the_version_before_wrote_decodes_into_the_same_customer() -> None:
    serde = Serde(SchemaStore.from_dir())
    rec = serde.decode(TOPICS.dispatcher_state, old_bytes(old_record("c-1")))
    c = core.customer_from_record(rec)
    entry = f"c-1:S:{NOON}"
    mail, task = keys("c-1", NOON)
    common: dict[str, Any] = dict(
        customer_id="c-1", playbook="P", segment="S", entry_id=entry, variant="A",
        priority=100, campaign_id="camp", decided_at=NOON,
    )  # fmt: skip
    assert c == Customer(
        "c-1",
        frozenset({"bounced"}),
        "Europe/Berlin",
        (("first_name", "Ada"),),
        None,
        (("crm_task", NOON + 400, mail),),
        (
            Action(
                key=mail, step="mail", channel="crm_task", due_at=NOON, status="sent",
                attempt=1, settled_at=NOON + 500, dispatched_at=NOON + 470, http_status=202,
                endpoint="crm", features=(("opens_drop", "-0.72"),), **common,
            ),
            Action(key=task, step="task", channel="crm_task", due_at=NOON + HOUR, **common),
        ),
        (Assignment("P", "S", entry, "A", "camp", NOON, frozenset({"assigned", "sent"})),),
    )  # fmt: skip
    # written back in the compact form: the same customer, in fewer bytes
    new = serde.encode(TOPICS.dispatcher_state, core.customer_record(c))
    assert core.customer_from_record(serde.decode(TOPICS.dispatcher_state, new)) == c
    assert len(new) < len(old_bytes(old_record("c-1"))) * 0.7


@pytest.mark.parametrize(
    "key",
    [
        "sf-" + "ab" * 16,
        "sf-" + "AB" * 16,
        "sf-short",
        "x" * 16,
        "x" * 15,
        "",
        "sf-" + "g" * 32,
        "ключ",
    ],
)
def test_any_idempotency_key_survives_the_compact_record(key: str) -> None:
    serde = Serde(SchemaStore.from_dir())
    a = Action(key, "c", "P", "step", "S", "c|S|1", "email", "A", 0, "P", NOON, NOON)
    c = Customer("c", sends=(("email", NOON, key),), actions=(a,))
    rec = serde.decode(
        TOPICS.dispatcher_state, serde.encode(TOPICS.dispatcher_state, core.customer_record(c))
    )
    assert core.customer_from_record(rec) == c


@pytest.mark.broker
def test_a_restarted_dispatcher_resumes_from_records_the_version_before_wrote(
    kafka_settings: Settings, receiver: Receiver, tmp_path: Path
) -> None:
    s = kafka_settings
    (tmp_path / "p.yaml").write_text(
        "playbook: P\nsegment: S\ncampaign_id: camp\nsteps:\n"
        "  - {id: mail, channel: crm_task, subject: Call}\n"
        "  - {id: task, channel: crm_task, after: 48h, subject: Call again}\n"
        "---\npolicy: {default_timezone: UTC}\n"
    )
    book = load_book([tmp_path])
    name = TOPICS.dispatcher_state.name(s)
    ensure_topics(s, topics=[TOPICS.dispatcher_state])
    # c-a: its mail step was in flight when the old version stopped; c-b: mail sent. Both
    # task steps are due (an hour after entries two hours ago).
    at = int(time.time() * 1000) - 2 * HOUR
    produce(
        s,
        name,
        [
            (b"c-a", old_bytes(old_record("c-a", at, mail_status="in_flight"))),
            (b"c-b", old_bytes(old_record("c-b", at))),
        ],
    )
    cfg = DispatcherSettings(
        group_id=s.topic_prefix + "dispatcher",
        crm_base_url=receiver.url,
        email_base_url=receiver.url,
        webhook_url=receiver.url + "/webhook",
        contact_pattern="{customer_id}@example.invalid",
        tick_interval=0.1,
    )
    (a_mail, a_task), (b_mail, b_task) = keys("c-a", at), keys("c-b", at)
    d = Dispatcher(s, cfg, book=book)
    d.restore()
    loop = d.loop()
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        assert receiver.wait_for({a_mail, a_task, b_task}, timeout=40)
        wait_until(
            lambda: all(
                a.status == "sent"
                for cid in ("c-a", "c-b")
                for a in (d.customer(cid) or Customer(cid)).actions
            ),
            30,
            what="every action recorded sent",
        )
    finally:
        loop.stop()
        thread.join(30)
        d.close()
    # the in-flight mail retried under its key, both tasks sent, the sent mail not again
    assert set(receiver.effects()) == {a_mail, a_task, b_task}
    assert b_mail not in {r.key for r in receiver.requests}
    serde = Serde.from_settings(s)
    latest: dict[str, bytes] = {}
    for r in read_all(s, name, timeout=20):
        if r.key in (b"c-a", b"c-b") and r.value is not None:
            latest[r.key.decode()] = r.value
    assert set(latest) == {"c-a", "c-b"}
    for cid, raw in latest.items():
        assert serde.written_with_current(TOPICS.dispatcher_state, raw), cid  # rewritten
        rec = serde.decode(TOPICS.dispatcher_state, raw)
        assert rec["actions"] == [] and rec["ledger"], cid
        mail, task = keys(cid, at)
        c = core.customer_from_record(rec)
        assert [(a.key, a.status) for a in c.actions] == [(mail, "sent"), (task, "sent")]
