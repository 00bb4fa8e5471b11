"""Time every console page in a real headless Chromium with 100,000 customers in the state.

    .venv/bin/python bench/bench_console_browser.py [--customers 100000] [--runs 5]

What is real: the gateway with the console (in this process), the segmenter's query endpoint
(in a child process: its real routes over 100,000 ``CustomerState`` records with 3
memberships each, built as ``bench_console.py`` builds them), the console's audit index
holding ~4 Avro-encoded segment changes per customer (what the gateway keeps when it reads
segment.changes), Debian's Chromium through chromedriver. Stand-ins (in the child too):
identity, scorer and dispatcher answer their per-customer lookups from dicts (what their real
endpoints do: a dict lookup in the service's state) and the KPIs from 40 rows; their cost
does not grow with customers.

For each page: the first load (``driver.get`` of the page until it has rendered its data,
static assets and the session included) and the median and max of ``--runs`` in-app
navigations (hash change until rendered, timed in the page). The machine is shared: numbers
are under load; the load average is printed next to each."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from typing import Any
from urllib.parse import quote

from bench_console import HOUR, Fake

from segflow.api.app import _serve, create_app
from segflow.api.console.audit import AuditIndex
from segflow.api.console.handlers import AUDIT
from segflow.api.gateway import GatewaySettings
from segflow.runtime.internal_api import NotFound, Params, Query, Routes
from segflow.runtime.internal_api import serve as serve_routes
from segflow.runtime.serde import SchemaStore, Serde
from segflow.runtime.topics import TOPICS
from services.segmenter import api as segmenter_api
from services.segmenter import core

TOKEN = "bench-console-token"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


class Segmenter(Fake):
    """bench_console's 100,000 customers, with ``explain`` as the segmenter answers it."""

    def explain(self, customer_id: str) -> dict[str, Any] | None:  # type: ignore[override]
        st = self.states.get(customer_id)
        if st is None:
            return None
        return {
            "customer_id": customer_id,
            "definition_version": self.defs.version,
            "as_of": st.as_of,
            "primary_segment": st.primary,
            "segments": core.explain_customer(st, self.watermark, self.defs),
        }


def stand_ins(seg: Segmenter) -> dict[str, Routes]:
    rnd = random.Random(3)
    names = [s.name for s in seg.defs.segments]
    kpis = []
    for name in names[:10]:
        for variant in ("control", "variant_b", "holdout", "treatment"):
            assigned = rnd.randrange(500, 5000)
            kpis.append(
                {
                    "segment": name,
                    "playbook": f"{name} playbook",
                    "variant": variant,
                    "assigned": assigned,
                    "sent": assigned,
                    "opened": assigned // 3,
                    "clicked": assigned // 9,
                    "converted": assigned // 20,
                    "churned": assigned // 30,
                    "unsubscribed": 3,
                    "conversion_rate": 0.05,
                    "open_rate": 0.33,
                    "click_rate": 0.11,
                    "unsubscribe_rate": 0.001,
                    "churn_rate": 0.03,
                    "uplift": None if variant == "holdout" else 0.01,
                    "uplift_ci": None if variant == "holdout" else [-0.004, 0.024],
                }
            )
    identity, scorer, dispatcher = Routes("identity"), Routes("scorer"), Routes("dispatcher")
    for r in (identity, scorer, dispatcher):
        r.get("/health")(lambda _p, _q, name=r: {"service": "x", "status": "ok"})

    def known(cid: str) -> Any:
        st = seg.states.get(cid)
        if st is None:
            raise NotFound("no such customer")
        return st

    @identity.get("/customers/{customer_id}")
    def ident(p: Params, _q: Query) -> dict[str, Any]:
        st = known(p["customer_id"])
        return {
            "customer_id": st.customer_id,
            "first_seen_at": st.as_of - 40 * 24 * HOUR,
            "identifiers": [{"type": "user_id", "hash": "ab" * 32}],
        }

    @scorer.get("/customers/{customer_id}")
    def score(p: Params, _q: Query) -> dict[str, Any]:
        st = known(p["customer_id"])
        churn = st.values["churn_probability"]
        feats = {
            f"{s}_{w}d": float(rnd.randrange(0, 9))
            for s in ("sessions", "logins", "purchases", "opens", "tickets")
            for w in (3, 7, 28)
        }
        return {
            "customer_id": st.customer_id,
            "as_of": st.as_of,
            "churn_probability": churn,
            "engagement_score": 4.2,
            "clv": 310.0,
            "cluster": 1,
            "lifecycle_stage": "adopting",
            "model_version": "bench",
            "top_features": [
                {"name": f"f{i}", "value": 1.0, "contribution": 0.3 - 0.1 * i} for i in range(5)
            ],
            "features": feats,
        }

    @dispatcher.get("/customers/{customer_id}")
    def acts(p: Params, _q: Query) -> dict[str, Any]:
        st = known(p["customer_id"])
        return {
            "customer_id": st.customer_id,
            "suppressions": [],
            "assignments": [],
            "pending": [],
            "settled": [],
        }

    dispatcher.get("/kpis")(lambda _p, _q: kpis)
    return {"identity": identity, "scorer": scorer, "dispatcher": dispatcher}


