"""``segflow demo``: the orchestration (broker, topics, services, receiver, the simulator in
closed loop, waiting for the pipeline after every simulated week)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException

from segflow import stack
from segflow.api import wiring
from segflow.demo.reading import (
    WEEK_DAYS,
    Observed,
    Tail,
    _new_actions,
    _read,
    _sizes,
    say,
)
from segflow.demo.report import _report, render_html
from segflow.receiver import Receiver, SMTPReceiver
from segflow.runtime.broker import LocalBroker, free_port
from segflow.runtime.kafka import ensure_topics, make_admin, wait_for_broker
from segflow.runtime.lag import LagProbe
from segflow.runtime.local import external_bootstrap
from segflow.runtime.log import configure
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from segflow.runtime.vault import generate_key
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery, NoiseConfig
from segflow.sim.sink import KafkaSink
from segflow.supervisor import Supervisor


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _metrics_ports(names: list[str], first: int | None, say: Any) -> dict[str, int]:
    """Consecutive /metrics ports from ``first`` (as ``segflow up`` gives them, so
    deploy/prometheus/prometheus-local.yml scrapes the demo too), or free ports when ``first``
    is None or one of them is taken (said, not fatal: the demo still runs)."""
    if first:
        wanted = {name: first + i for i, name in enumerate(names)}
        taken = [p for p in wanted.values() if not _port_free(p)]
        if not taken:
            return wanted
        say(f"      metrics ports {taken} are in use; the services get free ports instead")
    return {name: free_port() for name in names}


def run_demo(
    args: argparse.Namespace,
    receiver: Receiver | None = None,
    smtp: SMTPReceiver | None = None,
) -> int:
    """Run the demo; ``receiver`` and ``smtp`` (started, owned by the caller) stand in for the
    CRM and email vendors when given, so a test can check what reached them itself."""
    started = time.monotonic()
    configure("demo", level="ERROR", fmt="text")
    state_dir = Path(args.state_dir)
    broker: LocalBroker | None = None
    was_running = True
    prefix = f"demo-{time.strftime('%Y%m%d-%H%M%S')}."
    if external_bootstrap():
        settings = Settings(topic_prefix=prefix)
        say(f"[1/5] using the Kafka broker at {settings.bootstrap_servers}")
        wait_for_broker(settings)
    else:
        broker = LocalBroker(state_dir / "broker", port=args.port)
        was_running = broker.pid() is not None
        say(f"[1/5] starting a local Apache Kafka broker (KRaft) on {broker.bootstrap} ...")
        # Ours (not running before): it dies with the demo, however the demo ends, unless
        # --keep-broker asks for it to stay.
        broker.start(leash=not args.keep_broker)
        settings = Settings(bootstrap_servers=broker.bootstrap, topic_prefix=prefix)
        say(f"      ready; data in {broker.data_dir}, log in {broker.log_file}")
    own_receivers = receiver is None or smtp is None
    if receiver is None or smtp is None:
        receiver, smtp = Receiver().start(), SMTPReceiver().start()
    sup: Supervisor | None = None
    try:
        _drop_old_demo_topics(settings, prefix)
        ensure_topics(settings)
        say(f"[2/5] topics created under the prefix {prefix!r}")
        # issue 19: ReEngageAtRisk's high-value zip is a lookup table, loaded like a user would
        from segflow.lookups import DEFAULT_ZIP_INCOME
        from segflow.lookups import load as load_lookup

        zips = load_lookup(settings, "zip_income", DEFAULT_ZIP_INCOME)
        say(f"      lookup zip_income v{zips['version']}: {len(zips['entries'])} zips")
        names = stack.available_services()
        sup = Supervisor(
            state_dir / "logs" / prefix.rstrip("."),
            env=_service_env(settings, prefix, receiver, smtp),
        )
        metrics_ports = _metrics_ports(names, getattr(args, "metrics_port", None), say)
        api_ports = {name: free_port() for name in names}  # each service's query endpoint
        for name in names:
            port_env = wiring.service_env(name, api_ports[name])
            metrics_env = {"SEGFLOW_METRICS_PORT": str(metrics_ports[name])}
            sup.add_service(name, env={**metrics_env, **port_env})
        api_token, generated = wiring.demo_token()
        api_url = wiring.add_gateway(sup, api_ports, free_port(), api_token)
        from segflow.collector.cli import supervise as add_collector

        collector_line = add_collector(sup, str(state_dir), port=free_port())  # issue 19
        sup.start_all()
        say(f"[3/5] services running: {', '.join(names)} (logs in {sup.log_dir})")
        say(collector_line.strip() + " (the simulator writes to Kafka directly)")
        say(
            "      metrics: "
            + ", ".join(f"{n} http://127.0.0.1:{metrics_ports[n]}/metrics" for n in names)
        )
        say(wiring.announce(api_url, api_token, generated))
        sim, observed, produced = _simulate(settings, args, sup, names)
        produced["cpu"] = sup.cpu_seconds()
        produced["restarts"] = {n: c.restarts for n, c in sup.children.items() if c.restarts}
        say("[5/5] report")
        context, summary = _report(
            sim, observed, produced, receiver, smtp, time.monotonic() - started
        )
        summary["api"] = wiring.demo_tour(api_url, api_token, say)
        summary["topic_prefix"] = prefix
        out = state_dir / "demo-report.html"
        out.write_text(render_html(context, summary["api"].get("kpis", [])))
        (state_dir / "demo-summary.json").write_text(json.dumps(summary, indent=2))
        say(f"      HTML report with segment sizes over time: {out}")
        wiring.explore(api_url, api_token, generated, say)  # the console, while the stack runs
    finally:
        if sup is not None:
            sup.stop()
        if own_receivers:
            receiver.stop()
            smtp.stop()
        if broker is not None and not args.keep_broker and not was_running:
            broker.stop()
            say("local broker stopped (use --keep-broker to leave it running)")
    return 0


def _drop_old_demo_topics(settings: Settings, keep_prefix: str) -> None:
    with make_admin(settings) as admin:
        old = [
            t
            for t in admin.list_topics(timeout=10).topics
            if t.startswith("demo-") and not t.startswith(keep_prefix)
        ]
        if old:
            for future in admin.delete_topics(old, operation_timeout=30).values():
                with contextlib.suppress(Exception):  # already gone
                    future.result(timeout=30)


def _service_env(
    settings: Settings, prefix: str, receiver: Receiver, smtp: SMTPReceiver
) -> dict[str, str]:
    return {
        "SEGFLOW_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SEGFLOW_TOPIC_PREFIX": prefix,
        "SEGFLOW_LOG_LEVEL": "WARNING",
        "SEGFLOW_DISPATCHER_CLOCK": "event",
        "SEGFLOW_DISPATCHER_CRM_BASE_URL": receiver.url,
        "SEGFLOW_DISPATCHER_EMAIL_BASE_URL": receiver.url,
        "SEGFLOW_DISPATCHER_WEBHOOK_URL": receiver.url + "/webhook",
        "SEGFLOW_DISPATCHER_SMTP_PORT": str(smtp.port),
        # The contact vault's master key, new for every run: identity encrypts the simulated
        # customers' addresses with it and the dispatcher emails them at the receiver.
        "SEGFLOW_VAULT_KEY": generate_key(),
        **_vendor_ids(),
        **stack.group_env(settings),  # every service's group is <prefix><name>
        # The demo delivers a simulated week in one burst after a pause; the scorer's clock
        # (slowest live partition) can then run a week ahead of a partition it has not read
        # yet, so allow more than a week of lateness here (see the scorer's README).
        "SEGFLOW_SCORER_ALLOWED_LATENESS_HOURS": "192",
    }


def _vendor_ids() -> dict[str, str]:
    """The vendor record ids an operator configures for the default playbooks (here for the
    receiver's stand-in accounts): HubSpot ILS list ids and an owner, SendGrid dynamic
    template ids and an unsubscribe group. The dispatcher refuses to start without them on a
    real endpoint."""
    import hashlib

    from services.dispatcher.playbooks import DEFAULT_DIR, load_book
    from services.dispatcher.vendors import list_names, template_names

    book = load_book([DEFAULT_DIR])
    lists = {name: str(101 + i) for i, name in enumerate(sorted(list_names(book)))}
    templates = {
        t: "d-" + hashlib.md5(t.encode(), usedforsecurity=False).hexdigest()
        for t in sorted(template_names(book))
    }
    return {
        "SEGFLOW_DISPATCHER_HUBSPOT_LISTS": json.dumps(lists),
        "SEGFLOW_DISPATCHER_HUBSPOT_OWNER_ID": "9001",
        "SEGFLOW_DISPATCHER_SENDGRID_TEMPLATES": json.dumps(templates),
        "SEGFLOW_DISPATCHER_SENDGRID_ASM_GROUP_ID": "7",
    }


def _groups(settings: Settings, names: list[str]) -> dict[str, list[str]]:
    """Consumer group → input topics of the services running (segflow.stack)."""
    return stack.groups(settings, [n for n in names if n in stack.BY_NAME])


def _simulate(
    settings: Settings, args: argparse.Namespace, sup: Supervisor, names: list[str]
) -> tuple[Simulation, Observed, dict[str, Any]]:
    serde = Serde.from_settings(settings)
    noise = NoiseConfig(
        duplicates=0.01, late=0.01, out_of_order=0.02, malformed=0.001, blocked=0.01
    )
    config = SimConfig(customers=args.customers, days=args.days, seed=args.seed, noise=noise)
    say(
        f"[4/5] simulating {config.customers:,} customers over {config.days} days (seed "
        f"{config.seed}), a week at a time, in closed loop with the dispatcher ..."
    )
    sim = Simulation(config)
    sink = KafkaSink.from_settings(settings)
    tails = {
        t.key_name: Tail(settings, serde, t)
        for t in (
            TOPICS.identified,
            TOPICS.merges,
            TOPICS.scores,
            TOPICS.segment_changes,
            TOPICS.dispatch_results,
            TOPICS.dlq,
        )
    }
    obs = Observed()
    truth_of: dict[str, str] = {}
    produced: dict[str, Any] = {
        "events": 0,
        "malformed": 0,
        "applied": 0,
        "rescued": 0,
        "timeline": [],
    }
    groups = _groups(settings, names)
    lags = LagProbe(settings)
    t0 = time.monotonic()
    week = 0
    try:
        while not (sim.finished and not sim.pending):
            items = sim.step(WEEK_DAYS)
            for item in items:
                if type(item) is Delivery:
                    truth_of[item.event["event_id"]] = item.customer
            sink.write(items)
            sink.producer.flush(30)
            week += 1
            if getattr(args, "chaos", False) and week <= len(names):
                victim = names[week - 1]
                pid = sup.pids().get(victim)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    say(f"      chaos: kill -9 {victim} (pid {pid}) mid-stream")
            flushed = time.monotonic()
            _wait_caught_up(settings, groups, sup, timeout=args.step_timeout, probe=lags)
            obs.drain_seconds.append(time.monotonic() - flushed)
            _read(tails, obs)
            for action in _new_actions(obs, produced):
                ident = obs.handle.get(action["customer_id"])
                if ident is None:
                    continue
                outcome = sim.apply_action(ident, action)
                produced["applied"] += outcome.applied
                produced["rescued"] += outcome.rescued
            sizes = _sizes(obs.changes)
            produced["timeline"].append((sim.day, dict(sizes)))
            named = [(seg, n) for seg, n in sizes.most_common() if not seg.startswith("Lifecycle:")]
            largest = ", ".join(f"{seg} {n}" for seg, n in named[:4] if n)
            say(
                f"      day {sim.day:>3}/{config.days}: {sink.events:,} events, "
                f"{len(obs.event_owner):,} identified "
                f"({len(set(obs.event_owner.values())):,} customer ids), "
                f"{tails['scores'].count:,} scores, {len(obs.changes):,} segment changes, "
                f"{sum(1 for r in obs.results if r['status'] == 'sent'):,} actions sent; "
                f"caught up {obs.drain_seconds[-1]:.1f}s after the week was produced "
                f"({time.monotonic() - t0:.0f}s)"
                + (f"\n        largest: {largest}" if largest else "")
            )
        stats = sink.close()
        _wait_caught_up(settings, groups, sup, timeout=args.step_timeout, probe=lags)
        _read(tails, obs)
    finally:
        for tail in tails.values():
            tail.close()
        lags.close()
    produced.update(
        scores=tails["scores"].count,
        events=stats.events,
        malformed=stats.malformed,
        seconds=time.monotonic() - t0,
        truth_of=truth_of,
    )
    return sim, obs, produced


def _wait_caught_up(
    settings: Settings,
    groups: dict[str, list[str]],
    sup: Supervisor,
    timeout: float,
    probe: LagProbe | None = None,
) -> None:
    own = probe is None
    lags = probe or LagProbe(settings)
    try:
        deadline = time.monotonic() + timeout
        quiet = 0
        lag: dict[str, Any] = {}
        while time.monotonic() < deadline:
            for name in sup.check():
                say(f"      ({name} exited and was restarted; see its log)")
            try:
                lag = lags.lag(groups)
            except KafkaException as exc:  # e.g. the group coordinator still loading
                lag, quiet = {"(not known yet)": str(exc)}, 0
                time.sleep(0.5)
                continue
            quiet = quiet + 1 if sum(lag.values()) == 0 else 0
            if quiet >= 2:  # twice in a row: downstream outputs of the last batch are read too
                return
            time.sleep(0.5)
        say(f"      (pipeline still behind after {timeout:.0f}s: {lag}; carrying on)")
    finally:
        if own:
            lags.close()
