"""``segflow up`` stops everything it started: on SIGTERM (a process manager's stop), and
when it is killed with ``kill -9`` (its children die with it: segflow.runtime.leash)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import httpx
import pytest

from segflow.runtime.broker import free_port
from segflow.runtime.lag import LagProbe
from segflow.runtime.leash import leashed
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import processes_marked, read_all
from segflow.runtime.topics import TOPICS, Topic

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def start_up(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str, list[int], int, str]:
    """``segflow up --replicas 2`` on its own new broker, running: (process, broker address,
    service pids, broker pid, its output so far)."""
    env = {k: v for k, v in os.environ.items() if "BOOTSTRAP" not in k}  # its own broker
    env["SEGFLOW_LOG_LEVEL"] = "WARNING"
    port, metrics, api = free_port(), free_port(), free_port()
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        leashed([sys.executable, "-m", "segflow.cli", "--state-dir", str(tmp_path),
                 "--port", str(port), "up", "--metrics-port", str(metrics),
                 "--api-port", str(api), "--replicas", "2"]),
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 150
    text = ""
    while "running;" not in text and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        text = (tmp_path / "up.log").read_text()
    if "running;" not in text:
        proc.kill()
        pytest.fail("segflow up did not come up:\n" + text[-2000:])
    lines = [line.split() for line in text.splitlines() if " pid " in line]
    pids = [int(line[2]) for line in lines]
    # scorer, segmenter and dispatcher twice (--replicas 2); identity as 2 front-stage
    # processes plus the graph writer, active and warm standby; attributes once
    assert sorted(line[0] for line in lines) == sorted(
        ["identity-front", "identity-front-1", "identity-writer", "identity-writer-1",
         "scorer", "scorer-1", "segmenter", "segmenter-1", "dispatcher", "dispatcher-1",
         "attributes"]
    ), text  # fmt: skip
    assert all(alive(p) for p in pids)
    broker_pid = int((tmp_path / "broker" / "broker.pid").read_text().strip())
    assert alive(broker_pid)
    return proc, f"127.0.0.1:{port}", pids, broker_pid, text


def events_flow_through_the_split_identity(tmp_path: Path, bootstrap: str, api: str) -> None:
    """Events sent with ``segflow produce`` come out identified: one customer id per user,
    read_committed. The broker's committed offsets show who did the work: the front-stage
    group read every event and the graph writer's group the link requests; the one-process
    role's group read nothing. The API (asking both graph writers) resolves a user to the
    same customer id."""
    users = [f"up-user-{n}" for n in range(8)]  # keyed by user id: spread over partitions
    now = int(time.time() * 1000)
    events = [
        {"event_id": f"up-{u}-{k}", "event_type": "page_view", "occurred_at": now - 60_000 + k,
         "user_id": u, "properties": {}}
        for u in users for k in range(3)
    ]  # fmt: skip
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    env = {**os.environ, "SEGFLOW_BOOTSTRAP_SERVERS": bootstrap}
    done = subprocess.run(
        [sys.executable, "-m", "segflow.cli", "produce", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    s = Settings(bootstrap_servers=bootstrap)
    out = read_all(s, TOPICS.identified.name(s), expected=len(events), timeout=90)
    serde = Serde.from_settings(s)
    identified = [serde.decode(TOPICS.identified, r.value) for r in out]
    assert sorted(e["event"]["event_id"] for e in identified) == sorted(
        e["event_id"] for e in events
    )
    ids = {u: {e["customer_id"] for e in identified if e["event"]["user_id"] == u} for u in users}
    assert all(len(c) == 1 for c in ids.values()), ids
    assert len({c for cs in ids.values() for c in cs}) == len(users)
    with LagProbe(s) as probe:

        def read_by(group: str, topic: Topic) -> int:
            parts = probe.partitions(group, topic.name(s))
            return sum(max(o, 0) for o in probe.committed(group, parts).values())

        assert read_by(s.topic_prefix + "identity-front", TOPICS.events) == len(events)
        assert read_by(s.topic_prefix + "identity-writer", TOPICS.identity_links) >= len(events)
        assert read_by(s.topic_prefix + "identity", TOPICS.events) == 0
    token = (tmp_path / "api-token").read_text().strip()
    answer = httpx.get(
        f"{api}/identities/resolve",
        params={"type": "user_id", "value": users[0]},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert {answer.json()["customer_id"]} == ids[users[0]]


def test_up_runs_the_services_and_sigterm_stops_them_and_its_broker(tmp_path: Path) -> None:
    proc, bootstrap, pids, broker_pid, text = start_up(tmp_path)
    try:
        # The second segmenter reports its instance id on /metrics once its loop runs.
        line = next(x for x in text.splitlines() if x.strip().startswith("segmenter-1 "))
        url = line.split("metrics ")[1].split()[0]
        want = 'segflow_instance_info{instance="1",service="segmenter"} 1.0'
        body = ""
        deadline = time.monotonic() + 90
        while want not in body and time.monotonic() < deadline:
            time.sleep(0.5)
            with contextlib.suppress(OSError):  # not listening yet
                body = urlopen(url, timeout=2).read().decode()
        assert want in body, body[-1500:]
        api = next(x for x in text.splitlines() if x.strip().startswith("api ")).split()[1]
        events_flow_through_the_split_identity(tmp_path, bootstrap, api)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        gone = time.monotonic() + 30
        while any(alive(p) for p in [*pids, broker_pid]) and time.monotonic() < gone:
            time.sleep(0.2)
        assert not [p for p in pids if alive(p)], "a service outlived segflow up"
        assert not alive(broker_pid), "the broker segflow up started is still running"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill_9_of_up_leaves_no_service_gateway_or_broker(tmp_path: Path) -> None:
    proc, bootstrap, pids, broker_pid, _ = start_up(tmp_path)
    # Everything this run started carries its broker address (environment) or its state
    # folder (the broker's command line): found by /proc, not by asking segflow.
    ours = processes_marked(bootstrap, str(tmp_path))
    mine = {pid for pid, _ in ours}
    assert {*pids, broker_pid} <= mine, ours
    assert any("segflow.api" in cmd for _, cmd in ours), ours
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        left = processes_marked(bootstrap, str(tmp_path))
        while left and time.monotonic() - killed < 5:
            time.sleep(0.1)
            left = processes_marked(bootstrap, str(tmp_path))
        assert not left, f"still running 5 s after kill -9 of segflow up: {left}"
    finally:
        for pid, _ in processes_marked(bootstrap, str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
