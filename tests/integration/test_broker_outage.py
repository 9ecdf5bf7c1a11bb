"""The gateway while the broker is down: a bounded 503, never a 200, then recovery."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from core.admin import apply_topics
from core.settings import BrokerSettings, GatewaySettings, KafkaSettings
from core.topics import Topics, required_topics
from gateway.app import create_app
from ops.kafka_broker import start_broker, stop_broker
from ops.traffic import basic_auth
from schemas.codec import event_codec
from tests.configs import Configs
from tests.integration.test_gateway import read_topic
from tests.pipeline import free_port

pytestmark = pytest.mark.integration

CONFIG = Configs().model(sources=[Configs().source("web", keys=["k"])])
PRODUCE_TIMEOUT_S = 3.0


async def test_broker_down_gives_bounded_503_and_the_retry_succeeds(
    tmp_path: Path, broker: str
) -> None:
    del broker  # the shared broker must be up too: this test starts one of its own beside it
    own = BrokerSettings(
        port=free_port(), controller_port=free_port(), state_dir=tmp_path / "kafka"
    )
    await asyncio.to_thread(start_broker, own)
    try:
        kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{own.port}", topic_prefix="outage")
        apply_topics(required_topics(CONFIG, kafka), kafka)
        settings = GatewaySettings(produce_timeout_s=PRODUCE_TIMEOUT_S)
        async with TestClient(TestServer(create_app(settings, kafka, CONFIG))) as client:
            batch: dict[str, Any] = {
                "batch": [{"type": "track", "event": "E", "userId": "u", "messageId": "before"}]
            }
            headers = {"Authorization": basic_auth("k")}
            assert (await client.post("/v1/batch", json=batch, headers=headers)).status == 200

            await asyncio.to_thread(stop_broker, own)
            batch = {
                "batch": [{"type": "track", "event": "E", "userId": "u", "messageId": "during"}]
            }
            # Answered within the produce timeout (a client waiting longer gives up).
            answer_within = aiohttp.ClientTimeout(total=PRODUCE_TIMEOUT_S + 5)
            resp = await client.post(
                "/v1/batch", json=batch, headers=headers, timeout=answer_within
            )
            assert resp.status == 503
            assert resp.headers["Retry-After"]
            assert "unavailable" in (await resp.json())["error"]
            assert (await client.get("/ready")).status == 503

            await asyncio.to_thread(start_broker, own)
            statuses = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                resp = await client.post("/v1/batch", json=batch, headers=headers)
                statuses.append(resp.status)
                if resp.status == 200:
                    break
            assert statuses[-1] == 200, statuses
            assert set(statuses) <= {200, 503}

        ids = [
            event_codec().decode(m.value())["event_id"]
            for m in read_topic(kafka, Topics("outage").ingest, 2)
        ]
        assert ids.count("before") == 1
        assert ids.count("during") >= 1
    finally:
        await asyncio.to_thread(stop_broker, own)
