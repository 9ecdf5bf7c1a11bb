"""A minute of load while the gateway, the worker, the sink and the delivery process are
SIGKILLed in turn: nothing acknowledged is lost, and a plain `count()` is the truth.

The client behaves as an SDK does: a batch whose answer it did not get (the gateway died
with the request in flight, or was down) is sent again with the same `messageId`s until
the gateway acknowledges it. So copies reach the warehouse's topic both ways: events the
gateway took in before it died and that the client sent again, and events the worker
routed again after a kill (it processes at least once). The sink's copy window must keep
every table at one row per event without `FINAL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from core.settings import KafkaSettings
from ops.traffic import basic_auth, sample_events
from schemas.codec import event_codec
from tests.configs import Configs
from tests.pipeline import Pipeline, http_receiver, pipeline_with_topics, read_records, until

pytestmark = pytest.mark.integration

LOAD_S = 60.0
KILL_EVERY_S = 3.5
REQUESTS_PER_S = 10
EVENTS_PER_REQUEST = 10
VICTIMS = ("gateway", "worker", "sink", "deliver")


async def _send_until_acked(
    session: aiohttp.ClientSession, pipe: Pipeline, batch: list[dict[str, Any]]
) -> int:
    """POST the batch until the gateway answers 200 (the same messageIds every time);
    how many tries it took."""
    headers = {"Authorization": basic_auth(pipe.write_key)}
    tries = 0
    while True:
        tries += 1
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            async with session.post(
                f"{pipe.gateway_url}/v1/batch", json={"batch": batch}, headers=headers
            ) as resp:
                if resp.status == 200:
                    return tries
                assert resp.status >= 500, await resp.text()  # a 4xx is the test's fault
        await asyncio.sleep(0.3)


def _kill_and_restart(pipe: Pipeline, name: str) -> None:
    pid = pipe.pid(name)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pipe.services[name].pid() is not None:
        assert time.monotonic() < deadline, f"{name} outlived SIGKILL"
        time.sleep(0.05)
    pipe.start(name)


def _plain_counts(pipe: Pipeline) -> dict[str, list[int]]:
    """`count()` next to `uniqExact` of the event id, without FINAL, in each table."""
    return {
        table: [int(v) for v in pipe.query(f"SELECT count(), uniqExact({column}) FROM {table}")[0]]
        for table, column in (
            ("events", "event_id"),
            ("tracks", "id"),
            ("identifies", "id"),
            ("order_completed", "id"),
        )
    }


async def test_a_minute_of_kills_loses_nothing_and_leaves_one_row_per_event(
    configs: Configs, broker: str, prefix: str, tmp_path: Path
) -> None:
    delivered: Counter[str] = Counter()

    async def hook(request: web.Request) -> web.Response:
        delivered[orjson.loads(await request.read())["messageId"]] += 1
        return web.Response(status=200)

    requests = int(LOAD_S * REQUESTS_PER_S)
    events = sample_events(requests * EVENTS_PER_REQUEST, users=300, seed=19)
    batches = [
        events[i : i + EVENTS_PER_REQUEST] for i in range(0, len(events), EVENTS_PER_REQUEST)
    ]
    async with http_receiver(hook) as port:
        config = configs.text(
            configs.warehouse(retry={"tiers": ["1s", "3s"], "max_attempts": 3}),
            configs.webhook(f"http://127.0.0.1:{port}/hook"),
        )
        pipe = pipeline_with_topics(tmp_path, broker, prefix, config)
        await asyncio.to_thread(pipe.start)
        kills: list[str] = []
        loading = asyncio.Event()

        async def killer() -> None:
            # A SIGKILL every few seconds, round-robin; each victim is started again at once.
            began = time.monotonic()
            while loading.is_set():
                tick = began + (len(kills) + 1) * KILL_EVERY_S
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
                if loading.is_set():
                    victim = VICTIMS[len(kills) % len(VICTIMS)]
                    await asyncio.to_thread(_kill_and_restart, pipe, victim)
                    kills.append(victim)

        surplus: list[dict[str, list[int]]] = []

        async def watcher() -> None:
            # Plain counts all along, not only at the end: the engine's merges collapse
            # copies of an event sooner or later, and a reader sees them until it does.
            while loading.is_set():
                with contextlib.suppress(OSError):  # the sink is being restarted
                    counts = await asyncio.to_thread(_plain_counts, pipe)
                    if any(n != unique for n, unique in counts.values()):
                        surplus.append(counts)
                await asyncio.sleep(0.5)

        try:
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                loading.set()
                chaos = asyncio.create_task(killer())
                watching = asyncio.create_task(watcher())
                started = time.monotonic()
                sending: list[asyncio.Task[int]] = []
                for i, batch in enumerate(batches):
                    sending.append(asyncio.create_task(_send_until_acked(session, pipe, batch)))
                    await asyncio.sleep(
                        max(0.0, started + (i + 1) / REQUESTS_PER_S - time.monotonic())
                    )
                # On a slow machine a kill and restart take longer than KILL_EVERY_S: the
                # kills go on (the last batches still in flight) until each victim had 3.
                await until(lambda: len(kills) >= 3 * len(VICTIMS), 60, "3 kills of each")
                loading.clear()
                await chaos
                await watching
                tries = await asyncio.wait_for(asyncio.gather(*sending), 120)
            acked = {e["messageId"] for e in events}  # every batch was acknowledged at last
            assert all(kills.count(v) >= 3 for v in VICTIMS), kills

            expected = {
                "events": len(events),
                "tracks": sum(e["type"] == "track" for e in events),
                "identifies": sum(e["type"] == "identify" for e in events),
                "order_completed": sum(e.get("event") == "Order Completed" for e in events),
            }
            await until(
                lambda: pipe.wait_rows(len(events), timeout=5) >= len(events),
                300,
                "every acknowledged event in the warehouse",
            )
            await until(lambda: set(delivered) >= acked, 300, "every acknowledged event delivered")
            # The tables of a batch are written one after another: wait for the last one.
            await until(
                lambda: all(c[0] >= expected[t] for t, c in _plain_counts(pipe).items()),
                60,
                "every table loaded",
            )
            await asyncio.sleep(2)  # copies arriving late would show now
            counts = await asyncio.to_thread(_plain_counts, pipe)
            kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
            routed = await asyncio.to_thread(read_records, kafka, f"{prefix}.dest.warehouse")
            codec = event_codec()
            copies = len(routed) - len({codec.decode(r.value())["event_id"] for r in routed})
        finally:
            await asyncio.to_thread(pipe.stop)

    # Not one row too many or too few in any table, read plainly, then or at any time.
    assert counts == {table: [n, n] for table, n in expected.items()}
    assert surplus == []
    # The test is only worth something if copies reached the sink and it dropped them:
    # batches the client sent again, events the worker routed again.
    assert sum(t > 1 for t in tries) > 0, "no batch was ever sent again"
    assert copies > 0, "no copy reached the warehouse's topic"
