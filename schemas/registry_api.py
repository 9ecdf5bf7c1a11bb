"""The schema registry over HTTP: the Confluent Schema Registry REST API.

Enough of it for Confluent's clients (`SchemaRegistryClient`, `AvroSerializer`,
`AvroDeserializer`) and the usual tooling: schemas by id, subjects and their versions,
register and look up, compatibility checks and levels. Errors are Confluent's JSON
bodies (`error_code`, `message`). Writes and the blocking log reads run in a thread so
that the event loop keeps serving.

`/health` is 503 once the thread following the schema log died, `/ready` while the log
cannot be read (or has not been read to its end): the process shell's probes
(`core.shell.Probes`), with `/metrics`.

Reads are open, as in Confluent's registry; a write (any request that is not a read)
needs HTTP Basic auth with `SLUICE_REGISTRY_WRITE_USER`/`_PASSWORD`, which Confluent's
clients send from `basic.auth.user.info`. With no password configured, writes are off.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from core.follower import CompactedFollower
from core.settings import KafkaSettings, RegistrySettings
from core.shell import Probe, Probes
from schemas.errors import RegistryError
from schemas.registry import SchemaRegistry

log = structlog.get_logger("sluice.registry")

REGISTRY = web.AppKey("registry", SchemaRegistry)
# The follower of the schema log (the registry's), for the probes.
FOLLOWER = web.AppKey("follower", CompactedFollower)
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=CONTENT_TYPE)


# Requests other than GET/HEAD that change nothing: a look-up and a compatibility check.
_READ_POSTS = frozenset(
    {"/subjects/{subject}", "/compatibility/subjects/{subject}/versions/{version}"}
)
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="sluice-registry", charset="UTF-8"'}


def _is_read(request: web.Request) -> bool:
    if request.method in ("GET", "HEAD"):
        return True
    resource = request.match_info.route.resource
    return request.method == "POST" and resource is not None and resource.canonical in _READ_POSTS


def _basic_credentials(header: str) -> tuple[bytes, bytes] | None:
    """User and password of an `Authorization: Basic …` header; None when it is not one."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


