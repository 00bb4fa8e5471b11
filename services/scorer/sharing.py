"""The scorer's shared churn model in the shell (a mixin of
:class:`services.scorer.app.ScorerService`): each partition's day contributions out to
``scorer.examples``, the learner (:class:`services.scorer.shared.SharedLearner`) publishing
its versions and state to ``scorer.model``, the other instances tailing them, the idle
rule. Moved out of :mod:`services.scorer.app` (session 10)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from segflow.runtime.loop import Incoming, Output
from segflow.runtime.topics import TOPICS
from services.scorer.config import FORGET_EVENT
from services.scorer.metrics import MODEL_VERSIONS, VERSION_HOLDS
from services.scorer.model import ChurnModel
from services.scorer.shared import SharedLearner

if TYPE_CHECKING:
    from segflow.runtime.serde import Serde
    from segflow.runtime.settings import Settings
    from segflow.runtime.state import ChangelogStore
    from services.scorer.core import Scorer
    from services.scorer.settings import ScorerSettings

log = logging.getLogger("segflow.scorer")

#: ``scorer.model`` key prefix of the deployment's one churn model's versions
#: (``churn.shared.<day>``, published by the learner; services/scorer/shared.py) and key of
#: the learner's own state (the model and the contributions not applied yet).
SHARED_MODEL = "churn.shared"
LEARNER_KEY = "churn.learner"


class SharedModel:
    """The shared model's part of the scorer service (attributes: the service's)."""

    settings: Settings
    options: ScorerSettings
    clock: Callable[[], float]
    scorer: Scorer
    states: ChangelogStore
    models: ChangelogStore
    serde: Serde
    instance: str
    learner: bool
    _learner: SharedLearner | None
    _versions_out: list[tuple[int, bytes]]
    _idle_from: tuple[int | None, float]
    _examples_out: list[Output]
    _learned_in_batch: bool
    _learned_uncommitted: bool
    _tail: Consumer | None

    _holds: dict[tuple[str, int], int]
    _holds_new: dict[tuple[str, int], int]

    def _now(self) -> int:
        return int(self.clock() * 1000)

    # -- the hold: a record waits for the version it scores with ---------------------------
    def _version_hold(self, record: Incoming) -> bool:
        """Whether to hold the identified ``record``'s partition (the loop's
        ``HoldPartition``): it may score with a version of the shared model this instance
        does not have yet (``Scorer.version_needed``). Before holding, what reading it would
        sweep is swept (``Scorer.precomplete``, sent with the batch), so that the version does
        not wait for this partition; it is released when the version it waits for arrives
        (:meth:`releases`)."""
        sc = self.scorer
        if sc.sink is None or sc.partition_states is None:
            return False
        event = record.value.get("event") or {}
        t = event.get("occurred_at")
        if t is None or event.get("event_type") == FORGET_EVENT:
            return False
        t = int(t)
        if not record.value.get("customer_id") or t > self._now() + sc.config.max_future_ms:
            return False  # dead-lettered when handled
        part = record.partition
        need = sc.version_needed(part, t)
        if need is None:
            return False
        blocked = sc.precomplete(part, t, sc.partition_states(part))
        self._holds_new[(record.topic_name, part)] = need if blocked is None else blocked
        VERSION_HOLDS.inc()
        return True

    def releases(self) -> list[tuple[str, int]]:
        """The held partitions whose version arrived (the loop resumes them)."""
        out = [key for key, day in self._holds.items() if self.scorer.has_version(day)]
        for key in out:
            del self._holds[key]
        return out

    def _holds_committed(self, committed: bool) -> None:
        """The batch committed (its holds take effect) or aborted (it held nothing)."""
        if committed:
            self._holds.update(self._holds_new)
        self._holds_new.clear()

    def _holds_revoked(self, partitions: set[int]) -> None:
        for key in [k for k in self._holds if k[1] in partitions]:
            del self._holds[key]

    # -- one model (examples out, versions in) -------------------------------------------
    def _sink(self, kind: str, payload: dict[str, Any]) -> None:
        """What the core contributes to the shared model (one partition's day:
        services/scorer/shared.py), as a record for the learner (yielded with the outputs of
        the batch or tick that produced it)."""
        owned = self.states.assigned
        if owned is None:  # not in a consumer group (tools, tests): the only learner there is
            self._apply(payload)
            return
        buf = io.BytesIO()
        arrays = {k: np.asarray(v) for k, v in payload.items()}
        cast(Any, np.savez)(buf, **arrays)
        value = {
            "kind": "examples",  # (the schema's kinds: a day's contribution holds all three)
            "instance": self.instance,
            "day": int(payload["day"]),
            "partitions": [int(payload["partition"])],
            "payload": buf.getvalue(),
            "sent_at": self._now(),
        }
        self._examples_out.append(Output(TOPICS.scorer_examples, self.instance, value))

    def _examples(self) -> Iterator[Output]:
        out, self._examples_out = self._examples_out, []
        yield from out

    def _learn(self, rec: dict[str, Any]) -> None:
        """The learner: a partition's contribution (records written before the per-day
        contributions, without ``complete``, are skipped: the sweeps send their days again)."""
        with np.load(io.BytesIO(rec["payload"])) as npz:
            payload: dict[str, Any] = {k: npz[k] for k in npz.files}
        if "complete" not in payload:
            return
        payload = {k: (v.item() if v.ndim == 0 else v) for k, v in payload.items()}
        self._apply(payload)

    def _apply(self, payload: dict[str, Any]) -> None:
        if self._learner is None:
            self._load_learner()
        assert self._learner is not None
        for day, blob in self._learner.add(payload):
            self._versions_out.append((day, blob))
            self.scorer.receive(day, ChurnModel.from_bytes(blob))
        self._learned_in_batch = self._learned_uncommitted = True

    def _load_learner(self) -> None:
        """The learner's state as the last learner committed it (None: a new one)."""
        record = self.models.get(LEARNER_KEY)
        cfg = self.scorer.config
        self._learner = (
            SharedLearner(self.states.partitions, cfg, self.options.shared_model_grace_days)
            if record is None
            else SharedLearner.from_bytes(record["model"])
        )

    def _idle_rule(self) -> None:
        """The learner waited ``shared_model_idle_seconds`` (processing time) without applying
        a day while contributions wait for a partition that has not completed theirs (idle:
        no record moved its watermark): apply them without it (``SharedLearner.force``)."""
        lr = self._learner
        if not self.learner or lr is None:
            return
        now = self.clock()
        if not lr.waiting() or lr.through != self._idle_from[0]:
            self._idle_from = (lr.through, now)
            return
        if now - self._idle_from[1] < self.options.shared_model_idle_seconds:
            return
        day = max(lr.done.values())
        log.warning("churn-model learner: idle partitions skipped", extra={"fields": {"day": day}})
        for d, blob in lr.force(day):
            self._versions_out.append((d, blob))
            self.scorer.receive(d, ChurnModel.from_bytes(blob))
        self._learned_in_batch = self._learned_uncommitted = True
        self._idle_from = (lr.through, now)

    def _published(self) -> Iterator[Output]:
        """The learner's new versions and its state, in the transaction of the contributions
        it learned; a version ``keep_versions`` days older is deleted."""
        if not self._learned_in_batch or self._learner is None:
            return
        self._learned_in_batch = False
        now = self._now()
        keep = self.scorer.keep_versions
        for day, blob in self._versions_out:
            name = f"{SHARED_MODEL}.{day}"
            rec = self.scorer.checkpoint(name, now, ChurnModel.from_bytes(blob))
            MODEL_VERSIONS.labels("published").inc()
            yield self.models.put(name, rec)
            if self.models.get(f"{SHARED_MODEL}.{day - keep}") is not None:
                yield self.models.delete(f"{SHARED_MODEL}.{day - keep}")
        self._versions_out.clear()
        rec = self.scorer.checkpoint(LEARNER_KEY, now, self._learner.model)
        rec["model"] = self._learner.to_bytes()
        yield self.models.put(LEARNER_KEY, rec)

    def _adopt_stored(self) -> None:
        """The versions of the shared model the topic holds (the last ``keep_versions``)."""
        if not self.options.shared_model:
            return
        prefix = f"{SHARED_MODEL}."
        for key, record in sorted(self.models.items()):
            if key.startswith(prefix) and key[len(prefix) :].lstrip("-").isdigit():
                self.scorer.receive(int(key[len(prefix) :]), ChurnModel.from_bytes(record["model"]))

    def _follow(self) -> None:
        """Not the learner: take the versions of the shared model the learner published."""
        if self.learner or not self.options.shared_model:
            return
        if self._tail is None:
            topic = TOPICS.scorer_model.name(self.settings)
            self._tail = Consumer(
                {
                    **self.settings.kafka_config(),
                    "group.id": f"{self.options.group_id}-{self.instance}-model",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                }
            )
            self._tail.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        prefix = f"{SHARED_MODEL}.".encode()
        for msg in self._tail.consume(100, 0):
            key = msg.key() or b""
            if msg.error() is None and key.startswith(prefix) and msg.value():
                day = key[len(prefix) :].decode()
                if not day.lstrip("-").isdigit():
                    continue
                record = self.serde.decode(TOPICS.scorer_model, msg.value())
                self.scorer.receive(int(day), ChurnModel.from_bytes(record["model"]))
                MODEL_VERSIONS.labels("adopted").inc()
