"""The dispatcher alone as 1 instance, as 2, and as 2 with one killed with ``kill -9`` mid-stream
and a third added (issue #15), on the same segment changes.

The input is written here, straight onto the segment changes topic (no upstream service whose
own differences would show through): weeks of event time, several customers per partition,
entries, exits, re-entries, ``re_engaged`` cancels, merges (``exited``/``merged``) and a
forgotten customer, on the default playbooks (holdouts and variants, delayed steps with
``no_engagement_since``, caps, cooldowns, priorities, quiet hours) plus one SMTP and webhook
playbook written here. The dispatchers run with ``clock: event``; one sentinel change per
partition at the end moves every partition's clock past every step due before it.

Everything is checked from outside the dispatcher: the results topic (``read_committed``) and
what real vendor stand-ins on 127.0.0.1 (``segflow.receiver``: HTTP with the vendors' contract
checks, and SMTP) received. Runs 2 and 3 must give exactly what run 1 gives: the same actions
at the vendors (idempotency keys, paths and bodies), the same decision for every step (the
results without their processing-time fields), except in run 3 the emails the killed instance
had recorded as started: they are failed as ``ambiguous`` and not sent again (at most once),
and each must have a committed start record in the changelog. In every run: no result twice,
no action decided twice or taken twice, no email at the SendGrid or SMTP stand-in twice
(counted by raw attempts), every step due before the end fired, every action reported sent
took effect and nothing else did.

The three runs are independent (own topics, group, receivers and processes) and run at the
same time, as in test_scale_out.py, whose helpers this file uses.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import time
from collections import Counter
from collections.abc import Set
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from segflow.demo.run import _vendor_ids
from segflow.receiver import Receiver, SMTPReceiver
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import partition_for
from segflow.runtime.testing import isolated_settings, read_all
from segflow.runtime.topics import TOPICS
from services.dispatcher.core import UNKNOWN_OUTCOME, customer_from_record
from services.dispatcher.playbooks import DEFAULT_DIR, load_book
from tests.integration.test_scale_out import (  # noqa: F401 (fleets: the fixture)
    COORDINATOR_MOVING,
    DAY,
    T0,
    Fleet,
    Fleets,
    by_customer,
    concurrently,
    fleets,
    send,
    settled,
)

pytestmark = pytest.mark.broker

HOUR = 3_600_000
DAYS = 28
T_END = T0 + DAYS * DAY
PER_PARTITION = 10

#: A playbook on the SMTP and webhook channels (the default book has no SMTP step): a delayed
#: step under the SMTP cooldown and caps, a webhook between them, a holdout and two variants.
EXTRA = """playbook: Winback SMTP
segment: Winback
version: 1
priority: 50
campaign_id: winback-smtp
experiment: {holdout: 0.2, variants: [{name: A}, {name: B, steps: {first_mail: {subject: "B"}}}]}
steps:
  - {id: first_mail, channel: smtp, after: 0h, subject: "Come back", body: "We kept your seat."}
  - {id: ping, channel: webhook, after: 12h}
  - id: second_mail
    channel: smtp
    after: 30h
    if: {no_engagement_since: first_mail}
    subject: "Still here"
    body: "A last reminder."
