"""The whole product on a real broker: simulator → identity → scorer → segmenter → dispatcher
→ local CRM/email receiver, in closed loop, with every service killed -9 once mid-run."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from segflow.demo import run_demo
from segflow.receiver import Receiver, SMTPReceiver
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import read_all
from segflow.runtime.topics import TOPICS

pytestmark = pytest.mark.broker


@pytest.fixture
def vendors() -> Iterator[tuple[Receiver, SMTPReceiver]]:
    """The CRM/email stand-ins, owned by the test: what reached them is checked here, not
    through the demo's own counting."""
    receiver, smtp = Receiver().start(), SMTPReceiver().start()
    try:
        yield receiver, smtp
    finally:
        receiver.stop()
        smtp.stop()


def test_pipeline_end_to_end_with_kills_sends_every_action_once(
    kafka_bootstrap: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    vendors: tuple[Receiver, SMTPReceiver],
) -> None:
    receiver, smtp = vendors
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    args = argparse.Namespace(
        state_dir=str(tmp_path),
        port=0,
        customers=80,
        days=35,
        seed=3,
        keep_broker=True,
        step_timeout=90.0,
        chaos=True,
    )
    assert run_demo(args, receiver, smtp) == 0
    summary = json.loads((tmp_path / "demo-summary.json").read_text())

    # Exactly once, checked independently of the demo's report: the committed dispatch
    # results as a read_committed consumer sees them, against what reached the vendors.
    settings = Settings(bootstrap_servers=kafka_bootstrap, topic_prefix=summary["topic_prefix"])
    serde = Serde.from_settings(settings)
    results = [
        serde.decode(TOPICS.dispatch_results, r.value)
        for r in read_all(settings, TOPICS.dispatch_results.name(settings))
        if r.value
    ]
    sent = Counter(r["idempotency_key"] for r in results if r["status"] == "sent")
    assert sent and max(sent.values()) == 1, [k for k, n in sent.items() if n > 1][:5]
    reached = set(receiver.effects()) | {m["key"] for m in smtp.messages}
    assert set(sent) <= reached, sorted(set(sent) - reached)[:5]  # no "sent" without an effect
    emails = Counter(m["key"] for m in smtp.messages)
    assert not emails or max(emails.values()) == 1, emails.most_common(3)
    holdout = {r["idempotency_key"] for r in results if r["status"] == "holdout"}
    assert holdout and not holdout & set(receiver.attempts()), "a holdout customer was contacted"
    assert receiver.rejected() == 0 and not smtp.rejected

    # Identity: every event stitched, at the quality the issue asks for.
    assert summary["identified"] > 0
    assert summary["precision"] >= 0.99 and summary["recall"] >= 0.95, summary
    # Every malformed record the simulator sent is on the DLQ, and nothing else undecodable.
    undecodable = summary["dlq"].get("undecodable", 0) + summary["dlq"].get("unknown_schema_id", 0)
    assert undecodable == summary["malformed"] > 0
    # Actions: each one reported sent took effect exactly once at the receiver, no key was
    # reported sent twice, and the holdout was never contacted - across four kill -9s and
    # restarts.
    assert summary["sent"] > 0
    assert summary["sent_twice"] == 0
    assert summary["missing"] == 0
    assert summary["effects"] == summary["sent"]
    # Every request met the vendors' contracts (the receiver validates as the vendors do) and
    # the report lists the effects per vendor.
    assert summary["rejected_requests"] == 0
    assert summary["vendor_effects"].get("sendgrid", 0) > 0, summary["vendor_effects"]
    assert summary["vendor_effects"].get("hubspot", 0) > 0, summary["vendor_effects"]
    assert summary["holdout"] > 0 and summary["holdout_contacted"] == 0
    # Every segment change a playbook triggers on was decided (sent, scheduled, suppressed or
    # holdout): none lost across the kills.
    assert summary["undecided"] == 0, summary["undecided"]
    # Closed loop: dispatched actions reached the simulated customers.
    assert summary["applied"] > 0
    report = (tmp_path / "demo-report.html").read_text()
    assert "requests rejected by the vendor contracts: 0" in report and "sendgrid " in report
    assert report.count("<polyline") > 0
    # The report's KPIs come from the API: each treated variant compared with its holdout.
    kpis = summary["api"]["kpis"]
    assert any(k["variant"] == "holdout" for k in kpis)
    assert any(k["uplift"] is not None for k in kpis), kpis
    assert "uplift vs holdout" in report and report.count("<tr>") == len(kpis) + 1
    # Stage latencies were measured (their size is the benchmark's business, not a test's).
    latency = summary["latency"]
    assert latency["score_to_change_s"]["n"] > 0 and latency["change_to_decision_s"]["n"] > 0
    assert latency["week_drain_s"]["n"] >= 5  # 35 days = 5 simulated weeks, then the tail
    # processing-time intervals: an effect never precedes its cause
    assert latency["change_to_decision_s"]["p50"] >= 0, latency
