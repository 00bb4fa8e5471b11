"""Pure cores stay pure: importing one must not load Kafka, Faust, httpx or the I/O runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = [
    "confluent_kafka",
    "faust",
    "aiokafka",
    "httpx",
    "fastavro",
    "prometheus_client",
    "segflow.runtime",
]
PURE = (
    ["segflow.events", "segflow.errors"]
    + [
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in sorted((ROOT / "services").glob("*/core.py"))
    ]
    + [
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in sorted((ROOT / "segflow" / "sim").glob("*.py"))
        if p.stem not in ("sink", "cli", "__main__")
    ]
)


@pytest.mark.parametrize("module", PURE)
def test_core_module_imports_no_io(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in forbidden)]\n"  # noqa: E501
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"{module} loaded {out}"
