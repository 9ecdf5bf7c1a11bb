"""Live config: applied while the pipeline runs, a new write key and a new destination work
within 5 s without restarts; an invalid config is refused and never reaches a service."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli import app
from ops.traffic import basic_auth, sample_events, send_batches
from tests.pipeline import Pipeline

pytestmark = pytest.mark.integration

GROWN = """
sources:
  - id: test-src
    write_keys: [{key}]
  - id: late-src
    write_keys: [late-key]
destinations:
  - id: warehouse
    type: clickhouse
    sources: [test-src, late-src]
    retry: {tiers: [1s, 3s], max_attempts: 3}
  - id: audit
    type: clickhouse
    sources: [test-src, late-src]
    settings: {table: audit_events, layout: false}
"""


async def _post_until_accepted(pipe: Pipeline, key: str, deadline_s: float) -> float:
    import aiohttp  # noqa: PLC0415

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < deadline_s:
            body = {"batch": [{"type": "track", "event": "Late", "userId": "u"}]}
            async with session.post(
                f"{pipe.gateway_url}/v1/batch",
                json=body,
                headers={"Authorization": basic_auth(key)},
            ) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
                assert resp.status == 401
            await asyncio.sleep(0.2)
    raise AssertionError(f"{key} not accepted within {deadline_s}s")


async def test_applied_config_takes_effect_within_five_seconds(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline.start()
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", pipeline.bootstrap)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", pipeline.prefix)
    before = sample_events(100, seed=1)
    assert (await send_batches(pipeline.gateway_url, pipeline.write_key, before)).accepted == 100

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        GROWN.replace("{key}", pipeline.write_key).replace(
            "id: audit\n    type: clickhouse",
            "id: audit\n    type: kafka",
        )
    )
    refused = await asyncio.to_thread(CliRunner().invoke, app, ["config", "apply", str(bad)])
    assert refused.exit_code == 1
    assert "destinations.1.type" in refused.output

    grown = tmp_path / "grown.yaml"
    grown.write_text(GROWN.replace("{key}", pipeline.write_key))
    applied = await asyncio.to_thread(CliRunner().invoke, app, ["config", "apply", str(grown)])
    assert applied.exit_code == 0, applied.output
    assert await _post_until_accepted(pipeline, "late-key", 5.0) <= 5.0

    after = sample_events(100, seed=2)
    assert (await send_batches(pipeline.gateway_url, pipeline.write_key, after)).accepted == 100
    expected = 100 + 100 + 1  # both batches and the late source's first event
    assert await asyncio.to_thread(pipeline.wait_rows, expected) >= expected
    # The new destination got everything routed after the change, and the old one lost nothing.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        audit = pipeline.query("SELECT count() FROM audit_events")[0][0]
        if audit >= 101:
            break
        await asyncio.sleep(0.5)
    ids = {r[0] for r in pipeline.query("SELECT event_id FROM audit_events")}
    assert {e["messageId"] for e in after} <= ids
    assert pipeline.query("SELECT count(), uniqExact(event_id) FROM events") == [
        [expected, expected]
    ]
