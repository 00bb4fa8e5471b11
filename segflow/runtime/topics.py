"""The topic registry: every topic's name, key, value schema, partitions and cleanup policy.

Loaded once from ``schemas/topics.yaml``; services refer to ``TOPICS.events`` and friends,
never to a topic name literal.

>>> TOPICS.events.value
'io.segflow.BehaviorEvent'
>>> TOPICS.scores.cleanup
'compact'
>>> TOPICS.events.name_with("acme.")
'acme.events'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from segflow.errors import ConfigError

if TYPE_CHECKING:
    from segflow.runtime.settings import Settings

REGISTRY_FILE = Path(__file__).resolve().parents[2] / "schemas" / "topics.yaml"


@dataclass(frozen=True)
class Topic:
    """One entry of the registry."""

    key_name: str
    suffix: str
    key: str
    value: str
    partitions: int
    cleanup: str
    doc: str = ""
    #: Extra topic-level configs from the registry entry's ``config`` (applied at creation).
    extra: tuple[tuple[str, str], ...] = ()

    def name(self, settings: Settings) -> str:
        """Full topic name under the configured prefix."""
        return self.name_with(settings.topic_prefix)

    def name_with(self, prefix: str) -> str:
        """Full topic name under ``prefix``."""
        return prefix + self.suffix

    def config(self) -> dict[str, str]:
        """Topic-level configs used when the topic is created."""
        conf = {"cleanup.policy": self.cleanup}
        if self.cleanup == "compact":
            conf["min.cleanable.dirty.ratio"] = "0.1"
            conf["segment.ms"] = str(6 * 3600 * 1000)
        conf.update(self.extra)
        return conf


class Topics:
    """Attribute access to the registry (``TOPICS.events``), plus iteration."""

    def __init__(self, topics: dict[str, Topic]) -> None:
        self._topics = topics
        for key, topic in topics.items():
            setattr(self, key, topic)

    # Typed attributes for the topics of SPEC §2.
    events: Topic
    identified: Topic
    merges: Topic
    scores: Topic
    segment_changes: Topic
    dispatch_results: Topic
    forget: Topic
    dlq: Topic
    identity_state: Topic
    identity_dedup: Topic  # issue 15: identity front stage
    identity_links: Topic  # issue 15: front -> graph writer
    scorer_state: Topic
    scorer_model: Topic
    scorer_handoff: Topic
    scorer_examples: Topic
    dispatcher_state: Topic
    contact_vault: Topic
    segmenter_state: Topic
    attributes: Topic  # issue 19
    lookups: Topic  # issue 19

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._topics.values())

    def __len__(self) -> int:
        return len(self._topics)

    def by_value(self, full_name: str) -> Topic:
        """The first topic whose values use the record ``full_name``."""
        for topic in self._topics.values():
            if topic.value == full_name:
                return topic
        raise KeyError(full_name)


def load(path: Path = REGISTRY_FILE) -> Topics:
    """Parse and check the registry file."""
    raw: Any = yaml.safe_load(path.read_text())
    entries = raw.get("topics") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise ConfigError(f"{path}: expected a 'topics' mapping")
    topics: dict[str, Topic] = {}
    for key, entry in entries.items():
        try:
            topic = Topic(
                key_name=key,
                suffix=str(entry["name"]),
                key=str(entry["key"]),
                value=str(entry["value"]),
                partitions=int(entry["partitions"]),
                cleanup=str(entry["cleanup"]),
                doc=str(entry.get("doc", "")),
                extra=tuple((str(k), str(v)) for k, v in (entry.get("config") or {}).items()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: topic {key!r}: missing or bad field {exc}") from exc
        if topic.key not in ("string", "bytes"):
            raise ConfigError(f"{path}: topic {key!r}: key must be 'string' or 'bytes'")
        if topic.cleanup not in ("delete", "compact", "compact,delete"):
            raise ConfigError(f"{path}: topic {key!r}: unknown cleanup {topic.cleanup!r}")
        topics[key] = topic
    return Topics(topics)


TOPICS = load()
