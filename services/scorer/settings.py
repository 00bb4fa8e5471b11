"""The scorer's own settings, ``SEGFLOW_SCORER_*`` (moved out of
:mod:`services.scorer.app`, which re-exports :class:`ScorerSettings`)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from services.scorer.core import ScorerConfig
from services.scorer.features import DAY, HOUR


class ScorerSettings(BaseSettings):
    """The scorer's own settings (``SEGFLOW_SCORER_*`` environment variables)."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_SCORER_", extra="ignore")

    instance: str = "scorer-0"
    group_id: str = "segflow-scorer"
    allowed_lateness_hours: float = 48.0
    watermark_delay_seconds: float = 300.0
    max_future_hours: float = 24.0
    churn_horizon_days: int = 30  # H: churn = no qualifying activity in the next H days
    churn_activity: str = "any"  # qualifying activity: purchase, login or any
    min_emit_interval_seconds: float = 300.0
    refresh_hours: float = 24.0
    checkpoint_seconds: float = 60.0
    tick_seconds: float = 1.0
    # bounded work per tick (input waits while it runs): the rest is done in the next ticks
    max_scores_per_tick: int = 5000
    label_seconds_per_tick: float = 1.0  # label days learned until this is spent (>= 1 day)
    batch_size: int = 2000
    high_value_zips: str = ""  # deprecated: the zip_income lookup table (issue 19)
    reorder_records: int = 2000  # records of one partition that may arrive out of time order
    pre_commit_delay: float = 0.0  # fault injection for tests: widen the open-transaction window
    http_port: int | None = None  # internal query endpoint (services/scorer/api.py)
    # True: one churn model for all instances (examples to scorer.examples, the owner of its
    # partition 0 learns and publishes churn.shared). False: each instance learns its own.
    shared_model: bool = True
    # A score as of day D uses the shared model's version of day D - lag (services/scorer/
    # shared.py); the learner applies a day once every partition completed it, or once one
    # partition is grace days past it, or after idle seconds without applying a day while
    # contributions wait (an idle partition must not stop the model).
    shared_model_lag_days: int = 1
    shared_model_grace_days: int = 7
    shared_model_idle_seconds: float = 30.0

    def core(self) -> ScorerConfig:
        return ScorerConfig(
            allowed_lateness_ms=int(self.allowed_lateness_hours * HOUR),
            watermark_delay_ms=int(self.watermark_delay_seconds * 1000),
            max_future_ms=int(self.max_future_hours * HOUR),
            churn_horizon_days=self.churn_horizon_days,
            churn_activity=self.churn_activity,
            min_emit_interval_ms=int(self.min_emit_interval_seconds * 1000),
            refresh_interval_ms=max(1, int(self.refresh_hours * HOUR)),
            churned_refresh_interval_ms=7 * DAY,
            reorder_records=self.reorder_records,
            max_scores_per_flush=self.max_scores_per_tick,
            high_value_zips=frozenset(z.strip() for z in self.high_value_zips.split(",") if z),
        )
