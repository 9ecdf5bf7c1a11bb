"""`sluice replay`: a range delivered again leaves no duplicate rows in the warehouse, and a
time range from the ingest topic reaches a webhook again through its filter."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from ops.cli import app
from tests.configs import Configs


def test_replay_needs_a_range_and_a_known_destination(configs: Configs, tmp_path: Path) -> None:
    cfg = tmp_path / "sluice.yaml"
    cfg.write_text(
        configs.text(
            configs.warehouse(),
            configs.webhook(
                "http://127.0.0.1:1/hook", filter={"allow_types": ["track"]}, timeout_s=2
            ),
        )
    )
    no_range = CliRunner().invoke(app, ["replay", "hook", "--config", str(cfg)])
    assert no_range.exit_code == 1
    assert "say which records" in no_range.output
    ghost = CliRunner().invoke(app, ["replay", "ghost", "--from-offset", "0", "--config", str(cfg)])
    assert ghost.exit_code == 1
    assert "no destination 'ghost'" in ghost.output
