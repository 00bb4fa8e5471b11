"""The demo's HTML report (a Jinja2 template): what it shows, and data escaped as text."""

from __future__ import annotations

from html.parser import HTMLParser

from segflow.demo import Observed
from segflow.demo.report import page, render_html


class Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_shows_sizes_quality_and_kpis_with_names_escaped() -> None:
    timeline = [(7, {"AtRisk-60d": 3, "<script>x</script>": 1}), (14, {"AtRisk-60d": 5})]
    obs = Observed(
        results=[
            {"status": s, "entry_id": f"e{i}", "decided_at": 0}
            for i, s in enumerate(["sent", "sent", "holdout"])
        ]
    )
    kpis = [
        {
            "segment": "AtRisk-60d",
            "playbook": "winback",
            "variant": "b",
            "assigned": 40,
            "sent": 38,
            "conversion_rate": 0.25,
            "churn_rate": 0.1,
            "uplift": 0.05,
            "uplift_ci": [-0.02, 0.12],
        }
    ]
    html = render_html(page(timeline, obs, 0.9876, 0.5, 0.71), kpis)
    parsed = Text()
    parsed.feed(html)
    text = " ".join(parsed.text)
    assert "script" not in parsed.tags  # a segment name is text, never markup
    assert "<script>x</script>" in text
    assert parsed.tags.count("polyline") == 2  # one line per segment
    assert "precision 0.9876, recall 0.5000" in text
    assert "Churn AUC (final score vs true churn): 0.710" in text
    assert '"sent": 2' in text and '"holdout": 1' in text
    assert "+5.0 pts [-2.0, +12.0]" in text and "25.0%" in text


def test_report_without_kpis_or_auc_says_so() -> None:
    html = render_html(page([], Observed(), 1.0, 1.0, None), [])
    assert "No KPI rows (no actions decided)." in html
    assert "Churn AUC" not in html
