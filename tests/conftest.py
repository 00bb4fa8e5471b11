"""Test harness: a real Kafka broker for integration tests.

Which broker, in order: ``KAFKA_BOOTSTRAP_SERVERS`` / ``SEGFLOW_BOOTSTRAP_SERVERS`` when set;
else a testcontainers ``apache/kafka`` container when a Docker engine answers; else the
project's own local broker (jars from Maven Central) on free ports in a temporary folder.
Each test gets fresh topic names (a unique prefix) and consumer groups.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from segflow.runtime.broker import LocalBroker, free_port
from segflow.runtime.kafka import wait_for_broker
from segflow.runtime.settings import Settings
from segflow.runtime.testing import isolated_settings

KAFKA_IMAGE = "apache/kafka:4.1.1"

#: The longest test files (one to three minutes each, most of it waiting on a broker), run
#: first: ``./run test`` spreads files over two pytest-xdist workers in collection order
#: (``--dist loadfile``), and a long file drawn last would leave one worker alone at the end.
SLOW_FIRST = (
    "tests/integration/test_pipeline_scale_out.py",
    "tests/integration/test_scale_out.py",
    "tests/integration/test_end_to_end.py",
    "tests/scorer/test_shared_model.py",
    "tests/scorer/test_scorer_broker.py",
    "tests/api/test_api_broker.py",
    "tests/integration/test_dispatcher_rebalance.py",
    "tests/identity/test_identity_scaled.py",
    "tests/identity/test_identity_broker.py",
    "tests/console/test_console_browser.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of ``SLOW_FIRST`` first, in that order; everything else as collected."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    root = Path(__file__).resolve().parents[1]

    def key(item: pytest.Item) -> int:
        try:
            name = item.path.resolve().relative_to(root).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(name, len(rank))

    items.sort(key=key)  # stable: the order within a file and among the rest is kept


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real Kafka broker for the whole session."""
    explicit = os.environ.get("SEGFLOW_BOOTSTRAP_SERVERS") or os.environ.get(
        "KAFKA_BOOTSTRAP_SERVERS"
    )
    if explicit:
        wait_for_broker(Settings(bootstrap_servers=explicit), timeout=60)
        yield explicit
        return
    if _docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer(KAFKA_IMAGE).with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    broker = LocalBroker(
        tmp_path_factory.mktemp("broker"), port=free_port(), controller_port=free_port()
    )
    broker.start(leash=True)  # dies with pytest, however pytest ends
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def kafka_settings(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Settings:
    """Settings on the session broker with a fresh prefix and all registry topics created."""
    label = request.node.name.split("[")[0][:20].replace("_", "-")
    return isolated_settings(kafka_bootstrap, label)


#: A broker restarted after ``kill -9`` is ready only once its controller drops the killed
#: incarnation's registration, when that broker session times out (Kafka's default 9 s,
#: counted from the controller's own restart in this combined node; the new registration
#: is refused with DuplicateBrokerRegistrationException until then). A private broker that
#: a test kills times out sooner: 4 s, heartbeats every 0.5 s (in-process, on loopback).
#: The shared session broker keeps the defaults: nothing kills it, and a session that short
#: could fence it on a loaded box.
RESTARTS_FAST = {"broker.session.timeout.ms": "4000", "broker.heartbeat.interval.ms": "500"}


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A private local broker this test may kill and restart (needs Java)."""
    broker = LocalBroker(
        tmp_path / "broker", port=free_port(), controller_port=free_port(), extra=RESTARTS_FAST
    )
    broker.start(leash=True)
    try:
        yield broker
    finally:
        broker.stop(timeout=15)
