"""The gateway as a real process: killed under load it loses no acked event; bombs stay small."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import aiohttp
import orjson
import pytest

from core.settings import KafkaSettings
from core.topics import Topics
from ops.traffic import basic_auth
from schemas.codec import event_codec
from tests.integration.test_gateway import read_topic
from tests.pipeline import Pipeline, http_text

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


async def test_gzip_bomb_gets_413_without_inflating_or_growing_the_process(
    pipeline: Pipeline,
) -> None:
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
        # Inflating a GiB would take longer than this client waits.
        async with session.post(
            f"{pipeline.gateway_url}/v1/batch",
            data=bomb,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            assert resp.status == 413
            assert "request body exceeds" in (await resp.json())["error"]
    assert _rss_kb(pid) - before < 50 * 1024


def _connect(pipe: Pipeline) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", pipe.gateway_port), timeout=30)
    sock.settimeout(30)
    return sock


def _cut_off(sock: socket.socket, data: bytes, interval: float) -> bool:
    """Send `data` a byte every `interval` s; whether the gateway let go before the end."""
    sock.setblocking(False)
    try:
        for byte in data:
            try:
                sock.send(bytes((byte,)))
                received = sock.recv(4096)
            except BlockingIOError:
                received = None
            except (ConnectionResetError, BrokenPipeError):
                return True
            if received is not None:
                # A 408 or the end of the stream: either way the gateway let go.
                return True
            time.sleep(interval)
    finally:
        sock.close()
    return False


def _health(pipe: Pipeline) -> int:
    with urllib.request.urlopen(f"{pipe.gateway_url}/health", timeout=5) as resp:
        status: int = resp.status
        return status


@pytest.mark.parametrize("part", ["head", "body"])
async def test_a_client_sending_a_byte_a_second_is_cut_off_while_others_are_served(
    pipeline: Pipeline, part: str
) -> None:
    pipeline.env["SLUICE_GATEWAY_READ_TIMEOUT_S"] = "2"
    pipeline.start("gateway")
    body = orjson.dumps({"batch": [{"type": "track", "event": "E", "userId": "u"}]})
    head = (
        f"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: {basic_auth(pipeline.write_key)}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    slow = [_connect(pipeline) for _ in range(5)]
    if part == "body":
        for sock in slow:
            sock.sendall(head)
        trickle = body
    else:
        trickle = head
    cut_off, served = await asyncio.gather(
        asyncio.gather(*(asyncio.to_thread(_cut_off, sock, trickle, 0.5) for sock in slow)),
        asyncio.to_thread(lambda: [_health(pipeline) for _ in range(10)]),
    )
    # The read timeout is 2 s; sending the whole request this way would take over a minute.
    assert cut_off == [True] * len(slow)
    assert served == [200] * 10
    assert _health(pipeline) == 200


def test_a_slow_body_gets_408(pipeline: Pipeline) -> None:
    pipeline.env["SLUICE_GATEWAY_READ_TIMEOUT_S"] = "1"
    pipeline.start("gateway")
    sock = _connect(pipeline)
    auth = basic_auth(pipeline.write_key)
    sock.sendall(
        f"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
        "Content-Length: 100\r\n\r\n{".encode()
    )
    answer = sock.recv(4096)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"request body not received within 1 s" in answer


def test_connections_past_the_limit_are_refused_until_others_close(pipeline: Pipeline) -> None:
    pipeline.env["SLUICE_GATEWAY_MAX_CONNECTIONS"] = "5"
    pipeline.env["SLUICE_GATEWAY_READ_TIMEOUT_S"] = "60"
    pipeline.start("gateway")
    held = [_connect(pipeline) for _ in range(5)]
    time.sleep(0.5)
    extra = _connect(pipeline)
    refused = extra.recv(4096)
    assert refused.startswith(b"HTTP/1.1 503"), refused
    assert b"too many connections" in refused
    assert extra.recv(4096) == b""  # and closed
    extra.close()
    # The held connections still work.
    held[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert held[0].recv(4096).startswith(b"HTTP/1.1 200")
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert _health(pipeline) == 200
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    text = http_text(f"{pipeline.gateway_url}/metrics")
    assert "sluice_gateway_refused_connections_total 1.0" in text
