"""`sluice workflow apply` refuses a playbook Sluice does not run, before any broker call."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from ops.cli import app

HEAD = """apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: bad, path: tests/bad}
workflow:
"""


def apply(tmp_path: Path, steps: str) -> tuple[int, str]:
    book = tmp_path / "book.yaml"
    book.write_text(HEAD + steps)
    # No broker at this address: a refusal must come before the catalog is read.
    result = CliRunner().invoke(
        app,
        ["workflow", "apply", str(book)],
        env={"SLUICE_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "COLUMNS": "400"},
    )
    return result.exit_code, " ".join(result.output.split())


def test_an_unsupported_tool_is_refused_naming_step_and_reason(tmp_path: Path) -> None:
    code, out = apply(
        tmp_path,
        "  - step: start\n    tool: {kind: snowflake, query: 'select 1'}\n",
    )
    assert code == 1
    assert "step 'start'" in out
    assert "tool kind 'snowflake' is not supported" in out


def test_a_template_error_is_refused_naming_step_and_reason(tmp_path: Path) -> None:
    code, out = apply(
        tmp_path,
        "  - step: start\n    next: {arcs: [{step: fetch}]}\n"
        "  - step: fetch\n    tool: {kind: http, url: '{{ workload.url( }}'}\n",
    )
    assert code == 1
    assert "step 'fetch'" in out
    assert "template" in out


def test_every_problem_is_named_and_the_exit_is_non_zero(tmp_path: Path) -> None:
    code, out = apply(
        tmp_path,
        "  - step: start\n    tool: {kind: snowflake}\n    next: {arcs: [{step: nowhere}]}\n",
    )
    assert code == 1
    assert "snowflake" in out
    assert "nowhere" in out
