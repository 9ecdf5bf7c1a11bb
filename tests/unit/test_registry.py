"""The built-in schema registry: compatibility rules, and Confluent's own clients against it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.errors import RegistryError
from schemas.registry import RegistryState
from tests.orders import NO_DEFAULT, V1, V2

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
