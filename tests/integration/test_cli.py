"""The `sluice` CLI: help, one-line failures with non-zero exits, idempotent topic creation."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.settings import KafkaSettings
from ops.cli import app
from tests.pipeline import CONFIG

runner = CliRunner()


@pytest.mark.integration
def test_topics_apply_creates_then_changes_nothing(
    tmp_path: Path, kafka: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text(CONFIG.replace("{key}", "k"))
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", kafka.topic_prefix)
    first = runner.invoke(app, ["topics", "apply", "--config", str(config)])
    assert first.exit_code == 0, first.output
    # 10 of the pipeline (with the config's destination and its tiers), 3 of workflows.
    assert first.output.count("created") == 13
    assert f"{kafka.topic_prefix}.dest.warehouse.retry.3s" in first.output
    assert f"{kafka.topic_prefix}.workflows.events" in first.output
    second = runner.invoke(app, ["topics", "apply", "--config", str(config)])
    assert second.exit_code == 0
    assert second.output.count("unchanged") == 13
