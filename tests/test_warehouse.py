"""The warehouse layout and loader on ClickHouse's real engine (embedded chdb)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from connectors.clickhouse import Warehouse
from connectors.layout import event_table, layout_rows, sql_name
from connectors.loader import Batch, Loader
from ops.settings import WarehouseSettings

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def envelope(etype: str, n: int, **fields: Any) -> dict[str, Any]:
    """A decoded event envelope as the sink sees it."""
    event = {
        "event_id": f"e{n}",
        "source_id": "web",
        "type": etype,
        "event": None,
        "user_id": f"u{n % 3}",
        "anonymous_id": None,
        "timestamp": NOW,
        "received_at": NOW,
        "sent_at": None,
        "original_timestamp": None,
        "properties": "{}",
        "traits": "{}",
        "context": '{"library": {"name": "sdk"}}',
        "integrations": "{}",
        "group_id": None,
        "previous_id": None,
        "_topic": "t",
        "_partition": 0,
        "_offset": n,
    }
    event.update(fields)
    return event


def test_names_are_safe_and_reserved_tables_are_prefixed() -> None:
    assert sql_name("Order Completed!") == "order_completed"
    assert sql_name("3-D view") == "_3_d_view"
    assert event_table("Users") == "_users"
    assert event_table("Signed Up") == "signed_up"


def test_layout_spreads_events_over_type_and_event_tables() -> None:
    props = orjson.dumps({"price": 9.5, "item": {"sku": "A1", "tags": ["x", "y"]}}).decode()
    tables = layout_rows(
        [
            envelope("track", 1, event="Order Completed", properties=props),
            envelope("identify", 2, traits='{"plan": "pro"}'),
            envelope("page", 3, event="Home"),
        ]
    )
    assert set(tables) == {"tracks", "order_completed", "identifies", "users", "pages"}
    [row] = tables["order_completed"].rows
    assert row["price"] == 9.5
    assert row["item_sku"] == "A1"
    assert row["item_tags"] == '["x","y"]'
    assert row["context_library_name"] == "sdk"
    assert row["event_text"] == "Order Completed"
    assert "price" not in tables["tracks"].rows[0]
    assert tables["users"].rows[0] == {
        "plan": "pro",
        "id": "u2",
        "source_id": "web",
        "received_at": NOW,
    }
    assert tables["pages"].rows[0]["name"] == "Home"


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warehouse]:
    # The embedded engine is one per process: the module shares it, tests use own tables.
    wh = Warehouse(WarehouseSettings(dsn=f"chdb://{tmp_path_factory.mktemp('wh')}"))
    yield wh
    wh.close()


@pytest.fixture
def loader(warehouse: Warehouse) -> tuple[Loader, str]:
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    loader = Loader(warehouse, table_prefix=prefix)
    loader.prepare(prefix + "events")
    return loader, prefix


def _batch(first: int, events: list[dict[str, Any]]) -> Batch:
    return Batch("t", first % 7, first, first + len(events) - 1, events)


def test_new_property_becomes_a_column_filled_from_then_on(
    warehouse: Warehouse, loader: tuple[Loader, str]
) -> None:
    load, prefix = loader
    first = [envelope("track", i, event="Viewed", properties='{"a": 1}') for i in range(3)]
    later = [
        envelope("track", i, event="Viewed", properties='{"a": 2, "b": "new"}') for i in range(3, 6)
    ]
    load.load(_batch(100, first), prefix + "events", layout=True)
    assert "b" not in warehouse.columns(prefix + "viewed")
    result = load.load(_batch(103, later), prefix + "events", layout=True)

    assert result.new_columns == 1
    assert warehouse.columns(prefix + "viewed")["b"] == "Nullable(String)"
    rows = warehouse.query(f"SELECT id, a, b FROM {prefix}viewed ORDER BY id").rows
    assert rows == [
        ["e0", 1, None],
        ["e1", 1, None],
        ["e2", 1, None],
        ["e3", 2, "new"],
        ["e4", 2, "new"],
        ["e5", 2, "new"],
    ]


def test_type_conflict_is_recorded_not_fatal(
    warehouse: Warehouse, loader: tuple[Loader, str]
) -> None:
    load, prefix = loader
    load.load(
        _batch(200, [envelope("track", 1, event="Paid", properties='{"amount": 10}')]),
        prefix + "events",
        True,
    )
    result = load.load(
        _batch(
            201, [envelope("track", 2, event="Paid", properties='{"amount": "ten", "ok": true}')]
        ),
        prefix + "events",
        True,
    )

    assert result.discarded == 1
    rows = warehouse.query(f"SELECT id, amount, ok FROM {prefix}paid ORDER BY id").rows
    assert rows == [["e1", 10, None], ["e2", None, True]]
    discards = warehouse.query(
        f"SELECT table_name, column_name, column_type, value, row_id FROM {prefix}discards"
    ).rows
    assert discards == [[f"{prefix}paid", "amount", "Nullable(Int64)", '"ten"', "e2"]]


def test_loading_a_batch_again_changes_nothing(
    warehouse: Warehouse, loader: tuple[Loader, str]
) -> None:
    load, prefix = loader
    batch = _batch(300, [envelope("track", i, event="Clicked") for i in range(50)])
    for _ in range(3):
        load.load(batch, prefix + "events", layout=True)
    for table in ("events", "tracks", "clicked"):
        assert warehouse.query(f"SELECT count() FROM {prefix}{table}").rows == [[50]]
    assert warehouse.loaded_ranges("t", 300 % 7)[-1] == (300, 349)


def test_numbers_that_mix_ints_and_floats_become_floats(
    warehouse: Warehouse, loader: tuple[Loader, str]
) -> None:
    load, prefix = loader
    events = [
        envelope("track", 1, event="Rated", properties='{"score": 4}'),
        envelope("track", 2, event="Rated", properties='{"score": 4.5}'),
    ]
    load.load(_batch(400, events), prefix + "events", layout=True)
    assert warehouse.columns(prefix + "rated")["score"] == "Nullable(Float64)"
    assert warehouse.query(f"SELECT score FROM {prefix}rated ORDER BY id").rows == [[4.0], [4.5]]
