"""Playbook files validated by pydantic models over the line-tracking loader: unknown keys,
wrong types and errors inside a step, a variant or the policy name the file, the line and the
field (lines counted by hand in the texts); a bad file on hot reload keeps the running book."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from segflow.runtime.settings import Settings
from services.dispatcher.app import Dispatcher
from services.dispatcher.playbooks import PlaybookError, parse_documents
from services.dispatcher.settings import DispatcherSettings

BOOK = """\
playbook: P
segment: S
defaults: {first_name: there}
steps:
  - id: mail
    channel: email
    template: t-1
    subject: "Hi {{first_name}}"
  - id: list
    channel: crm_list
    list_id: at-risk
experiment:
  variants:
    - name: A
    - name: B
      steps:
        mail: {subject: "Hello {{first_name}}"}
"""


@pytest.mark.parametrize(
    ("old", "new", "where", "words"),
    [
        # an unknown key inside a step, a step's condition, a variant's step change
        (
            "    list_id: at-risk\n",
            "    list_id: at-risk\n    colour: red\n",
            "x.yaml:12: steps[1].colour",
            "unknown field (expected one of after, body, channel",
        ),
        (
            "    template: t-1\n",
            "    template: t-1\n    if: {no_engagement: mail}\n",
            "x.yaml:8: steps[0].if.no_engagement",
            "expected one of no_engagement_since",
        ),
        (
            '{subject: "Hello {{first_name}}"}',
            '{subject: "Hello", colour: red}',
            "x.yaml:17: experiment.variants[1].steps.mail.colour",
            "unknown field",
        ),
        # wrong types
        (
            "    list_id: at-risk\n",
            "    list_id: [a, b]\n",
            "x.yaml:11: steps[1].list_id",
            "expected text",
        ),
        (
            "defaults: {first_name: there}\n",
            "defaults: [first_name]\n",
            "x.yaml:3: defaults",
            "expected a mapping of names to strings",
        ),
        (
            "    - name: A\n",
            "    - name: A\n      weight: lots\n",
            "x.yaml:15: experiment.variants[0].weight",
            "a positive number",
        ),
        (
            "    - name: B\n",
            "    - name: A\n",
            "x.yaml:15: experiment.variants[1].name",
            "'A' is reserved or duplicated",
        ),
        (
            "steps:\n  - id: mail\n",
            "steps:\n  - mail\n  - id: mail\n",
            "x.yaml:5: steps[0]",
            "a step is a mapping with id and channel",
        ),
        # a missing key is reported at the key, on the line of the mapping that lacks it
        ("    channel: crm_list\n", "", "x.yaml:9: steps[1].channel", "required"),
        (
            '"Hi {{first_name}}"',
            '"Hi {{nickname}}"',
            "x.yaml:8: steps[0].subject",
            "nickname may be undefined",
        ),
    ],
)
def test_playbook_errors_name_the_line_and_the_field(
    old: str, new: str, where: str, words: str
) -> None:
    assert old in BOOK
    parse_documents(BOOK, "x.yaml")  # the unchanged book is valid
    with pytest.raises(PlaybookError) as err:
        parse_documents(BOOK.replace(old, new, 1), "x.yaml")
    message = str(err.value)
    assert message.startswith(where + ": "), message
    assert words in message, message


def test_every_problem_of_a_document_is_listed_in_file_order() -> None:
    text = BOOK.replace("template: t-1", "template: t-1\n    after: soon").replace(
        "list_id: at-risk", "list_id: at-risk\n    task_priority: {a: 1}"
    )
    with pytest.raises(PlaybookError) as err:
        parse_documents(text, "x.yaml")
    assert [(p.line, p.path) for p in err.value.problems] == [
        (8, "steps[0].after"),
        (13, "steps[1].task_priority"),
    ]
    assert str(err.value).startswith("x.yaml:8: steps[0].after: 'soon' is not a duration")


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        (
            "policy:\n  caps:\n    fax: [{max: 1, per: 1d}]\n",
            "x.yaml:3: policy.caps.fax",
            "unknown channel",
        ),
        (
            "policy:\n  caps:\n    email: [{max: 1, per: 1d, burst: 2}]\n",
            "x.yaml:3: policy.caps.email[0].burst",
            "unknown field (expected one of max, per)",
        ),
        (
            "policy:\n  caps:\n    email: {max: 1}\n",
            "x.yaml:3: policy.caps.email",
            "a list of {max: N, per: 24h}",
        ),
        (
            "policy:\n  cooldowns: {email: 1d, sms: 1d}\n",
            "x.yaml:2: policy.cooldowns.sms",
            "unknown channel",
        ),
        (
            "policy:\n  quiet_hours: {start: '21:00'}\n",
            "x.yaml:2: policy.quiet_hours.end",
            "a local time HH:MM",
        ),
        (
            "policy:\n  ledger_retention: 30\n",
            "x.yaml:2: policy.ledger_retention",
            "30 is not a duration",
        ),
        (
            "policy:\n  default_timezone: Mars/Base\n",
            "x.yaml:2: policy.default_timezone",
            "unknown time zone",
        ),
        ("policy:\n  caps: {}\nsteps: []\n", "x.yaml:3: steps", "unknown field"),
    ],
)
def test_policy_errors_name_the_line_and_the_field(text: str, where: str, words: str) -> None:
    with pytest.raises(PlaybookError) as err:
        parse_documents(text, "x.yaml")
    assert str(err.value).startswith(where + ": "), str(err.value)
    assert words in str(err.value)


def _touch(path: Path, text: str) -> None:
    """Write ``text`` and move the mtime on, so the reload sees a change at once."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def test_a_bad_playbook_on_reload_is_rejected_and_the_running_book_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    webhook = "playbook: P\nsegment: S\nsteps:\n  - {id: hook, channel: webhook}\n"
    _touch(tmp_path / "p.yaml", webhook)
    dispatcher = Dispatcher(
        Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="playbook-model-test."),
        DispatcherSettings(playbooks=str(tmp_path), clock="event"),
    )
    try:
        running = dispatcher.book
        assert [s.id for s in running.playbooks[0].steps] == ["hook"]
        _touch(tmp_path / "p.yaml", webhook.replace("webhook}", "webhook, retries: 3}"))
        with caplog.at_level(logging.ERROR):
            assert dispatcher.reload_playbooks() is False
        assert dispatcher.book is running
        (rejected,) = [r for r in caplog.records if r.getMessage() == "playbooks rejected"]
        error = rejected.fields["error"]  # type: ignore[attr-defined]
        assert error.startswith(f"{tmp_path / 'p.yaml'}:4: steps[0].retries: unknown field")
        _touch(tmp_path / "p.yaml", webhook.replace("hook, ", "ping, "))
        assert dispatcher.reload_playbooks() is True
        assert [s.id for s in dispatcher.book.playbooks[0].steps] == ["ping"]
    finally:
        dispatcher.close()
