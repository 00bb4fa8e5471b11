"""The local broker's install step fails clearly when its tools are missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from segflow.errors import BrokerError
from segflow.runtime import broker


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(broker.shutil, "which", lambda tool: None)
    with pytest.raises(BrokerError, match="java was not found.*Java 17.*KAFKA_BOOTSTRAP_SERVERS"):
        broker.install()


def test_missing_maven_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGFLOW_CACHE_DIR", str(tmp_path))
    real = broker.shutil.which
    monkeypatch.setattr(broker.shutil, "which", lambda tool: None if tool == "mvn" else real(tool))
    with pytest.raises(BrokerError, match="mvn was not found.*Maven"):
        broker.install()


def test_old_java_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(broker, "java_major_version", lambda java: 11)
    with pytest.raises(BrokerError, match="Java 17 or newer"):
        broker.install()


def test_broker_properties_keep_compaction_and_single_node_replication(tmp_path: Path) -> None:
    props = broker.LocalBroker(tmp_path, port=19092, controller_port=19093)._properties()
    assert "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093" in props
    assert "log.cleaner.enable=true" in props
    assert "transaction.state.log.replication.factor=1" in props
    assert "auto.create.topics.enable=false" in props
