"""The commit watchdog of the shared loop (moved out of :mod:`segflow.runtime.loop`)."""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("segflow.loop")

EXIT_STUCK = 75


class Watchdog:
    """Exit the process if a guarded block runs longer than ``timeout`` seconds.

    One daemon thread per loop, started on first use and armed around each commit (a thread
    per commit cost ~1-2 % of a service's CPU at a few commits per second)::

        with watchdog:
            commit()
    """

    def __init__(self, timeout: float, service: str) -> None:
        self.timeout = timeout
        self.service = service
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def __enter__(self) -> Watchdog:
        with self._cond:
            self._deadline = time.monotonic() + self.timeout
            if self._thread is None:
                self._closed = False
                self._thread = threading.Thread(
                    target=self._watch, daemon=True, name="commit-watchdog"
                )
                self._thread.start()
            else:
                self._cond.notify()
        return self

    def __exit__(self, *_: object) -> None:
        with self._cond:
            self._deadline = None

    def close(self) -> None:
        """End the thread (the loop is closed)."""
        with self._cond:
            self._closed = True
            self._deadline = None
            self._cond.notify()
        self._thread = None

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                deadline = self._deadline
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                log.critical(
                    "commit stuck; exiting so the supervisor restarts this instance",
                    extra={"fields": {"stuck_seconds": self.timeout, "exit_status": EXIT_STUCK}},
                )
                logging.shutdown()
                os._exit(EXIT_STUCK)
