"""Run the README's first command on a newly formatted broker, N times: crashes and orphans.

Each run gets its own state directory (so ``segflow demo`` formats a new KRaft broker in it)
and its own free broker port, and runs ``segflow demo --days D --customers C``. A run counts
as a crash when it ends by a signal or with an exit status other than 0; the demo's output,
the services' logs and any core file stay in the run's directory for gdb. After each run, every
process that still carries the run's broker address in its environment or the run's
directory on its command line is an orphan (listed, then killed so the next run starts clean).

    .venv/bin/python bench/demo_crashes.py --runs 20 --days 14 --customers 100

Not part of the suite: it takes about a minute per run on the 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from segflow.runtime.broker import free_port  # noqa: E402
from segflow.runtime.leash import leashed  # noqa: E402
from segflow.runtime.testing import processes_marked  # noqa: E402


def _core_limit() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def one_run(index: int, base: Path, args: argparse.Namespace) -> tuple[int, float, list[str]]:
    run_dir = base / f"run-{index:02d}"
    run_dir.mkdir(parents=True)
    port = free_port()
    cmd = [
        str(ROOT / ".venv" / "bin" / "segflow"),
        "--state-dir",
        str(run_dir / "state"),
        "--port",
        str(port),
        "demo",
        "--days",
        str(args.days),
        "--customers",
        str(args.customers),
        "--metrics-port",
        "0",
    ]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    for key in ("KAFKA_BOOTSTRAP_SERVERS", "SEGFLOW_BOOTSTRAP_SERVERS"):
        env.pop(key, None)  # always the demo's own, newly formatted broker
    started = time.monotonic()
    with (run_dir / "demo.out").open("wb") as out:
        proc = subprocess.Popen(
            leashed(cmd),  # the demo dies with this bench, however the bench ends
            cwd=run_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_core_limit,
        )
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            (run_dir / "TIMEOUT").write_text(f"killed after {args.timeout} s\n")
    took = time.monotonic() - started
    time.sleep(2)  # children that die with their parent get a moment to go
    orphans = processes_marked(f"127.0.0.1:{port}", str(run_dir))
    for pid, _ in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return code, took, [cmd for _, cmd in orphans]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--days", type=int, default=14)
    ap.add_argument("--customers", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--dir", help="keep the runs here (default: a new temporary folder)")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="segflow-crashes-"))
    base.mkdir(parents=True, exist_ok=True)
    print(
        f"{args.runs} runs of `segflow demo --days {args.days} --customers {args.customers}`"
        f" on new brokers; runs in {base}",
        flush=True,
    )
    crashes = orphans = 0
    for i in range(1, args.runs + 1):
        code, took, left = one_run(i, base, args)
        bad = code != 0
        crashes += bad
        orphans += len(left)
        how = "ok" if not bad else (f"signal {-code}" if code < 0 else f"exit {code}")
        print(
            f"run {i:>2}/{args.runs}: {how} in {took:.0f} s, {len(left)} orphans"
            + "".join(f"\n    orphan: {c[:160]}" for c in left),
            flush=True,
        )
    load = os.getloadavg()
    print(
        f"crashes {crashes} of {args.runs}, orphans {orphans} "
        f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; runs in {base})"
    )
    return 1 if crashes or orphans else 0


if __name__ == "__main__":
    sys.exit(main())
