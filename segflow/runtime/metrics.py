"""Prometheus metrics shared by every segflow process, and the ``/metrics`` endpoint.

Labels never carry PII: only service, topic, reason and similar closed sets.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

RECORDS_IN = Counter("segflow_records_in_total", "Records consumed", ["service", "topic"])
RECORDS_OUT = Counter("segflow_records_out_total", "Records produced", ["service", "topic"])
DLQ_RECORDS = Counter(
    "segflow_dlq_records_total", "Records sent to the dead-letter topic", ["service", "reason"]
)
BATCH_SECONDS = Histogram(
    "segflow_batch_seconds",
    "Time to process and commit one consumed batch",
    ["service"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECORD_AGE_SECONDS = Histogram(
    "segflow_record_age_seconds",
    "Age of a record (now minus its Kafka timestamp) when its batch commits",
    ["service"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
TRANSACTIONS = Counter(
    "segflow_transactions_total", "Kafka transactions by outcome", ["service", "outcome"]
)
CONSUMER_LAG = Gauge(
    "segflow_consumer_lag",
    "Records between the consumer's position and the partition end (librdkafka statistics)",
    ["service", "topic", "partition"],
)
UP = Gauge("segflow_up", "1 while the service's processing loop runs", ["service"])
INSTANCE = Gauge(
    "segflow_instance_info", "1 per running instance of a service", ["service", "instance"]
)
REBALANCES = Counter(
    "segflow_rebalances_total",
    "Partition assignment changes of an instance (assigned, revoked, lost)",
    ["service", "instance", "kind"],
)
ASSIGNED_PARTITIONS = Gauge(
    "segflow_assigned_partitions",
    "Input partitions an instance currently owns",
    ["service", "instance"],
)
HELD_PARTITIONS = Gauge(
    "segflow_held_partitions",
    "Input partitions an instance holds at a record its handler cannot handle yet (e.g. the "
    "scorer waiting for a merge's hand-off)",
    ["service", "instance"],
)
REVOKE_UNFINISHED = Counter(
    "segflow_revoke_unfinished_total",
    "Pieces of work under way (e.g. dispatcher calls) a revoke could not wait for: their new "
    "owner does them again",
    ["service", "instance"],
)
RESTORE_SECONDS = Histogram(
    "segflow_state_restore_seconds",
    "Time to restore the state of newly assigned partitions (the instance processes nothing "
    "meanwhile)",
    ["service", "instance"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """Serve ``/metrics`` on ``port`` (0.0.0.0) from a background thread."""
    start_http_server(port, registry=registry)


def record_consumer_lag(service: str, stats_json: str) -> None:
    """Set CONSUMER_LAG from a librdkafka statistics JSON document (``stats_cb``)."""
    import json

    stats = json.loads(stats_json)
    for topic, tstats in stats.get("topics", {}).items():
        for partition, pstats in tstats.get("partitions", {}).items():
            lag = partition_lag(pstats)
            if partition != "-1" and lag is not None:
                CONSUMER_LAG.labels(service, topic, partition).set(lag)


def partition_lag(pstats: dict[str, Any]) -> int | None:
    """Records between the consumer's position and the end of one partition, from its stats.

    Not librdkafka's ``consumer_lag``: that counts from the committed offset the consumer
    fetched at assignment, which offsets committed in a producer transaction never update, so it
    is -1 or stale in segflow's services. The position is the next offset handed to the
    application (``app_offset``), or the committed offset before any record arrived; the end is
    the last stable offset (read_committed).

    >>> partition_lag({"ls_offset": 120, "app_offset": 100, "committed_offset": 58})
    20
    >>> partition_lag({"ls_offset": 120, "app_offset": -1001, "committed_offset": 115})
    5
    >>> partition_lag({"ls_offset": -1001, "app_offset": -1001, "committed_offset": -1001}) is None
    True
    """
    end = pstats.get("ls_offset", -1)
    pos = pstats.get("app_offset", -1)
    if pos is None or pos < 0:
        pos = pstats.get("committed_offset", -1)
    if end is None or pos is None or end < 0 or pos < 0:
        return None
    return max(0, int(end) - int(pos))
