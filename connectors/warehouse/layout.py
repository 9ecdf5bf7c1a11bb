"""The warehouse layout of RudderStack: a table per event type, one per track event name.

`tracks`, `identifies`, `pages`, `screens`, `groups`, `aliases` and `webhooks` get one
row per event with `context` flattened into `context_*` columns; a track event also
lands in a table named after the event with its properties flattened into columns;
`identify` keeps the latest traits of each user in `users`. Column types are inferred
from the values; the sink adds a column when a new property appears.

Names: `sql_name` lower-cases a name and turns what is not `[a-z0-9_]` into `_`, so names
that differ only in case or punctuation share a table or column (as in RudderStack). A
name with other characters is transliterated to ASCII (`Заказ` -> `zakaz`, `注文` ->
`zhu_wen`) and always gets a hash of the (lower-cased) original as a suffix, as does a
name cut to `MAX_NAME` or one with nothing left: distinct names stay distinct. A track
event named like a reserved table gets `_` prefixes until it is not, and a property named
like a column of the event itself (`id`, `received_at`, `context_*`, ...) gets a `_`
prefix; two properties of one event that still meet in one column keep the first one's
value and report the other (`Row.lost`, recorded in `discards`).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from anyascii import anyascii

TYPE_TABLES = {
    "track": "tracks",
    "identify": "identifies",
    "page": "pages",
    "screen": "screens",
    "group": "groups",
    "alias": "aliases",
    "webhook": "webhooks",
}
# Tables no track event may write into (besides the raw tables a loader is given).
RESERVED_TABLES = frozenset(
    {
        *TYPE_TABLES.values(),
        "users",
        "events",
        "discards",
        "_sluice_offsets",
        "_sluice_event_tables",
        "system",
        "information_schema",
    }
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
# anyascii spells CJK as title-cased syllables ("ZhuWen"): a `_` between them reads better.
_SYLLABLE = re.compile(r"(?<=[A-Za-z0-9])(?=[A-Z])")
MAX_NAME = 120
HASH_CHARS = 8


@functools.lru_cache(maxsize=65536)
def sql_name(raw: str) -> str:
    """A safe lower-case ASCII identifier for a table or column made from any string.

    ASCII names map as RudderStack maps them (`Order Completed!` -> `order_completed`);
    a name that needed transliteration, was cut or kept nothing gets `_<hash>` appended,
    the hash taken over the lower-cased name, so case variants still meet.
    """
    text = raw.strip().lower()
    exact = text.isascii()
    if not exact:
        text = unicodedata.normalize("NFKC", text)
        spelled = _SYLLABLE.sub("_", anyascii(text)).lower()
    else:
        spelled = text
    name = _NAME.sub("_", spelled).strip("_")
    if name and name[0].isdigit():
        name = "_" + name
    if exact and name and len(name) <= MAX_NAME:
        return name
    tag = hashlib.blake2b(text.encode(), digest_size=HASH_CHARS // 2).hexdigest()
    return f"{name[: MAX_NAME - HASH_CHARS - 1]}_{tag}" if name else f"_{tag}"


def event_table(event_name: str, reserved: frozenset[str] = frozenset()) -> str:
    """The table of a track event: its name made safe, prefixed while it is reserved."""
    name = sql_name(event_name)
    while name in RESERVED_TABLES or name in reserved:
        name = "_" + name
    return name


def infer_type(value: Any) -> str:
    """ClickHouse type of a flattened property value."""
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, int):
        return "Int64"
    if isinstance(value, float):
        return "Float64"
    return "String"


def flatten(
    obj: dict[str, Any],
    prefix: str,
    out: dict[str, Any],
    lost: list[tuple[str, Any, str]] | None = None,
    path: str = "",
) -> None:
    """Nested objects become `a_b` columns; lists become JSON text; nulls are left out.

    Two keys that map to one column (`userId` and `userid`, `a.b` and `a_b`) keep the
    first value; the others are appended to `lost` as (column, value, reason).
    """
    for key, value in obj.items():
        name = sql_name(f"{prefix}{key}")
        where = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            flatten(value, f"{name}_", out, lost, where)
            continue
        if value is None:
            continue
        if name in out:
            if lost is not None:
                reason = f"{where!r} maps to column {name!r}, taken by another key of the event"
                lost.append((name, value, reason))
            continue
        out[name] = orjson.dumps(value).decode() if isinstance(value, list) else value


@dataclass
class TableRows:
    """Rows bound for one table; `fixed` columns have known types, the rest are inferred.

    `event` marks a track event's own table (limited per source by the loader); `lost`
    holds (column, value, row id, received_at, reason) of values no column could take.
    """

    fixed: tuple[tuple[str, str], ...]
    order_by: str
    version: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    event: bool = False
    lost: list[tuple[str, Any, str, Any, str]] = field(default_factory=list)


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


def _with(
    values: dict[str, Any], row: dict[str, Any], lost: list[tuple[str, Any, str]]
) -> dict[str, Any]:
    """`row` and `values` (properties or traits), without a value taking a column of `row`.

    The row's own columns come first, so a table at its column limit still gets them.
    """
    out = dict(row)
    for key, value in values.items():
        name = key
        while name in row or name.startswith("context_"):
            name = "_" + name
        if name in out:
            lost.append((name, value, f"{key!r} maps to column {name!r}, taken already"))
        else:
            out[name] = value
    return out


def layout_rows(
    events: Iterable[dict[str, Any]], reserved: frozenset[str] = frozenset()
) -> dict[str, TableRows]:
    """Spread decoded envelopes over the layout's tables.

    `reserved` names tables besides `RESERVED_TABLES` that no event table may be (the
    raw tables of the loader).
    """
    tables: dict[str, TableRows] = {}

    def add(
        table: str,
        row: dict[str, Any],
        fixed: tuple[tuple[str, str], ...] = COMMON_COLUMNS,
        lost: list[tuple[str, Any, str]] | None = None,
        event: bool = False,
    ) -> None:
        if table not in tables:
            version = "received_at" if table == "users" else None
            tables[table] = TableRows(
                fixed, "(source_id, id)" if table != "users" else "(id)", version, event=event
            )
        rows = tables[table]
        rows.rows.append(row)
        for column, value, reason in lost or ():
            rows.lost.append((column, value, row["id"], row["received_at"], reason))

    contexts: dict[str, tuple[dict[str, Any], list[tuple[str, Any, str]]]] = {}
    for event in events:
        etype = event["type"]
        row = _common(event)
        # SDKs send the same context with most events: flatten each distinct one once.
        cached = contexts.get(event["context"])
        if cached is None:
            flat: dict[str, Any] = {}
            flat_lost: list[tuple[str, Any, str]] = []
            flatten(_json(event["context"]), "context_", flat, flat_lost, "context")
            cached = contexts[event["context"]] = (flat, flat_lost)
        context, context_lost = cached
        row.update(context)
        lost: list[tuple[str, Any, str]] = []
        props: dict[str, Any] = {}
        if etype in ("track", "page", "screen", "webhook"):
            flatten(_json(event["properties"]), "", props, lost)
        traits: dict[str, Any] = {}
        if etype in ("identify", "group"):
            flatten(_json(event["traits"]), "", traits, lost)
        if etype == "track":
            name = event["event"] or ""
            table = event_table(name, reserved)
            row["event"] = table
            row["event_text"] = name
            add("tracks", dict(row), lost=context_lost)
            add(table, _with(props, row, lost), lost=lost, event=True)
        elif etype in ("page", "screen"):
            row["name"] = event["event"]
            add(TYPE_TABLES[etype], _with(props, row, lost), lost=context_lost + lost)
        elif etype == "identify":
            add("identifies", _with(traits, row, lost), lost=context_lost + lost)
            if event["user_id"]:
                user = {
                    "id": event["user_id"],
                    "source_id": event["source_id"],
                    "received_at": event["received_at"],
                }
                add("users", _with(traits, user, []), USERS_COLUMNS)
        elif etype == "group":
            row["group_id"] = event["group_id"]
            add("groups", _with(traits, row, lost), lost=context_lost + lost)
        elif etype == "alias":
            row["previous_id"] = event["previous_id"]
            add("aliases", row, lost=context_lost)
        else:
            table = TYPE_TABLES.get(etype, "webhooks")
            add(table, _with(props, row, lost), lost=context_lost + lost)
    return tables
