"""Child processes that die with their parent, whatever killed the parent (SIGKILL included).

A child started with :func:`leashed` runs ``python -m segflow.runtime.leash PARENT_PID --
ARGV...``: this module asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, kept across ``execve``), checks that the parent is still the
one that started it (it may have died between ``fork`` and ``prctl``), and then *execs* the
real program in place, so the pid, the signals and the exit status are the program's own.

Why not ``preexec_fn``: it runs Python in the forked child of a threaded parent (the demo
runs an HTTP and an SMTP receiver in threads), which CPython documents as unsafe. Why not a
process group alone: ``kill -9`` of the parent leaves a group running; only the kernel's
death signal (or a watchdog) reaches children then.

Caveat from prctl(2): the death signal follows the parent *thread* that forked the child, so
children are started from the main thread (the supervisors here do).

Linux only; elsewhere :func:`leashed` returns the argv unchanged (children then outlive a
killed parent, as they did before).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def supported() -> bool:
    return sys.platform.startswith("linux")


def leashed(argv: list[str]) -> list[str]:
    """``argv`` wrapped so that the process dies with this one (the caller)."""
    if not supported():
        return list(argv)
    return [sys.executable, "-m", "segflow.runtime.leash", str(os.getpid()), "--", *argv]


def _die_with(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent:  # the parent died before the kernel was told to watch it
        os._exit(137)


def main(args: list[str]) -> None:
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        sys.stderr.write("usage: python -m segflow.runtime.leash PARENT_PID -- PROGRAM [ARGS...]\n")
        sys.exit(2)
    _die_with(int(args[0]))
    program = args[2:]
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
