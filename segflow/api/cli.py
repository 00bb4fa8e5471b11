"""``segflow api``: serve the HTTP API gateway (also ``python -m segflow.api``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (default SEGFLOW_API_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default SEGFLOW_API_PORT or 8480)")
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without a bearer token (local development only; never expose it)",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``api`` to a CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "api",
        help="serve the HTTP API (bearer token from SEGFLOW_API_TOKEN) over running services",
        description="Serve the HTTP API gateway. Services are found at SEGFLOW_API_<SERVICE>_URL "
        "(default http://127.0.0.1:9410-9413); the OpenAPI spec is at /v1/openapi.yaml.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_api)
    return p


def cmd_api(args: argparse.Namespace) -> int:
    from segflow.api.app import run
    from segflow.api.gateway import GatewaySettings
    from segflow.runtime.log import configure
    from segflow.runtime.settings import Settings

    shared = Settings()
    configure("api", shared.log_level, shared.log_format)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = GatewaySettings(**overrides)

    def ready(port: int) -> None:
        auth = "bearer token from SEGFLOW_API_TOKEN" if settings.token else "NO AUTH (insecure)"
        print(
            f"segflow API on http://{settings.host}:{port}/v1 ({auth}); spec at /v1/openapi.yaml",
            flush=True,
        )

    run(settings, insecure_no_auth=args.insecure_no_auth, ready=ready)
    return 0


def main(argv: list[str] | None = None) -> int:
    from segflow.errors import ConfigError

    parser = argparse.ArgumentParser(prog="python -m segflow.api", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_api(args)
    except ConfigError as exc:
        print(f"segflow api: error: {exc}", file=sys.stderr)
        return 2
