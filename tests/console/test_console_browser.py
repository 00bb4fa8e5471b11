"""The console in a real headless Chromium against a running stack with simulated customers.

Checked against what a user can see by other means: the gateway's JSON API (bearer token),
``segflow explain`` (the CLI, asking the segmenter directly) and the definitions file."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import pytest

from console.conftest import (
    EDITOR,
    SHOTS,
    STAYS_SEGMENT_NAME,
    VIEWER,
    Browser,
    ConsoleStack,
    wait_until,
)

pytestmark = pytest.mark.broker


def _by_css(b: Browser, css: str) -> list:
    from selenium.webdriver.common.by import By

    return b.driver.find_elements(By.CSS_SELECTOR, css)


def _read(b: Browser, css: str, *attrs: str) -> list[dict[str, str]]:
    """Attributes (and ``text``) of every element matching ``css``, read in one go (the page
    re-renders every few seconds, so elements found earlier may be gone)."""
    return b.driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => Object.fromEntries("
        "arguments[1].map(a => [a, a === 'text' ? e.textContent : e.getAttribute(a)])))",
        css,
        list(attrs),
    )


def _member_with_history(stack: ConsoleStack) -> tuple[str, str]:
    """The largest segment and its member with the highest churn score."""
    with stack.api() as api:
        sizes = {s["name"]: s["size"] for s in api.get("/v1/segments").json()["segments"]}
        biggest = max(sizes, key=lambda n: sizes[n])
        assert sizes[biggest] > 0, sizes
        page = api.get(f"/v1/console/segments/{quote(biggest, safe='')}/members").json()
        return biggest, page["members"][0]["customer_id"]


def test_unauthenticated_browser_is_refused(console_stack: ConsoleStack, browser: Browser) -> None:
    from selenium.webdriver.common.by import By

    browser.sign_out()
    browser.go("/console/")
    browser.wait(lambda d: d.current_url.endswith("/console/login"), what="no redirect to login")
    # the data routes refuse a browser without a session (no token, no cookie)
    status = browser.driver.execute_async_script(
        "const done = arguments[0];"
        "fetch('/v1/console/segments', {credentials: 'same-origin'}).then(r => done(r.status));"
    )
    assert status == 401
    # a wrong token is refused with a message, and no session cookie is set
    field = browser.driver.find_element(By.ID, "token")
    field.send_keys("not-the-token")
    field.submit()
    browser.wait(lambda d: d.find_elements(By.CSS_SELECTOR, ".error"), what="no error shown")
    assert "not valid" in browser.driver.find_element(By.CSS_SELECTOR, ".error").text
    assert browser.driver.get_cookie("segflow_session") is None
    browser.screenshot("login-refused")
    browser.driver.get_log("browser")  # the refusals above log 401s on purpose


def test_every_page_loads_without_console_errors(
    console_stack: ConsoleStack, browser: Browser
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.sign_out()
    browser.login(VIEWER)
    cookie = browser.driver.get_cookie("segflow_session")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    biggest, cid = _member_with_history(console_stack)
    with console_stack.api() as api:
        listed = api.get("/v1/segments").json()
        kpis = api.get("/v1/campaigns/kpis").json()["kpis"]
    sizes = {s["name"]: s["size"] for s in listed["segments"]}

    # Segments: one row per segment, sizes as the API says, playbooks listed
    browser.go("/console/#/segments")
    browser.wait_loaded("#/segments")
    names = [r["data-segment"] for r in _read(browser, "tr[data-segment]", "data-segment")]
    shown = dict(
        zip(
            names,
            [r["text"] for r in _read(browser, "tr[data-segment] td.size", "text")],
            strict=True,
        )
    )
    assert shown == {n: f"{s:,}" for n, s in sizes.items()}
    assert listed["definition_version"] in browser.driver.find_element(By.TAG_NAME, "h1").text
    assert _by_css(browser, "tr[data-segment] svg path")  # size-over-time sparklines drawn
    browser.screenshot("segments")

    # A segment: YAML, members sorted by churn, KPIs of its playbooks
    browser.go(f"/console/#/segment/{quote(biggest, safe='')}")
    browser.wait_loaded(f"#/segment/{quote(biggest, safe='')}")
    yaml_text = _read(browser, "pre.yaml", "text")[0]["text"]
    assert biggest in yaml_text and "enter" in yaml_text
    browser.wait(lambda d: _read(browser, "#members tbody td a", "text"), what="no members")
    first = _read(browser, "#members tbody td a", "text")[0]["text"]
    assert first == cid  # highest churn first, as the API orders it
    box = browser.driver.find_element(By.ID, "member-filter")
    box.send_keys(cid[-6:])
    browser.wait(
        lambda d: [a["text"] for a in _read(browser, "#members tbody td a", "text")] == [cid],
        what="the filter did not narrow the members to the one customer",
    )
    browser.screenshot("segment")

    # A customer: identifiers hashed, feature bars, timeline
    browser.go(f"/console/#/customer/{quote(cid, safe='')}")
    browser.wait_loaded(f"#/customer/{quote(cid, safe='')}")
    assert _by_css(browser, "svg.features rect")
    assert _by_css(browser, "#timeline li[data-kind=entered]")
    # recent events by type: the 28-day counts the profile API's features give
    with console_stack.api() as api:
        features = api.get(f"/v1/customers/{quote(cid, safe='')}").json()["features"]
    rows = browser.driver.execute_script(
        "return [...document.querySelectorAll('tr[data-event]')].map(r =>"
        " [r.dataset.event, r.cells[3].textContent])"
    )
    assert rows and all(
        f"{features[f'{kind}_28d']:g}" == shown.replace(",", "") for kind, shown in rows
    )
    browser.screenshot("customer")

    # Campaigns: one row per KPI row and an interval per variant with an uplift
    browser.go("/console/#/campaigns")
    browser.wait_loaded("#/campaigns")
    assert len(_by_css(browser, "tr[data-kpi]")) == len(kpis) > 0
    with_ci = [k for k in kpis if k["uplift"] is not None and k["uplift_ci"]]
    assert len(_by_css(browser, "svg.intervals circle")) == len(with_ci)
    browser.screenshot("campaigns")

    # What-if: the running definitions in the editor; publishing is off for a viewer
    browser.go("/console/#/whatif")
    browser.wait_loaded("#/whatif")
    text = browser.driver.execute_script("return document.getElementById('defs').value")
    assert text == console_stack.definitions.read_text()
    assert browser.driver.find_element(By.ID, "publish").get_attribute("disabled") is not None
    browser.screenshot("whatif")

    # keyboard: "/" focuses the customer search; Enter opens the customer
    browser.go("/console/#/segments")
    browser.wait_loaded("#/segments")
    body = browser.driver.find_element(By.TAG_NAME, "body")
    body.send_keys("/")
    active = browser.driver.switch_to.active_element
    assert active.get_attribute("id") == "find-id"
    active.send_keys(cid, Keys.ENTER)
    browser.wait_loaded(f"#/customer/{quote(cid, safe='')}")

    # polling ran meanwhile (live); nothing logged an error on any page
    errors = browser.console_errors()
    assert errors == [], errors
    assert len(list(SHOTS.glob("*.png"))) >= 5


def test_customer_timeline_shows_the_entries_explain_shows(
    console_stack: ConsoleStack, browser: Browser
) -> None:
    if browser.driver.get_cookie("segflow_session") is None:
        browser.login(VIEWER)
    with console_stack.api() as api:
        segs = api.get("/v1/segments").json()["segments"]
        # every customer who is a member somewhere, up to a few
        members: list[str] = []
        for s in segs:
            if s["size"]:
                members += api.get(f"/v1/segments/{quote(s['name'], safe='')}/members").json()[
                    "members"
                ][:2]
    assert members
    for cid in sorted(set(members))[:4]:
        explained = console_stack.explain(cid)
        expected = {
            (s["segment"], str(s["entered_at"])) for s in explained["segments"] if s["member"]
        }
        assert expected
        browser.go(f"/console/#/customer/{quote(cid, safe='')}")
        browser.wait_loaded(f"#/customer/{quote(cid, safe='')}")
        entries = browser.driver.execute_script(
            "return [...document.querySelectorAll('#timeline li[data-kind=entered]"
            "[data-active=true]')].map(li => [li.dataset.segment, li.dataset.at,"
            " [...li.querySelectorAll('table.conds td.pass, table.conds td.fail')]"
            ".map(td => td.textContent)])"
        )
        assert {(seg, at) for seg, at, _ in entries} == expected, cid
        # and each shows the conditions explain lists, with their verdict
        for seg_name, _, verdicts in entries:
            seg = next(s for s in explained["segments"] if s["segment"] == seg_name)
            assert verdicts == ["pass" if c["passed"] else "fail" for c in seg["conditions"]]
    assert browser.console_errors() == []


def _lowered(text: str) -> str:
    """Support Escalation's thresholds relaxed: 0 escalations in 7 days instead of 3 and any
    sentiment below 1 instead of -0.2 (enter), so that leaving never holds (exit): every
    scored customer qualifies, whatever the simulated week brought."""
    swaps = [
        (
            '{feature: escalations_7d, op: ">=", value: 3}',
            '{feature: escalations_7d, op: ">=", value: 0}',
        ),
        (
            '{feature: sentiment_mean_7d, op: "<", value: -0.2}',
            '{feature: sentiment_mean_7d, op: "<", value: 1}',
        ),
        (
            '{feature: escalations_7d, op: "<", value: 3}',
            '{feature: escalations_7d, op: "<", value: 0}',
        ),
        (
            '{feature: sentiment_mean_7d, op: ">=", value: 0}',
            '{feature: sentiment_mean_7d, op: ">=", value: 1}',
        ),
    ]
    for old, new in swaps:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def test_viewer_cannot_publish(console_stack: ConsoleStack, browser: Browser) -> None:
    browser.sign_out()
    browser.login(VIEWER)
    before = console_stack.definitions.read_text()
    browser.go("/console/#/whatif")
    browser.wait_loaded("#/whatif")
    assert browser.driver.find_element("id", "publish").get_attribute("disabled") is not None
    # even when the page is bypassed, the gateway refuses the viewer's session
    status = browser.driver.execute_async_script(
        "const done = arguments[1];"
        "fetch('/v1/console/definitions', {method: 'PUT', credentials: 'same-origin',"
        " headers: {'Content-Type': 'application/json', 'X-Segflow-Console': '1'},"
        " body: JSON.stringify({yaml: arguments[0]})}).then(r => done(r.status));",
        _lowered(before),
    )
    assert status == 403
    with console_stack.api(VIEWER) as api:
        assert (
            api.put("/v1/console/definitions", json={"yaml": _lowered(before)}).status_code == 403
        )
    assert console_stack.definitions.read_text() == before
    browser.driver.get_log("browser")  # the 403s above are expected


def test_whatif_of_a_lowered_threshold_shows_more_entries_and_an_editor_publishes(
    console_stack: ConsoleStack, browser: Browser
) -> None:
    from selenium.webdriver.common.by import By

    browser.sign_out()
    browser.login(EDITOR)
    browser.go("/console/#/whatif")
    browser.wait_loaded("#/whatif")
    original = console_stack.definitions.read_text()
    browser.driver.execute_script(
        "document.getElementById('defs').value = arguments[0];", _lowered(original)
    )
    browser.driver.find_element(By.ID, "check").click()
    browser.wait(
        lambda d: "valid: version" in _read(browser, "#whatif-result", "text")[0]["text"],
        what="the check did not say the definitions are valid",
    )
    browser.driver.find_element(By.ID, "replay").click()
    row = browser.wait(
        lambda d: _read(
            browser,
            "tr[data-diff-segment='Support Escalation']",
            "data-entries-old",
            "data-entries-new",
        ),
        timeout=180,
        what="the what-if never showed Support Escalation",
        explain=lambda: _read(browser, "#whatif-result", "text")[0]["text"][:3000],
    )[0]
    old, new = int(row["data-entries-old"]), int(row["data-entries-new"])
    assert new > old, (old, new)
    browser.screenshot("whatif-diff")

    # publish: the file changes and the running segmenter reloads it (version changes)
    with console_stack.api() as api:
        version = api.get("/v1/segments").json()["definition_version"]
    browser.driver.find_element(By.ID, "publish").click()
    browser.wait(lambda d: d.find_elements(By.ID, "published"), what="publish not confirmed")
    assert console_stack.definitions.read_text() == _lowered(original)
    with console_stack.api() as api:
        wait_until(
            lambda: api.get("/v1/segments").json()["definition_version"] != version,
            what="the segmenter to reload the published definitions",
        )
    # an invalid publish is refused with line and field, and the running version stays
    browser.driver.execute_script(
        "document.getElementById('defs').value = arguments[0];",
        _lowered(original).replace("priority: 100", "priority: high", 1),
    )
    browser.driver.find_element(By.ID, "publish").click()
    problems = browser.wait(lambda d: d.find_elements(By.CSS_SELECTOR, ".problems li"))
    assert "line " in problems[0].text and "priority" in problems[0].text
    assert console_stack.definitions.read_text() == _lowered(original)
    assert browser.console_errors() == []  # an invalid publish is an answer, not an error

    # live: the Segments page shows a change within seconds, without reloading or navigating
    browser.go("/console/#/segments")
    browser.wait_loaded("#/segments")
    h1 = "return document.querySelector('#segments-page h1').textContent"
    lowered_version = browser.driver.execute_script(h1)
    assert version not in lowered_version
    browser.driver.execute_script("window.__sameDocument = true")
    with console_stack.api(EDITOR) as api:  # the editor token as a bearer token
        restored = api.put("/v1/console/definitions", json={"yaml": original}).json()
    assert restored["published"] is True
    browser.wait(
        lambda d: version in d.execute_script(h1),
        timeout=20,
        what="the Segments page to show the restored version by itself",
    )
    assert browser.driver.execute_script("return window.__sameDocument") is True
    assert browser.console_errors() == []


def test_whatif_of_a_playbook_shows_the_actions_it_would_add(
    console_stack: ConsoleStack, browser: Browser
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.sign_out()
    browser.login(VIEWER)  # a what-if changes nothing: a viewer may run one
    browser.go("/console/#/whatif")
    browser.wait_loaded("#/whatif")
    Select(browser.driver.find_element(By.ID, "whatif-kind")).select_by_value("pb:lifecycle.yaml")
    text = browser.driver.execute_script("return document.getElementById('defs').value")
    step = "  - {id: sync_stage, channel: crm_property, properties: {segflow_lifecycle: prospect}}"
    assert text.count(step) == 1
    welcome = '  - {id: welcome, channel: email, template: d-welcome, subject: "Welcome"}'
    set_text = "document.getElementById('defs').value = arguments[0];"
    # a broken playbook: the dispatcher's loader names the line and field
    browser.driver.execute_script(set_text, text.replace(step, step.replace("crm_property", "fax")))
    browser.driver.find_element(By.ID, "check").click()
    problems = browser.wait(lambda d: _read(browser, ".problems li", "text"), what="no problems")
    assert "line " in problems[0]["text"] and "channel" in problems[0]["text"], problems
    # an added e-mail step: the replay shows e-mails the current playbook never sends
    browser.driver.execute_script(set_text, text.replace(step, step + "\n" + welcome))
    browser.driver.find_element(By.ID, "replay").click()
    rows = browser.wait(
        lambda d: _read(
            browser,
            "tr[data-playbook='Lifecycle prospect'][data-channel=email]",
            "data-outcome",
            "data-old",
            "data-new",
        ),
        timeout=180,
        what="the what-if never showed Lifecycle prospect e-mails",
        explain=lambda: _read(browser, "#whatif-result", "text")[0]["text"][:2000],
    )
    assert all(r["data-old"] == "0" for r in rows)
    assert sum(int(r["data-new"]) for r in rows) > 0
    assert browser.driver.find_element(By.ID, "publish").get_attribute("disabled") is not None
    browser.screenshot("whatif-playbook")
    assert browser.console_errors() == []


def _settings(stack: ConsoleStack) -> Any:
    from segflow.runtime.settings import Settings

    return Settings(
        bootstrap_servers=stack.env["SEGFLOW_BOOTSTRAP_SERVERS"],
        topic_prefix=stack.env["SEGFLOW_TOPIC_PREFIX"],
    )


def _published(stack: ConsoleStack, topic: Any) -> list[dict[str, Any]]:
    """Every committed record of ``topic`` as its consumer would read it (a plain consumer of
    the test's own, not the gateway's), with its key as ``_key``."""
    from confluent_kafka import Consumer, TopicPartition

    from segflow.runtime.serde import Serde

    settings = _settings(stack)
    serde = Serde.from_settings(settings)
    name = topic.name_with(settings.topic_prefix)
    consumer = Consumer(
        {
            **settings.kafka_config(),
            "group.id": "console-test-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        parts = consumer.list_topics(name, timeout=10).topics[name].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in parts
        }
        consumer.assign([TopicPartition(name, p, 0) for p in parts])
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # to the end of every partition as of the start
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None and msg.value() is not None:
                    out.append({**serde.decode(topic, msg.value()), "_key": msg.key().decode()})
            at = consumer.position([TopicPartition(name, p) for p in parts])
            if all(tp.offset >= ends[tp.partition] for tp in at if ends[tp.partition] > 0):
                break
        else:
            raise AssertionError(f"could not read {name} to its end in 60 s")
        return out
    finally:
        consumer.close()


def test_customer_timeline_shows_every_stay_and_merges(
    console_stack: ConsoleStack, browser: Browser
) -> None:
    from segflow.runtime.topics import TOPICS
    from segflow.sim.generator import DEFAULT_START_MS
    from segflow.sim.noise import Delivery
    from segflow.sim.sink import KafkaSink

    seg = STAYS_SEGMENT_NAME
    # a new customer, after the simulated weeks: a ticket (enters), 4 days later a session
    # (no ticket in 3 days: leaves), a day later another ticket (enters again)
    day = 86_400_000
    t0 = DEFAULT_START_MS + 40 * day
    events = [
        ("support_ticket", t0),
        ("session_start", t0 + 4 * day),
        ("support_ticket", t0 + 5 * day),
        ("session_start", t0 + 6 * day),
    ]
    sink = KafkaSink.from_settings(_settings(console_stack), create=False)
    user = "console-stays-user"
    cid = ""
    with console_stack.api() as api:

        def resolved() -> str | None:
            got = api.get("/v1/identities/resolve", params={"type": "user_id", "value": user})
            return got.json()["customer_id"] if got.status_code == 200 else None

        def scored_at(at: int) -> bool:
            got = api.get(f"/v1/customers/{quote(cid, safe='')}")
            scores = got.json().get("scores") if got.status_code == 200 else None
            return bool(scores and (scores.get("last_emitted") or {}).get("as_of", 0) >= at)

        # One at a time: a score for each. The scorer scores a customer once its burst has
        # paused (5 min of event time after its latest event), when the next event moves its
        # clock on: event i's score is awaited after event i + 1 is written (the last one,
        # a session, needs none).
        for i, (kind, at) in enumerate(events):
            event = {
                "event_id": f"console-stays-{i}",
                "event_type": kind,
                "occurred_at": at,
                "user_id": user,
                **({"sentiment": 0.0, "escalated": False} if kind == "support_ticket" else {}),
            }
            sink.write([Delivery(at, user, event, user, None)])
            sink.producer.flush(10)
            cid = cid or wait_until(resolved, what="the new customer to be identified")
            if i:
                before_kind, before_at = events[i - 1]
                wait_until(
                    lambda at=before_at: scored_at(at),
                    what=f"a score of the {before_kind} at {before_at}",
                )
    sink.close()

    def published() -> list[dict[str, Any]] | None:
        """The customer's changes in the segment, once both entries are there."""
        every = _published(console_stack, TOPICS.segment_changes)
        mine = [
            c
            for c in {c["change_id"]: c for c in every}.values()
            if c["customer_id"] == cid and c["segment"] == seg
        ]
        return mine if sum(c["transition"] == "entered" for c in mine) >= 2 else None

    # what the segmenter published, read from the topic by a consumer of the test's own
    changes = wait_until(published, timeout=60, what=f"two entries of the customer into {seg}")
    entries = sorted(c["occurred_at"] for c in changes if c["transition"] == "entered")
    exits = sorted(c["occurred_at"] for c in changes if c["transition"] != "entered")
    assert len(entries) == 2 and len(exits) == 1, changes
    if browser.driver.get_cookie("segflow_session") is None:
        browser.login(VIEWER)
    browser.go(f"/console/#/customer/{quote(cid, safe='')}")
    browser.wait_loaded(f"#/customer/{quote(cid, safe='')}")

    def shown(_d: Any) -> Any:
        rows = browser.driver.execute_script(
            "return [...document.querySelectorAll('#timeline li[data-segment]')]"
            ".filter(li => li.dataset.segment === arguments[0])"
            ".map(li => [li.dataset.kind, Number(li.dataset.at), li.dataset.stay || null,"
            " li.dataset.active || null])",
            seg,
        )
        return rows if sorted(at for k, at, _, _ in rows if k == "entered") == entries else None

    # both stays the segmenter published, each entry and the exit, with stay numbers; the
    # page polls, so it shows them once the gateway has read them
    rows = browser.wait(shown, what=f"the timeline to show both entries into {seg}: {entries}")
    assert sorted(at for k, at, _, _ in rows if k == "exited") == exits
    ordered = sorted((r for r in rows if r[0] == "entered"), key=lambda r: r[1])
    assert [int(r[2]) for r in ordered] == [1, 2], ordered
    assert [r[3] for r in ordered] == ["false", "true"]  # the second stay is the current one
    browser.screenshot("customer-two-stays")

    merges = _published(console_stack, TOPICS.merges)
    assert merges, "the simulation produced no merge"
    merge = sorted(merges, key=lambda m: m["survivor_id"])[0]
    survivor = merge["survivor_id"]
    browser.go(f"/console/#/customer/{quote(survivor, safe='')}")
    browser.wait_loaded(f"#/customer/{quote(survivor, safe='')}")
    shown_merges = browser.driver.execute_script(
        "return [...document.querySelectorAll('#timeline li[data-kind=merged]')]"
        ".map(li => [Number(li.dataset.at), li.dataset.absorbed])"
    )
    expected = {
        (m["occurred_at"], " ".join(m["absorbed_ids"]))
        for m in merges
        if m["survivor_id"] == survivor
    }
    assert set(map(tuple, shown_merges)) == expected
    browser.screenshot("customer-merges")
    # the absorbed profile's page says where it went
    absorbed = merge["absorbed_ids"][0]
    browser.go(f"/console/#/customer/{quote(absorbed, safe='')}")
    browser.wait_loaded(f"#/customer/{quote(absorbed, safe='')}")
    link = _read(browser, "#merged-into a", "text")
    assert [x["text"] for x in link] == [survivor]
    browser.screenshot("customer-merged")
    assert browser.console_errors() == []