def write_guard(settings: RegistrySettings) -> Middleware:
    """Middleware: reads pass; a write needs the configured Basic credentials."""
    user = settings.write_user.encode()
    password = (
        settings.write_password.get_secret_value().encode() if settings.write_password else None
    )

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _is_read(request):
            return await handler(request)
        if password is None:
            return _json(
                {
                    "error_code": 40301,
                    "message": "Writes to this registry are disabled: "
                    "set SLUICE_REGISTRY_WRITE_PASSWORD to allow them.",
                },
                403,
            )
        given = _basic_credentials(request.headers.get("Authorization", ""))
        # Both compared in constant time, and both always: no early exit on the user.
        ok_user = hmac.compare_digest(given[0] if given else b"", user)
        ok_password = hmac.compare_digest(given[1] if given else b"", password)
        if given is None or not (ok_user & ok_password):
            response = _json(
                {
                    "error_code": 401,
                    "message": "Unauthorized: registry writes need HTTP Basic credentials.",
                },
                401,
            )
            response.headers.update(_CHALLENGE)
            return response
        return await handler(request)

    return guard


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Registry errors and malformed bodies as Confluent's error JSON."""
    try:
        return await handler(request)
    except RegistryError as exc:
        return _json({"error_code": exc.code, "message": exc.message}, exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json({"error_code": exc.status, "message": exc.reason}, exc.status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise RegistryError(422, 42201, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise RegistryError(422, 42201, "The body must be a JSON object.")
    return body


async def _schema_text(request: web.Request) -> str:
    body = await _body(request)
    kind = body.get("schemaType", "AVRO")
    if kind != "AVRO":
        raise RegistryError(422, 42201, f"Only AVRO schemas are supported, not {kind!r}.")
    schema = body.get("schema")
    if not isinstance(schema, str):
        raise RegistryError(422, 42201, "The body needs 'schema', the schema's JSON as a string.")
    return schema


async def get_schema(request: web.Request) -> web.Response:
    """`GET /schemas/ids/{id}`."""
    state = request.app[REGISTRY].state
    try:
        schema = state.by_id[int(request.match_info["id"])]
    except (KeyError, ValueError):
        raise RegistryError(404, 40403, "Schema not found.") from None
    return _json({"schema": schema})


async def get_schema_versions(request: web.Request) -> web.Response:
    """`GET /schemas/ids/{id}/versions`: where a schema id is registered."""
    state = request.app[REGISTRY].state
    wanted = request.match_info["id"]
    found = [
        {"subject": v.subject, "version": v.version}
        for versions in state.subjects.values()
        for v in versions
        if str(v.id) == wanted
    ]
    if not found:
        raise RegistryError(404, 40403, "Schema not found.")
    return _json(found)


async def list_subjects(request: web.Request) -> web.Response:
    """`GET /subjects`."""
    return _json(sorted(request.app[REGISTRY].state.subjects))


async def list_versions(request: web.Request) -> web.Response:
    """`GET /subjects/{subject}/versions`."""
    versions = request.app[REGISTRY].state.versions(request.match_info["subject"])
    return _json([v.version for v in versions])


async def get_version(request: web.Request) -> web.Response:
    """`GET /subjects/{subject}/versions/{version}` (`latest` or a number)."""
    state = request.app[REGISTRY].state
    version = state.version(request.match_info["subject"], request.match_info["version"])
    return _json(version.as_json())


async def get_version_schema(request: web.Request) -> web.Response:
    """`GET /subjects/{subject}/versions/{version}/schema`: the schema alone."""
    state = request.app[REGISTRY].state
    version = state.version(request.match_info["subject"], request.match_info["version"])
    return web.Response(text=version.schema, content_type=CONTENT_TYPE)


async def register(request: web.Request) -> web.Response:
    """`POST /subjects/{subject}/versions`: register (or find) a schema; its id."""
    text = await _schema_text(request)
    registry = request.app[REGISTRY]
    loop = asyncio.get_running_loop()
    version = await loop.run_in_executor(
        None, registry.register, request.match_info["subject"], text
    )
    return _json({"id": version.id})


async def lookup(request: web.Request) -> web.Response:
    """`POST /subjects/{subject}`: the version of a subject that has this schema."""
    text = await _schema_text(request)
    version = request.app[REGISTRY].state.lookup(request.match_info["subject"], text)
    return _json(version.as_json())


async def check_compatibility(request: web.Request) -> web.Response:
    """`POST /compatibility/subjects/{subject}/versions/{version}`."""
    text = await _schema_text(request)
    subject, version = request.match_info["subject"], request.match_info["version"]
    state = request.app[REGISTRY].state
    state.version(subject, version)  # 404 for an unknown subject or version
    problems = state.check(subject, text, version)
    return _json({"is_compatible": not problems, "messages": problems})


async def get_config(request: web.Request) -> web.Response:
    """`GET /config` and `GET /config/{subject}`."""
    subject = request.match_info.get("subject")
    return _json({"compatibilityLevel": request.app[REGISTRY].state.level(subject)})


async def put_config(request: web.Request) -> web.Response:
    """`PUT /config` and `PUT /config/{subject}`: `{"compatibility": "FULL"}`."""
    level = (await _body(request)).get("compatibility")
    if not isinstance(level, str):
        raise RegistryError(422, 42203, "The body needs 'compatibility', a level name.")
    registry = request.app[REGISTRY]
    loop = asyncio.get_running_loop()
    subject = request.match_info.get("subject")
    done = await loop.run_in_executor(None, registry.set_level, subject, level.upper())
    return _json({"compatibility": done})


def probes(app: web.Application) -> Probes:
    """`/health`: 503 once the thread following the schema log died; `/ready`: 503 while
    the log cannot be read or has not been read to its end (`FOLLOWER`, set at startup)."""

    def following() -> Probe:
        return app[FOLLOWER].failure()

    def ready() -> Probe:
        return app[FOLLOWER].problem()

    return Probes(CollectorRegistry(), health=following, ready=ready)


def _registry_ctx(kafka: KafkaSettings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        registry = SchemaRegistry(kafka)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, registry.start)
        app[REGISTRY], app[FOLLOWER] = registry, registry.follower
        yield
        await loop.run_in_executor(None, registry.stop)

    return ctx


def create_app(settings: RegistrySettings, kafka: KafkaSettings) -> web.Application:
    """The registry's HTTP app; it reads the schema log before it serves."""
    app = web.Application(client_max_size=1024 * 1024, middlewares=[_errors, write_guard(settings)])
    app.cleanup_ctx.append(_registry_ctx(kafka))
    app.router.add_get("/schemas/ids/{id}", get_schema)
    app.router.add_get("/schemas/ids/{id}/versions", get_schema_versions)
    app.router.add_get("/subjects", list_subjects)
    app.router.add_get("/subjects/{subject}/versions", list_versions)
    app.router.add_get("/subjects/{subject}/versions/{version}", get_version)
    app.router.add_get("/subjects/{subject}/versions/{version}/schema", get_version_schema)
    app.router.add_post("/subjects/{subject}/versions", register)
    app.router.add_post("/subjects/{subject}", lookup)
    app.router.add_post("/compatibility/subjects/{subject}/versions/{version}", check_compatibility)
    app.router.add_get("/config", get_config)
    app.router.add_put("/config", put_config)
    app.router.add_get("/config/{subject}", get_config)
    app.router.add_put("/config/{subject}", put_config)
    probes(app).add_routes(app)
    return app


def run(settings: RegistrySettings, kafka: KafkaSettings) -> None:
    """Serve until SIGTERM/SIGINT."""
    if settings.write_password is None:
        log.warning("registry writes are off: SLUICE_REGISTRY_WRITE_PASSWORD is not set")
    web.run_app(
        create_app(settings, kafka),
        host=settings.host,
        port=settings.port,
        access_log=None,
        print=lambda *_: None,
    )
    log.info("registry stopped")
