"""The demo's report: printed lines and an HTML page rendered from a Jinja2 template."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import jinja2

from segflow.demo.evaluate import (
    _capacity,
    _latencies,
    _pairwise,
    _segment_quality,
    _undecided,
)
from segflow.demo.reading import (
    Observed,
    _sizes,
    say,
)
from segflow.receiver import Receiver, SMTPReceiver
from segflow.sim.generator import Simulation
from segflow.sim.truth import truth_records
from segflow.stats import roc_auc


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "  n/a"
    return f"{x * 100:5.1f}%" if pct else f"{x:5.1f}"


def _report(
    sim: Simulation,
    obs: Observed,
    produced: dict[str, Any],
    receiver: Receiver,
    smtp: SMTPReceiver,
    total: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    truth = truth_records(sim)
    end_ms = sim.config.end_ms
    summary: dict[str, Any] = {"dlq": dict(obs.dlq), "malformed": produced["malformed"]}
    personas = Counter(t["persona"] for t in truth)
    churned = {t["customer"] for t in truth if t["churn_at"] is not None}
    say("=" * 72)
    say(
        f"customers: {len(truth):,} ({len(churned):,} churn during the span); "
        + ", ".join(f"{p} {n}" for p, n in personas.most_common())
    )
    say(
        f"events: {produced['events']:,} produced (+{produced['malformed']:,} malformed) in "
        f"{produced['seconds']:.0f}s: a closed-loop pace of "
        f"{produced['events'] / produced['seconds']:,.0f} events/s (each simulated week waits "
        "for the pipeline to drain; this is not the pipeline's capacity)"
    )
    capacity = _capacity(obs, produced)
    if capacity:
        summary["capacity"] = capacity
        say(
            "capacity: input records per CPU-second of each service (its own CPU time): "
            + ", ".join(
                f"{name} {c['records_per_cpu_second']:,.0f} ({c['records']:,} in "
                f"{c['cpu_seconds']:.1f} CPU-s"
                + (", since its last restart)" if c["restarted"] else ")")
                for name, c in capacity.items()
            )
        )
    say("dead-lettered: " + (", ".join(f"{r} {n}" for r, n in obs.dlq.most_common()) or "none"))
    final_owner = {e: obs.final_id(c) for e, c in obs.event_owner.items()}
    precision, recall = _pairwise(final_owner, produced["truth_of"])
    summary.update(precision=precision, recall=recall, identified=len(obs.event_owner))
    say(
        f"identity: {len(set(final_owner.values())):,} customer ids for {len(truth):,} "
        f"true customers; {obs.merges:,} merges; pairwise precision {precision:.4f}, "
        f"recall {recall:.4f}"
    )
    auc = None
    if obs.scores:
        true_of: dict[str, str | None] = {}
        for event_id, cid in obs.event_owner.items():
            true_of.setdefault(cid, produced["truth_of"].get(event_id))
        known = [
            (s["churn_probability"], true_of.get(cid) in churned)
            for cid, s in obs.scores.items()
            if true_of.get(cid)
        ]
        auc = roc_auc([p for p, _ in known], [y for _, y in known])
        say(
            f"scores: {len(obs.scores):,} customers scored; final churn probability vs true "
            f"churn: AUC {_fmt(auc, pct=False) if auc is None else f'{auc:.3f}'}"
        )
    say("segments (time overlap with the ground truth; median days from true onset to entered):")
    say(f"  {'segment':26} {'members':>7} {'precision':>9} {'recall':>7} {'onset→entered':>13}")
    final = _sizes(obs.changes)
    for seg, p, r, med, _n in _segment_quality(obs, produced, truth, end_ms):
        say(
            f"  {seg:26} {final.get(seg, 0):7,} {_fmt(p):>9} {_fmt(r):>7} "
            f"{_fmt(med, pct=False) + ' d' if med is not None else 'n/a':>13}"
        )
    other = sorted(s for s in final if not any(s == t for t in truth[0]["segments"]))
    if other:
        say("  also: " + ", ".join(f"{s} {final[s]}" for s in other))
    transitions = Counter(c["transition"] for c in obs.changes)
    say("changes: " + ", ".join(f"{k} {v:,}" for k, v in transitions.most_common()))
    status = Counter(r["status"] for r in obs.results)
    say(
        "dispatch decisions: "
        + (", ".join(f"{k} {v:,}" for k, v in status.most_common()) or "none")
    )
    sent = [r for r in obs.results if r["status"] == "sent"]
    by_channel = Counter((r["channel"], r.get("variant") or "-") for r in sent)
    for (channel, variant), n in sorted(by_channel.items()):
        say(f"  sent {channel:20} variant {variant:8} {n:6,}")
    holdout_keys = {r["idempotency_key"] for r in obs.results if r["status"] == "holdout"}
    effects = set(receiver.effects()) | {m["key"] for m in smtp.messages}
    sent_keys = Counter(r["idempotency_key"] for r in sent)
    twice = sum(1 for n in sent_keys.values() if n > 1)
    missing = set(sent_keys) - effects
    say(
        f"receiver: {len(effects):,} distinct actions took effect ({len(smtp.unique()):,} by "
        f"SMTP); {receiver.replays():,} repeated requests absorbed by idempotency keys; "
        f"'sent' results without an effect: {len(missing)}; keys reported sent twice: {twice}; "
        f"holdout contacted: {len(holdout_keys & effects)}"
    )
    per_vendor = receiver.effects_by_vendor()
    if smtp.messages:
        per_vendor["smtp"] = len(smtp.unique())
    rejected = receiver.rejected() + len(smtp.rejected)
    say(
        "vendors: "
        + (", ".join(f"{v} {n:,} effects" for v, n in sorted(per_vendor.items())) or "none")
        + f"; requests rejected by the vendor contracts: {rejected}"
    )
    summary.update(
        vendor_effects=per_vendor,
        rejected_requests=rejected,
        sent=len(sent_keys),
        effects=len(effects),
        sent_twice=twice,
        missing=len(missing),
        holdout=len(holdout_keys),
        holdout_contacted=len(holdout_keys & effects),
    )
    undecided = _undecided(obs)
    say(
        f"every triggering segment change decided: {len(undecided) == 0} "
        f"({len(undecided)} of the changes a playbook triggers on have no dispatch result)"
    )
    summary["undecided"] = len(undecided)
    latency = _latencies(obs)
    for line in _latency_lines(latency):
        say(line)
    summary["latency"] = latency
    say(
        f"closed loop: {produced['applied']:,} actions reached simulated customers, "
        f"{produced['rescued']:,} customers rescued by treatment"
    )
    say(f"total {total:.0f}s")
    summary.update(auc=auc, rescued=produced["rescued"], applied=produced["applied"])
    return page(produced["timeline"], obs, precision, recall, auc), summary


def _latency_lines(latency: dict[str, dict[str, float] | None]) -> list[str]:
    names = {
        "score_to_change_s": "score → segment change",
        "change_to_decision_s": "segment change → dispatch decision",
        "week_drain_s": "simulated week produced → all caught up",
    }
    out = ["latency (processing time, seconds; each simulated week is produced at once):"]
    for key, label in names.items():
        q = latency.get(key)
        out.append(
            f"  {label:40} "
            + (
                f"p50 {q['p50']:.2f}  p99 {q['p99']:.2f}  max {q['max']:.2f}  (n={q['n']:,})"
                if q
                else "n/a"
            )
        )
    return out


PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("segflow.demo", "templates"),
    autoescape=True,  # segment names and KPI cells are data, not markup
    undefined=jinja2.StrictUndefined,
)


def kpi_rows(kpis: list[dict[str, Any]]) -> list[list[str]]:
    """The API's KPI rows as table cells (uplift = conversion minus the holdout's)."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    rows = []
    for k in kpis:
        ci = k.get("uplift_ci")
        uplift = (
            f"{100 * k['uplift']:+.1f} pts [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
            if k.get("uplift") is not None and ci
            else "-"
        )
        rows.append(
            [
                k["segment"],
                k["playbook"],
                k["variant"],
                f"{k.get('assigned', 0):,}",
                f"{k.get('sent', 0):,}",
                pct(k.get("conversion_rate")),
                pct(k.get("churn_rate")),
                uplift,
            ]
        )
    return rows