"""

#: Segments the playbooks react to (the lifecycle ones are CRM syncs, never competing).
SEGMENTS = [
    "AtRisk-60d",
    "Silent Decline",
    "High-CLV Login Drop",
    "New Lead No Content",
    "Purchase Frequency Drop",
    "ReEngageAtRisk",
    "Re-engaged",
    "Support Escalation",
    "Engaged But At-Risk",
    "Lifecycle: churned",
    "Lifecycle: loyal",
    "Winback",
]


def change(
    cid: str, segment: str, transition: str, entry: str, at: int, reason: str | None = None
) -> dict[str, Any]:
    return {
        "change_id": f"{entry}:{transition}",
        "customer_id": cid,
        "segment": segment,
        "transition": transition,
        "reason": reason,
        "entry_id": entry,
        "definition_version": "test",
        "occurred_at": at,
        "emitted_at": T0,
        "primary_segment": segment,
        "score": None,
        "explanation": [
            {
                "path": "enter",
                "feature": "engagement_drop",
                "operator": ">=",
                "observed": round((at % 997) / 997, 3),
                "threshold": 0.6,
                "margin": None,
                "passed": True,
                "observed_text": None,
                "threshold_text": None,
            }
        ],
        "previous_primary": None,
        "dwell_ms": None,
    }


def customers() -> list[str]:
    """``PER_PARTITION`` customer ids on every partition."""
    parts = TOPICS.segment_changes.partitions
    by_part: dict[int, list[str]] = {p: [] for p in range(parts)}
    i = 0
    while any(len(ids) < PER_PARTITION for ids in by_part.values()):
        cid = f"d{i:03d}"
        ids = by_part[partition_for(cid, parts)]
        if len(ids) < PER_PARTITION:
            ids.append(cid)
        i += 1
    return sorted(c for ids in by_part.values() for c in ids)


def segment_changes(seed: int = 15) -> list[dict[str, Any]]:
    """Every customer's stays over ``DAYS`` days, interleaved in event-time order with a few
    changes produced late (behind their partition's clock); one sentinel per partition last."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    ids = customers()
    merged = set(ids[3::9])
    for k, cid in enumerate(ids):
        t = T0 + rng.randrange(0, 2 * DAY)
        n: Counter[str] = Counter()
        live: dict[str, str] = {}
        end = T_END - 3 * DAY if cid in merged else T_END - DAY
        while t < end:
            seg = rng.choice(SEGMENTS)
            if seg in live:
                transition = "re_engaged" if rng.random() < 0.2 else "exited"
                out.append(change(cid, seg, transition, live.pop(seg), t, "condition"))
            else:
                n[seg] += 1
                live[seg] = f"{cid}|{seg}|{n[seg]}"
                out.append(change(cid, seg, "entered", live[seg], t))
            short = rng.randrange(HOUR, 14 * HOUR)
            t += (short if rng.random() < 0.5 else rng.randrange(DAY, 4 * DAY)) + rng.randrange(
                60_000
            )
        if cid in merged:  # absorbed into another id: every stay ends; a late one starts
            for seg, entry in sorted(live.items()):
                out.append(change(cid, seg, "exited", entry, t, "merged"))
            seg = rng.choice(SEGMENTS)
            n[seg] += 1
            out.append(change(cid, seg, "entered", f"{cid}|{seg}|{n[seg]}", t + 5 * HOUR))
        if k == 7:  # forgotten mid-way: everything pending cancelled, nothing sent after
            at = T0 + 10 * DAY + 30 * 60_000
            out.append(change(cid, "AtRisk-60d", "exited", f"{cid}|gdpr", at, "forgotten"))
    out.sort(key=lambda c: (c["occurred_at"], c["customer_id"]))
    for i in range(0, len(out) - 12, 29):  # late: produced a few records after later ones
        out.insert(i + 10, out.pop(i))
    parts = TOPICS.segment_changes.partitions
    clocks: dict[int, str] = {}
    i = 0
    while len(clocks) < parts:
        clocks.setdefault(partition_for(f"zz-clock-{i}", parts), f"zz-clock-{i}")
        i += 1
    for cid in clocks.values():
        out.append(change(cid, "Clock", "entered", f"{cid}|Clock|1", T_END))
    return out


def dispatcher_env(
    s: Settings, receiver: Receiver, smtp: SMTPReceiver, extra: Path, **more: str
) -> dict[str, str]:
    return {
        "SEGFLOW_DISPATCHER_GROUP_ID": s.topic_prefix + "dispatcher",
        "SEGFLOW_DISPATCHER_CLOCK": "event",
        "SEGFLOW_DISPATCHER_TICK_INTERVAL": "0.1",
        "SEGFLOW_DISPATCHER_PLAYBOOKS": f"{DEFAULT_DIR},{extra}",
        "SEGFLOW_DISPATCHER_CONTACT_PATTERN": "{customer_id}@example.invalid",
        "SEGFLOW_DISPATCHER_CRM_BASE_URL": receiver.url,
        "SEGFLOW_DISPATCHER_EMAIL_BASE_URL": receiver.url,
        "SEGFLOW_DISPATCHER_WEBHOOK_URL": receiver.url + "/webhook",
        "SEGFLOW_DISPATCHER_SMTP_PORT": str(smtp.port),
        **_vendor_ids(),
        **more,
    }


def drained(s: Settings, fleet: Fleet, timeout: float = 120.0) -> None:
    """The group committed every segment change (written here without transactions: the end
    offset is the record count) and no transaction is open on the dispatcher's outputs (a
    ``kill -9``ed instance's hides what follows from read_committed readers until the broker
    aborts it)."""
    changes = TOPICS.segment_changes.name(s)
    outputs = [TOPICS.dispatch_results.name(s), TOPICS.dispatcher_state.name(s)]
    base = {**s.kafka_config(), "enable.auto.commit": False}
    group = Consumer({**base, "group.id": s.topic_prefix + "dispatcher"})
    committed_reader = Consumer({**base, "group.id": "x", "isolation.level": "read_committed"})
    raw_reader = Consumer({**base, "group.id": "x", "isolation.level": "read_uncommitted"})
    deadline = time.monotonic() + timeout
    try:
        while True:
            fleet.check_alive()
            behind: list[str] = []
            parts = sorted(group.list_topics(changes, timeout=10).topics[changes].partitions)
            try:
                done = group.committed([TopicPartition(changes, p) for p in parts], timeout=10)
            except KafkaException as exc:  # the group's coordinator is (re)loading
                if exc.args[0].code() not in COORDINATOR_MOVING:
                    raise
                done, behind = [], [exc.args[0].str()]
            for tp in done:
                end = group.get_watermark_offsets(tp, timeout=10)[1]
                if tp.offset < end:
                    behind.append(f"changes[{tp.partition}] at {tp.offset} of {end}")
            for name in outputs:
                for p in raw_reader.list_topics(name, timeout=10).topics[name].partitions:
                    tp = TopicPartition(name, p)
                    stable = committed_reader.get_watermark_offsets(tp, timeout=10)[1]
                    if stable < raw_reader.get_watermark_offsets(tp, timeout=10)[1]:
                        behind.append(f"{name}[{p}] open transaction")
            if not behind:
                return
            assert time.monotonic() < deadline, f"not drained after {timeout:g} s: {behind}"
            time.sleep(0.3)
    finally:
        for c in (group, committed_reader, raw_reader):
            c.close()


def results(s: Settings) -> list[dict[str, Any]]:
    serde = Serde.from_settings(s)
    return [
        serde.decode(TOPICS.dispatch_results, r.value)
        for r in read_all(s, TOPICS.dispatch_results.name(s), timeout=30)
        if r.value is not None
    ]


#: Set by the call, not by the decision: the wall clock (``dispatched_at``), the attempt count
#: and the answer (a call made again after a kill gets the receiver's 200 for a known key).
CALL_FIELDS = ("dispatched_at", "attempt", "http_status")


def decision(r: dict[str, Any]) -> tuple[Any, ...]:
    """A result without its processing-time fields."""
    return tuple((k, v) for k, v in sorted(r.items()) if k not in CALL_FIELDS)


#: Request body fields set from the wall clock when the call is made: a HubSpot task's and
#: ticket's ``hs_timestamp`` (its due date: now).
CALL_BODY_FIELDS = frozenset({"hs_timestamp"})


def without_call_time(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: without_call_time(v) for k, v in body.items() if k not in CALL_BODY_FIELDS}
    if isinstance(body, list):
        return [without_call_time(v) for v in body]
    return body


def at_vendor(receiver: Receiver, smtp: SMTPReceiver) -> dict[str, tuple[str, str, str]]:
    """Idempotency key → (method, path, body) of the request that took effect; SMTP messages
    by their key (subject and recipient)."""
    out = {
        k: (seen.method, seen.path, json.dumps(without_call_time(seen.body), sort_keys=True))
        for k, seen in receiver.effects().items()
    }
    for m in smtp.messages:
        out[m["key"]] = ("SMTP", m["to"], m["subject"])
    return out


class Run:
    """One run's outputs, read from the topics and the receivers after the fleet stopped."""

    def __init__(self, s: Settings, receiver: Receiver, smtp: SMTPReceiver) -> None:
        self.results = results(s)
        self.vendor = at_vendor(receiver, smtp)
        self.attempts = receiver.attempts()
        self.replays = receiver.replays()
        self.rejected = receiver.rejected() + len(smtp.rejected)
        self.smtp_keys = Counter(m["key"] for m in smtp.messages)
        self.smtp_ids = Counter(m["message_id"] for m in smtp.messages)
        self.smtp_pairs = {(m["message_id"], m["key"]) for m in smtp.messages}
        self.at_kill = 0
        self.customer_of = {r["idempotency_key"]: r["customer_id"] for r in self.results}
        self.channel_of = {r["idempotency_key"]: r["channel"] for r in self.results}
        #: Started by an instance killed before it recorded the answer: not called again.
        self.unknown = {
            r["idempotency_key"]
            for r in self.results
            if r["status"] == "failed" and r["reason"] == UNKNOWN_OUTCOME
        }

    def decisions(self, leave_out: Set[str] = frozenset()) -> Counter[tuple[Any, ...]]:
        return Counter(decision(r) for r in self.results if r["idempotency_key"] not in leave_out)

    def emails_twice(self) -> dict[str, int]:
        """Emails that reached the stand-ins more than once, counted by raw attempts: HTTP
        requests to the SendGrid-shaped endpoint per idempotency key, SMTP messages per
        Message-ID (a real SendGrid or SMTP server would deliver each one)."""
        http = {
            k: n for k, n in self.attempts.items() if n > 1 and self.channel_of.get(k) == "email"
        }
        smtp = {m: n for m, n in self.smtp_ids.items() if n > 1}
        return {**http, **smtp}

    def sent(self) -> Counter[str]:
        return Counter(r["idempotency_key"] for r in self.results if r["status"] == "sent")


def assigned(fleet: Fleet, s: Settings, instances: list[str]) -> None:
    """Every instance owns partitions before the input comes: a partition that moves while
    calls are under way for it has them made again by its new owner (same key), which only
    the kill run is meant to show."""
    deadline = time.monotonic() + 60
    while sorted(i for i, p in fleet.owned(s).items() if p) != sorted(instances):
        assert time.monotonic() < deadline, f"not all assigned within 60 s: {fleet.owned(s)}"
        fleet.check_alive()
        time.sleep(0.2)


def run_dispatchers(
    bootstrap: str,
    label: str,
    fleet: Fleet,
    extra: Path,
    instances: list[str],
    data: list[Any],
    **more: str,
) -> Run:
    s = isolated_settings(bootstrap, label)
    receiver, smtp = Receiver().start(), SMTPReceiver().start()
    try:
        env = dispatcher_env(s, receiver, smtp, extra, **more)
        for inst in instances:
            fleet.start("services.dispatcher", s, inst, env)
        assigned(fleet, s, instances)
        send(s, TOPICS.segment_changes, data, by_customer)
        drained(s, fleet)
        settled(lambda: results(s), fleet, quiet=3.0)
        fleet.stop()
        owned = fleet.owned(s)
        assert sorted(owned) == sorted(instances) and all(owned.values()), owned
        return Run(s, receiver, smtp)
    finally:
        fleet.stop()
        receiver.stop()
        smtp.stop()


def kill_dispatchers(
    bootstrap: str, fleet: Fleet, extra: Path, data: list[Any]
) -> tuple[Run, Fleet, Settings]:
    """Two instances (slow: small batches, each transaction held open 0.2 s, every call
    answered 0.2 s late), one killed with -9 mid-stream while calls are under way (its
    unrecorded CRM and webhook calls are made again by the new owner: ``Run.replays``; its
    started emails are not: ``Run.unknown``), a third added."""
    s = isolated_settings(bootstrap, "disp-kill")
    receiver, smtp = Receiver(latency=0.2).start(), SMTPReceiver().start()
    try:
        slow = dispatcher_env(
            s,
            receiver,
            smtp,
            extra,
            SEGFLOW_DISPATCHER_BATCH_SIZE="10",
            SEGFLOW_DISPATCHER_PRE_COMMIT_DELAY="0.2",
        )
        fleet.start("services.dispatcher", s, "0", slow)
        fleet.start("services.dispatcher", s, "1", slow)
        assigned(fleet, s, ["0", "1"])
        deadline = time.monotonic() + 60
        half = len(data) // 2
        send(s, TOPICS.segment_changes, data[:half], by_customer)
        # killed once actions are being taken, while the receiver is answering calls
        while sum(1 for k in receiver.effects() if k) < 40 or receiver.idle():
            assert time.monotonic() < deadline, "nothing delivered within 60 s"
            fleet.check_alive()
            time.sleep(0.05)
        at_kill = len(results(s))
        fleet.kill("1")
        send(s, TOPICS.segment_changes, data[half:], by_customer)
        while len(results(s)) < at_kill + 100:  # the survivor goes on; then one more joins
            assert time.monotonic() < deadline + 60, "no progress after the kill"
            fleet.check_alive()
            time.sleep(0.2)
        fleet.start("services.dispatcher", s, "2", dispatcher_env(s, receiver, smtp, extra))
        drained(s, fleet)
        settled(lambda: results(s), fleet, quiet=3.0)
        fleet.stop()
        run = Run(s, receiver, smtp)
        run.at_kill = at_kill
        return run, fleet, s
    finally:
        fleet.stop()
        receiver.stop()
        smtp.stop()


def started_records(s: Settings) -> set[str]:
    """Keys of the actions the dispatcher's changelog (read_committed, every version of every
    customer record) ever held as in flight and recorded as started."""
    serde = Serde.from_settings(s)
    out: set[str] = set()
    for r in read_all(s, TOPICS.dispatcher_state.name(s), timeout=30):
        if r.value is None:
            continue
        rec = serde.decode(TOPICS.dispatcher_state, r.value)
        if rec.get("kind") == "customer":
            c = customer_from_record(rec)
            out |= {a.key for a in c.actions if a.started and a.status == "in_flight"}
    return out


def seen(run: Run, key: str, forgotten: set[str]) -> tuple[str, ...] | None:
    """What the vendor got for ``key``. A forgotten customer's action that was in flight at
    the forget still goes out (it was taken before, in event time) but, once the forget is
    read, without the erased feature values and attributes: whether its call was rendered
    before or after that is processing timing, so only where it went is compared."""
    got = run.vendor.get(key)
    if got is None:
        return None
    return got[:2] if run.customer_of.get(key) in forgotten else got


def check_run(run: Run, label: str) -> None:
    """What any number of instances must give, checked on the topics and at the receivers."""
    doubled = [i for i, n in Counter(r["result_id"] for r in run.results).items() if n > 1]
    assert not doubled, f"{label}: results written twice: {doubled[:3]}"
    final = Counter(r["idempotency_key"] for r in run.results if r["status"] != "scheduled")
    twice = [k for k, n in final.items() if n > 1]
    assert not twice, f"{label}: actions decided twice: {twice[:3]}"
    # an SMTP message sent again (a call under way when its partition moved, made again by
    # the new owner) has the same Message-ID, which the receiver de-duplicates by
    ids = {m: k for m, k in run.smtp_pairs}
    assert len(ids) == len(set(run.smtp_keys)), f"{label}: one key, two Message-IDs"
    # what was sent took effect; what took effect was sent, or was started by an instance
    # killed before it recorded the answer (failed as ambiguous, not called again)
    assert (
        set(run.sent()) <= set(run.vendor) and set(run.vendor) - set(run.sent()) <= run.unknown
    ), (
        f"{label}: sent without effect {sorted(set(run.sent()) - set(run.vendor))[:3]}, "
        f"effect without sent {sorted(set(run.vendor) - set(run.sent()) - run.unknown)[:3]}"
    )
    assert not run.emails_twice(), f"{label}: emails sent twice {run.emails_twice()}"
    assert run.rejected == 0, f"{label}: requests refused by the vendor contracts"
    # every step whose latest schedule (quiet hours schedule a step again) fell due before
    # the end (every partition's clock reached T_END) fired: suppressed, sent or failed
    latest: dict[str, int] = {}
    for r in run.results:
        if r["status"] == "scheduled":
            latest[r["idempotency_key"]] = max(latest.get(r["idempotency_key"], 0), r["due_at"])
    lost = sorted(k for k, at in latest.items() if at <= T_END and k not in final)
    assert not lost, f"{label}: timers lost (due, never fired): {lost[:3]}"


def test_two_dispatchers_take_exactly_the_actions_one_does_also_across_kill_9_and_a_new_one(
    kafka_bootstrap: str,
    fleets: Fleets,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    extra = tmp_path / "winback.yaml"
    extra.write_text(EXTRA)
    load_book([DEFAULT_DIR, extra])  # valid, with the default policy
    data = segment_changes()
    one, two, (three, fleet, s) = concurrently(
        fleets,
        lambda: run_dispatchers(kafka_bootstrap, "disp-one", fleets.new("one"), extra, ["0"], data),
        # in batches of 50, not one of 2,000: the decisions must not depend on the batching
        lambda: run_dispatchers(
            kafka_bootstrap,
            "disp-two",
            fleets.new("two"),
            extra,
            ["0", "1"],
            data,
            SEGFLOW_DISPATCHER_BATCH_SIZE="50",
        ),
        lambda: kill_dispatchers(kafka_bootstrap, fleets.new("kill"), extra, data),
    )
    dump = os.environ.get("SEGFLOW_DISPATCHER_DUMP")
    if dump:  # the runs' outputs, for a look at what differs
        Path(dump).write_bytes(pickle.dumps({"one": one, "two": two, "kill": three}))
    for label, run in (("one", one), ("two", two), ("kill", three)):
        check_run(run, label)
    # The input exercises what a second instance or a kill could change: delayed steps that
    # fire on the event clock, quiet hours, caps and cooldowns, priorities, holdouts, cancels,
    # merges, and actions on every channel.
    statuses = Counter((r["status"], r["reason"]) for r in one.results)
    for want in (
        ("scheduled", None),
        ("scheduled", "quiet_hours"),
        ("suppressed", "frequency_cap"),
        ("suppressed", "cooldown"),
        ("suppressed", "segment_exited"),
        ("suppressed", "segment_re_engaged"),
        ("suppressed", "preempted"),
        ("suppressed", "lower_priority"),
        ("suppressed", "merged"),
        ("suppressed", "forgotten"),
        ("holdout", "holdout"),
    ):
        assert statuses[want] > 0, (want, statuses)
    scheduled = {r["idempotency_key"] for r in one.results if r["status"] == "scheduled"}
    assert len(scheduled & set(one.sent())) >= 50, "fewer than 50 scheduled steps were sent"
    channels = Counter(r["channel"] for r in one.results if r["status"] == "sent")
    assert set(channels) >= {
        "email",
        "smtp",
        "webhook",
        "crm_task",
        "crm_property",
        "crm_list",
        "support_escalation",
    }, channels
    # One instance and two: the same decisions, the same actions at the vendors.
    forgotten = {r["customer_id"] for r in one.results if r["reason"] == "forgotten"}
    assert forgotten
    for label, run in (("two", two), ("kill", three)):
        # an action started by the killed instance is failed as ambiguous where the others
        # sent it (at most once): the rest, its later steps, caps and cooldowns included, alike
        extra_d = run.decisions(run.unknown) - one.decisions(run.unknown)
        missing = one.decisions(run.unknown) - run.decisions(run.unknown)
        assert not extra_d and not missing, (
            f"{label}: {sum(extra_d.values())} decisions not in the 1-instance run "
            f"{[dict(d) for d in list(extra_d)[:2]]}, {sum(missing.values())} missing "
            f"{[dict(d) for d in list(missing)[:2]]}"
        )
        keys = set(run.vendor) | set(one.vendor)
        differ = sorted(
            k
            for k in keys
            if seen(run, k, forgotten) != seen(one, k, forgotten)
            and not (k in run.unknown and k not in run.vendor)  # started, never reached it
        )
        assert not differ, (
            f"{label}: {len(differ)} of {len(keys)} actions differ at the vendors, e.g. "
            f"{one.vendor.get(differ[0])} / {run.vendor.get(differ[0])}"
        )
    # Without a kill every action was called once; with it, only CRM and webhook calls under
    # way at the kill were made again (same key: the vendor applies them once), and no email
    # (check_run: raw attempts at the SendGrid and SMTP stand-ins).
    for run in (one, two):
        assert max(run.attempts.values()) == 1 and max(run.smtp_ids.values()) == 1
        assert run.replays == 0 and not run.unknown
    # An email not sent again after the kill was recorded as started (committed before its
    # call) by the killed instance: nothing that never started is lost.
    assert {three.channel_of[k] for k in three.unknown} <= {"email", "smtp"}, three.unknown
    never_started = three.unknown - started_records(s)
    assert not never_started, f"failed as ambiguous without a start record: {never_started}"
    owned = fleet.owned(s)
    assert owned.get("2"), f"the added instance never owned a partition: {owned}"
    assert owned["1"] & (owned["0"] | owned["2"]), f"nobody took over from the killed: {owned}"
    assert 0 < three.at_kill < len(one.results) * 0.8, "the kill should land mid-stream"
    print(
        f"results {len(one.results)}, sent {len(one.sent())} ({dict(channels)}), "
        f"kill at {three.at_kill}, calls made again after the kill: HTTP {three.replays}, "
        f"SMTP {sum(three.smtp_ids.values()) - len(three.smtp_ids)}; emails started by the "
        f"killed instance and not sent again: {len(three.unknown)} (of which reached the "
        f"stand-ins {len(three.unknown & set(three.vendor))})"
    )
