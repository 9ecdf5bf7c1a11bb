"""The HTTP load generator: posts bodies over many connections in a process of its own.

It runs in a spawned process with an interpreter and a uvloop event loop of its own; the
results come back through a queue.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
from typing import Any


def _load(
    url: str,
    path: str,
    bodies: list[bytes],
    events_per_body: int,
    connections: int,
    seconds: float,
    out: Any,
) -> None:
    """Load generator (runs in its own process): posts for `seconds`, reports via `out`."""
    import aiohttp  # noqa: PLC0415
    import uvloop  # noqa: PLC0415

    from ops.traffic import basic_auth  # noqa: PLC0415

    async def main() -> dict[str, Any]:
        headers = {"Authorization": basic_auth("bench-key"), "Content-Type": "application/json"}
        latencies: list[float] = []
        failures = 0
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker(n: int, until: float, record: bool) -> None:
                nonlocal failures
                i = n
                while time.perf_counter() < until:
                    started = time.perf_counter()
                    async with session.post(
                        url + path, data=bodies[i % len(bodies)], headers=headers
                    ) as resp:
                        await resp.read()
                        if record:
                            if resp.status == 200:
                                latencies.append(time.perf_counter() - started)
                            else:
                                failures += 1
                    i += connections

            warm = time.perf_counter() + 2.0
            await asyncio.gather(*(worker(n, warm, False) for n in range(connections)))
            started = time.perf_counter()
            await asyncio.gather(*(worker(n, started + seconds, True) for n in range(connections)))
            elapsed = time.perf_counter() - started
        latencies.sort()
        return {
            "requests_per_s": len(latencies) / elapsed,
            "events_per_s": len(latencies) * events_per_body / elapsed,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
            "failures": failures,
        }

    out.put(uvloop.run(main()))


def run_load(
    url: str, path: str, bodies: list[bytes], per_body: int, connections: int, seconds: float
) -> dict[str, Any]:
    """Post `bodies` (in turn) to `url + path` for `seconds` after a 2 s warm-up.

    Returns requests/s, events/s (`per_body` events a body), p50 and p99 latency of the
    200 answers, and how many answers were not 200.
    """
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_load, args=(url, path, bodies, per_body, connections, seconds, queue)
    )
    proc.start()
    result: dict[str, Any] = queue.get(timeout=seconds + 120)
    proc.join()
    return result
