"""Versions of an `Order` Avro schema, for the registry tests."""

from __future__ import annotations

from typing import Any

V1: dict[str, Any] = {
    "type": "record",
    "name": "Order",
    "fields": [{"name": "id", "type": "string"}],
}


V2: dict[str, Any] = {
    "type": "record",
    "name": "Order",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "total", "type": "double", "default": 0.0},
    ],
}


NO_DEFAULT: dict[str, Any] = {
    "type": "record",
    "name": "Order",
    "fields": [*V2["fields"], {"name": "currency", "type": "string"}],
}
