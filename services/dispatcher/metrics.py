"""The dispatcher's Prometheus metrics. Moved out of ``app.py`` unchanged."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RESULTS = Counter(
    "segflow_dispatch_results_total", "Dispatch decisions", ["channel", "status", "reason"]
)
ATTEMPTS = Counter(
    "segflow_dispatch_attempts_total", "API calls by endpoint and outcome", ["endpoint", "outcome"]
)
CALL_SECONDS = Histogram(
    "segflow_dispatch_call_seconds",
    "API call latency",
    ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BREAKER_OPEN = Gauge(
    "segflow_dispatch_breaker_open", "1 while an endpoint's breaker is open", ["endpoint"]
)
PENDING = Gauge("segflow_dispatch_pending", "Actions waiting", ["state"])
KPI = Gauge(
    "segflow_dispatch_kpi", "Campaign KPI counters", ["segment", "playbook", "variant", "kpi"]
)
RATE = Gauge(
    "segflow_dispatch_kpi_rate", "Campaign KPI rates", ["segment", "playbook", "variant", "rate"]
)
UPLIFT = Gauge(
    "segflow_dispatch_uplift",
    "Conversion uplift vs holdout (estimate and 95% CI)",
    ["segment", "playbook", "variant", "bound"],
)
UNKNOWN_OUTCOMES = Counter(
    "segflow_dispatch_unknown_outcome_total",
    "Calls an earlier owner recorded as started and never settled (kill -9): failed as "
    "ambiguous, not made again",
    ["channel"],
)
START_WAIT = Histogram(
    "segflow_dispatch_start_wait_seconds",
    "From recording a call as started (at-most-once channels) to making it: the rest of the "
    "tick and its transaction's commit, the latency the start record adds",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
