"""``segflow collect`` as a user runs it: refuses to start without a write key, serves, stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from segflow.runtime.broker import free_port
from segflow.runtime.leash import leashed
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import read_all
from segflow.runtime.topics import TOPICS

ROOT = Path(__file__).resolve().parents[2]


def test_collect_without_a_write_key_says_how_to_give_one() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGFLOW_COLLECTOR_")}
    out = subprocess.run(
        [sys.executable, "-m", "segflow.cli", "collect"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "SEGFLOW_COLLECTOR_WRITE_KEYS" in out.stderr and "--write-key" in out.stderr


@pytest.mark.broker
def test_collect_serves_the_tracking_api_and_stops_on_sigterm(kafka_settings: Settings) -> None:
    s = kafka_settings
    port = free_port()
    env = {
        **os.environ,
        "SEGFLOW_BOOTSTRAP_SERVERS": s.bootstrap_servers,
        "SEGFLOW_TOPIC_PREFIX": s.topic_prefix,
    }
    proc = subprocess.Popen(
        leashed([sys.executable, "-m", "segflow.cli", "collect", "--collect-port", str(port),
                 "--write-key", "cli=k-123"]),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = []  # librdkafka's own log lines come first while the broker warms up
        while not (seen and "listening" in seen[-1]) and len(seen) < 200:
            line = proc.stdout.readline()
            if not line:
                pytest.fail("segflow collect exited: " + "".join(seen)[-3000:])
            seen.append(line)
        assert "k-123" not in "".join(seen)  # the write key is never printed
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/identify",
            auth=("k-123", ""),
            json={"userId": "u-1", "messageId": "cli-1", "traits": {"plan": "pro"},
                  "timestamp": "2024-01-01T00:00:00Z"},
            timeout=30,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        [rec] = read_all(s, TOPICS.events.name(s), expected=1)
        ev = Serde.from_settings(s).decode(TOPICS.events, rec.value)
        assert (ev["event_id"], ev["event_type"], ev["occurred_at"]) == (
            "cli-1", "identify", 1704067200000,
        )  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
