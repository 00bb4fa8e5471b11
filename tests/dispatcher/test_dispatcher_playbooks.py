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
