"""Metrics hooks: what SREs see on /metrics."""

from __future__ import annotations

import json


def test_consumer_lag_is_read_from_librdkafka_statistics() -> None:
    """From the position the service reached, not from librdkafka's committed offset (offsets
    committed in a producer transaction never update it: its consumer_lag goes stale)."""
    from prometheus_client import REGISTRY

    from segflow.runtime.metrics import record_consumer_lag

    doc = json.dumps(
        {
            "topics": {
                "segflow.events": {
                    "partitions": {
                        "0": {"ls_offset": 142, "app_offset": 100, "committed_offset": 58},
                        "1": {"ls_offset": -1001, "app_offset": -1001, "committed_offset": -1001},
                        "-1": {"ls_offset": 7, "app_offset": 0},
                    }
                }
            }
        }
    )
    record_consumer_lag("lagtest", doc)
    labels = {"service": "lagtest", "topic": "segflow.events"}
    assert REGISTRY.get_sample_value("segflow_consumer_lag", {**labels, "partition": "0"}) == 42
    assert REGISTRY.get_sample_value("segflow_consumer_lag", {**labels, "partition": "1"}) is None
    assert REGISTRY.get_sample_value("segflow_consumer_lag", {**labels, "partition": "-1"}) is None
