"""The warehouse layout and loader on ClickHouse's real engine (embedded chdb)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from connectors.warehouse.clickhouse import EVENT_COLUMNS, Warehouse
from connectors.warehouse.layout import COMMON_COLUMNS, event_table, layout_rows, sql_name
from connectors.warehouse.loader import Batch, Loader
from core.settings import WarehouseSettings

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


def _rows(warehouse: Warehouse, sql: str) -> list[list[Any]]:
    return warehouse.query(sql).rows


def _tables(warehouse: Warehouse, prefix: str) -> set[str]:
    rows = _rows(
        warehouse,
        f"SELECT name FROM system.tables WHERE database = currentDatabase() "
        f"AND startsWith(name, '{prefix}')",
    )
    return {str(r[0]).removeprefix(prefix) for r in rows}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Заказ оформлен", "Заказ отменён"),
        ("Заказ отменён", "Заказ отменен"),  # transliterate alike: the hash keeps them apart
        ("注文完了", "注文取消"),
        ("注文", "注文!"),
    ],
)
def test_distinct_non_ascii_event_names_get_distinct_readable_tables(
    warehouse: Warehouse, loader: tuple[Loader, str], first: str, second: str
) -> None:
    load, prefix = loader
    events = [
        envelope("track", 1, event=first, properties='{"сумма": 10, "金额": 1}'),
        envelope("track", 2, event=second, properties='{"сумма": 20, "数量": 2}'),
        envelope("track", 3, event=first, properties='{"Сумма": 30}'),
    ]
    load.load(_batch(500, events), prefix + "events", layout=True)

    one, two = event_table(first), event_table(second)
    assert one != two
    assert {one, two} <= _tables(warehouse, prefix)
    assert one.isascii()
    assert one.split("_")[0] in ("zakaz", "zhu")
    assert _rows(warehouse, f"SELECT id, event_text FROM {prefix}{one} ORDER BY id") == [
        ["e1", first],
        ["e3", first],
    ]
    assert _rows(warehouse, f"SELECT id, event_text FROM {prefix}{two}") == [["e2", second]]
    # Property names likewise: `Сумма` is `сумма` in another case, so the same column.
    amount, total, count = sql_name("сумма"), sql_name("金额"), sql_name("数量")
    assert len({amount, total, count}) == 3
    assert amount.startswith("summa_")
    assert _rows(warehouse, f"SELECT id, {amount}, {total} FROM {prefix}{one} ORDER BY id") == [
        ["e1", 10, 1],
        ["e3", 30, None],
    ]
    assert _rows(warehouse, f"SELECT {amount}, {count} FROM {prefix}{two}") == [[20, 2]]


def test_case_variants_share_a_table_and_column_and_none_is_overwritten(
    warehouse: Warehouse, loader: tuple[Loader, str]
) -> None:
    load, prefix = loader
    events = [
        envelope("track", 1, event="Order Completed", properties='{"userId": "a"}'),
        envelope("track", 2, event="order completed", properties='{"userid": "b"}'),
        # One event with both spellings: the first keeps the column, the other is reported.
        envelope("track", 3, event="ORDER COMPLETED", properties='{"userId": "c", "userid": 7}'),
    ]
    load.load(_batch(510, events), prefix + "events", layout=True)

    assert {"order_completed"} == _tables(warehouse, prefix) - {
        "events",
        "tracks",
        "discards",
        "_sluice_event_tables",
    }
    assert _rows(
        warehouse, f"SELECT id, userid, event_text FROM {prefix}order_completed ORDER BY id"
    ) == [
        ["e1", "a", "Order Completed"],
        ["e2", "b", "order completed"],
        ["e3", "c", "ORDER COMPLETED"],
    ]
    assert _rows(
        warehouse, f"SELECT table_name, column_name, value, row_id FROM {prefix}discards"
    ) == [[f"{prefix}order_completed", "userid", "7", "e3"]]


@pytest.mark.parametrize("name", ["events", "_sluice_offsets", "discards", "identifies", "Users"])
def test_an_event_named_like_a_reserved_table_gets_its_own_table(
    warehouse: Warehouse, loader: tuple[Loader, str], name: str
) -> None:
    load, prefix = loader
    load.load(_batch(520, [envelope("track", 0, event="Signed Up")]), prefix + "events", True)
    before = {
        t: _rows(warehouse, f"SELECT count() FROM {prefix}{t}")[0][0]
        for t in ("events", "tracks", "discards")
    }
    props = '{"id": "forged", "received_at": "x", "context_ip": "1.2.3.4", "plan": "pro"}'
    load.load(
        _batch(521, [envelope("track", 1, event=name, properties=props)]), prefix + "events", True
    )

    table = event_table(name)
    assert table not in {"events", "discards", "_sluice_offsets", "identifies", "users"}
    assert _rows(warehouse, f"SELECT id, event_text, plan FROM {prefix}{table}") == [
        ["e1", name, "pro"]
    ]
    # Properties named like the event's own columns do not overwrite them.
    assert _rows(warehouse, f"SELECT id, _id, _received_at, _context_ip FROM {prefix}{table}") == [
        ["e1", "forged", "x", "1.2.3.4"]
    ]
    # The reserved tables got what they get for any track event, nothing else.
    assert _rows(warehouse, f"SELECT count() FROM {prefix}events")[0][0] == before["events"] + 1
    assert _rows(warehouse, f"SELECT count() FROM {prefix}tracks")[0][0] == before["tracks"] + 1
    assert _rows(warehouse, f"SELECT count() FROM {prefix}discards")[0][0] == before["discards"]
    assert set(warehouse.columns(prefix + "events")) == {n for n, _ in EVENT_COLUMNS} | {
        "_loaded_at"
    }


def test_an_event_named_like_a_configured_raw_table_does_not_write_into_it(
    warehouse: Warehouse, loader: tuple[Loader, str]
) -> None:
    load, prefix = loader
    load.prepare(prefix + "audit_events")
    load.load(_batch(530, [envelope("track", 1, event="Audit Events")]), prefix + "events", True)

    assert _rows(warehouse, f"SELECT count() FROM {prefix}audit_events") == [[0]]
    assert _rows(warehouse, f"SELECT id FROM {prefix}_audit_events") == [["e1"]]


def _limited(warehouse: Warehouse, **limits: int) -> tuple[Loader, str]:
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    load = Loader(warehouse, table_prefix=prefix, **limits)
    load.prepare(prefix + "events")
    return load, prefix


def test_past_the_event_table_limit_events_land_in_events_tracks_and_discards(
    warehouse: Warehouse,
) -> None:
    limit, names = 5, 12
    load, prefix = _limited(warehouse, max_event_tables=limit)
    events = [envelope("track", i, event=f"Event {i % names}") for i in range(3 * names)]
    # Another source has a limit of its own.
    events += [envelope("track", 100 + i, event=f"Other {i}", source_id="app") for i in range(3)]
    half = len(events) // 2
    result = load.load(_batch(600, events[:half]), prefix + "events", layout=True)
    result2 = load.load(_batch(600 + half, events[half:]), prefix + "events", layout=True)

    web = {f"event_{i}" for i in range(limit)}
    app = {f"other_{i}" for i in range(3)}
    assert _tables(warehouse, prefix) == web | app | {
        "events",
        "tracks",
        "discards",
        "_sluice_event_tables",
    }
    ids = {f"e{i}" for i in range(3 * names)} | {f"e{100 + i}" for i in range(3)}
    for table in ("events", "tracks"):
        assert {
            r[0]
            for r in _rows(
                warehouse,
                f"SELECT {'event_id' if table == 'events' else 'id'} FROM {prefix}{table}",
            )
        } == ids
        assert _rows(warehouse, f"SELECT count() FROM {prefix}{table}") == [[len(ids)]]
    over = [f"e{i}" for i in range(3 * names) if i % names >= limit]
    assert result.overflow_tables + result2.overflow_tables == len(over)
    discards = _rows(warehouse, f"SELECT table_name, value, row_id, reason FROM {prefix}discards")
    assert sorted(r[2] for r in discards) == sorted(over)
    assert {r[0] for r in discards} == {f"{prefix}event_{i}" for i in range(limit, names)}
    assert all("SLUICE_WAREHOUSE_MAX_EVENT_TABLES" in r[3] for r in discards)
    # The limit holds for a new loader (a restarted sink) too: the tables are recorded.
    again, _ = Loader(warehouse, table_prefix=prefix, max_event_tables=limit), None
    again.prepare(prefix + "events")
    later = again.load(
        _batch(700, [envelope("track", 900, event="Event 0"), envelope("track", 901, event="New")]),
        prefix + "events",
        layout=True,
    )
    assert later.overflow_tables == 1
    assert "new" not in _tables(warehouse, prefix)
    assert _rows(warehouse, f"SELECT id FROM {prefix}event_0 WHERE id = 'e900'") == [["e900"]]


def test_past_the_column_limit_properties_go_to_discards_and_events_still_land(
    warehouse: Warehouse,
) -> None:
    load, prefix = _limited(warehouse, max_columns=20)
    fixed = len(COMMON_COLUMNS) + 2  # the common columns, event and event_text
    context = len(orjson.loads(envelope("track", 0)["context"]))  # context_library_name
    room = 20 - fixed - context
    props = {f"p{i:02d}": i for i in range(30)}
    events = [
        envelope("track", i, event="Wide", properties=orjson.dumps(props).decode())
        for i in range(4)
    ]
    result = load.load(_batch(800, events), prefix + "events", layout=True)

    columns = warehouse.columns(prefix + "wide")
    assert len(columns) == 20
    kept = [f"p{i:02d}" for i in range(room)]
    assert [c for c in columns if c.startswith("p")] == kept
    assert _rows(warehouse, f"SELECT id, {kept[-1]} FROM {prefix}wide ORDER BY id") == [
        [f"e{i}", room - 1] for i in range(4)
    ]
    for table in ("events", "tracks"):
        assert _rows(warehouse, f"SELECT count() FROM {prefix}{table}") == [[4]]
    assert result.overflow_columns == 4 * (30 - room)
    discards = _rows(warehouse, f"SELECT column_name, value, row_id, reason FROM {prefix}discards")
    assert len(discards) == 4 * (30 - room)
    assert {r[0] for r in discards} == {f"p{i:02d}" for i in range(room, 30)}
    assert all("SLUICE_WAREHOUSE_MAX_COLUMNS" in r[3] for r in discards)


def test_the_copy_window_is_read_from_the_records_before_each_committed_offset(
    warehouse: Warehouse,
) -> None:
    from connectors.warehouse.copies import event_key, recent_event_ids  # noqa: PLC0415

    table = f"t{uuid.uuid4().hex[:8]}_events"
    Loader(warehouse).prepare(table)
    names = [name for name, _ in EVENT_COLUMNS]
    # Partition 0 loaded offsets 0-9, partition 1 offsets 0-4; another topic offsets 0-9.
    rows = [("dest", 0, o) for o in range(10)] + [("dest", 1, o) for o in range(5)]
    rows += [("other", 0, o) for o in range(10)]
    for topic, partition, offset in rows:
        event = envelope("track", offset, event="E")
        event.update(
            event_id=f"{topic}-{partition}-{offset}",
            _topic=topic,
            _partition=partition,
            _offset=offset,
        )
        warehouse.insert_events(
            table, [[event.get(n)] for n in names], f"{topic}:{partition}:{offset}"
        )

    # Partition 0 committed 8 (8-9 are a pending batch), 1 committed 5, 2 never committed.
    found = recent_event_ids(warehouse, table, "dest", {0: 8, 1: 5, 2: -1001}, window=3)
    assert found == {
        0: [
            event_key("web", "dest-0-5"),
            event_key("web", "dest-0-6"),
            event_key("web", "dest-0-7"),
        ],
        1: [
            event_key("web", "dest-1-2"),
            event_key("web", "dest-1-3"),
            event_key("web", "dest-1-4"),
        ],
        2: [],
    }
    assert recent_event_ids(warehouse, table, "dest", {0: 8}, window=0) == {0: []}
