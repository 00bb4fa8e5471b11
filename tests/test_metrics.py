"""Metrics hooks: what SREs see on /metrics."""

from __future__ import annotations

import json


def test_consumer_lag_is_read_from_librdkafka_statistics() -> None:
    from prometheus_client import REGISTRY

    from segflow.runtime.metrics import record_consumer_lag

    doc = json.dumps(
        {
            "topics": {
                "segflow.events": {
                    "partitions": {
                        "0": {"consumer_lag": 42},
                        "1": {"consumer_lag": -1},
                        "-1": {"consumer_lag": 7},
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
