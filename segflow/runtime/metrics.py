"""Prometheus metrics shared by every segflow process, and the ``/metrics`` endpoint.

Labels never carry PII: only service, topic, reason and similar closed sets.
"""

from __future__ import annotations

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


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """Serve ``/metrics`` on ``port`` (0.0.0.0) from a background thread."""
    start_http_server(port, registry=registry)


def record_consumer_lag(service: str, stats_json: str) -> None:
    """Set CONSUMER_LAG from a librdkafka statistics JSON document (``stats_cb``)."""
    import json

    stats = json.loads(stats_json)
    for topic, tstats in stats.get("topics", {}).items():
        for partition, pstats in tstats.get("partitions", {}).items():
            lag = pstats.get("consumer_lag", -1)
            if partition != "-1" and lag is not None and lag >= 0:
                CONSUMER_LAG.labels(service, topic, partition).set(lag)
