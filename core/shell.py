"""The process shell: `/health`, `/ready` and `/metrics` of every Sluice process, and serving.

Each process (gateway, worker, sink, delivery, and the job and workflow processes to
come) says what makes it unhealthy and what makes it not ready as two checks; the shell
answers the probes the same way everywhere:

- `GET /health`: 200 `{"status": "ok"}`, or 503 `{"status": "failed", ...}` once the
  process cannot recover (a loop died): its supervisor should restart it.
- `GET /ready`: 200 `{"status": "ready"}`, or 503 `{"status": "not ready", ...}` while it
  cannot do its work (stalled, broker away): take it out of rotation.
- `GET /metrics`: the process's Prometheus registry.

A check returns None when all is well, a reason (`"reason": ...` in the answer), or a
reason per part (`"problems": {...}`). `details` adds fields to every answer. The shell
serves on the process's aiohttp app (`Probes.add_routes`, `run_app`) or, for a process
whose event loop belongs to someone else (the Faust worker), from a thread of its own,
so that a wedged loop still gets a truthful answer (`Probes.serve_in_thread`).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# None: fine; a reason; or a reason per part (destination, agent, ...).
Probe = str | dict[str, str] | None
Check = Callable[[], Probe | Awaitable[Probe]]
StartResponse = Callable[..., Any]


def joined(*reasons: str | None) -> str | None:
    """One reason from several checks of a process: those that fail, in order, joined by
    "; " (None when none fails)."""
    found = [reason for reason in reasons if reason is not None]
    return "; ".join(found) if found else None


def _fine() -> Probe:
    return None


def _nothing() -> dict[str, Any]:
    return {}


@dataclass
class Probes:
    """What one process answers on `/health`, `/ready` and `/metrics`."""

    registry: CollectorRegistry
    health: Check = _fine
    ready: Check = _fine
    details: Callable[[], dict[str, Any]] = field(default=_nothing)

    # -- answers -----------------------------------------------------------------------

    def answer(self, path: str, problem: Probe) -> tuple[int, dict[str, Any]]:
        """The status code and JSON body for `path` (`/health` or `/ready`) given its check."""
        body: dict[str, Any]
        if problem is None:
            code, body = 200, {"status": "ready" if path == "/ready" else "ok"}
        else:
            status = "not ready" if path == "/ready" else "failed"
            body = {"status": status}
            body["problems" if isinstance(problem, dict) else "reason"] = problem
            code = 503
        return code, body | self.details()

    def _sync(self, check: Check) -> Probe:
        result = check()
        if inspect.isawaitable(result):
            raise TypeError("a check served from a thread must not be a coroutine")
        return result

    # -- aiohttp -----------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Serve the three endpoints on `app`."""

        async def probe(request: web.Request) -> web.Response:
            check = self.health if request.path == "/health" else self.ready
            result = check()
            problem = await result if inspect.isawaitable(result) else result
            code, body = self.answer(request.path, problem)
            return web.Response(
                body=orjson.dumps(body), status=code, content_type="application/json"
            )

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        app.router.add_get("/health", probe)
        app.router.add_get("/ready", probe)
        app.router.add_get("/metrics", metrics)

    # -- a thread of its own -----------------------------------------------------------

    def wsgi_app(self) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
        """The endpoints as a WSGI app (anything but `/health` and `/ready` is the metrics)."""

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path not in ("/health", "/ready"):
                data = generate_latest(self.registry)
                content_type = CONTENT_TYPE_LATEST
                status = "200 OK"
            else:
                check = self.health if path == "/health" else self.ready
                code, body = self.answer(path, self._sync(check))
                data = orjson.dumps(body)
                content_type = "application/json"
                status = "200 OK" if code == 200 else "503 Service Unavailable"
            start_response(
                status, [("Content-Type", content_type), ("Content-Length", str(len(data)))]
            )
            return [data]

        return app

    def serve_in_thread(self, host: str, port: int) -> WSGIServer:
        """Serve the endpoints from a daemon thread; raises OSError when the port is taken."""
        server = make_server(
            host, port, self.wsgi_app(), server_class=_Server, handler_class=_QuietHandler
        )
        threading.Thread(target=server.serve_forever, name="sluice-probes", daemon=True).start()
        return server


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: no access log."""


def run_app(app: web.Application, host: str, port: int) -> None:
    """Serve `app` until SIGTERM/SIGINT, then run its cleanup contexts (no banner, no access log)."""
    web.run_app(app, host=host, port=port, access_log=None, print=lambda *_: None)


def graceful_exit() -> None:
    """Stop `run_app` from inside the loop, as its SIGTERM handler does (cleanups run)."""
    raise web.GracefulExit
