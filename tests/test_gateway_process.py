"""The gateway as a real process: killed under load it loses no acked event; bombs stay small."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
import zlib
from pathlib import Path

import aiohttp
import pytest

from ops.settings import KafkaSettings
from ops.topics import Topics
from ops.traffic import basic_auth
from schemas.codec import event_codec
from tests.pipeline import Pipeline
from tests.test_gateway import read_topic

pytestmark = pytest.mark.integration

RATE = 200  # requests a second
EVENTS_PER_REQUEST = 5


async def _load_until_killed(pipe: Pipeline, sig: signal.Signals) -> set[str]:
    """Post at RATE requests/s; signal the gateway after 2 s; the ids of acked events."""
    acked: set[str] = set()
    headers = {"Authorization": basic_auth(pipe.write_key)}

    async def post(session: aiohttp.ClientSession) -> None:
        ids = [str(uuid.uuid4()) for _ in range(EVENTS_PER_REQUEST)]
        batch = [
            {"type": "track", "event": "E", "userId": f"u{i}", "messageId": m}
            for i, m in enumerate(ids)
        ]
        try:
            async with session.post(
                f"{pipe.gateway_url}/v1/batch", json={"batch": batch}, headers=headers
            ) as resp:
                if resp.status == 200:
                    acked.update(ids)
        except (aiohttp.ClientError, OSError):
            pass  # the gateway is gone: no ack, no promise

    pid = pipe.pid("gateway")
    tasks: list[asyncio.Task[None]] = []
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.monotonic()
        killed = False
        while time.monotonic() - started < 3.0:
            tasks.append(asyncio.create_task(post(session)))
            if not killed and time.monotonic() - started > 2.0:
                os.kill(pid, sig)
                killed = True
            await asyncio.sleep(1 / RATE)
        await asyncio.gather(*tasks)
    return acked


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_every_acked_event_survives_the_gateway_dying(
    pipeline: Pipeline, sig: signal.Signals
) -> None:
    pipeline.start("gateway")
    acked = await _load_until_killed(pipeline, sig)

    assert len(acked) >= RATE * EVENTS_PER_REQUEST, "the load must run a while before the kill"
    kafka = KafkaSettings(bootstrap_servers=pipeline.bootstrap, topic_prefix=pipeline.prefix)
    records = await asyncio.to_thread(
        read_topic, kafka, Topics(pipeline.prefix).ingest, len(acked), 60
    )
    on_topic = {event_codec().decode(r.value())["event_id"] for r in records}
    assert acked - on_topic == set()
    if sig == signal.SIGTERM:
        # A graceful stop finishes what it took in: every event on the topic was acked.
        assert on_topic == acked
        assert pipeline.services["gateway"].pid() is None


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _bomb(inflated_mb: int) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"[" + b" " * (1024 * 1024 - 1)
    parts = [deflate.compress(b'{"batch": ')]
    parts.extend(deflate.compress(chunk) for _ in range(inflated_mb))
    parts.append(deflate.flush())
    return b"".join(parts)


async def test_gzip_bomb_gets_413_fast_without_growing_the_process(pipeline: Pipeline) -> None:
    pipeline.start("gateway")
    pid = pipeline.pid("gateway")
    bomb = _bomb(1024)  # 1 GiB inflated
    assert len(bomb) < 2 * 1024 * 1024
    headers = {
        "Authorization": basic_auth(pipeline.write_key),
        "Content-Encoding": "gzip",
        "Content-Type": "application/json",
    }
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{pipeline.gateway_url}/health") as warm:
            assert warm.status == 200
        before = _rss_kb(pid)
        started = time.monotonic()
        async with session.post(
            f"{pipeline.gateway_url}/v1/batch", data=bomb, headers=headers
        ) as resp:
            elapsed = time.monotonic() - started
            assert resp.status == 413
            assert "request body exceeds" in (await resp.json())["error"]
    assert elapsed < 1.0
    assert _rss_kb(pid) - before < 50 * 1024
