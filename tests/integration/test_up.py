"""``segflow up`` stops everything it started on SIGTERM (a process manager's stop)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import pytest

from segflow.runtime.broker import free_port

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def test_up_runs_the_services_and_sigterm_stops_them_and_its_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if "BOOTSTRAP" not in k}  # its own broker
    env["SEGFLOW_LOG_LEVEL"] = "WARNING"
    port, metrics, api = free_port(), free_port(), free_port()
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "segflow.cli", "--state-dir", str(tmp_path), "--port", str(port),
         "up", "--metrics-port", str(metrics), "--api-port", str(api), "--replicas", "2"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        text = ""
        while "running;" not in text and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            text = (tmp_path / "up.log").read_text()
        assert "running;" in text, text[-2000:]
        pids = [
            int(line.split(" pid ")[1].split()[0]) for line in text.splitlines() if " pid " in line
        ]
        # identity and scorer once, segmenter and dispatcher twice (--replicas 2)
        assert len(pids) == 6 and all(alive(p) for p in pids)
        # The second segmenter reports its instance id on /metrics once its loop runs.
        line = next(x for x in text.splitlines() if x.strip().startswith("segmenter-1 "))
        url = line.split("metrics ")[1].split()[0]
        want = 'segflow_instance_info{instance="1",service="segmenter"} 1.0'
        body = ""
        while want not in body and time.monotonic() < deadline + 60:
            time.sleep(0.5)
            with contextlib.suppress(OSError):  # not listening yet
                body = urlopen(url, timeout=2).read().decode()
        assert want in body, body[-1500:]
        broker_pid = int((tmp_path / "broker" / "broker.pid").read_text().strip())
        assert alive(broker_pid)

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
