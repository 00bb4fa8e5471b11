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


def test_broker_aborts_timed_out_transactions_within_a_second_and_takes_extra_properties(
    tmp_path: Path,
) -> None:
    import io
    from configparser import ConfigParser

    props = broker.LocalBroker(
        tmp_path, port=19092, extra={"broker.session.timeout.ms": "4000", "num.partitions": "2"}
    )._properties()
    # read as the broker does (java.util.Properties: a key given twice keeps its last value)
    parser = ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_file(io.StringIO("[p]\n" + props))
    got = parser["p"]
    assert got["transaction.abort.timed.out.transaction.cleanup.interval.ms"] == "1000"
    assert got["broker.session.timeout.ms"] == "4000"
    assert got["num.partitions"] == "2"
