"""`sluice replay`: a range delivered again leaves no duplicate rows in the warehouse, and a
time range from the ingest topic reaches a webhook again through its filter."""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from typer.testing import CliRunner

from ops.cli import app
from ops.traffic import sample_events, send_batches
from tests.configs import Configs
from tests.pipeline import free_port, http_text, pipeline_with_topics, until, webhook_receiver


async def test_replays_deliver_again_without_duplicate_rows(
    configs: Configs, broker: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    seen: dict[str, int] = defaultdict(int)

    async def hook(request: web.Request) -> web.Response:
        seen[orjson.loads(await request.read())["messageId"]] += 1
        return web.Response(status=200)

    pipe = pipeline_with_topics(
        tmp_path,
        broker,
        prefix,
        configs.text(
            configs.warehouse(),
            configs.webhook(
                f"http://127.0.0.1:{port}/hook", filter={"allow_types": ["track"]}, timeout_s=2
            ),
        ),
    )
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", broker)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", prefix)
    cli = CliRunner()
    config = ["--config", str(pipe.root / "sluice.yaml")]
    first, second = sample_events(150, seed=31), sample_events(150, seed=32)
    tracks = {e["messageId"] for e in first + second if e["type"] == "track"}
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start)
        try:
            assert (await send_batches(pipe.gateway_url, pipe.write_key, first)).accepted == 150
            await asyncio.sleep(1.5)
            between = datetime.now(UTC).isoformat()
            await asyncio.sleep(0.5)
            assert (await send_batches(pipe.gateway_url, pipe.write_key, second)).accepted == 150
            assert await asyncio.to_thread(pipe.wait_rows, 300) == 300
            await until(lambda: set(seen) == tracks, 60)

            # The warehouse's whole topic once more: every copy is skipped, no row added.
            dry = await asyncio.to_thread(
                cli.invoke, app, ["replay", "warehouse", "--from-offset", "0", "--dry-run", *config]
            )
            assert dry.exit_code == 0, dry.output
            assert "would replay 300 records of 300 read" in dry.output
            done = await asyncio.to_thread(
                cli.invoke, app, ["replay", "warehouse", "--from-offset", "0", *config]
            )
            assert done.exit_code == 0, done.output
            assert "replayed 300 records of 300 read" in done.output
            await until(lambda: _deduplicated(pipe.query_port) >= 300, 60)
            assert pipe.query("SELECT count(), uniqExact(event_id) FROM events") == [[300, 300]]

            # The second half again, read from the ingest topic by time: through the
            # webhook's filter (tracks only), so only its tracks go out once more.
            again = await asyncio.to_thread(
                cli.invoke,
                app,
                [
                    "replay",
                    "hook",
                    "--topic",
                    f"{prefix}.events.ingest",
                    "--since",
                    between,
                    *config,
                ],
            )
            assert again.exit_code == 0, again.output
            second_tracks = {e["messageId"] for e in second if e["type"] == "track"}
            assert f"replayed {len(second_tracks)} records of 150 read" in again.output
            await until(lambda: sum(seen.values()) == len(tracks) + len(second_tracks), 60)
        finally:
            await asyncio.to_thread(pipe.stop)
    assert {m for m, n in seen.items() if n == 2} == second_tracks
    assert {m for m, n in seen.items() if n == 1} == tracks - second_tracks


def _deduplicated(port: int) -> float:
    text = http_text(f"http://127.0.0.1:{port}/metrics")
    found = re.search(r"^sluice_sink_deduplicated_records_total\{[^}]*\} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0
