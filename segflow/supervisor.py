"""Run segflow's services as supervised processes: restarted when they die, stopped together.

Each service runs as ``python -m services.<name>`` with its output in
``<state dir>/logs/<name>.log``. A process that exits is restarted after a back-off that
doubles up to 30 s (reset once it has stayed up for a minute). ``stop()`` sends SIGTERM to
all, waits, then SIGKILLs stragglers. Every child dies with the supervising process, however
that process dies (``kill -9`` included: :mod:`segflow.runtime.leash`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from segflow.runtime.leash import leashed

SERVICES = ("identity", "scorer", "segmenter", "dispatcher")  # = segflow.stack.SERVICES


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    backoff: float = 1.0
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Keep a set of child processes running."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = {**os.environ, **(env or {})}
        self.children: dict[str, Child] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, self.log_dir / f"{name}.log", {**self.env, **(env or {})})
        self.children[name] = child
        return child

    def add_service(self, name: str, env: dict[str, str] | None = None) -> Child:
        return self.add(name, [sys.executable, "-m", f"services.{name}"], env)

    def _start(self, child: Child) -> None:
        with child.log_path.open("ab") as log:
            child.proc = subprocess.Popen(
                leashed(child.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child.env,
                start_new_session=True,
            )
        child.started_at = time.monotonic()

    def start_all(self) -> None:
        for child in self.children.values():
            self._start(child)

    def check(self) -> list[str]:
        """Restart any child that exited (after its back-off); returns the names restarted."""
        restarted = []
        now = time.monotonic()
        for child in self.children.values():
            if child.proc is None:
                continue
            code = child.proc.poll()
            if code is None:
                if now - child.started_at > 60:
                    child.backoff = 1.0
                continue
            if child.next_start == 0.0:
                child.exits.append(code)
                child.next_start = now + child.backoff
                child.backoff = min(child.backoff * 2, 30.0)
            elif now >= child.next_start:
                child.next_start = 0.0
                child.restarts += 1
                self._start(child)
                restarted.append(child.name)
        return restarted

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds of each running child since it (last) started, read from
        ``/proc/<pid>/stat``; children not running are left out."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, pid in self.pids().items():
            if pid is None:
                continue
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return out

    def pids(self) -> dict[str, int | None]:
        return {
            n: (c.proc.pid if c.proc and c.proc.poll() is None else None)
            for n, c in self.children.items()
        }

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every child, wait up to ``timeout``, then SIGKILL."""
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children.values():
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
