"""The process shell answers /health, /ready and /metrics the same way in every process."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter

from core.shell import Probe, Probes


def _probes(health: Probe, ready: Probe) -> Probes:
    registry = CollectorRegistry()
    Counter("sluice_things_total", "Things.", registry=registry).inc(3)
    return Probes(registry, lambda: health, lambda: ready, lambda: {"seconds_since_progress": 1.5})


async def _get(probes: Probes, path: str) -> tuple[int, Any]:
    app = web.Application()
    probes.add_routes(app)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get(path)
        body = await resp.read()
        return resp.status, orjson.loads(body) if path != "/metrics" else body.decode()


async def test_a_process_that_is_fine_is_healthy_and_ready() -> None:
    probes = _probes(None, None)
    assert await _get(probes, "/health") == (200, {"status": "ok", "seconds_since_progress": 1.5})
    assert await _get(probes, "/ready") == (200, {"status": "ready", "seconds_since_progress": 1.5})
    status, text = await _get(probes, "/metrics")
    assert status == 200
    assert "sluice_things_total 3.0" in text


async def test_problems_are_503_with_the_reason_or_a_reason_per_part() -> None:
    probes = _probes("loop died: boom", {"hook": "stalled"})
    status, body = await _get(probes, "/health")
    assert (status, body["status"], body["reason"]) == (503, "failed", "loop died: boom")
    status, body = await _get(probes, "/ready")
    assert (status, body["status"], body["problems"]) == (503, "not ready", {"hook": "stalled"})


async def test_a_check_may_be_a_coroutine_on_aiohttp() -> None:
    async def broker_away() -> Probe:
        return "broker unreachable"

    probes = Probes(CollectorRegistry(), ready=broker_away)
    status, body = await _get(probes, "/ready")
    assert (status, body) == (503, {"status": "not ready", "reason": "broker unreachable"})


def test_served_from_a_thread_it_answers_the_same() -> None:
    probes = _probes(None, "agent stalled: 10 records waiting")
    server = probes.serve_in_thread("127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
            assert (resp.status, orjson.loads(resp.read())["status"]) == (200, "ok")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/ready", timeout=5)
        body = orjson.loads(refused.value.read())
        assert (refused.value.code, body["reason"]) == (503, "agent stalled: 10 records waiting")
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            assert "sluice_things_total 3.0" in resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
