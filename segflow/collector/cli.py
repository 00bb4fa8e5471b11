"""``segflow collect``: run the Segment-spec collector in the foreground."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "collect",
        help="accept Segment tracking-API calls (SDKs, HTTP) and write them to segflow.events",
        description="Serve Segment's tracking API (/v1/track, identify, page, screen, alias, "
        "group, batch) and answer 200 only once Kafka acknowledged the events. Write keys come "
        "from SEGFLOW_COLLECTOR_WRITE_KEYS (source=KEY,...) or --write-key; every other "
        "setting from SEGFLOW_COLLECTOR_* (see the README).",
    )
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--collect-port", type=int, default=None, help="HTTP port (default 8088)")
    p.add_argument(
        "--write-key",
        action="append",
        default=None,
        metavar="[SOURCE=]KEY",
        help="accept this write key (repeatable); prefer the environment variable, which "
        "stays out of the process list",
    )
    p.add_argument(
        "--event-map",
        default=None,
        metavar="FILE",
        help="YAML or JSON object of track event names to segflow event types, "
        'e.g. {"Trial Started": "session_start"}',
    )
    p.set_defaults(func=cmd_collect)


def cmd_collect(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import SecretStr

    from segflow.collector.app import CollectorSettings, run
    from segflow.errors import ConfigError
    from segflow.runtime.local import settings_for

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.collect_port is not None:
        overrides["port"] = args.collect_port
    if args.write_key:
        overrides["write_keys"] = SecretStr(",".join(args.write_key))
    if args.event_map:
        try:
            with open(args.event_map, encoding="utf-8") as f:
                table = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--event-map {args.event_map}: {exc}") from exc
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in table.items()
        ):
            raise ConfigError(
                f"--event-map {args.event_map}: expected an object of event name -> event type"
            )
        overrides["event_map"] = table
    config = CollectorSettings().model_copy(update=overrides)
    return run(settings_for(args.port), config)


def supervise(sup: Any, state_dir: str, port: int | None = None) -> str:
    """Add the collector to ``segflow up``'s (or the demo's) supervisor; a line saying where
    it listens. ``port``: this one instead of ``SEGFLOW_COLLECTOR_PORT`` (8088).

    The write key is ``SEGFLOW_COLLECTOR_WRITE_KEYS`` when set, else a local one kept in
    ``<state_dir>/collector-write-key`` (mode 0600, created on first use).
    """
    import secrets
    import sys
    from pathlib import Path

    env: dict[str, str] = {}
    if os.environ.get("SEGFLOW_COLLECTOR_WRITE_KEYS"):
        where = "SEGFLOW_COLLECTOR_WRITE_KEYS"
    else:
        path = Path(state_dir) / "collector-write-key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(18) + "\n")
        env["SEGFLOW_COLLECTOR_WRITE_KEYS"] = f"local={path.read_text().strip()}"
        where = str(path)
    if port is not None:
        env["SEGFLOW_COLLECTOR_PORT"] = str(port)
    sup.add("collector", [sys.executable, "-m", "segflow.collector"], env)
    shown = port if port is not None else os.environ.get("SEGFLOW_COLLECTOR_PORT", "8088")
    return f"  collector  http://127.0.0.1:{shown}/v1 (Segment tracking API; write key in {where})"
