"""Playbook files: the defaults load, mistakes are reported with file, line and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.dispatcher.playbooks import (
    DEFAULT_DIR,
    PlaybookError,
    load_book,
    parse_documents,
    parse_duration,
)

GOOD = """\
playbook: P
segment: S
steps:
  - id: mail
    channel: email
    template: t
  - id: task
    channel: crm_task
    after: 48h
    if: {no_engagement_since: mail}
"""


def test_defaults_load_and_include_the_policy() -> None:
    book = load_book([DEFAULT_DIR])
    assert len(book.playbooks) >= 10
    assert book.policy.caps_for("email") and book.policy.quiet_start_min == 21 * 60


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (GOOD.replace("channel: crm_task", "channel: fax"), "x.yaml:8: steps[1].channel"),
        (GOOD.replace("after: 48h", "after: two days"), "x.yaml:9: steps[1].after"),
        (
            GOOD.replace("no_engagement_since: mail", "no_engagement_since: task"),
            "x.yaml:10: steps[1].if.no_engagement_since",
        ),
        (GOOD.replace("    template: t\n", ""), "x.yaml:4: steps[0].template"),
        (GOOD.replace("segment: S\n", "segment: S\nprio: 3\n"), "x.yaml:3: prio"),
        (GOOD.replace("id: task", "id: mail"), "x.yaml:7: steps[1].id"),
        (GOOD + "experiment: {holdout: 1.5}\n", "x.yaml:11: experiment.holdout"),
        (
            GOOD + "experiment:\n  variants:\n    - {name: A, steps: {nope: {subject: x}}}\n",
            "x.yaml:13: experiment.variants[0].steps.nope",
        ),
        (
            "policy:\n  caps:\n    email: [{max: 0, per: 1d}]\n",
            "x.yaml:3: policy.caps.email[0].max",
        ),
        (
            "policy:\n  quiet_hours: {start: '25:00', end: '08:00'}\n",
            "x.yaml:2: policy.quiet_hours.start",
        ),
        ("playbook: P\nsegment: S\nsteps: [\n", "x.yaml:4: (syntax)"),
    ],
)
def test_errors_name_the_line_and_the_field(text: str, where: str) -> None:
    with pytest.raises(PlaybookError) as err:
        parse_documents(text, "x.yaml")
    assert str(err.value).startswith(where), str(err.value)


def test_durations() -> None:
    assert parse_duration("96h") == 96 * 3_600_000
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_check_command_reports_a_broken_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(GOOD.replace("channel: crm_task", "channel: fax"))
    env_ok = subprocess.run(
        [sys.executable, "-m", "services.dispatcher", "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert env_ok.returncode == 0 and "AtRisk-60d" in env_ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "services.dispatcher", "--check"],
        capture_output=True,
        text=True,
        check=False,
        env={"SEGFLOW_DISPATCHER_PLAYBOOKS": str(tmp_path), "PATH": ""},
    )
    assert bad.returncode == 2 and "bad.yaml:8: steps[1].channel" in bad.stderr


# -- templates: strict, sandboxed, checked at load ----------------------------------------------
UNDEFINED_SUBJECT = """\
playbook: P
segment: S
defaults: {first_name: there}
steps:
  - id: mail
    channel: email
    template: d-x
    subject: "{{first_name}}, {{discount_code}} is yours"
"""


def test_a_template_variable_without_a_value_is_rejected_at_load() -> None:
    with pytest.raises(PlaybookError) as err:
        parse_documents(UNDEFINED_SUBJECT, "p.yaml")
    message = str(err.value)
    assert message.startswith("p.yaml:8: steps[0].subject: discount_code may be undefined")
    assert "first_name" in message  # what is known, so the author sees the fix


def test_a_broken_template_is_rejected_with_line_and_field() -> None:
    text = UNDEFINED_SUBJECT.replace("{{discount_code}} is yours", "{{ first_name ")
    with pytest.raises(PlaybookError, match=r"^p\.yaml:8: steps\[0\]\.subject: not a valid"):
        parse_documents(text, "p.yaml")


def test_variant_subjects_are_checked_too() -> None:
    text = UNDEFINED_SUBJECT.replace(" {{discount_code}} is yours", " hello").replace(
        "steps:\n",
        "experiment: {variants: [{name: B, steps: {mail: {subject: 'Hi {{nickname}}'}}}]}\n"
        "steps:\n",
    )
    with pytest.raises(PlaybookError, match=r"experiment\.variants\[0\]\.steps\.mail\.subject"):
        parse_documents(text, "p.yaml")


def test_templates_cannot_reach_python_internals() -> None:
    from services.dispatcher.playbooks import RenderError, render

    with pytest.raises(RenderError):
        render("{{ x.__class__.__mro__[1].__subclasses__() }}", {"x": "s"})


def test_every_default_email_renders_without_an_empty_variable() -> None:
    """A customer with no attributes at all still gets whole sentences: defaults fill in."""
    from services.dispatcher.core import SegmentChange, decide, request_for

    book = load_book([DEFAULT_DIR])
    for pb in book.playbooks:
        for i in range(40):  # some customer is treated by every variant
            c, _ = decide(None, SegmentChange(f"z{i}", pb.segment, "entered", "e", 0), 0, book)
            if c is None:
                continue
            for action in c.actions:
                req = request_for(c, action, book)
                assert req is not None and req.problem is None
                for text in (req.subject, req.body, *req.properties.values()):
                    if text is not None:
                        assert "{{" not in text and not text.startswith(","), (pb.name, text)
                        assert ", ," not in text and "  " not in text, (pb.name, text)


def test_a_duplicate_key_is_an_error_not_a_silent_override() -> None:
    text = "playbook: P\nsegment: S\npriority: 1\npriority: 2\nsteps: [{id: m, channel: webhook}]\n"
    with pytest.raises(
        PlaybookError, match=r"^p\.yaml:4: priority: duplicate key \(first on line 3\)"
    ):
        parse_documents(text, "p.yaml")
