"""The warehouse layout of RudderStack: a table per event type, one per track event name.

`tracks`, `identifies`, `pages`, `screens`, `groups`, `aliases` and `webhooks` get one
row per event with `context` flattened into `context_*` columns; a track event also
lands in a table named after the event with its properties flattened into columns;
`identify` keeps the latest traits of each user in `users`. Column types are inferred
from the values; the sink adds a column when a new property appears.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

TYPE_TABLES = {
    "track": "tracks",
    "identify": "identifies",
    "page": "pages",
    "screen": "screens",
    "group": "groups",
    "alias": "aliases",
    "webhook": "webhooks",
}
RESERVED_TABLES = frozenset(
    {*TYPE_TABLES.values(), "users", "events", "discards", "_sluice_offsets"}
)
TIME = "DateTime64(3, 'UTC')"

# Columns every event table has, in this order, with fixed types.
COMMON_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "String"),
    ("source_id", "LowCardinality(String)"),
    ("anonymous_id", "Nullable(String)"),
    ("user_id", "Nullable(String)"),
    ("timestamp", TIME),
    ("received_at", TIME),
    ("sent_at", f"Nullable({TIME})"),
    ("original_timestamp", f"Nullable({TIME})"),
)
USERS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "String"),
    ("source_id", "LowCardinality(String)"),
    ("received_at", TIME),
)
_NAME = re.compile(r"[^a-z0-9_]+")
MAX_NAME = 120


@functools.lru_cache(maxsize=65536)
def sql_name(raw: str) -> str:
    """A safe lower-case identifier for a table or column made from any string."""
    name = _NAME.sub("_", raw.strip().lower()).strip("_") or "_"
    if name[0].isdigit():
        name = "_" + name
    return name[:MAX_NAME]


def event_table(event_name: str) -> str:
    """The table of a track event: its name made safe, prefixed when it is reserved."""
    name = sql_name(event_name)
    return f"_{name}" if name in RESERVED_TABLES else name


def infer_type(value: Any) -> str:
    """ClickHouse type of a flattened property value."""
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, int):
        return "Int64"
    if isinstance(value, float):
        return "Float64"
    return "String"


def flatten(obj: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    """Nested objects become `a_b` columns; lists become JSON text; nulls are left out."""
    for key, value in obj.items():
        name = sql_name(f"{prefix}{key}")
        if isinstance(value, dict):
            flatten(value, f"{name}_", out)
        elif isinstance(value, list):
            out[name] = orjson.dumps(value).decode()
        elif value is not None:
            out[name] = value


@dataclass
class TableRows:
    """Rows bound for one table; `fixed` columns have known types, the rest are inferred."""

    fixed: tuple[tuple[str, str], ...]
    order_by: str
    version: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


def _common(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": event["event_id"],
        "source_id": event["source_id"],
        "anonymous_id": event["anonymous_id"],
        "user_id": event["user_id"],
        "timestamp": event["timestamp"],
        "received_at": event["received_at"],
        "sent_at": event["sent_at"],
        "original_timestamp": event["original_timestamp"],
    }


def _json(text: str) -> dict[str, Any]:
    value = orjson.loads(text)
    return value if isinstance(value, dict) else {}


def layout_rows(events: Iterable[dict[str, Any]]) -> dict[str, TableRows]:
    """Spread decoded envelopes over the layout's tables."""
    tables: dict[str, TableRows] = {}

    def add(
        table: str, row: dict[str, Any], fixed: tuple[tuple[str, str], ...] = COMMON_COLUMNS
    ) -> None:
        if table not in tables:
            version = "received_at" if table == "users" else None
            tables[table] = TableRows(
                fixed, "(source_id, id)" if table != "users" else "(id)", version
            )
        tables[table].rows.append(row)

    contexts: dict[str, dict[str, Any]] = {}
    for event in events:
        etype = event["type"]
        row = _common(event)
        # SDKs send the same context with most events: flatten each distinct one once.
        context = contexts.get(event["context"])
        if context is None:
            context = contexts[event["context"]] = {}
            flatten(_json(event["context"]), "context_", context)
        row.update(context)
        props: dict[str, Any] = {}
        if etype in ("track", "page", "screen", "webhook"):
            flatten(_json(event["properties"]), "", props)
        traits: dict[str, Any] = {}
        if etype in ("identify", "group"):
            flatten(_json(event["traits"]), "", traits)
        if etype == "track":
            name = event["event"] or ""
            row["event"] = event_table(name)
            row["event_text"] = name
            add("tracks", dict(row))
            add(event_table(name), {**props, **row})
        elif etype in ("page", "screen"):
            row["name"] = event["event"]
            add(TYPE_TABLES[etype], {**props, **row})
        elif etype == "identify":
            add("identifies", {**traits, **row})
            if event["user_id"]:
                user = {
                    "id": event["user_id"],
                    "source_id": event["source_id"],
                    "received_at": event["received_at"],
                }
                add("users", {**traits, **user}, USERS_COLUMNS)
        elif etype == "group":
            row["group_id"] = event["group_id"]
            add("groups", {**traits, **row})
        elif etype == "alias":
            row["previous_id"] = event["previous_id"]
            add("aliases", row)
        else:
            add(TYPE_TABLES.get(etype, "webhooks"), {**props, **row})
    return tables
