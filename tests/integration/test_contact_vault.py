"""The contact vault on a real broker: the identity service and the dispatcher (threads of this
process, their query endpoints on 127.0.0.1) and segflow's receiver.

An event carrying a raw email (and a phone number) leads to an email to that address at the
receiver, while the address is in no topic's bytes but the vault's (and there only as
ciphertext), in no log line and in no API answer; after ``segflow forget`` the vault record is
gone (tombstone, then physically, once the broker has compacted the topic) and no email goes
out. The segment change is produced directly: the scorer and segmenter never see addresses
(they read the identified topic, which is scanned here).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from segflow.forget import request as forget_request
from segflow.forget import send as forget_send
from segflow.receiver import Receiver
from segflow.runtime.kafka import make_admin, make_producer
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import produce, read_all
from segflow.runtime.testing import segment_entered as change
from segflow.runtime.topics import TOPICS
from segflow.runtime.vault import Keyring, VaultError, generate_key
from services.dispatcher import api as dispatcher_api
from services.dispatcher.app import Dispatcher, DispatcherSettings
from services.dispatcher.contacts import VaultContacts
from services.dispatcher.playbooks import load_book
from services.identity import api as identity_api
from services.identity.app import IdentityService

pytestmark = pytest.mark.broker

ADDRESS = "ada.lovelace+vip@example.org"  # as identity normalises it
RAW_ADDRESS = "  Ada.Lovelace+VIP@Example.org "  # as the producer sent it
PHONE = "+44 20 7946 0958"

PLAYBOOK = """\
playbook: Vault
segment: S
steps:
  - {id: mail, channel: email, template: d-1, subject: "Hello"}
---
policy: {default_timezone: UTC, quiet_hours: null}
"""


class Captured(logging.Handler):
    """Every log record of this process, formatted with its structured fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        line = record.getMessage() + " " + json.dumps(fields, default=str)
        if record.exc_info:
            line += " " + logging.Formatter().formatException(record.exc_info)
        self.lines.append(line)


@pytest.fixture
def logs() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


