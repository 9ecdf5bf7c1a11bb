"""DLQ operations on the real broker: list, show, dry run, redrive once, audit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from typer.testing import CliRunner

from ops.cli import app
from ops.dlq import dead_letters
from ops.settings import KafkaSettings
from ops.topics import Topics
from ops.traffic import sample_events, send_batches
from tests.pipeline import free_port, pipeline_with_topics, webhook_receiver

pytestmark = pytest.mark.integration

CONFIG = """
sources:
  - id: test-src
    write_keys: [{key}]
destinations:
  - id: hook
    type: webhook
    sources: [test-src]
    settings: {url: "http://127.0.0.1:PORT/hook", timeout_s: 2}
"""


async def test_redrive_after_the_destination_heals_delivers_every_record_once(
    broker: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 20
    port = free_port()
    healed = False
    delivered: dict[str, int] = {}
    everything = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if not healed:
            return web.Response(status=422, text="schema mismatch")
        delivered[body["messageId"]] = delivered.get(body["messageId"], 0) + 1
        if len(delivered) == count:
            everything.set()
        return web.Response(status=200)

    pipe = pipeline_with_topics(tmp_path, broker, prefix, CONFIG.replace("PORT", str(port)))
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", broker)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", prefix)
    cli = CliRunner()
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start)
        events = sample_events(count, seed=21)
        assert (await send_batches(pipe.gateway_url, pipe.write_key, events)).accepted == count
        for _ in range(120):
            if len(await asyncio.to_thread(dead_letters, kafka, "hook")) == count:
                break
            await asyncio.sleep(0.5)
        letters = await asyncio.to_thread(dead_letters, kafka, "hook")
        assert len(letters) == count
        assert {r.error_class for r in letters} == {"DeliveryRejected"}

        listing = await asyncio.to_thread(cli.invoke, app, ["dlq", "list", "hook"])
        assert listing.exit_code == 0, listing.output
        assert f"{count} records" in listing.output
        shown = await asyncio.to_thread(cli.invoke, app, ["dlq", "show", "hook", letters[0].ref])
        assert shown.exit_code == 0, shown.output
        assert '"sluice.error.message": "HTTP 422: schema mismatch"' in shown.output

        dry = await asyncio.to_thread(cli.invoke, app, ["dlq", "redrive", "hook", "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert f"would redrive {count} of {count}" in dry.output
        await asyncio.sleep(2)
        assert delivered == {}

        healed = True
        first = await asyncio.to_thread(
            cli.invoke, app, ["dlq", "redrive", "hook", "--rate", "100"]
        )
        assert first.exit_code == 0, first.output
        assert f"redrove {count} of {count}" in first.output
        await asyncio.wait_for(everything.wait(), 60)
        again = await asyncio.to_thread(cli.invoke, app, ["dlq", "redrive", "hook"])
        assert f"redrove 0 of {count} matching records ({count} already redriven)" in again.output
        await asyncio.sleep(3)
        await asyncio.to_thread(pipe.stop)

    assert delivered == {e["messageId"]: 1 for e in events}
    audits = await asyncio.to_thread(_audits, kafka)
    assert [(a["dry_run"], a["redriven"]) for a in audits] == [
        (True, 0),
        (False, count),
        (False, 0),
    ]


def _audits(kafka: KafkaSettings) -> list[dict[str, object]]:
    from ops.dlq import read_topic  # noqa: PLC0415

    return [
        orjson.loads(m.value()) for m in read_topic(kafka, Topics(kafka.topic_prefix).dlq_audit)
    ]


def test_unknown_destination_fails_with_one_line(
    monkeypatch: pytest.MonkeyPatch, broker: str
) -> None:
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP_SERVERS", broker)
    monkeypatch.setenv("SLUICE_KAFKA_TOPIC_PREFIX", "nothing-here")
    result = CliRunner().invoke(app, ["dlq", "list", "ghost"])
    assert result.exit_code == 1
    assert "does not exist" in result.output
