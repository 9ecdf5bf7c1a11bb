"""The worker's HTTP endpoint: `/metrics`, `/health` and `/ready`, served from a thread.

A thread of its own, not the worker's event loop: a loop that is wedged (a batch that
never completes) still gets a truthful answer, `/ready` 503 once the stall watchdog says
so. `/health` says the process is up and its agent alive; `/ready` also needs the agent to
have moved its input on within `SLUICE_WORKER_STALL_AFTER_S` whenever input is waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app

from core.watchdog import StallWatchdog

StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds: no access log."""


def health_app(
    registry: CollectorRegistry, watchdog: StallWatchdog, died: Callable[[], str | None]
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The WSGI app: `/health` and `/ready` as JSON, everything else the metrics.

    `died()` is why the agent stopped, or None while it runs.
    """
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/health", "/ready"):
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        problem = watchdog.problem() if path == "/ready" else died()
        if problem is None:
            status, body = "200 OK", {"status": "ready" if path == "/ready" else "ok"}
        else:
            status, body = "503 Service Unavailable", {"status": "not ready", "reason": problem}
        data = orjson.dumps(body | {"seconds_since_progress": round(watchdog.seconds_stalled(), 1)})
        start_response(
            status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        )
        return [data]

    return app


def serve(
    host: str,
    port: int,
    registry: CollectorRegistry,
    watchdog: StallWatchdog,
    died: Callable[[], str | None],
) -> WSGIServer:
    """Serve the endpoint on a daemon thread; raises OSError when the port is taken."""
    server = make_server(
        host,
        port,
        health_app(registry, watchdog, died),
        server_class=_Server,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="sluice-health", daemon=True).start()
    return server