def page(
    timeline: list[tuple[int, dict[str, int]]],
    obs: Observed,
    precision: float,
    recall: float,
    auc: float | None,
) -> dict[str, Any]:
    """What the HTML report shows, as data for ``report.html.j2`` (KPIs are added later,
    from the API)."""
    segments = sorted({s for _d, sizes in timeline for s in sizes})
    width, height = 760, 320
    top = max([1] + [n for _d, sizes in timeline for n in sizes.values()])
    days = max([1] + [d for d, _s in timeline])
    lines = [
        {
            "segment": seg,
            "color": PALETTE[i % len(PALETTE)],
            "points": " ".join(
                f"{40 + d / days * (width - 200):.1f},"
                f"{height - 30 - sizes.get(seg, 0) / top * (height - 50):.1f}"
                for d, sizes in timeline
            ),
        }
        for i, seg in enumerate(segments)
    ]
    return {
        "chart": {"width": width, "height": height, "top": top, "days": days, "lines": lines},
        "precision": precision,
        "recall": recall,
        "auc": auc,
        "decisions": json.dumps(dict(Counter(r["status"] for r in obs.results))),
        "latency_text": "\n".join(_latency_lines(_latencies(obs))),
    }


def render_html(context: dict[str, Any], kpis: list[dict[str, Any]]) -> str:
    return _TEMPLATES.get_template("report.html.j2").render(**context, kpis=kpi_rows(kpis))
