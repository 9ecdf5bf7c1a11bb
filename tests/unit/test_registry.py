"""The built-in schema registry: compatibility rules, Confluent's own clients against it, and
its probes: ready once its log can be read, unhealthy once it stopped following it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from core.follower import CompactedFollower
from schemas.errors import RegistryError
from schemas.registry import RegistryState
from schemas.registry_api import FOLLOWER, probes
from tests.orders import NO_DEFAULT, V1, V2
from tests.pipeline import until
from tests.unit.test_follower import KAFKA, TOPIC, FakeLog

EXTRA = {
    "type": "record",
    "name": "Order",
    "fields": [*NO_DEFAULT["fields"], {"name": "note", "type": "string"}],
}


def _register(state: RegistryState, subject: str, schema: dict[str, Any]) -> int:
    planned = state.plan(subject, json.dumps(schema))
    if planned is not None:
        state.apply(f"schema/{subject}/{planned.version}", planned.as_json())
    return state.lookup(subject, json.dumps(schema)).id


def test_versions_ids_and_backward_compatibility() -> None:
    state = RegistryState()
    first = _register(state, "orders-value", V1)
    assert _register(state, "orders-value", V1) == first  # the same schema: no new version
    second = _register(state, "orders-value", V2)  # a new field with a default: backward-safe
    assert second != first
    assert [v.version for v in state.versions("orders-value")] == [1, 2]
    assert _register(state, "other-value", V1) == first  # ids are global
    with pytest.raises(RegistryError) as refused:
        _register(state, "orders-value", NO_DEFAULT)
    assert refused.value.status == 409
    assert "reader_field_missing_default_value" in refused.value.message
    assert "currency" in refused.value.message
    assert [v.version for v in state.versions("orders-value")] == [1, 2]


def test_levels_decide_what_is_compatible() -> None:
    state = RegistryState()
    _register(state, "a", V1)
    state.apply("config/a", {"compatibilityLevel": "NONE"})
    _register(state, "a", NO_DEFAULT)  # anything goes
    state.apply("config/a", {"compatibilityLevel": "FORWARD"})
    # Forward: the latest version must read what the new one writes. An extra field is
    # fine for it; a missing field it has no default for is not.
    assert state.check("a", json.dumps(EXTRA)) == []
    assert "currency" in state.check("a", json.dumps(V1))[0]
    state.apply("config/", {"compatibilityLevel": "FULL"})
    assert state.level("b") == "FULL"
    assert state.level("a") == "FORWARD"


@pytest.mark.parametrize(
    ("text", "code"),
    [("not json", 42201), ('{"type": "record", "name": "X"}', 42201)],
)
def test_invalid_schemas_are_refused_with_a_reason(text: str, code: int) -> None:
    with pytest.raises(RegistryError) as refused:
        RegistryState().plan("s", text)
    assert refused.value.code == code
    assert refused.value.status == 422


async def test_the_registry_is_ready_once_its_log_can_be_read_and_unhealthy_if_it_stops() -> None:
    log = FakeLog()
    log.exists = False
    errors: list[BaseException] = []
    follower = CompactedFollower(
        KAFKA,
        TOPIC,
        lambda _entry: None,
        name="registry",
        consumer=log.consumer,
        on_error=errors.append,
    )
    app = web.Application()
    probes(app).add_routes(app)
    app[FOLLOWER] = follower
    follower.start()
    try:
        async with TestClient(TestServer(app)) as client:
            await until(lambda: bool(errors), 10, "the log found missing")
            resp = await client.get("/ready")
            body = await resp.json()
            assert (resp.status, body["status"]) == (503, "not ready")
            assert body["reason"].startswith(f"following {TOPIC}: RuntimeError: ")
            assert "no partitions to read" in body["reason"]
            assert (await client.get("/health")).status == 200  # following, and retrying

            log.exists = True
            assert await asyncio.to_thread(follower.wait_caught_up, 10)
            resp = await client.get("/ready")
            assert (resp.status, await resp.json()) == (200, {"status": "ready"})
    finally:
        follower.stop()


# The thread ending with an exception is what the test is about: pytest reports it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_the_registry_is_unhealthy_once_its_following_thread_died() -> None:
    log = FakeLog()
    log.exists = False

    def give_up(_exc: BaseException) -> None:
        raise SystemExit(1)  # escapes the follower's guard: its thread ends

    follower = CompactedFollower(
        KAFKA,
        TOPIC,
        lambda _entry: None,
        name="registry",
        consumer=log.consumer,
        on_error=give_up,
    )
    app = web.Application()
    probes(app).add_routes(app)
    app[FOLLOWER] = follower
    follower.start()
    async with TestClient(TestServer(app)) as client:
        await until(lambda: not follower.alive(), 10, "the following thread ended")
        resp = await client.get("/health")
        body = await resp.json()
        assert (resp.status, body["status"]) == (503, "failed")
        assert body["reason"].startswith(f"following {TOPIC} stopped: RuntimeError: ")
        assert (await client.get("/ready")).status == 503
