"""deploy/grafana: the dashboard's queries use metrics and labels the code defines, it shows what
an operator needs, and the provisioning files point at it and at Prometheus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from promql import defined_metrics, parse, problems

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "segflow.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]


def test_every_query_uses_metrics_and_labels_the_code_defines(dashboard: dict[str, Any]) -> None:
    metrics = defined_metrics()
    bad = {f"{title}: {expr}": problems(expr, metrics) for title, expr in exprs(dashboard)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_check_catches_a_renamed_metric_or_label() -> None:
    metrics = defined_metrics()
    assert problems("rate(segflow_records_in[5m])", metrics) == [
        "unknown metric segflow_records_in"
    ]
    assert problems('segflow_dispatch_results_total{kind="email"}', metrics) == [
        "segflow_dispatch_results_total has no label 'kind' "
        "(it has ['channel', 'reason', 'status'])"
    ]
    assert problems("sum by (kind) (segflow_segment_size)", metrics) == [
        "grouping by 'kind', which none of the expression's metrics has"
    ]
    p99 = "histogram_quantile(0.99, sum by (le) (rate(segflow_batch_seconds_bucket[5m])))"
    assert problems(p99, metrics) == []


def test_dashboard_shows_what_an_operator_needs(dashboard: dict[str, Any]) -> None:
    used = {s.metric for _, e in exprs(dashboard) for s in parse(e).selectors}
    needed = {
        "segment sizes": "segflow_segment_size",
        "entries/exits": "segflow_segment_transitions_total",
        "consumer lag": "segflow_consumer_lag",
        "events in": "segflow_records_in_total",
        "events out": "segflow_records_out_total",
        "DLQ by reason": "segflow_dlq_records_total",
        "churn AUC / log loss": "segflow_scorer_model_quality",
        "dispatch sent/failed by channel": "segflow_dispatch_results_total",
        "circuit state": "segflow_dispatch_breaker_open",
        "batch latency": "segflow_batch_seconds_bucket",
        "record age": "segflow_record_age_seconds_bucket",
        "API call latency": "segflow_dispatch_call_seconds_bucket",
    }
    missing = {what: m for what, m in needed.items() if m not in used}
    assert missing == {}
    all_text = " ".join(e for _, e in exprs(dashboard))
    for metric in ('metric="roc_auc"', 'metric="log_loss"', 'status="sent"', 'status="failed"'):
        assert metric in all_text
    # DLQ panel splits by reason, dispatch panels by channel
    queries = [e for _, e in exprs(dashboard)]
    assert any("segflow_dlq_records_total" in e and "reason" in e for e in queries)
    assert any("segflow_dispatch_results_total" in e and "channel" in e for e in queries)


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for y in range(g["y"], g["y"] + g["h"]):
            for x in range(g["x"], g["x"] + g["w"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    for p in panels(dashboard):
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_provisioning_points_at_the_dashboard_and_prometheus(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    provisioning = GRAFANA / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (ds,) = sources["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["uid"] == variables["datasource"]["current"]["value"]
    providers = yaml.safe_load((provisioning / "dashboards" / "segflow.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    # where docker-compose.yml mounts deploy/grafana/dashboards (checked in test_compose.py)
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_shows_the_churn_quality_that_would_have_caught_issue_17(
    dashboard: dict[str, Any],
) -> None:
    """Issue 17: the exported prequential AUC read 0.985 while the score ranked customers worse
    than chance; the held-back AUC next to recency alone, calibration and the share of tied
    scores are what would have shown it."""
    queries = " ".join(e for _, e in exprs(dashboard))
    for metric in (
        "holdout_roc_auc",
        "holdout_recency_roc_auc",
        "holdout_auc_minus_recency",
        "holdout_calibration_error",
        "score_tie_share",
    ):
        assert f'segflow_scorer_model_quality{{metric="{metric}"}}' in queries, metric
    # every metric value the dashboard asks for is one the scorer exports
    from services.scorer.model import ChurnModel

    exported = set(ChurnModel().quality())
    asked = {m.split('"')[1] for m in queries.split("segflow_scorer_model_quality{metric=")[1:]}
    assert asked <= exported, asked - exported
