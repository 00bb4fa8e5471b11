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
from segflow.runtime.lag import LagProbe
from segflow.runtime.leash import leashed
from segflow.runtime.settings import Settings
from segflow.runtime.testing import create_topic, produce
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
        want = sum(b for b in behind.values() if b > 1)  # one behind = a transaction marker
        assert probe.lag({group: [topic]}) == {group: want}
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
