"""Consumer-group lag (segflow.runtime.lag) on a real broker, including a newly formatted one.

The demo's lag checks used the Admin API's ListConsumerGroupOffsets, and librdkafka crashed
the demo (SIGSEGV in its main thread, NULL consumer-group handle) when a new broker answered
"coordinator load in progress" (confluentinc/librdkafka#5040). The probe reads committed
offsets with consumers of each group instead.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from segflow.runtime.broker import LocalBroker, free_port
from segflow.runtime.kafka import make_producer
from segflow.runtime.lag import LagProbe
from segflow.runtime.leash import leashed
from segflow.runtime.settings import Settings
from segflow.runtime.testing import create_topic, produce, read_all, wait_until
from segflow.runtime.topics import TOPICS

ROOT = Path(__file__).resolve().parents[2]


def test_no_segflow_code_asks_the_admin_api_for_group_offsets() -> None:
    callers = [
        str(path.relative_to(ROOT))
        for folder in ("segflow", "services", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if "list_consumer_group_offsets(" in path.read_text()
    ]
    assert not callers, f"ListConsumerGroupOffsets crashes librdkafka (see lag.py): {callers}"


@pytest.mark.broker
def test_lag_counts_what_a_group_has_not_committed(kafka_settings: Settings) -> None:
    s = kafka_settings
    topic = create_topic(s, s.topic_prefix + "lag-in", TOPICS.events, partitions=3)
    produce(s, topic, [(b"k%d" % i, b"v") for i in range(300)])
    group = s.topic_prefix + "g"
    with LagProbe(s) as probe:
        assert probe.lag({group: [topic]}) == {group: 300}  # a group that never committed
        # The group reads and commits 120 records on each partition it has (by offset).
        ends = {tp.partition: probe.high(group, tp) for tp in probe.partitions(group, topic)}
        assert sum(ends.values()) == 300
        member = Consumer({**s.kafka_config(), "group.id": group, "enable.auto.commit": False})
        try:
            done = {p: min(40, n) for p, n in ends.items()}
            member.commit(
                offsets=[TopicPartition(topic, p, o) for p, o in done.items()], asynchronous=False
            )
        finally:
            member.close()
        behind = {p: ends[p] - done[p] for p in ends}
        # plain records, no markers: every offset behind is a record to read
        assert probe.lag({group: [topic]}) == {group: sum(behind.values())}
        assert probe.committed(group, probe.partitions(group, topic)) == {
            (topic, p): o for p, o in done.items()
        }


PROBE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from confluent_kafka import Consumer, KafkaException
    from segflow.runtime.kafka import ensure_topics
    from segflow.runtime.lag import LagProbe
    from segflow.runtime.settings import Settings
    from segflow.runtime.topics import TOPICS

    s = Settings(bootstrap_servers=sys.argv[1], topic_prefix="fresh.")
    ensure_topics(s)
    topics = [TOPICS.events.name(s), TOPICS.scores.name(s)]
    groups = {f"fresh.g{i}": topics for i in range(4)}
    # Members join the groups meanwhile, as the services do when the demo starts: that is
    # what makes the new broker load the groups' coordinator partitions under the checks.
    members = []
    for group in groups:
        member = Consumer({**s.kafka_config(), "group.id": group, "enable.auto.commit": False})
        member.subscribe(topics)
        members.append(member)
    answers = errors = 0
    deadline = time.monotonic() + float(sys.argv[2])
    with LagProbe(s) as probe:
        while time.monotonic() < deadline:
            for member in members:
                member.poll(0)
            try:
                probe.lag(groups)
                answers += 1
            except KafkaException:
                errors += 1
            time.sleep(0.05)
    for member in members:
        member.close()
    print(answers, errors)
    """
)


@pytest.mark.broker
def test_lag_checks_on_a_newly_formatted_broker_do_not_crash(tmp_path: Path) -> None:
    """Right after a new broker starts, while members join and its coordinators load, as in the
    demo's first week: the checking process survives (it is a child, so a crash cannot take
    pytest with it) and answers. This does not reproduce the librdkafka crash on demand (the
    Admin API variant survived it too, twice); bench/demo_crashes.py does, on the demo itself."""
    broker = LocalBroker(tmp_path / "broker", port=free_port(), controller_port=free_port())
    broker.start(leash=True)
    try:
        run = subprocess.run(
            leashed([sys.executable, "-c", PROBE_SCRIPT, broker.bootstrap, "8"]),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        broker.stop(timeout=15)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stderr[-3000:]}"
    answers, _errors = map(int, run.stdout.split())
    assert answers > 0


TXN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from segflow.runtime.kafka import make_producer
    from segflow.runtime.settings import Settings

    s = Settings(bootstrap_servers=sys.argv[1])
    topic = sys.argv[2]
    p = make_producer(s, transactional_id=sys.argv[3], transaction_timeout_ms=2000)
    p.init_transactions(30)
    p.begin_transaction()
    for i in range(5):
        p.produce(topic, b"committed", b"k", partition=0)
    p.commit_transaction(30)
    p.begin_transaction()
    for i in range(5):
        p.produce(topic, b"aborted", b"k", partition=0)
    p.flush(30)
    print("open", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.broker
def test_an_aborted_transaction_at_the_end_of_a_partition_is_not_lag(
    kafka_settings: Settings,
) -> None:
    """A producer is killed with ``kill -9`` inside a transaction; the broker aborts it when
    it times out. A group that read everything committed before it has its committed offset
    before the aborted records and the abort marker, and never moves past them until a new
    record comes: the probe reports it caught up (before, it reported the gap as lag for
    ever, and the demo's catch-up wait and bench_e2e ran to their timeout). A record
    committed later counts as exactly one record behind, markers and aborted records not."""
    s = kafka_settings
    topic = create_topic(s, s.topic_prefix + "lag-txn", TOPICS.events, partitions=1)
    child = subprocess.Popen(
        leashed([sys.executable, "-c", TXN_SCRIPT, s.bootstrap_servers, topic,
                 s.topic_prefix + "lag-txn-producer"]),
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "open"
    finally:
        child.kill()  # kill -9 inside the open transaction
        child.wait(10)
    group = s.topic_prefix + "txn-reader"
    tp = TopicPartition(topic, 0)
    # The group read the committed transaction: 5 records and the commit marker (offset 5).
    member = Consumer({**s.kafka_config(), "group.id": group, "enable.auto.commit": False})
    try:
        member.commit(offsets=[TopicPartition(topic, 0, 6)], asynchronous=False)
    finally:
        member.close()
    with LagProbe(s) as probe:
        # the broker aborts the transaction after its 2 s timeout (its check runs every 10 s):
        # the partition's end moves past 5 aborted records and the abort marker, to 12
        wait_until(lambda: probe.high(group, tp) == 12, 60, what="the transaction aborted")
        assert probe.committed(group, [tp]) == {(topic, 0): 6}  # 6 offsets short of the end
        assert probe.lag({group: [topic]}) == {group: 0}
        # what a read_committed reader finds there: nothing (an independent check)
        assert not read_all(s, topic, expected=5)[5:]
        later = make_producer(s, transactional_id=s.topic_prefix + "lag-txn-2")
        later.init_transactions(30)
        later.begin_transaction()
        later.produce(topic, b"later", b"k", partition=0)
        later.commit_transaction(30)
        wait_until(lambda: probe.high(group, tp) == 14, 30, what="the new record committed")
        assert probe.lag({group: [topic]}) == {group: 1}
        assert probe.behind(group, [tp]) == {(topic, 0): (1, 6)}
