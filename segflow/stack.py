"""The services segflow runs, in one place: module, consumer group, input topics.

``segflow up``, ``segflow demo``, the benchmarks and the tests read this registry instead of
each keeping its own list. A service's consumer group is ``<topic prefix><name>`` whenever
segflow starts it (``group_env`` gives the variables that make every service use that name).
"""

from __future__ import annotations

from dataclasses import dataclass

from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS, Topic


@dataclass(frozen=True)
class Service:
    name: str
    inputs: tuple[Topic, ...]
    group_env: str | None = None  # the variable that sets its consumer group, if any

    @property
    def module(self) -> str:
        """``python -m <module>`` runs it."""
        return f"services.{self.name}"

    def group(self, settings: Settings) -> str:
        return settings.topic_prefix + self.name

    def input_names(self, settings: Settings) -> list[str]:
        return [t.name(settings) for t in self.inputs]


SERVICES: tuple[Service, ...] = (
    Service("identity", (TOPICS.events,)),
    Service(
        "scorer",
        (TOPICS.identified, TOPICS.merges, TOPICS.scorer_handoff),
        "SEGFLOW_SCORER_GROUP_ID",
    ),
    Service("segmenter", (TOPICS.scores, TOPICS.merges, TOPICS.attributes)),
    Service(
        "dispatcher",
        (TOPICS.segment_changes, TOPICS.identified, TOPICS.attributes),
        "SEGFLOW_DISPATCHER_GROUP_ID",
    ),
    # issue 19: identify traits and CRM exports -> segflow.attributes (read by the segmenter)
    Service("attributes", (TOPICS.identified, TOPICS.merges)),
)
BY_NAME = {s.name: s for s in SERVICES}
#: issue 15: identity as N instances runs ``python -m services.identity`` with
#: SEGFLOW_IDENTITY_ROLE=front (N instances) and =writer (one active, others warm standbys)
#: instead of the one-process role above: role -> (consumer group after the prefix, inputs).
IDENTITY_ROLES: dict[str, tuple[str, tuple[Topic, ...]]] = {
    "front": ("identity-front", (TOPICS.events, TOPICS.forget)),
    "writer": ("identity-writer", (TOPICS.identity_links,)),
}


def group_env(settings: Settings) -> dict[str, str]:
    """Environment that gives every service the group ``<prefix><name>`` (identity and the
    segmenter derive it from the prefix themselves; the others read a variable)."""
    return {s.group_env: s.group(settings) for s in SERVICES if s.group_env}


def groups(settings: Settings, names: list[str] | None = None) -> dict[str, list[str]]:
    """Consumer group → its input topic names, for the named services (default: all)."""
    chosen = [BY_NAME[n] for n in names] if names is not None else list(SERVICES)
    return {s.group(settings): s.input_names(settings) for s in chosen}


def available_services() -> list[str]:
    """The services of this build that can run (those with a ``__main__``), in order."""
    from importlib.util import find_spec

    return [s.name for s in SERVICES if find_spec(f"{s.module}.__main__") is not None]
