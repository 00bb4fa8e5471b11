"""The segmenter's own settings, ``SEGFLOW_SEGMENTER_*``, and where its default definitions
live (pure: no Kafka, no I/O; moved out of :mod:`services.segmenter.app`, which re-exports
:class:`SegmenterConfig` and :data:`DEFAULT_DEFINITIONS`). ``segflow replay`` reads the current
definitions' location from here."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

HERE = Path(__file__).resolve().parent
DEFAULT_DEFINITIONS = HERE / "segments" / "default.yaml"


class SegmenterConfig(BaseSettings):
    """The segmenter's own settings (``SEGFLOW_SEGMENTER_*``)."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_SEGMENTER_", extra="ignore")

    definitions: Path = DEFAULT_DEFINITIONS
    group_id: str = "segmenter"
    instance: str = "segmenter-0"  # transactional.id and static group member id
    reload_interval: float = 2.0  # seconds between mtime polls of the definitions file
    #: Seconds of *event time* between a scores partition's recomputations of its pNN table:
    #: a grid since the epoch (every hour by default), reached by the partition's own scores
    #: (README.md, "Percentile thresholds"). Until 2026-12 it was processing time (60 s).
    percentile_refresh: float = 3600.0
    #: Seconds of *event time*: how long past a merge's time an absorbed id waits for the
    #: scorer's score tombstone (where it is retired) before the fallback retires it without
    #: (``merging.py``; README.md, "Running N instances"). 7 days: far beyond how late a
    #: merge-causing event normally is relative to its absorbed id's partition.
    merge_wait: float = 7 * 86_400.0
    tick_interval: float = 0.5
    batch_size: int = 2000
    max_timers_per_tick: int = 20000
    http_port: int | None = None
    pre_commit_delay: float = 0.0  # fault injection for tests (widens the open transaction)
