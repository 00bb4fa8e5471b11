"""A running stack for the browser and schemathesis tests, shared by the package: a real
broker, the four services as processes fed simulated customers, the gateway (with the console)
as a supervised process, and Debian's headless Chromium driven by Selenium through Debian's
chromedriver."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from segflow.api import wiring
from segflow.demo import _groups, _service_env, _wait_caught_up
from segflow.receiver import Receiver, SMTPReceiver
from segflow.runtime.broker import free_port
from segflow.runtime.testing import isolated_settings
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.sink import KafkaSink
from segflow.supervisor import SERVICES, Supervisor
from services.dispatcher.playbooks import DEFAULT_DIR as PLAYBOOKS_DIR
from services.segmenter.app import DEFAULT_DEFINITIONS

VIEWER = "console-viewer-token"
EDITOR = "console-editor-token"
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / ".segflow" / "console-screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


#: A segment of the stack's own (added to the default definitions): a support ticket in the
#: last 3 days. The timeline test sends a customer a ticket, a quiet week and another ticket,
#: which gives two stays in it (the console must show both).
STAYS_SEGMENT_NAME = "Console Stays"
STAYS_SEGMENT = """
  # the console tests' segment (tests/console/conftest.py)
  - {name: Console Stays, priority: 0, enter: {feature: tickets_3d, op: ">=", value: 1}}
"""


@dataclass
class ConsoleStack:
    url: str
    segmenter_url: str
    definitions: Path
    env: dict[str, str]
    logs: Path
    playbooks: Path

    def api(self, token: str = VIEWER) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def explain(self, customer_id: str) -> dict[str, Any]:
        """``segflow explain CUSTOMER --url <segmenter> --json``, the CLI a user would run."""
        out = subprocess.run(
            [sys.executable, "-m", "segflow.cli", "explain", customer_id, "--json"]
            + ["--url", self.segmenter_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result


@pytest.fixture(scope="package")
def console_stack(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleStack]:
    tmp = tmp_path_factory.mktemp("console")
    settings = isolated_settings(kafka_bootstrap, "console")
    prefix = settings.topic_prefix
    definitions = tmp / "segments.yaml"  # the editor publishes here; the segmenter reloads it
    definitions.write_text(DEFAULT_DEFINITIONS.read_text() + STAYS_SEGMENT)
    playbooks = tmp / "playbooks"  # the editor publishes here; the dispatcher reloads them
    shutil.copytree(PLAYBOOKS_DIR, playbooks, ignore=shutil.ignore_patterns("salesforce"))
    receiver, smtp = Receiver().start(), SMTPReceiver().start()
    env = _service_env(settings, prefix, receiver, smtp)
    env["SEGFLOW_SEGMENTER_DEFINITIONS"] = str(definitions)
    env["SEGFLOW_SEGMENTER_RELOAD_INTERVAL"] = "0.5"
    env["SEGFLOW_DISPATCHER_PLAYBOOKS"] = str(playbooks)
    env["SEGFLOW_DISPATCHER_PLAYBOOK_RELOAD_INTERVAL"] = "0.5"
    # one customer scored after the simulated weeks, the other partitions quiet: its day's
    # model version waits for them up to this long (services/scorer/README.md, idle partition)
    env["SEGFLOW_SCORER_SHARED_MODEL_IDLE_SECONDS"] = "2"
    sup = Supervisor(tmp / "logs", env=env)
    ports = {name: free_port() for name in SERVICES}
    for name in SERVICES:
        sup.add_service(name, env=wiring.service_env(name, ports[name]))
    url = wiring.add_gateway(
        sup,
        ports,
        free_port(),
        VIEWER,
        extra={
            "SEGFLOW_API_EDITOR_TOKEN": EDITOR,
            "SEGFLOW_API_DEFINITIONS": str(definitions),
            "SEGFLOW_API_PLAYBOOKS": str(playbooks),
            "SEGFLOW_API_CONSOLE_SAMPLE_INTERVAL": "1",
        },
    )
    sup.start_all()
    try:
        sim = Simulation(SimConfig(customers=30, days=35, seed=5))
        sink = KafkaSink.from_settings(settings)
        while not sim.finished:
            sink.write(sim.step(7))
        sink.close()
        assert wiring.wait_ready(url, timeout=90), sorted((tmp / "logs").iterdir())
        _wait_caught_up(settings, _groups(settings, list(SERVICES)), sup, timeout=90)
        yield ConsoleStack(
            url,
            f"http://127.0.0.1:{ports['segmenter']}",
            definitions,
            {**env, "SEGFLOW_TOPIC_PREFIX": prefix},
            tmp / "logs",
            playbooks,
        )
    finally:
        sup.stop()
        receiver.stop()
        smtp.stop()


class Browser:
    """A headless Chromium session with its console log and a screenshot helper."""

    def __init__(self, base: str, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--window-size=1440,1000",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.base = base
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_page_load_timeout(30)

    def go(self, path: str) -> None:
        self.driver.get(self.base + path)

    def wait(self, predicate: Any, timeout: float = 20, what: str = "", explain: Any = None) -> Any:
        """Until ``predicate(driver)`` is truthy; on timeout, fail saying ``what`` and, when
        given, what ``explain()`` reads off the page then."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
                lambda d: predicate(d), message=what
            )
        except TimeoutException:
            seen = f"; the page shows: {explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s: {what}{seen}") from None

    def wait_loaded(self, hash_: str, timeout: float = 20) -> None:
        """Until the page for ``hash_`` has rendered its data once."""
        self.wait(
            lambda d: d.execute_script("return document.body.dataset.loaded") == hash_,
            timeout,
            f"page {hash_} never finished loading",
        )

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def screenshot(self, name: str) -> Path:
        """The whole page (beyond the viewport) as a PNG in .segflow/console-screenshots/."""
        import base64

        SHOTS.mkdir(parents=True, exist_ok=True)
        width, height = self.driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
        )
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 4000), "scale": 1},
            },
        )
        path = SHOTS / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def sign_out(self) -> None:
        """A fresh session: leave the console first (its page polls the API every few
        seconds; a poll after the cookies went would log a 401 into the next test), then
        drop the cookies and what the browser logged so far."""
        self.driver.get("about:blank")
        # WebDriver's delete_all_cookies only deletes the current page's; about:blank has none
        self.driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
        self.driver.get_log("browser")

    def login(self, token: str) -> None:
        from selenium.webdriver.common.by import By

        self.go("/console/login")
        field = self.driver.find_element(By.ID, "token")
        field.send_keys(token)
        field.submit()
        self.wait(
            lambda d: d.current_url.endswith("/console/"), what="login did not land on /console/"
        )

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def browser(
    console_stack: ConsoleStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Browser]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    assert not missing, (
        f"the browser tests need Debian's chromium and chromium-driver ({', '.join(missing)}"
        " not found): `./run test` installs them as root, or apt-get install -y chromium"
        " chromium-driver"
    )
    b = Browser(console_stack.url, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield b
    finally:
        b.close()


def wait_until(check: Any, timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
