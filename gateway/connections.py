"""Serving the gateway: bounded connections and bounded time to read a request.

aiohttp has no limit on open connections and no deadline for a request's head, so
a client that opens thousands of sockets, or sends a byte a second, holds the process's
resources for as long as it likes. Here:

- `LimitedSite` listens like `web.TCPSite`, but each connection passes a gate first: past
  `max_connections` open at once, a connection gets a `503` and is closed, without an HTTP
  handler made for it.
- aiohttp's keep-alive timer closes a connection whose request head is not complete
  `read_timeout_s` after it opened or after its previous response (the same timer closes
  idle keep-alive connections); the ingest handlers bound the body's time
  (`gateway.ingest.read_body`).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from typing import Final, cast

import orjson
import structlog
from aiohttp import web

from core.settings import GatewaySettings
from gateway.metrics import GatewayMetrics

log = structlog.get_logger("sluice.gateway")

_REFUSAL_BODY: Final = orjson.dumps({"error": "too many connections; retry later"})
REFUSAL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n\r\n" + _REFUSAL_BODY
)
"""What a connection past the limit receives before it is closed."""
# Lingering reads (and drops) a body a handler did not read, so that the client sees
# the response rather than a reset; a trickling client is not worth more than this.
_LINGER_S: Final = 2.0


class _Gate:
    """Counts open connections against a limit."""

    def __init__(self, limit: int, metrics: GatewayMetrics) -> None:
        self.limit = limit
        self.open = 0
        self.metrics = metrics

    def enter(self) -> bool:
        if self.open >= self.limit:
            self.metrics.refused_connections.inc()
            return False
        self.open += 1
        self.metrics.connections.set(self.open)
        return True

    def leave(self) -> None:
        self.open -= 1
        self.metrics.connections.set(self.open)


class _Gated(asyncio.Protocol):
    """One connection: handed to aiohttp's handler if the gate lets it in, else refused."""

    __slots__ = ("_gate", "_inner", "_server")

    def __init__(self, server: web.Server, gate: _Gate) -> None:
        self._server = server
        self._gate = gate
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._gate.enter():
            cast(asyncio.Transport, transport).write(REFUSAL)
            transport.close()
            return
        self._inner = self._server()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            self._gate.leave()
            inner.connection_lost(exc)


class LimitedSite(web.BaseSite):
    """A TCP site whose connections pass a `_Gate` of `max_connections`."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        max_connections: int,
        metrics: GatewayMetrics,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._gate = _Gate(max_connections, metrics)

    @property
    def name(self) -> str:
        """The URL the site serves."""
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        """Listen; each accepted connection goes through the gate."""
        await super().start()
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        gate = self._gate
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gated(server, gate),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )


def _allow_files(connections: int) -> None:
    # Each connection is a file descriptor: make room for the limit (and the producer's
    # sockets) where the soft limit is lower than that and the hard one allows it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            log.warning("open file limit below max_connections", limit=target)


def serve(
    app: web.Application,
    settings: GatewaySettings,
    metrics: GatewayMetrics,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Serve `app` on `settings.host:port` until SIGTERM/SIGINT, as `web.run_app` does.

    In-flight requests finish (up to the produce timeout) and the app's cleanup contexts
    run before this returns.
    """
    _allow_files(settings.max_connections)

    async def main() -> None:
        runner = web.AppRunner(
            app,
            handle_signals=True,
            access_log=None,
            shutdown_timeout=settings.produce_timeout_s + 5,
            keepalive_timeout=settings.read_timeout_s,
            lingering_time=min(_LINGER_S, settings.read_timeout_s),
        )
        await runner.setup()
        try:
            site = LimitedSite(
                runner, settings.host, settings.port, settings.max_connections, metrics
            )
            await site.start()
            # Until a signal raises GracefulExit out of the loop and this task is cancelled.
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.set_event_loop(loop)
    task = loop.create_task(main())
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
        rest = asyncio.all_tasks(loop)
        for left in rest:
            left.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
