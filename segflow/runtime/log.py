"""Structured logs: one JSON object per line on stderr (or plain text for humans).

>>> import io, logging, json
>>> stream = io.StringIO()
>>> log = configure("demo", level="INFO", fmt="json", stream=stream)
>>> log.info("started", extra={"fields": {"partitions": 4}})
>>> rec = json.loads(stream.getvalue())
>>> rec["msg"], rec["service"], rec["partitions"]
('started', 'demo', 4)

With an instance id (one of N instances of a service), every line carries it:

>>> stream = io.StringIO()
>>> log = configure("demo", fmt="json", stream=stream, instance="1")
>>> log.info("x")
>>> json.loads(stream.getvalue())["instance"]
'1'
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, instance: str | None = None) -> None:
        super().__init__()
        self.service = service
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            **({"instance": self.instance} if self.instance is not None else {}),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (a process that
    replaces it, as a test run capturing output does, never leaves this writing to a closed
    stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure(
    service: str,
    level: str = "INFO",
    fmt: str = "json",
    stream: IO[str] | None = None,
    instance: str | None = None,
) -> logging.Logger:
    """Set up the root logger for a process and return the service's logger."""
    handler: logging.Handler = logging.StreamHandler(stream) if stream else _Stderr()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service, instance))
    else:
        name = service if instance is None else f"{service}[{instance}]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return logging.getLogger(f"segflow.{service}")
