"""The project's own broker and topics, as a user meets them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from confluent_kafka.admin import ConfigResource

from segflow.runtime.broker import LocalBroker
from segflow.runtime.kafka import make_admin
from segflow.runtime.leash import leashed
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import create_topic, produce_events, read_all
from segflow.runtime.topics import TOPICS

pytestmark = pytest.mark.broker


def test_topics_are_created_with_registry_partitions_and_cleanup(kafka_settings: Settings) -> None:
    admin = make_admin(kafka_settings)
    md = admin.list_topics(timeout=10)
    resources = [ConfigResource("topic", t.name(kafka_settings)) for t in TOPICS]
    configs = {r.name: f.result() for r, f in admin.describe_configs(resources).items()}
    for topic in TOPICS:
        name = topic.name(kafka_settings)
        assert len(md.topics[name].partitions) == topic.partitions, name
        assert configs[name]["cleanup.policy"].value == topic.cleanup, name


def test_broker_keeps_its_data_across_a_clean_restart(own_broker: LocalBroker) -> None:
    from segflow.runtime.testing import isolated_settings

    s = isolated_settings(own_broker.bootstrap, "restart")
    events = [
        {
            "event_id": f"e{i}",
            "event_type": "login",
            "occurred_at": 1_700_000_000_000 + i,
            "user_id": f"u{i}",
        }
        for i in range(50)
    ]
    produce_events(s, TOPICS.events.name(s), events)
    assert own_broker.stop() is True
    assert own_broker.status().running is False
    own_broker.start()
    assert len(read_all(s, TOPICS.events.name(s), expected=50)) == 50
    assert "started" in own_broker.log_file.read_text().lower()


def test_sigterm_finishes_the_batch_in_hand_and_exits_cleanly(kafka_settings: Settings) -> None:
    s = kafka_settings
    source, sink = TOPICS.events.name(s), create_topic(s, s.topic_prefix + "copy", TOPICS.events)
    events = [
        {
            "event_id": f"e{i}",
            "event_type": "login",
            "occurred_at": 1_700_000_000_000 + i,
            "user_id": f"u{i % 9}",
        }
        for i in range(3000)
    ]
    produce_events(s, source, events)
    group = s.topic_prefix + "g"
    proc = subprocess.Popen(
        leashed(
            [
                sys.executable,
                "-m",
                "segflow.runtime.passthrough",
                "--bootstrap",
                s.bootstrap_servers,
                "--prefix",
                s.topic_prefix,
                "--source",
                source,
                "--sink",
                sink,
                "--group",
                group,
                "--transactional-id",
                group + "-tx",
                "--batch-size",
                "100",
                "--pre-commit-delay",
                "0.5",
            ]
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not read_all(s, sink, timeout=30):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-1500:]
    committed = len(read_all(s, sink))
    assert 0 < committed < 3000, "SIGTERM should stop the loop mid-stream"
    # A restart picks up exactly where the clean stop left off (at full speed: the 0.5 s
    # pre-commit delay only keeps a batch in hand when SIGTERM comes, and 29 more would be
    # 15 s of it).
    args = list(proc.args)
    at = args.index("--pre-commit-delay")
    del args[at : at + 2]
    subprocess.run(args + ["--idle-timeout", "5"], check=True, capture_output=True, timeout=120)
    serde = Serde.from_settings(s)
    ids = [serde.decode(TOPICS.events, r.value)["event_id"] for r in read_all(s, sink, 3000)]
    assert len(ids) == 3000 and len(set(ids)) == 3000
