"""The dispatcher on the real broker against the real local receiver.

* injected 429 / 500 / lost answers (timeouts): every due action takes effect exactly once
  and the receiver never saw more requests for a key than the attempts recorded;
* a CRM outage (seconds here, minutes in life) delays the CRM actions and then delivers all
  of them, while email keeps flowing (one circuit breaker per endpoint);
* kill -9 twice in the middle of a three-step sequence: no duplicate send, no lost step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from segflow.receiver import Cue, Receiver
from segflow.runtime.leash import leashed
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import partition_for
from segflow.runtime.testing import produce, read_all
from segflow.runtime.topics import TOPICS
from services.dispatcher import core
from services.dispatcher.app import Dispatcher, DispatcherSettings
from services.dispatcher.core import idempotency_key
from services.dispatcher.experiments import assign
from services.dispatcher.playbooks import DEFAULT_DIR, load_book

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]
HOUR = 3_600_000
NOON = 1_772_452_800_000  # 2026-03-02 12:00 UTC

PLAYBOOK = """\
playbook: P
segment: S
defaults: {first_name: there}
steps:
  - {id: mail, channel: email, template: d-1, subject: "Hi {{first_name}}"}
  - {id: task, channel: crm_task, subject: "Call"}
  - {id: hook, channel: webhook}
  - {id: case, channel: support_escalation, subject: "Escalate"}
