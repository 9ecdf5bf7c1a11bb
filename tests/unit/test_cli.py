"""The `sluice` CLI: help, one-line failures with non-zero exits, idempotent topic creation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.errors import TopicError
from core.settings import BrokerSettings
from ops.cli import app, main
from ops.errors import BrokerError
from ops.kafka_broker import log_recovery, new_cluster_id, server_properties, start_broker
from tests.pipeline import free_port

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in (
        "kafka",
        "topics",
        "gateway",
        "worker",
        "sink",
        "deliver",
        "sql",
        "send",
        "demo",
        "replay",
        "dlq",
    ):
        assert command in result.output


def test_sql_without_a_sink_fails_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_WAREHOUSE_QUERY_PORT", str(free_port()))
    result = runner.invoke(app, ["sql", "SELECT 1"])
    assert result.exit_code == 1
    assert "no sink answers" in result.output
    assert "Traceback" not in result.output


def test_an_error_a_command_does_not_catch_still_fails_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unreachable(*_args: object, **_kwargs: object) -> None:
        raise TopicError("cannot reach Kafka at 127.0.0.1:1: connection refused")

    monkeypatch.setattr("core.admin.apply_topics", unreachable)
    monkeypatch.setattr(sys, "argv", ["sluice", "bench", "processor", "--events", "10"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: cannot reach Kafka at 127.0.0.1:1: connection refused"


def test_invalid_config_fails_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("destinations: [{id: d, type: clickhouse, sources: [ghost]}]")
    result = runner.invoke(app, ["topics", "apply", "--config", str(bad)])
    assert result.exit_code == 1
    assert "unknown sources ['ghost']" in result.output


def test_broker_properties_use_the_configured_ports_and_folder(tmp_path: Path) -> None:
    settings = BrokerSettings(port=19001, controller_port=19002, state_dir=tmp_path)
    props = server_properties(settings)
    assert "listeners=PLAINTEXT://127.0.0.1:19001,CONTROLLER://127.0.0.1:19002" in props
    assert f"log.dirs={tmp_path.resolve() / 'data'}" in props
    assert "process.roles=broker,controller" in props


def test_cluster_ids_never_read_as_an_option() -> None:
    # One random id in 64 starts with '-', which Kafka's format tool takes for an option.
    ids = [new_cluster_id() for _ in range(3000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 22 for i in ids)


def test_log_recovery_progress_is_read_from_the_end_of_the_broker_log(tmp_path: Path) -> None:
    log = tmp_path / "broker.log"
    assert log_recovery(log) is None
    log.write_text("INFO Kafka version: 3.9.1\n")
    assert log_recovery(log) is None
    line = "INFO Completed load of Log(dir=d) with 1 segments in 3ms ({} completed in {})\n"
    log.write_text("x" * 100_000 + line.format("10/5438", "/data") + line.format("5120/5438", "/d"))
    assert log_recovery(log) == (5120, 5438)


def test_missing_java_or_maven_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ops.kafka_broker.shutil.which", lambda _tool: None)
    empty_cache = BrokerSettings(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state")
    with pytest.raises(BrokerError, match="Maven is required"):
        start_broker(empty_cache)
    cached = tmp_path / "cache" / f"2.13-{empty_cache.version}"
    cached.mkdir(parents=True)
    (cached / "complete").write_text(empty_cache.version)
    with pytest.raises(BrokerError, match="Java 17\\+ is required"):
        start_broker(empty_cache)


def test_kafka_status_of_a_stopped_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_BROKER_STATE_DIR", str(tmp_path))
    result = runner.invoke(app, ["kafka", "status"])
    assert result.exit_code == 3
    assert "not running" in result.output
    stop = runner.invoke(app, ["kafka", "stop"])
    assert stop.exit_code == 0
    assert "was not running" in stop.output


def test_a_three_node_cluster_has_its_own_ports_folders_and_one_quorum(tmp_path: Path) -> None:
    from ops.kafka_broker import bootstrap, nodes  # noqa: PLC0415

    settings = BrokerSettings(brokers=3, port=19100, controller_port=19101, state_dir=tmp_path)
    assert [(n.port, n.controller_port) for n in nodes(settings)] == [
        (19100, 19101),
        (19102, 19103),
        (19104, 19105),
    ]
    assert bootstrap(settings) == "127.0.0.1:19100,127.0.0.1:19102,127.0.0.1:19104"
    props = server_properties(settings, 2)
    assert "node.id=2" in props
    assert "controller.quorum.voters=1@127.0.0.1:19101,2@127.0.0.1:19103,3@127.0.0.1:19105" in props
    assert f"log.dirs={tmp_path.resolve() / 'node-2' / 'data'}" in props
    assert "offsets.topic.replication.factor=3" in props
    assert "transaction.state.log.min.isr=2" in props
    overlapping = BrokerSettings(brokers=2, port=19100, controller_port=19102, state_dir=tmp_path)
    with pytest.raises(BrokerError, match="overlap"):
        nodes(overlapping)


def test_replication_follows_the_cluster_unless_set() -> None:
    from core.admin import replication  # noqa: PLC0415
    from core.errors import TopicError  # noqa: PLC0415
    from core.settings import KafkaSettings  # noqa: PLC0415

    assert replication(KafkaSettings(), 1) == (1, 1)
    assert replication(KafkaSettings(), 2) == (2, 1)
    assert replication(KafkaSettings(), 3) == (3, 2)
    assert replication(KafkaSettings(), 5) == (3, 2)
    assert replication(KafkaSettings(replication_factor=2, min_insync_replicas=2), 3) == (2, 2)
    with pytest.raises(TopicError, match="needs 3 brokers"):
        replication(KafkaSettings(replication_factor=3), 1)
    with pytest.raises(TopicError, match="more than the replication factor"):
        replication(KafkaSettings(replication_factor=1, min_insync_replicas=2), 3)


def test_authenticated_mode_logs_in_every_listener_and_keeps_passwords_private(
    tmp_path: Path,
) -> None:
    from ops.kafka_broker import ROLES, client_config, credentials, role_env  # noqa: PLC0415

    settings = BrokerSettings(port=19200, controller_port=19201, state_dir=tmp_path, sasl=True)
    props = server_properties(settings)
    assert "listeners=SASL_PLAINTEXT://127.0.0.1:19200,CONTROLLER://127.0.0.1:19201" in props
    assert "PLAINTEXT:PLAINTEXT" not in props  # no listener without a login
    assert "allow.everyone.if.no.acl.found=false" in props
    assert "super.users=User:broker;User:controller;User:admin" in props
    users = credentials(settings)
    assert set(users) == {*ROLES, "broker", "controller"}
    assert len(set(users.values())) == len(users)
    assert credentials(settings) == users  # made once
    assert (tmp_path / "credentials.json").stat().st_mode & 0o077 == 0
    env_file = tmp_path / "credentials" / "gateway.env"
    assert env_file.stat().st_mode & 0o077 == 0
    assert f"SLUICE_KAFKA_SASL_PASSWORD={users['gateway']}" in env_file.read_text()
    assert role_env(settings, "sink")["SLUICE_KAFKA_SASL_USERNAME"] == "sink"
    assert client_config(settings, "jobs")["sasl.password"] == users["jobs"]
    # A folder formatted without authentication is not started with it.
    plain = tmp_path / "plain"
    (plain / "data").mkdir(parents=True)
    (plain / "data" / "meta.properties").write_text("")
    with pytest.raises(BrokerError, match="without authentication"):
        start_broker(BrokerSettings(state_dir=plain, sasl=True))
