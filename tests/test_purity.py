"""Pure cores stay pure: importing one must not load Kafka, httpx or the I/O runtime, and
their code reads no clock and no environment (time and settings come in as arguments)."""

from __future__ import annotations

import ast
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
    [
        "segflow.events",
        "segflow.errors",
        "segflow.durations",
        "segflow.stats",
        "segflow.replay.core",
        "segflow.api.console.timeline",
    ]
    + [
        "services.dispatcher.playbooks",
        "services.dispatcher.policy",
        "services.dispatcher.experiments",
        "services.dispatcher.backoff",
        "services.dispatcher.delivery",
        "services.dispatcher.signing",
        "services.dispatcher.model",
        "services.dispatcher.observing",
        "services.dispatcher.merge",
        "services.dispatcher.records",
        "services.dispatcher.playbook_model",
        "services.dispatcher.playbook_schema",
        "services.segmenter.dsl",
        "services.segmenter.definition_model",
        "segflow.yamldoc",
        "services.segmenter.quantiles",
        "services.segmenter.population",
        "services.segmenter.model",
        "services.segmenter.explain",
        "services.segmenter.statuses",
        "services.segmenter.records",
        "services.segmenter.rules",
        "services.segmenter.merging",
        "services.scorer.features",
        "services.scorer.model",
        "services.scorer.btyd",
        "services.identity.window",
        "services.identity.order",
        "services.identity.hashing",
        "services.scorer.config",
        "services.scorer.view",
        "services.scorer.clock",
        "services.scorer.labels",
        "services.scorer.days",
        "services.scorer.shared",
        "services.scorer.timers",
        "services.scorer.layout",
        "services.scorer.merge",
        "services.scorer.explain",
        # settings modules: the environment is read by pydantic-settings when a shell or a
        # product command builds one, never by the module's own code
        "services.scorer.settings",
        "services.identity.settings",
        "services.segmenter.settings",
        "services.attributes.settings",
        "services.dispatcher.playbook_settings",
    ]
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


#: Calls that make a function's result depend on when or where it runs.
IMPURE_CALLS = {
    ("time", "time"),
    ("time", "time_ns"),
    ("time", "monotonic"),
    ("time", "perf_counter"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("date", "today"),
    ("os", "getenv"),
    ("os", "environ"),
}
#: Pure modules allowed a clock or environment read (none: the scorer's per-tick work budget
#: is a callable its shell passes in).
KNOWN: set[tuple[str, str]] = set()


def clock_and_environment_reads(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in IMPURE_CALLS
        ):
            found.add(f"{node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("module", PURE)
def test_core_module_reads_no_clock_and_no_environment(module: str) -> None:
    source = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
    found = {f for f in clock_and_environment_reads(source) if (module, f) not in KNOWN}
    assert not found, f"{module} reads {sorted(found)}: pass time and settings in instead"


def test_the_check_sees_clock_and_environment_reads() -> None:
    sample = (
        "import os, time\nfrom datetime import datetime\n"
        "def f():\n    return time.monotonic(), datetime.now(), os.environ['X']\n"
        "def g(clock):\n    return clock()\n"
    )
    assert clock_and_environment_reads(sample) == {"time.monotonic", "datetime.now", "os.environ"}
