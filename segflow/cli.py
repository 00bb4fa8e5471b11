"""The ``segflow`` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from segflow import __version__
from segflow.errors import SegflowError


def _broker(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from segflow.runtime.broker import LocalBroker

    home = Path(args.state_dir) / "broker"
    return LocalBroker(home, port=args.port)


def _settings_for(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from segflow.runtime.local import settings_for

    return settings_for(getattr(args, "port", 9092))


def external_bootstrap() -> str | None:
    from segflow.runtime.local import external_bootstrap as configured

    return configured()


def cmd_broker(args: argparse.Namespace) -> int:
    from segflow.runtime.broker import install

    broker = _broker(args)
    if args.action == "install":
        print(f"Kafka jars in {install()}")
    elif args.action == "start":
        t0 = time.monotonic()
        broker.start()
        print(
            f"Kafka broker running at {broker.bootstrap} (pid {broker.pid()}, "
            f"ready in {time.monotonic() - t0:.1f}s); data in {broker.data_dir}, "
            f"log in {broker.log_file}"
        )
        if not args.no_topics:
            _create_topics(_settings_for(args))
    elif args.action == "stop":
        print("broker stopped" if broker.stop() else "broker was not running")
    elif args.action == "status":
        st = broker.status()
        state = f"running (pid {st.pid})" if st.running else "stopped"
        print(f"broker {state} at {st.bootstrap}; data {st.data_dir}; log {st.log_file}")
        return 0 if st.running else 3
    return 0


def _create_topics(settings) -> None:  # type: ignore[no-untyped-def]
    from segflow.runtime.kafka import ensure_topics
    from segflow.runtime.topics import TOPICS

    created = ensure_topics(settings)
    for topic in TOPICS:
        mark = "created" if topic.name(settings) in created else "exists "
        print(
            f"  {mark} {topic.name(settings):32} partitions={topic.partitions} "
            f"cleanup={topic.cleanup}"
        )


def cmd_topics(args: argparse.Namespace) -> int:
    settings = _settings_for(args)
    from segflow.runtime.kafka import wait_for_broker

    wait_for_broker(settings)
    _create_topics(settings)
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from segflow.runtime.contract import check_all

    problems = check_all()
    for line in problems:
        print(line)
    if not problems:
        print("schemas OK: every schema parses and every example validates")
    return 1 if problems else 0


def available_services() -> list[str]:
    from segflow.stack import available_services as available

    return available()


#: Services whose state is partitioned (they may run as N instances of one consumer group).
SCALABLE = ("scorer", "segmenter", "dispatcher")
#: Services that run as N instances by splitting into roles (segflow.stack.processes):
#: identity as N front-stage processes plus the graph writer, active and warm standby.
SPLIT = ("identity",)


def replica_counts(names: list[str], replicas: int, per_service: list[str]) -> dict[str, int]:
    """Instances per service from ``--replicas N`` and ``--replicas-of name=N`` (for
    identity, N front-stage processes; see segflow.stack.processes).

    >>> replica_counts(["identity", "segmenter", "attributes"], 2, ["segmenter=3"])
    {'identity': 2, 'segmenter': 3, 'attributes': 1}
    """
    if replicas < 1:
        raise SystemExit(f"--replicas: expected N >= 1, got {replicas}")
    many = (*SPLIT, *SCALABLE)
    counts = {name: replicas if name in many else 1 for name in names}
    for item in per_service:
        name, sep, n = item.partition("=")
        if not sep or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--replicas-of: expected service=N (N >= 1), got {item!r}")
        if name not in many and int(n) != 1:
            raise SystemExit(
                f"--replicas-of: {name} runs as one instance (scalable: {', '.join(many)})"
            )
        if name in counts:
            counts[name] = int(n)
    return counts


def cmd_up(args: argparse.Namespace) -> int:
    from segflow.supervisor import Supervisor

    if external_bootstrap():
        settings = _settings_for(args)
        from segflow.runtime.kafka import wait_for_broker

        wait_for_broker(settings)
    else:
        broker = _broker(args)
        started_broker = broker.pid() is None
        # A broker this command starts dies with it, however it dies (kill -9 included),
        # unless --keep-broker; one already running is left as it is.
        broker.start(leash=not args.keep_broker)
        print(f"broker at {broker.bootstrap} (log {broker.log_file})")
        settings = _settings_for(args)
    _create_topics(settings)
    names = available_services()
    if not names:
        print("no services are built yet; the broker and topics are up")
        return 0
    from segflow.api import wiring
    from segflow.runtime.vault import local_key

    vault_key, _ = local_key(Path(args.state_dir))  # the contact vault's master key
    sup = Supervisor(
        Path(args.state_dir) / "logs",
        env={
            "SEGFLOW_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "SEGFLOW_VAULT_KEY": vault_key,
        },
    )
    from segflow.stack import processes

    ports = {name: args.metrics_port + 10 + i for i, name in enumerate(names)}  # for the API
    counts = replica_counts(names, args.replicas, args.replicas_of or [])
    metrics_ports: dict[str, int] = {}
    query_ports: dict[str, list[int]] = {name: [] for name in names}
    started: set[str] = set()
    for k, proc in enumerate(processes(counts)):
        # A service's first process keeps its usual ports; the others get metrics ports from
        # 9430 up and query ports from 9460 up (the API asks every instance). Identity's
        # front-stage processes have no query endpoint (the graph writers have).
        i = names.index(proc.service)
        first = proc.service not in started
        started.add(proc.service)
        metrics_ports[proc.name] = args.metrics_port + (i if first else 30 + k)
        env = {"SEGFLOW_METRICS_PORT": str(metrics_ports[proc.name]), **proc.env}
        if proc.serves_queries:
            query = args.metrics_port + 60 + k if query_ports[proc.service] else ports[proc.service]
            query_ports[proc.service].append(query)
            env.update(wiring.service_env(proc.service, query))
        sup.add(proc.name, [sys.executable, "-m", proc.module], env)
    token, token_source = wiring.local_token(Path(args.state_dir))
    api_url = wiring.add_gateway(sup, query_ports, args.api_port, token)
    from segflow.collector.cli import supervise as add_collector

    collector_line = add_collector(sup, args.state_dir)  # Segment-spec collector (issue 19)
    sup.start_all()
    for child, mport in metrics_ports.items():
        print(
            f"  {child:17} pid {sup.pids()[child]}  metrics http://127.0.0.1:"
            f"{mport}/metrics  log {sup.children[child].log_path}"
        )
    print(f"  api        {api_url}/v1 (bearer token in {token_source}; spec /v1/openapi.yaml)")
    print(f"  console    {api_url}/console/ (sign in with the same token)")
    print(collector_line)
    print("running; Ctrl-C (or SIGTERM) stops everything")

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a background job started by a script inherits SIGINT ignored, and
    # SIGTERM (a process manager's stop) would otherwise leave every child running.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        while True:
            for name in sup.check():
                print(f"  {name} exited and was restarted (see its log)")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping services ...")
    finally:
        sup.stop()
        if not external_bootstrap() and started_broker and not args.keep_broker:
            print("stopping the broker this command started ...")
            broker.stop()
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from segflow.produce import produce_file

    settings = _settings_for(args)
    if args.file == "-":
        return produce_file(settings, sys.stdin)
    with open(args.file, encoding="utf-8") as lines:
        return produce_file(settings, lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from segflow.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segflow",
        description="Kafka-native dynamic micro-segmentation for CRM retention.",
    )
    parser.add_argument("--version", action="version", version=f"segflow {__version__}")
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("SEGFLOW_STATE_DIR", ".segflow"),
        help="where the local broker and services keep their files (default .segflow)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("SEGFLOW_BROKER_PORT", "9092")),
        help="local broker port (default 9092; the controller uses port+1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("broker", help="install, start, stop or inspect the local Kafka broker")
    p.add_argument("action", choices=["install", "start", "stop", "status"])
    p.add_argument("--no-topics", action="store_true", help="do not create segflow's topics")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("up", help="start the broker and every built service, supervised")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="first /metrics port; services get consecutive ports (default 9400) and their "
        "query endpoints for the API the ports from this + 10",
    )
    p.add_argument("--api-port", type=int, default=8480, help="HTTP API port (default 8480)")
    p.add_argument(
        "--keep-broker",
        action="store_true",
        help="leave a broker this command starts running when it stops",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help=f"instances of each scalable service ({', '.join(SCALABLE)}), one consumer group "
        "each, partitions and state shared out between them; identity runs as N front-stage "
        "processes plus its graph writer, active and warm standby (default 1: one process each)",
    )
    p.add_argument(
        "--replicas-of",
        action="append",
        metavar="SERVICE=N",
        help="instances of one service (repeatable), e.g. --replicas-of dispatcher=3",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("topics", help="create segflow's topics from the registry")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("produce", help="send a JSON-lines file of events to segflow.events")
    p.add_argument("file", help="JSON lines, one BehaviorEvent per line ('-' = stdin)")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("schemas", help="check the Avro contract in schemas/")
    p.set_defaults(func=cmd_schemas)

    p = sub.add_parser("demo", help="run segflow on simulated customers on the local broker")
    p.add_argument("--customers", type=int, default=300)
    p.add_argument("--days", type=int, default=84)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keep-broker", action="store_true", help="leave the broker running")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="first /metrics port, as for `segflow up` (default 9400, so "
        "deploy/prometheus/prometheus-local.yml scrapes the demo); 0 or ports in use: free ports",
    )
    p.add_argument(
        "--step-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the services to catch up after each simulated week",
    )
    p.add_argument(
        "--chaos",
        action="store_true",
        help="kill -9 one service per simulated week (the supervisor restarts it)",
    )
    p.set_defaults(func=cmd_demo)

    from segflow.api.cli import add_parser as add_api_parser
    from segflow.collector.cli import add_parser as add_collect_parser
    from segflow.forget import add_parser as add_forget_parser
    from segflow.replay.cli import add_parser as add_replay_parser
    from segflow.sim.cli import add_parser as add_sim_parser
    from services.segmenter.cli import add_parser as add_segmenter_parser

    add_api_parser(sub)  # `segflow api` (the HTTP API gateway)
    add_sim_parser(sub)
    add_segmenter_parser(sub)  # `segflow segments check FILE`, `segflow explain CUSTOMER`
    add_forget_parser(sub)  # `segflow forget CUSTOMER_ID` (GDPR erasure, everywhere)
    add_replay_parser(sub)  # `segflow replay --segments NEW.yaml` (what-if, sends nothing)
    add_collect_parser(sub)  # `segflow collect` (Segment tracking API -> segflow.events)
    from segflow.lookups import add_parser as add_lookups_parser

    add_lookups_parser(sub)  # `segflow lookups load NAME FILE.csv` (issue 19)
    from segflow.attributes import add_parser as add_attributes_parser

    add_attributes_parser(sub)  # `segflow attributes load FILE.csv|jsonl` (issue 19)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None) or getattr(
        args, "handler", None
    )
    if func is None:
        parser.print_help()
        return 0
    try:
        return func(args)
    except SegflowError as exc:
        print(f"segflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