def audit_index(seg: Segmenter) -> AuditIndex:
    """3 segment changes per customer, Avro-encoded as the segmenter publishes them."""
    serde = Serde(SchemaStore.from_dir())
    index = AuditIndex(serde)
    for cid, st in seg.states.items():
        for m in st.memberships.values():
            for transition, at in (("entered", m.entered_at), ("exited", m.exited_at)):
                if at is None:
                    continue
                record = {
                    "change_id": f"{cid}|{m.segment}|{m.seq}|{transition}",
                    "customer_id": cid,
                    "segment": m.segment,
                    "transition": transition,
                    "reason": "condition" if transition == "exited" else None,
                    "entry_id": f"{cid}|{m.segment}|{m.seq}",
                    "definition_version": seg.defs.version,
                    "occurred_at": at,
                    "emitted_at": at,
                    "explanation": [
                        {
                            "path": "enter.all[0]",
                            "feature": "churn_probability",
                            "operator": ">=",
                            "observed": 0.7,
                            "threshold": 0.5,
                            "margin": 0.2,
                            "passed": True,
                        }
                    ],
                }
                index.add_change(cid, serde.encode(TOPICS.segment_changes, record))
    return index


def start_gateway(urls: dict[str, str], index: AuditIndex) -> tuple[str, Any]:
    env = {f"SEGFLOW_API_{k.upper()}_URL": v for k, v in urls.items()}
    os.environ.update(env)
    settings = GatewaySettings(token=TOKEN, port=0, timeout=30)  # type: ignore[arg-type]
    app = create_app(settings)
    app[AUDIT] = index
    box: dict[str, Any] = {}
    ready = threading.Event()

    def announce(port: int, stop: asyncio.Event) -> None:
        box.update(port=port, stop=stop, loop=asyncio.get_running_loop())
        ready.set()

    thread = threading.Thread(
        target=lambda: asyncio.run(_serve(app, "127.0.0.1", 0, announce, signals=False)),
        daemon=True,
    )
    thread.start()
    assert ready.wait(30), "the gateway did not start"

    def stop() -> None:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)

    return f"http://127.0.0.1:{box['port']}", stop


def serve_services(seg: Segmenter, ports: Any) -> None:
    """The child: the segmenter's real routes and the stand-ins, until terminated (it also
    ends when the parent does: it is a daemon process)."""
    servers = {"segmenter": segmenter_api.serve(seg, 0)}  # type: ignore[arg-type]
    for name, routes in stand_ins(seg).items():
        servers[name] = serve_routes(routes, 0)
    ports.put({n: s.port for n, s in servers.items()})
    threading.Event().wait()


WAIT_LOADED = """
const [hash, done] = arguments;
const t0 = performance.now();
location.hash = hash;
(function poll() {
  if (document.body.dataset.loaded === hash) done(performance.now() - t0);
  else setTimeout(poll, 2);
})();
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.perf_counter()
    seg = Segmenter(args.customers)
    index = audit_index(seg)
    print(
        f"built {args.customers:,} customers (segmenter state, {index.records:,} audit "
        f"changes) in {time.perf_counter() - started:.1f}s"
    )
    # the services in a child process of their own (as in a deployment: the segmenter's
    # pass over its customers does not share the gateway's interpreter lock)
    ctx = multiprocessing.get_context("fork")
    ports: Any = ctx.Queue()
    child = ctx.Process(target=serve_services, args=(seg, ports), daemon=True)
    child.start()
    urls = {n: f"http://127.0.0.1:{port}" for n, port in ports.get(timeout=60).items()}
    url, stop_gateway = start_gateway(urls, index)
    profile = tempfile.mkdtemp(prefix="bench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--window-size=1440,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.set_script_timeout(60)
        driver.get(url + "/console/login")
        field = driver.find_element("id", "token")
        field.send_keys(TOKEN)
        field.submit()
        WebDriverWait(driver, 30).until(lambda d: d.current_url.endswith("/console/"))
        biggest = max(seg.sizes, key=lambda n: seg.sizes[n])
        cid = next(iter(seg.states))
        pages = {
            "Segments": "#/segments",
            f"Segment ({biggest}, {seg.sizes[biggest]:,} members)": "#/segment/"
            + quote(biggest, safe=""),
            "Customer": "#/customer/" + quote(cid, safe=""),
            "Campaigns": "#/campaigns",
            "What-if": "#/whatif",
        }
        worst = 0.0
        for label, hash_ in pages.items():
            t = time.perf_counter()
            driver.get(url + "/console/" + hash_)
            WebDriverWait(driver, 60, poll_frequency=0.005).until(
                lambda d, h=hash_: d.execute_script("return document.body.dataset.loaded") == h
            )
            first = 1000 * (time.perf_counter() - t)
            times = []
            for _ in range(args.runs):
                driver.execute_script("location.hash = '#/none'")  # leave, then come back
                WebDriverWait(driver, 60).until(
                    lambda d: d.execute_script("return document.body.dataset.loaded") == "#/none"
                )
                times.append(driver.execute_async_script(WAIT_LOADED, hash_))
            worst = max(worst, first, max(times))
            print(
                f"{label:48} first load {first:7.0f} ms   navigation median "
                f"{statistics.median(times):7.0f} ms  max {max(times):7.0f} ms   "
                f"(load average {os.getloadavg()[0]:.2f})"
            )
        t = time.perf_counter()  # a full reload of the first page, now that all is warm
        driver.get(url + "/console/#/segments")
        WebDriverWait(driver, 60, poll_frequency=0.005).until(
            lambda d: d.execute_script("return document.body.dataset.loaded") == "#/segments"
        )
        print(
            f"{'Segments, full reload again (warm)':48} first load "
            f"{1000 * (time.perf_counter() - t):7.0f} ms   (load average {os.getloadavg()[0]:.2f})"
        )
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        print(f"slowest: {worst:.0f} ms; console errors: {len(errors)}")
        for e in errors[:5]:
            print("  ", e)
    finally:
        driver.quit()
        stop_gateway()
        child.terminate()
        child.join(10)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
