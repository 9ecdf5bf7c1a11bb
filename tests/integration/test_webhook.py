"""Webhook destinations: classification, payloads, and delivery through the real pipeline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from confluent_kafka import Consumer

from core.settings import KafkaSettings
from ops.traffic import sample_events, send_batches
from tests.configs import Configs
from tests.pipeline import free_port, pipeline_with_topics, webhook_receiver


@pytest.mark.integration
async def test_failing_rate_limiting_webhook_gets_every_event_at_the_configured_rate(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    rate, count = 25.0, 150
    port = free_port()
    seen: dict[str, int] = {}
    all_delivered = asyncio.Event()
    rejected = asyncio.Event()
    times: list[float] = []
    requests = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        times.append(time.monotonic())
        body = orjson.loads(await request.read())
        if requests <= 4:
            return web.Response(status=503)  # an outage at the start: the breaker opens
        if requests % 15 == 0:
            return web.Response(status=429, headers={"Retry-After": "1"})
        if body.get("properties", {}).get("poison"):
            rejected.set()
            return web.Response(status=422, text="poison")
        seen[body["messageId"]] = seen.get(body["messageId"], 0) + 1
        if len(seen) == count - 1:
            all_delivered.set()
        return web.Response(status=200)

    config = configs.text(
        configs.webhook(
            f"http://127.0.0.1:{port}/hook",
            rate_limit={"requests_per_s": rate},
            breaker={"failures": 3, "cooldown_s": 1},
            timeout_s=2,
        )
    )
    pipe = pipeline_with_topics(tmp_path, broker, prefix, config)
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    async with webhook_receiver(port, hook):
        await asyncio.to_thread(pipe.start)
        events = sample_events(count, seed=5)
        events[10]["properties"] = {"poison": True}
        report = await send_batches(pipe.gateway_url, pipe.write_key, events)
        assert report.accepted == count
        try:
            await asyncio.wait_for(all_delivered.wait(), 90)
            # The poison event may have met the outage or a 429 first and still be in a
            # retry tier when the rest is in: its 422 and dead letter come later.
            await asyncio.wait_for(rejected.wait(), 60)
            dead = await asyncio.to_thread(_read_all, kafka, f"{prefix}.dest.hook.dlq")
        finally:
            await asyncio.to_thread(pipe.stop)

    assert set(seen) == {e["messageId"] for e in events} - {events[10]["messageId"]}
    steady = times[10:]
    observed = (len(steady) - 1) / (steady[-1] - steady[0])
    assert observed <= rate * 1.1, f"{observed:.1f} requests/s against a limit of {rate}"
    assert len(dead) == 1
    headers = {k: v.decode() for k, v in dead[0]}
    assert headers["sluice.error.class"] == "DeliveryRejected"
    assert headers["sluice.error.message"].startswith("HTTP 422")
    assert headers["sluice.destination"] == "hook"
    assert headers["sluice.original.topic"] == f"{prefix}.dest.hook"
    assert {"sluice.original.partition", "sluice.original.offset", "sluice.attempts"} <= set(
        headers
    )


def _read_all(kafka: KafkaSettings, topic: str) -> list[Any]:
    consumer = Consumer(
        kafka.client_config() | {"group.id": f"{topic}-check", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    found = []
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, timeout=0.5):
                if msg.error() is None:
                    found.append(msg.headers() or [])
            if found:
                deadline = min(deadline, time.monotonic() + 1)
    finally:
        consumer.close()
    return found