class Running:
    """A service's loop in a thread."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=loop.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.stop()
        self.thread.join(30)


def behaviour(event_type: str, at: int, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "event_type": event_type,
        "occurred_at": at,
        "user_id": "u-vault-1",
        "properties": {},
        **extra,
    }


def wait(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def emails(receiver: Receiver) -> list[str]:
    """Recipients of every mail send that took effect at the receiver."""
    return [
        to["email"]
        for seen in receiver.effects().values()
        if seen.path == "/v3/mail/send"
        for p in seen.body["personalizations"]
        for to in p["to"]
    ]


def raw_bytes(s: Settings) -> dict[str, bytes]:
    """Every record of every registry topic (aborted transactions included), keys, values and
    headers concatenated per topic: one consumer reading each partition to its end."""
    consumer = Consumer(
        {
            **s.kafka_config(),
            "group.id": f"scan-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
        }
    )
    ends: dict[tuple[str, int], int] = {}
    out: dict[str, list[bytes]] = {t.name(s): [] for t in TOPICS}
    try:
        md = consumer.list_topics(timeout=10)
        for name in out:
            for p in md.topics[name].partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                if high > low:
                    ends[(name, p)] = high
        consumer.assign([TopicPartition(n, p, OFFSET_BEGINNING) for n, p in ends])
        deadline = time.monotonic() + 30
        while ends and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.2):
                if m.error():
                    continue
                name, part = str(m.topic()), int(m.partition() or 0)
                heads = b"".join(v or b"" for _, v in m.headers() or [])
                out[name].append((m.key() or b"") + (m.value() or b"") + heads)
                if int(m.offset() or 0) + 1 >= ends.get((name, part), 0):
                    ends.pop((name, part), None)
            if ends:  # transaction markers take offsets too: compare positions
                tps = [TopicPartition(n, p) for n, p in ends]
                for tp in consumer.position(tps):
                    if tp.offset >= ends[(tp.topic, tp.partition)]:
                        ends.pop((tp.topic, tp.partition), None)
    finally:
        consumer.close()
    assert not ends, f"could not read to the end of {sorted(ends)}"
    return {name: b"".join(parts) for name, parts in out.items()}


def vault_records(s: Settings) -> list[tuple[str, bytes | None]]:
    recs = read_all(s, TOPICS.contact_vault.name(s), timeout=15)
    return [((r.key or b"").decode(), r.value) for r in recs]


def test_a_raw_email_is_emailed_kept_only_encrypted_in_the_vault_and_shredded_by_forget(
    kafka_settings: Settings, tmp_path: Path, logs: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = kafka_settings
    key = generate_key()
    monkeypatch.setenv("SEGFLOW_VAULT_KEY", key)
    keyring = Keyring.from_text(key)
    serde = Serde.from_settings(s)
    (tmp_path / "vault.yaml").write_text(PLAYBOOK)
    receiver = Receiver().start()
    identity = IdentityService(s)
    identity.restore()
    cfg = DispatcherSettings(
        group_id=s.topic_prefix + "dispatcher",
        crm_base_url=receiver.url,
        email_base_url=receiver.url,
        webhook_url=receiver.url + "/webhook",
        tick_interval=0.1,
    )
    dispatcher = Dispatcher(s, cfg, book=load_book([tmp_path / "vault.yaml"]))
    dispatcher.restore()
    servers = [identity_api.start(identity, 0), dispatcher_api.start(dispatcher, 0)]
    now = int(time.time() * 1000)
    try:
        with Running(identity.loop()), Running(dispatcher.loop()):
            # 1. the raw event (email and phone), and a later one without them
            first = behaviour("identify", now, email=RAW_ADDRESS, properties={"phone": PHONE})
            later = behaviour("page_view", now + 1)
            # an invalid event (10 days ahead) keyed by the address: dead-lettered without it
            bad = behaviour("login", now + 864_000_000, email=RAW_ADDRESS)
            produce(
                s,
                TOPICS.events.name(s),
                [(b"u-vault-1", serde.encode(TOPICS.events, e)) for e in (first, later)]
                + [(RAW_ADDRESS.encode(), serde.encode(TOPICS.events, bad))],
            )
            recs = read_all(s, TOPICS.identified.name(s), expected=2, timeout=30)
            identified = sorted(
                (serde.decode(TOPICS.identified, r.value) for r in recs),
                key=lambda r: r["event"]["occurred_at"],
            )
            cid = identified[0]["customer_id"]
            assert identified[0]["event"]["email"] is None
            assert identified[0]["event"]["properties"] == {}  # the phone moved to the vault
            assert identified[0]["email_hash"]  # the keyed hash still travels

            # 2. the vault holds both contact points, encrypted with the customer's data key
            stored = wait(
                "the vault record", lambda: [v for k, v in vault_records(s) if k == cid and v]
            )
            record = serde.decode(TOPICS.contact_vault, stored[-1])
            points = keyring.open(record)
            assert points.emails == (ADDRESS,) and points.phones == (PHONE,)
            with pytest.raises(VaultError):  # another master key opens nothing
                Keyring.from_text(generate_key()).open(record)

            # 3. the segment change leads to an email to that address
            produce(
                s,
                TOPICS.segment_changes.name(s),
                [(cid.encode(), serde.encode(TOPICS.segment_changes, change(cid, now)))],
            )
            assert wait("the email", lambda: emails(receiver)) == [ADDRESS]

            # 4. no API answer carries it (the identity API resolves by it, without echoing)
            answers = []
            with httpx.Client(timeout=10) as http:
                ident = f"http://127.0.0.1:{servers[0].server_address[1]}"
                disp = f"http://127.0.0.1:{servers[1].server_address[1]}"
                found = http.get(ident + "/resolve", params={"type": "email", "value": ADDRESS})
                assert found.status_code == 200 and found.json()["customer_id"] == cid
                answers += [found.text, http.get(f"{ident}/customers/{cid}").text]
                answers += [http.get(f"{disp}/customers/{cid}").text, http.get(disp + "/kpis").text]
            for text in answers:
                assert ADDRESS not in text.lower() and PHONE not in text

            # 5. forget: the vault record is tombstoned, the dispatcher drops it, and a new
            #    entry into the segment sends nothing
            forget_send(s, forget_request(cid, "test", int(time.time() * 1000)))
            wait(
                "the vault tombstone",
                lambda: [v for k, v in vault_records(s) if k == cid][-1:] == [None],
            )
            vault = dispatcher.vault
            assert vault is not None
            wait("the dispatcher to drop the record", lambda: vault.email_for(cid) is None)
            fresh = VaultContacts(s, keyring)
            fresh.start()
            assert fresh.email_for(cid) is None  # a reader from the start finds nothing
            fresh.close()
            produce(
                s,
                TOPICS.segment_changes.name(s),
                [(cid.encode(), serde.encode(TOPICS.segment_changes, change(cid, now + 5)))],
            )
            time.sleep(2)
            assert emails(receiver) == [ADDRESS]  # still the one email
    finally:
        for server in servers:
            server.stop()
        dispatcher.close()
        receiver.stop()

    # 6. every topic's bytes: the address and phone only in the raw input topic (what the
    #    producer wrote) and, encrypted, in the vault; never in plain text anywhere else
    letters = read_all(s, TOPICS.dlq.name(s), timeout=10)
    assert len(letters) == 1 and letters[0].key is None  # the invalid event, redacted
    everything = raw_bytes(s)
    for topic in TOPICS:
        raw = everything[topic.name(s)].lower()
        present = ADDRESS.encode() in raw or PHONE.encode().lower() in raw
        assert present == (topic is TOPICS.events), topic.name(s)

    # 7. no log line of the services
    assert logs.lines, "no log captured"
    for line in logs.lines:
        assert ADDRESS not in line.lower() and PHONE not in line, line

    # 8. physically: once the broker compacts the vault, no record opens to the address
    topic = TOPICS.contact_vault.name(s)
    fast = {
        "segment.ms": "500",
        "min.cleanable.dirty.ratio": "0.001",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": "0",
    }
    with make_admin(s) as admin:
        res = ConfigResource(
            ConfigResource.Type.TOPIC,
            topic,
            incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                for k, v in fast.items()
            ],
        )
        for f in admin.incremental_alter_configs([res]).values():
            f.result(30)

    def opens() -> int:
        n = 0
        for k, v in vault_records(s):
            if k == cid and v is not None:
                try:
                    keyring.open(serde.decode(TOPICS.contact_vault, v))
                    n += 1
                except VaultError:
                    pass
        return n

    assert opens() >= 1  # before compaction the old record is still on the broker's disk
    part = [r.partition for r in read_all(s, topic) if r.key == cid.encode()][0]
    producer = make_producer(s)

    def compacted() -> bool:
        time.sleep(1.0)  # roll the segment holding the tombstone: a newer record after it
        producer.produce(topic, None, b"roll", partition=part)
        producer.flush(10)
        return opens() == 0

    wait("the broker to compact the vault", compacted, timeout=90)
