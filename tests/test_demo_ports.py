"""The demo's /metrics ports: those `segflow up` uses (so prometheus-local.yml scrapes the
demo) when free, else free ones with a message; the demo never fails over a busy port."""

from __future__ import annotations

import socket

import yaml

from segflow.demo import _metrics_ports, _port_free
from segflow.runtime.broker import free_port
from segflow.runtime.settings import REPO_ROOT


def test_the_local_prometheus_config_scrapes_the_demo_default_ports() -> None:
    from segflow.cli import build_parser

    first = build_parser().parse_args(["demo"]).metrics_port
    config = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus-local.yml").read_text())
    targets = {
        job["job_name"]: t
        for job in config["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    names = ["identity", "scorer", "segmenter", "dispatcher"]
    for i, name in enumerate(names):
        assert targets[name] == f"127.0.0.1:{first + i}"


def test_consecutive_ports_when_free_and_free_ports_when_one_is_taken() -> None:
    said: list[str] = []
    first = next(p for p in iter(free_port, None) if _port_free(p + 1))
    assert _metrics_ports(["a", "b"], first, said.append) == {"a": first, "b": first + 1}
    assert said == []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = _metrics_ports(["a", "b"], taken, said.append)
        assert taken not in ports.values() and len(set(ports.values())) == 2
        assert said and str(taken) in said[-1]
    said.clear()
    ports = _metrics_ports(["a", "b"], 0, said.append)  # 0: free ports, silently
    assert len(set(ports.values())) == 2 and said == []
