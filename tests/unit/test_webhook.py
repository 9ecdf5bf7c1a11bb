"""Webhook destinations: classification, payloads, and delivery through the real pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connectors.errors import DeliveryRejected, DestinationUnavailable
from connectors.webhook import WebhookClient, payload, webhook_session
from core.config import WebhookConfig
from core.settings import DeliverySettings

STATUS = web.AppKey("status", list[int])


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Any, list[int]]]:
    """A webhook that answers the status codes it is told to, one per request."""
    app = web.Application()
    app[STATUS] = []

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        status = request.app[STATUS].pop(0) if request.app[STATUS] else 200
        if status == 0:
            await asyncio.sleep(5)
        headers = {"Retry-After": "2"} if status == 429 else {}
        return web.Response(status=status or 200, text="x", headers=headers)

    app.router.add_post("/hook", hook)
    async with TestServer(app) as server:
        yield server, app[STATUS]


@pytest.mark.parametrize(
    ("status", "error", "retry_after"),
    [
        (200, None, None),
        (500, DestinationUnavailable, None),
        (429, DestinationUnavailable, 2.0),
        (408, DestinationUnavailable, None),
        (400, DeliveryRejected, None),
        (404, DeliveryRejected, None),
        (0, DestinationUnavailable, None),
    ],
)
async def test_responses_are_classified(
    receiver: tuple[TestServer, list[int]],
    status: int,
    error: type[Exception] | None,
    retry_after: float | None,
) -> None:
    server, statuses = receiver
    statuses.append(status)
    cfg = WebhookConfig.model_validate({"url": str(server.make_url("/hook")), "timeout_s": 1})
    event = {
        "event_id": "e",
        "type": "track",
        "event": "E",
        "user_id": "u",
        "anonymous_id": None,
        "timestamp": 0,
        "received_at": 0,
        "sent_at": None,
        "original_timestamp": None,
        "context": "{}",
        "properties": '{"a": 1}',
        "traits": "{}",
        "source_id": "s",
        "group_id": None,
        "previous_id": None,
    }
    settings = DeliverySettings()
    async with webhook_session(settings) as session:
        client = WebhookClient(cfg, session, settings)
        if error is None:
            await client.send([event])
            return
        with pytest.raises(error) as caught:
            await client.send([event])
    if retry_after is not None:
        assert isinstance(caught.value, DestinationUnavailable)
        assert caught.value.retry_after == retry_after


def test_payload_is_segment_shaped() -> None:
    body = payload(
        {
            "event_id": "m1",
            "type": "track",
            "event": "Paid",
            "user_id": "u1",
            "anonymous_id": None,
            "timestamp": 1_700_000_000_123,
            "received_at": 1_700_000_000_500,
            "sent_at": None,
            "original_timestamp": None,
            "context": '{"ip": "1.2.3.4"}',
            "properties": '{"n": 2}',
            "traits": "{}",
            "source_id": "web",
            "group_id": None,
            "previous_id": None,
        }
    )
    assert body == {
        "messageId": "m1",
        "type": "track",
        "event": "Paid",
        "userId": "u1",
        "timestamp": "2023-11-14T22:13:20.123Z",
        "receivedAt": "2023-11-14T22:13:20.500Z",
        "context": {"ip": "1.2.3.4"},
        "properties": {"n": 2},
        "sourceId": "web",
    }
