"""The shared loop's partition holds, in process, for scorer tests without a broker: records
are read in a given interleaving; a record whose handler raises ``HoldPartition`` and the
later records of its partition wait (in order) until the service's ``releases()`` names
the partition, asked after each record handled while a partition is held and after each
commit, as the loop asks (:mod:`segflow.runtime.holds`; the loop's own tests:
tests/integration/test_loop_holds.py)."""

from __future__ import annotations

from typing import Any

from segflow.runtime.loop import Output
from segflow.runtime.records import HoldPartition, Incoming


class HeldReader:
    """Feed ``records`` to ``svc`` (one instance), committing every ``batch`` handled
    records (``before_commit``, ``tick``, the stores' ``on_commit``)."""

    def __init__(self, svc: Any, batch: int, tick: bool = True) -> None:
        self.svc, self.batch, self.tick = svc, batch, tick
        self.out: list[Output] = []
        self.pending: list[Output] = []
        self.held: dict[tuple[str, int], list[Incoming]] = {}
        self.holds = 0
        self._n = 0
        self._open = False  # records handled since the last commit

    def read(self, record: Incoming) -> None:
        key = (record.topic.name(self.svc.settings), record.partition)
        if key in self.held:
            self.held[key].append(record)
            return
        try:
            outs = list(self.svc.handle(record))
        except HoldPartition:
            self.held[key] = [record]
            self.holds += 1
            return
        self.pending += outs
        self._n += 1
        self._open = True
        if self.held:  # what this record brought may release a partition: its records now
            self._release()
        if self._n % self.batch == 0:
            self.commit()

    def _release(self) -> None:
        for key in list(getattr(self.svc, "releases", list)()):
            for record in self.held.pop(key, []):
                self.read(record)

    def commit(self) -> None:
        self._open = False
        self.pending += self.svc.before_commit()
        if self.tick:
            self.pending += self.svc.tick()
        for store in (self.svc.states, self.svc.models):
            store.on_commit()
        self.out += self.pending
        self.pending = []
        self._release()

    def abort(self) -> None:
        """The open transaction aborts: its outputs go (the caller feeds its records again)."""
        self.pending = []
        self.svc.states.on_abort()
        self.svc.on_abort()

    def finish(self) -> list[Output]:
        self.commit()
        while self._open:  # records of a partition released by the last commit
            self.commit()
        assert not self.held, f"partitions still held: {sorted(self.held)}"
        return self.out
