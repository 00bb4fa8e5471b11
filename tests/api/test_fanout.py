"""Merging N instances' answers: what one instance holding every customer would have said."""

from __future__ import annotations

from typing import Any

from segflow.api.fanout import merge, paging
from services.dispatcher.experiments import kpi_rows


def members_page(ids: list[str], after: str, limit: int) -> tuple[int, dict[str, Any]]:
    """What one segmenter instance answers for ``/segments/A`` (its own members only)."""
    found = sorted(c for c in ids if c > after)
    page = found[:limit]
    return 200, {
        "segment": "A",
        "size": len(ids),
        "members": page,
        "next_after": page[-1] if len(found) > limit else None,
    }


def test_member_pages_across_instances_walk_every_member_once_in_order() -> None:
    owned = [["c01", "c04", "c05", "c09"], ["c02", "c03", "c07", "c08", "c10"]]
    everyone = sorted(c for ids in owned for c in ids)
    seen: list[str] = []
    after = ""
    while True:
        params = {"limit": "3", "after": after}
        status, body = merge("/segments/A", params, [members_page(ids, after, 3) for ids in owned])
        assert status == 200 and body["size"] == len(everyone)
        seen += body["members"]
        if body["next_after"] is None:
            break
        after = body["next_after"]
    assert seen == everyone


def test_console_members_sorted_by_churn_across_instances() -> None:
    def row(cid: str, churn: float | None) -> dict[str, Any]:
        return {"customer_id": cid, "churn_probability": churn, "entered_at": 1}

    a = [row("a", 0.9), row("b", 0.2), row("e", None)]
    b = [row("c", 0.95), row("d", 0.5)]
    asked = paging("/console/segments/S/members", {"offset": "1", "limit": "2"})
    assert asked == {"offset": "0", "limit": "3"}
    answers = [(200, {"segment": "S", "total": len(x), "members": x[:3]}) for x in (a, b)]
    _, body = merge("/console/segments/S/members", {"offset": "1", "limit": "2"}, answers)
    assert [m["customer_id"] for m in body["members"]] == ["a", "d"] and body["total"] == 5


def test_kpis_are_summed_counts_with_rates_and_uplift_computed_again() -> None:
    one = [("S", "P", "A", {"assigned": 40, "sent": 40, "opened": 10, "converted": 8}),
           ("S", "P", "holdout", {"assigned": 30, "converted": 3})]  # fmt: skip
    two = [("S", "P", "A", {"assigned": 60, "sent": 60, "opened": 30, "converted": 12}),
           ("S", "P", "holdout", {"assigned": 70, "converted": 7})]  # fmt: skip
    _, merged = merge("/kpis", {}, [(200, kpi_rows(one)), (200, kpi_rows(two))])
    together = kpi_rows(
        [
            ("S", "P", "A", {"assigned": 100, "sent": 100, "opened": 40, "converted": 20}),
            ("S", "P", "holdout", {"assigned": 100, "converted": 10}),
        ]  # fmt: skip
    )
    assert merged == together
    assert merged[0]["open_rate"] == 0.4 and round(merged[0]["uplift"], 2) == 0.1


def test_a_customer_comes_from_its_owner_and_a_miss_everywhere_is_a_404() -> None:
    miss = (404, {"error": {"code": "not_found", "message": "no state"}})
    assert merge("/customers/x", {}, [miss, (200, {"id": "x"})]) == (200, {"id": "x"})
    assert merge("/console/customers/x/memberships", {}, [miss, miss]) == miss


def test_flows_are_summed_hour_by_hour_and_health_needs_every_instance() -> None:
    f1 = {"watermark": 10, "hours": 2, "segments": {"A": {"entered": [1, 2], "exited": [0, 1]}}}
    f2 = {"watermark": 8, "hours": 2, "segments": {"A": {"entered": [3, 0], "exited": [1, 1]}}}
    _, flow = merge("/console/flow", {}, [(200, f1), (200, f2)])
    assert flow["segments"]["A"] == {"entered": [4, 2], "exited": [1, 2]} and flow["watermark"] == 8
    ok, bad = {"status": "ok", "customers": 3}, {"status": "stalled", "customers": 4}
    _, health = merge("/health", {}, [(200, ok), (200, bad)])
    assert health["status"] == "degraded" and health["customers"] == 7