---
policy: {default_timezone: UTC}
"""


def change(cid: str, at: int, segment: str = "S", transition: str = "entered") -> dict[str, Any]:
    entry = f"{cid}:{segment}:{at}"
    return {
        "change_id": f"{entry}:{transition}",
        "customer_id": cid,
        "segment": segment,
        "transition": transition,
        "reason": None,
        "entry_id": entry,
        "definition_version": "test@1",
        "occurred_at": at,
        "emitted_at": at,
        "primary_segment": segment,
        "score": None,
        "explanation": [],
    }


def send(s: Settings, topic: Any, records: list[dict[str, Any]]) -> None:
    serde = Serde.from_settings(s)
    produce(
        s, topic.name(s), ((r["customer_id"].encode(), serde.encode(topic, r)) for r in records)
    )


def results(s: Settings, expected: int | None = None, timeout: float = 30) -> list[dict[str, Any]]:
    serde = Serde.from_settings(s)
    recs = read_all(s, TOPICS.dispatch_results.name(s), expected=expected, timeout=timeout)
    return [serde.decode(TOPICS.dispatch_results, r.value) for r in recs if r.value]


def settings_for(receiver: Receiver, s: Settings, **kw: Any) -> DispatcherSettings:
    base: dict[str, Any] = dict(
        group_id=s.topic_prefix + "dispatcher",
        crm_base_url=receiver.url,
        email_base_url=receiver.url,
        webhook_url=receiver.url + "/webhook",
        contact_pattern="{customer_id}@example.invalid",
        tick_interval=0.1,
        backoff_base=0.05,
        backoff_cap=0.5,
        http_timeout=0.5,
    )
    base.update(kw)
    return DispatcherSettings(**base)


class Running:
    """A dispatcher running in a thread of this process."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        d.restore()
        self.loop = d.loop()
        self.thread = threading.Thread(target=self.loop.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.stop()
        self.thread.join(30)
        self.d.close()


def sent_results(rs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    sent = [r for r in rs if r["status"] == "sent"]
    assert len(sent) == len({r["idempotency_key"] for r in sent}), "a key was sent twice"
    return {r["idempotency_key"]: r for r in sent}


def test_injected_failures_still_deliver_every_action_exactly_once(
    kafka_settings: Settings, receiver: Receiver, tmp_path: Path
) -> None:
    s = kafka_settings
    (tmp_path / "p.yaml").write_text(PLAYBOOK)
    book = load_book([tmp_path])
    now = int(time.time() * 1000)
    cids = [f"c{i:03d}" for i in range(40)]
    expected = {
        idempotency_key(c, "P", step, f"{c}:S:{now}", now)
        for c in cids
        for step in ("mail", "task", "hook", "case")
    }
    # a 400 (permanent), then 429 with Retry-After, 500s and answers lost to client timeouts
    receiver.cue(
        Cue(400),
        *[Cue(429, (("Retry-After", "0.3"),)), Cue(500), Cue(200, delay=0.8), Cue(503), Cue(201)]
        * 8,
    )
    # email retries after lost answers too here: this receiver de-duplicates by key, which
    # SendGrid does not (the default, at most once, is tested in test_vendor_exactly_once.py)
    cfg = settings_for(
        receiver, s, breaker_threshold=1000, concurrency=32, email_on_ambiguous="at_least_once"
    )
    with Running(Dispatcher(s, cfg, book=book)):
        send(s, TOPICS.segment_changes, [change(c, now) for c in cids])
        _wait(lambda: any(r.status == 400 for r in receiver.requests), 30)
        rejected = next(r.key for r in receiver.requests if r.status == 400)
        assert receiver.wait_for(expected - {rejected}, timeout=40)
        rs = results(s, expected=len(expected))
    sent = sent_results(rs)
    assert set(sent) == expected - {rejected} == set(receiver.effects())
    attempts = receiver.attempts()
    assert all(attempts[k] <= sent[k]["attempt"] for k in sent)  # raw requests <= attempts
    assert sum(attempts.values()) > len(expected)  # failures really happened
    assert max(r["attempt"] for r in sent.values()) >= 2
    failed = [r for r in rs if r["status"] == "failed"]
    assert [(r["idempotency_key"], r["http_status"]) for r in failed] == [(rejected, 400)]
    assert {r["status"] for r in rs} == {"sent", "failed"}
    serde = Serde.from_settings(s)
    dlq = [serde.decode(TOPICS.dlq, r.value) for r in read_all(s, TOPICS.dlq.name(s), expected=1)]
    assert [
        (
            d["reason"],
            dict((h["key"], h["value"]) for h in d["original_headers"])["idempotency_key"].decode(),
        )
        for d in dlq
    ] == [("dispatch_failed", rejected)]
    assert serde.decode(TOPICS.dispatch_results, dlq[0]["original_value"])["status"] == "failed"
    lost = {k for k, n in attempts.items() if n > 1}
    assert receiver.replays() <= min(len(lost), 8)  # only lost answers were replayed
    webhook = [r for r in receiver.requests if r.path == "/webhook"]
    assert webhook and all(r.status != 401 for r in webhook)  # every webhook verified


def test_crm_outage_delays_crm_actions_then_delivers_them_all(
    kafka_settings: Settings, receiver: Receiver, tmp_path: Path
) -> None:
    s = kafka_settings
    (tmp_path / "p.yaml").write_text(
        PLAYBOOK.replace(
            "  - {id: hook, channel: webhook}\n  - {id: case, channel: support_escalation, "
            'subject: "Escalate"}\n',
            "",
        )
    )
    book = load_book([tmp_path])
    now = int(time.time() * 1000)
    cids = [f"o{i:03d}" for i in range(30)]
    mails = {idempotency_key(c, "P", "mail", f"{c}:S:{now}", now) for c in cids}
    tasks = {idempotency_key(c, "P", "task", f"{c}:S:{now}", now) for c in cids}
    outage = 4.0  # "10 minutes" in life: the same path, shortened by config
    receiver.outage(prefix="/crm")
    cfg = settings_for(receiver, s, breaker_threshold=3, breaker_cooldown=1.0, backoff_cap=1.0)
    with Running(Dispatcher(s, cfg, book=book)):
        send(s, TOPICS.segment_changes, [change(c, now) for c in cids])
        assert receiver.wait_for(mails, timeout=30)  # email flows during the outage
        _wait(lambda: sum(r.status == 503 for r in receiver.requests) >= 3, 10)
        time.sleep(outage)  # the outage lasts this long (not a wait for a condition)
        assert not tasks & set(receiver.effects())
        assert not any(r["status"] == "failed" for r in results(s, timeout=2))
        receiver.end_outage()
        ended = time.time()
        assert receiver.wait_for(tasks, timeout=30)
        rs = results(s, expected=60)
    failed_calls = [r for r in receiver.requests if r.path.startswith("/crm") and r.at < ended]
    assert all(r.status == 503 for r in failed_calls)
    # the breaker holds the endpoint: ~one probe per cooldown after the first failed batch,
    # instead of 30 actions retrying every <= 1 s
    assert len(failed_calls) <= 30 + 2 * (outage + 3)
    sent = sent_results(rs)
    assert set(sent) == mails | tasks
    crm_calls = [r for r in receiver.requests if r.path.startswith("/crm")]
    assert Counter(r.key for r in crm_calls if r.effect) == Counter(tasks)


def _spawn(s: Settings, receiver: Receiver, group: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SEGFLOW_BOOTSTRAP_SERVERS": s.bootstrap_servers,
        "SEGFLOW_TOPIC_PREFIX": s.topic_prefix,
        "SEGFLOW_LOG_LEVEL": "WARNING",
        "SEGFLOW_DISPATCHER_CLOCK": "event",
        "SEGFLOW_DISPATCHER_GROUP_ID": group,
        "SEGFLOW_DISPATCHER_PLAYBOOKS": str(DEFAULT_DIR),
        "SEGFLOW_DISPATCHER_CRM_BASE_URL": receiver.url,
        "SEGFLOW_DISPATCHER_EMAIL_BASE_URL": receiver.url,
        "SEGFLOW_DISPATCHER_WEBHOOK_URL": receiver.url + "/webhook",
        "SEGFLOW_DISPATCHER_CONTACT_PATTERN": "{customer_id}@example.invalid",
        "SEGFLOW_DISPATCHER_CONCURRENCY": "8",
        "SEGFLOW_DISPATCHER_TICK_INTERVAL": "0.1",
        "SEGFLOW_DISPATCHER_BACKOFF_CAP": "0.5",
    }
    return subprocess.Popen(
        leashed([sys.executable, "-m", "services.dispatcher"]),
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
    )


def _wait(cond: Any, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None:
            assert proc.poll() is None, f"dispatcher exited with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def clock_changes(at: int) -> list[dict[str, Any]]:
    """One segment change at ``at`` on every partition, in a segment no playbook reacts to:
    the pipeline clock is per partition, and only segment changes move it."""
    parts = TOPICS.segment_changes.partitions
    ids: dict[int, str] = {}
    i = 0
    while len(ids) < parts:
        ids.setdefault(partition_for(f"clock{i}", parts), f"clock{i}")
        i += 1
    return [change(cid, at, "Clock") for cid in ids.values()]


def test_kill_9_mid_sequence_and_restart_send_no_email_twice_and_lose_no_step_never_started(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    s = kafka_settings
    receiver = Receiver(latency=0.15).start()
    book = load_book([DEFAULT_DIR])
    pb = book.get("AtRisk-60d")
    assert pb is not None
    cids = [f"k{i:03d}" for i in range(60)]
    treated = [c for c in cids if assign(c, pb.name, pb.experiment) != "holdout"]
    assert len(treated) < len(cids)

    def keys(step: str) -> set[str]:
        return {idempotency_key(c, pb.name, step, f"{c}:AtRisk-60d:{NOON}", NOON) for c in treated}

    mail, task, case = keys("reengagement_email"), keys("owner_task"), keys("support_escalation")
    done = lambda ks: len(ks & set(receiver.effects()))  # noqa: E731

    def settled(ks: set[str]) -> bool:
        final = {r["idempotency_key"] for r in results(s, timeout=10) if r["status"] != "scheduled"}
        return ks <= final

    group = s.topic_prefix + "dispatcher"
    try:
        send(s, TOPICS.segment_changes, [change(c, NOON, "AtRisk-60d") for c in cids])
        first = _spawn(s, receiver, group)
        _wait(lambda: done(mail) >= 16, 60, first)  # some emails out, more in flight
        first.kill()
        first.wait(10)
        _wait(receiver.idle, 10)  # requests sent before the kill still land
        at_first_kill = done(mail)
        assert at_first_kill < len(mail)

        second = _spawn(s, receiver, group)
        # every email settles: sent, or (started by the killed instance) failed as ambiguous
        _wait(lambda: settled(mail), 60, second)
        send(s, TOPICS.segment_changes, clock_changes(NOON + 49 * HOUR))  # 48 h later
        _wait(lambda: done(task) >= 16, 60, second)
        second.kill()
        second.wait(10)
        _wait(receiver.idle, 10)
        at_second_kill = done(task)
        assert at_second_kill < len(task)

        third = _spawn(s, receiver, group)
        _wait(lambda: done(task) == len(task), 60, third)
        send(s, TOPICS.segment_changes, clock_changes(NOON + 97 * HOUR))  # 96 h later
        _wait(lambda: done(case) == len(case), 60, third)
        rs = results(s, expected=3 * len(treated) + 3 * (len(cids) - len(treated)))
        third.terminate()
        third.wait(20)
    finally:
        receiver.stop()
    sent = sent_results(rs)  # one committed "sent" per key
    unknown = {
        r["idempotency_key"]
        for r in rs
        if r["status"] == "failed" and r["reason"] == core.UNKNOWN_OUTCOME
    }
    # every step either sent, or (an email the killed instance had recorded as started) not
    # called again: nothing lost that never started, nothing extra
    assert set(sent) | unknown == mail | task | case and not set(sent) & unknown
    assert unknown <= mail, "a CRM upsert (applied once by the vendor) was not repeated"
    assert set(sent) <= set(receiver.effects()) <= mail | task | case
    # no email reached the receiver twice (raw attempts: SendGrid would send each one)
    attempts = receiver.attempts()
    twice = [k for k in mail if attempts.get(k, 0) > 1]
    assert not twice, f"{len(twice)} emails sent twice"
    # at most the calls the killed instance could have recorded as started (CONCURRENCY 8)
    assert len(unknown) <= 8, unknown
    assert all(attempts[k] <= max(sent[k]["attempt"], 1) + 1 for k in sent)
    # only CRM calls made in the killed, uncommitted tick may reach the receiver again
    assert receiver.replays() <= at_first_kill + at_second_kill
    holdout = [r for r in rs if r["status"] == "holdout"]
    assert {r["customer_id"] for r in holdout} == set(cids) - set(treated)
    assert not {r.key for r in receiver.requests} & {r["idempotency_key"] for r in holdout}


def test_a_clean_stop_records_the_calls_under_way_so_a_restart_repeats_none(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    # Calls run on the I/O thread while the loop goes on consuming; stopping must wait for
    # the calls under way and commit their outcomes, or the restart would call them again.
    s = kafka_settings
    receiver = Receiver(latency=1.0).start()
    try:
        (tmp_path / "p.yaml").write_text(
            'playbook: P\nsegment: S\nsteps:\n  - {id: task, channel: crm_task, subject: "Call"}\n'
            "---\npolicy: {default_timezone: UTC}\n"
        )
        book = load_book([tmp_path])
        now = int(time.time() * 1000)
        cids = [f"g{i:03d}" for i in range(30)]
        expected = {idempotency_key(c, "P", "task", f"{c}:S:{now}", now) for c in cids}
        # a HubSpot task is three calls (contact lookup, upsert, association) of 1 s each
        # here: all 30 at once so the batch under way ends within the loop's drain timeout
        cfg = settings_for(receiver, s, concurrency=32, http_timeout=5.0)
        with Running(Dispatcher(s, cfg, book=book)):
            send(s, TOPICS.segment_changes, [change(c, now) for c in cids])
            _wait(lambda: receiver.busy > 0, 30)  # stop while calls are in flight
        recorded = set(sent_results(results(s)))
        assert recorded == set(receiver.effects()), "a call made before the stop went unrecorded"
        assert recorded  # the calls under way were waited for and committed
        with Running(Dispatcher(s, cfg, book=book)):
            assert receiver.wait_for(expected, timeout=60)
            rs = results(s, expected=len(expected))
        assert set(sent_results(rs)) == expected
        assert receiver.replays() == 0, "the restart called an action again"
    finally:
        receiver.stop()