def _running_playbooks(stack: ConsoleStack) -> dict[str, str]:
    """The dispatcher's running playbooks and versions, as its health reports them."""
    with stack.api() as api:
        health = api.get("/v1/health").json()
    return dict(health["services"]["dispatcher"]["details"]["playbooks"])


def test_an_editor_publishes_a_playbook_and_the_dispatcher_runs_it(
    console_stack: ConsoleStack, browser: Browser
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    path = console_stack.playbooks / "lifecycle.yaml"
    original = path.read_text()
    assert _running_playbooks(console_stack)["Lifecycle prospect"] == "1"
    browser.sign_out()
    browser.login(EDITOR)
    browser.go("/console/#/whatif")
    browser.wait_loaded("#/whatif")
    Select(browser.driver.find_element(By.ID, "whatif-kind")).select_by_value("pb:lifecycle.yaml")
    assert browser.driver.execute_script("return document.getElementById('defs').value") == original
    assert browser.driver.find_element(By.ID, "publish").get_attribute("disabled") is None
    set_text = "document.getElementById('defs').value = arguments[0];"

    # a valid change: written, and the running dispatcher reloads it (version 2)
    v2 = original.replace(
        "playbook: Lifecycle prospect\n", "playbook: Lifecycle prospect\nversion: 2\n"
    )
    assert v2 != original
    browser.driver.execute_script(set_text, v2)
    browser.driver.find_element(By.ID, "publish").click()
    browser.wait(lambda d: d.find_elements(By.ID, "published"), what="publish not confirmed")
    assert path.read_text() == v2
    wait_until(
        lambda: _running_playbooks(console_stack)["Lifecycle prospect"] == "2",
        what="the dispatcher to run the published playbook",
    )

    # an invalid one: refused with its line and field; nothing written; version 2 runs on
    step = "  - {id: sync_stage, channel: crm_property, properties: {segflow_lifecycle: prospect}}"
    bad = v2.replace(step, step.replace("crm_property", "fax"))
    line = bad.splitlines().index(step.replace("crm_property", "fax")) + 1
    browser.driver.execute_script(set_text, bad)
    browser.driver.find_element(By.ID, "publish").click()
    problems = browser.wait(lambda d: _read(browser, ".problems li", "text"), what="no problems")
    assert problems[0]["text"].startswith(f"line {line}: ") and "channel" in problems[0]["text"]
    assert path.read_text() == v2
    browser.screenshot("whatif-playbook-rejected")

    # the same file written behind the console's back: the dispatcher says so in its log and
    # keeps running version 2
    log = console_stack.logs / "dispatcher.log"
    path.write_text(bad)
    wait_until(lambda: "playbooks rejected" in log.read_text(), what="the dispatcher to reject it")
    assert _running_playbooks(console_stack)["Lifecycle prospect"] == "2"

    # a viewer cannot publish a playbook, by the API either
    with console_stack.api(VIEWER) as api:
        refused = api.put("/v1/console/playbooks/lifecycle.yaml", json={"yaml": original})
    assert refused.status_code == 403
    assert path.read_text() == bad

    # back to the original, through the API with the editor token
    with console_stack.api(EDITOR) as api:
        assert api.put("/v1/console/playbooks/lifecycle.yaml", json={"yaml": original}).json()[
            "published"
        ]
    wait_until(
        lambda: _running_playbooks(console_stack)["Lifecycle prospect"] == "1",
        what="the dispatcher to run the restored playbook",
    )
    assert browser.console_errors() == []
