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


#: Graph-writer processes when identity runs split: one active, one warm standby.
IDENTITY_WRITERS = 2


@dataclass(frozen=True)
class Process:
    """One process of a running stack: a service, or one role of it, and its instance.

    ``name`` is what a supervisor calls it: the service or role name for instance 0,
    ``<name>-<instance>`` for the others (``segmenter-1``, ``identity-front-1``).
    """

    name: str
    service: str
    instance: int
    role: str | None = None  # identity's split roles: "front" or "writer"

    @property
    def module(self) -> str:
        return BY_NAME[self.service].module

    @property
    def env(self) -> dict[str, str]:
        """``SEGFLOW_INSTANCE_ID`` (names its transactional.id and static group.instance.id)
        and, for a role of identity, ``SEGFLOW_IDENTITY_ROLE``."""
        env = {"SEGFLOW_INSTANCE_ID": str(self.instance)}
        if self.role is not None:
            env["SEGFLOW_IDENTITY_ROLE"] = self.role
        return env

    @property
    def serves_queries(self) -> bool:
        """Whether it has a query endpoint for the API (identity's fronts hold no graph)."""
        return self.role != "front"

    def group(self, settings: Settings) -> str:
        if self.role is not None:
            return settings.topic_prefix + IDENTITY_ROLES[self.role][0]
        return BY_NAME[self.service].group(settings)

    def input_names(self, settings: Settings) -> list[str]:
        topics = IDENTITY_ROLES[self.role][1] if self.role else BY_NAME[self.service].inputs
        return [t.name(settings) for t in topics]


def processes(counts: dict[str, int]) -> list[Process]:
    """The processes that run ``counts[name]`` instances of each named service, in order.

    Identity with more than one instance runs its split roles: N front-stage processes and
    the graph writer, one active and ``IDENTITY_WRITERS - 1`` warm standbys; with one, the
    one-process role.

    >>> [p.name for p in processes({"identity": 2})]
    ['identity-front', 'identity-front-1', 'identity-writer', 'identity-writer-1']
    >>> [p.name for p in processes({"segmenter": 2})]
    ['segmenter', 'segmenter-1']
    >>> [p.name for p in processes({"identity": 1, "scorer": 1})]
    ['identity', 'scorer']
    """
    out: list[Process] = []
    for name, n in counts.items():
        if n < 1:
            raise ValueError(f"{name}: expected at least 1 instance, got {n}")
        parts: list[tuple[str | None, int]] = [(None, n)]
        if name == "identity" and n > 1:
            parts = [("front", n), ("writer", IDENTITY_WRITERS)]
        for role, k in parts:
            base = f"{name}-{role}" if role else name
            out += [Process(base if i == 0 else f"{base}-{i}", name, i, role) for i in range(k)]
    return out


def process_groups(settings: Settings, procs: list[Process]) -> dict[str, list[str]]:
    """Consumer group → its input topic names, for the groups of these processes."""
    return {p.group(settings): p.input_names(settings) for p in procs}


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
