"""Webhook destinations cannot be turned against the machine they run on.

`${NAME}` expands only allowed variables (refused at config check otherwise), redirects
are not followed unless configured and never to another origin, and with
SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS no request reaches a loopback, private or
link-local address, whatever the URL's name resolves to. Each refusal at delivery time
is a DLQ record with the reason, through the real delivery process and broker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from core.settings import KafkaSettings
from ops.dlq import DeadLetter, dead_letters
from ops.traffic import sample_events
from tests.configs import Configs
from tests.pipeline import (
    Pipeline,
    envelope_records,
    http_receiver,
    pipeline_with_topics,
    produce,
    until,
)

# Dead-lettered after two attempts, one second apart.
ONE_RETRY = {"tiers": ["1s"], "max_attempts": 2}


async def _letters(
    pipe: Pipeline, destinations: tuple[str, ...], count: int
) -> dict[str, list[DeadLetter]]:
    """Produce `count` events to each destination's topic; wait for `count` dead letters each."""
    kafka = KafkaSettings(bootstrap_servers=pipe.bootstrap, topic_prefix=pipe.prefix)
    for name in destinations:
        records = envelope_records(sample_events(count, seed=len(name)))
        await asyncio.to_thread(produce, kafka, f"{pipe.prefix}.dest.{name}", records)
    found: dict[str, list[DeadLetter]] = {}

    def all_there() -> bool:
        found.update({name: dead_letters(kafka, name) for name in destinations})
        return all(len(found[name]) >= count for name in destinations)

    await until(all_there, 60, f"{count} dead letters for each of {destinations}")
    return found


def _reason(letter: DeadLetter) -> tuple[str, str]:
    return letter.headers["sluice.error.class"], letter.headers["sluice.error.message"]


@pytest.mark.integration
async def test_a_redirect_to_another_host_is_not_followed_and_dead_letters_with_the_reason(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    elsewhere: list[dict[str, str]] = []
    first: list[str] = []

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(dict(request.headers))
        return web.Response(status=200)

    async with http_receiver(other) as other_port:
        target = f"http://localhost:{other_port}/hook"

        async def hook(request: web.Request) -> web.Response:
            first.append(request.headers.get("Authorization", ""))
            raise web.HTTPTemporaryRedirect(target)

        async with http_receiver(hook) as port:
            settings: dict[str, Any] = {
                "url": f"http://127.0.0.1:{port}/hook",
                "retry": ONE_RETRY,
                "headers": {"X-Key": "k"},
                "auth": {"type": "bearer", "token": "${SLUICE_SECRET_CRM_TOKEN}"},
            }
            pipe = pipeline_with_topics(
                tmp_path,
                broker,
                prefix,
                configs.text(
                    configs.webhook(id="plain", **settings),
                    configs.webhook(id="follows", follow_redirects=True, **settings),
                ),
            )
            pipe.env["SLUICE_SECRET_CRM_TOKEN"] = "t0ken"
            await asyncio.to_thread(pipe.start, "deliver")
            try:
                letters = await _letters(pipe, ("plain", "follows"), 5)
            finally:
                await asyncio.to_thread(pipe.stop)

    assert elsewhere == []  # nothing, and so never the destination's Authorization
    assert first
    assert set(first) == {"Bearer t0ken"}
    assert len(letters["plain"]) == 5
    assert {_reason(x)[0] for x in letters["plain"]} == {"RedirectRefused"}
    assert all(
        f"HTTP 307 redirect to '{target}': redirects are not followed" in _reason(x)[1]
        for x in letters["plain"]
    )
    assert {_reason(x)[0] for x in letters["follows"]} == {"RedirectRefused"}
    assert all("another origin" in _reason(x)[1] for x in letters["follows"])
    # Fatal: one attempt each, no retry loop.
    assert {x.headers["sluice.attempts"] for x in letters["plain"] + letters["follows"]} == {"1"}


@pytest.mark.integration
async def test_blocking_private_targets_refuses_loopback_by_address_and_by_name(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    received: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(orjson.loads(await request.read())["messageId"])
        return web.Response(status=200)

    async with http_receiver(hook) as port:
        pipe = pipeline_with_topics(
            tmp_path,
            broker,
            prefix,
            configs.text(
                configs.webhook(f"http://127.0.0.1:{port}/hook", id="by-ip", retry=ONE_RETRY),
                configs.webhook(f"http://localhost:{port}/hook", id="by-name", retry=ONE_RETRY),
            ),
        )
        pipe.env["SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS"] = "true"
        await asyncio.to_thread(pipe.start, "deliver")
        try:
            letters = await _letters(pipe, ("by-ip", "by-name"), 4)
        finally:
            await asyncio.to_thread(pipe.stop)
        assert received == []
        assert {_reason(x) for x in letters["by-ip"]} == {
            ("TargetRefused", "127.0.0.1 is loopback (SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS)")
        }
        [(error_class, message)] = {_reason(x) for x in letters["by-name"]}
        assert error_class == "TargetRefused"
        assert message.startswith("localhost resolves to no public address (")
        assert "127.0.0.1 is loopback" in message
        assert {x.headers["sluice.attempts"] for x in letters["by-ip"]} == {"1"}

        # The same config with the setting off delivers.
        pipe.env["SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS"] = "false"
        kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
        events = {
            name: sample_events(3, seed=40 + i) for i, name in enumerate(("by-ip", "by-name"))
        }
        await asyncio.to_thread(pipe.start, "deliver")
        try:
            for name, batch in events.items():
                await asyncio.to_thread(
                    produce, kafka, f"{prefix}.dest.{name}", envelope_records(batch)
                )
            await until(lambda: len(received) >= 6, 60, "both destinations delivered")
        finally:
            await asyncio.to_thread(pipe.stop)
    assert sorted(received) == sorted(m["messageId"] for b in events.values() for m in b)
    assert len(dead_letters(kafka, "by-ip")) == len(dead_letters(kafka, "by-name")) == 4
