"""Sample traffic: realistic Segment-style events, and a batched HTTP sender."""

from __future__ import annotations

import asyncio
import base64
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

EVENT_NAMES = ("Product Viewed", "Product Added", "Checkout Started", "Order Completed")


def sample_events(count: int, users: int = 20, seed: int | None = None) -> list[dict[str, Any]]:
    """`count` track/identify/page messages as an SDK sends them, each with a unique messageId."""
    rng = random.Random(seed)  # noqa: S311 - sample data, not secrets
    now = datetime.now(UTC)
    events: list[dict[str, Any]] = []
    for i in range(count):
        user = f"user-{rng.randrange(users):04d}"
        ts = (now - timedelta(seconds=count - i)).isoformat(timespec="milliseconds")
        kind = rng.choices(("track", "identify", "page"), weights=(8, 1, 1))[0]
        msg: dict[str, Any] = {
            "type": kind,
            "messageId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "userId": user,
            "timestamp": ts,
            "sentAt": now.isoformat(timespec="milliseconds"),
            "context": {"library": {"name": "sluice-sample", "version": "1"}, "ip": "127.0.0.1"},
        }
        if kind == "track":
            msg["event"] = rng.choice(EVENT_NAMES)
            msg["properties"] = {"price": round(rng.uniform(1, 200), 2), "sku": f"SKU-{i % 50}"}
        elif kind == "identify":
            msg["traits"] = {"email": f"{user}@example.com", "plan": rng.choice(("free", "pro"))}
        else:
            msg["name"] = rng.choice(("Home", "Pricing", "Docs"))
            msg["properties"] = {"path": "/" + msg["name"].lower()}
        events.append(msg)
    return events


def basic_auth(write_key: str) -> str:
    """The Authorization header value SDKs send: the write key as the Basic username."""
    return "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()


@dataclass
class SendReport:
    """What the gateway answered."""

    accepted: int = 0
    rejected: int = 0
    failed_requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


async def send_batches(
    url: str,
    write_key: str,
    events: list[dict[str, Any]],
    batch_size: int = 100,
    concurrency: int = 4,
    on_progress: Callable[[int], None] | None = None,
    retries: int = 5,
) -> SendReport:
    """POST `events` to `url`/v1/batch in batches; 503s are retried with backoff."""
    report = SendReport()
    batches = [events[i : i + batch_size] for i in range(0, len(events), batch_size)]
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    headers = {"Authorization": basic_auth(write_key), "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=30)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            for attempt in range(retries + 1):
                async with session.post(
                    f"{url}/v1/batch", json={"batch": batch}, headers=headers
                ) as resp:
                    report.statuses[resp.status] = report.statuses.get(resp.status, 0) + 1
                    if resp.status == 503 and attempt < retries:
                        await asyncio.sleep(0.5 * 2**attempt)
                        continue
                    body = await resp.json(content_type=None)
                    if resp.status >= 500:
                        report.failed_requests += 1
                    else:
                        report.accepted += int(body.get("accepted", 0))
                        report.rejected += len(body.get("rejected", []))
                    break
            if on_progress:
                on_progress(len(batch))

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return report
