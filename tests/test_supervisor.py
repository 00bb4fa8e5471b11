"""The supervisor behind `segflow up`: restarts what dies, stops everything together."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from segflow.supervisor import Supervisor


def wait_for(condition, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met")


def test_a_crashing_child_is_restarted_and_its_output_kept(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs")
    crasher = sup.add(
        "crasher", [sys.executable, "-c", "print('up', flush=True); raise SystemExit(3)"]
    )
    sleeper = sup.add("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    sup.start_all()
    try:
        wait_for(lambda: (sup.check(), crasher.restarts >= 2)[1])
        assert crasher.exits[:2] == [3, 3]
        assert sleeper.restarts == 0 and sup.pids()["sleeper"] is not None
        assert (tmp_path / "logs" / "crasher.log").read_text().count("up") >= 2
    finally:
        sup.stop(timeout=5)
    assert sup.pids() == {"crasher": None, "sleeper": None}


def test_stop_terminates_running_children_promptly(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs")
    child = sup.add("s", [sys.executable, "-c", "import time; time.sleep(60)"])
    sup.start_all()
    t0 = time.monotonic()
    sup.stop(timeout=5)
    assert child.proc is not None and child.proc.returncode is not None
    assert time.monotonic() - t0 < 5
