"""`sluice bench sink`: warehouse sink rows/s next to a bare insert loop."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from core.settings import KafkaSettings
from ops.benchmarks.baselines import bare_insert_rate
from ops.benchmarks.harness import (
    Bootstrap,
    JsonOut,
    bench_topics,
    console,
    envelopes,
    report,
    seed_topic,
)


def bench_sink(
    events: Annotated[int, typer.Option(help="Events to load.")] = 200_000,
    layout: Annotated[
        bool, typer.Option(help="Also fan out into the per-type and per-event tables.")
    ] = True,
    bootstrap: Bootstrap = None,
    json_out: JsonOut = None,
) -> None:
    """Warehouse sink rows/s (Kafka to embedded ClickHouse) next to a bare insert loop."""

    from connectors.warehouse.clickhouse import COLUMN_NAMES, Warehouse  # noqa: PLC0415
    from connectors.warehouse.sink import WarehouseSink  # noqa: PLC0415
    from connectors.warehouse.targets import SinkTarget  # noqa: PLC0415
    from core.settings import WarehouseSettings  # noqa: PLC0415
    from core.topics import Topics  # noqa: PLC0415
    from schemas.codec import event_codec  # noqa: PLC0415

    kafka, _ = bench_topics(bootstrap or KafkaSettings().bootstrap_servers)
    topic = Topics(kafka.topic_prefix).destination("warehouse").main
    records = envelopes(events)
    seed_topic(kafka, topic, records)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-wh-"))
    settings = WarehouseSettings(
        dsn=f"chdb://{workdir}", consumer_group=f"{kafka.topic_prefix}-sink"
    )
    warehouse = Warehouse(settings)
    results: dict[str, Any] = {"events": events, "layout": layout, "cores": os.cpu_count()}
    try:
        codec = event_codec(logical_types=False)
        decoded = [codec.decode(v) for _, v in records]
        for i, e in enumerate(decoded):
            e["_topic"], e["_partition"], e["_offset"] = topic, 0, i
        columns = [[e[name] for e in decoded] for name in COLUMN_NAMES]
        with console.status("baseline: bare clickhouse-connect inserts, 10,000 rows each ..."):
            results["bare_insert_rows_per_s"] = bare_insert_rate(warehouse, columns, events)
        sink = WarehouseSink(
            warehouse, [SinkTarget("warehouse", topic, "events", layout)], kafka, settings, codec
        )
        with console.status(
            f"sink: Kafka -> decode -> {'layout + ' if layout else ''}insert -> commit ..."
        ):
            started = time.perf_counter()
            sink.start()
            while sink.metrics.rows.labels("warehouse")._value.get() < events:
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            sink.stop()
        rows = warehouse.query("SELECT count() FROM events").rows[0][0]
        if rows != events:
            console.print(f"[red]expected {events} rows, found {rows}[/red]")
            raise typer.Exit(1)
        # Every row the sink wrote: the events table and, with the layout, the per-type,
        # per-event and users tables (not the bookkeeping of loaded offset ranges).
        table_rows = warehouse.query(
            "SELECT sum(total_rows) FROM system.tables WHERE database = currentDatabase()"
            " AND name NOT IN ('bare', '_sluice_offsets')"
        ).rows[0][0]
        results["sink_events_per_s"] = events / elapsed
        results["sink_table_rows"] = int(table_rows)
        results["sink_rows_per_s"] = int(table_rows) / elapsed
    finally:
        warehouse.close()
        shutil.rmtree(workdir, ignore_errors=True)
    table = Table(
        title=f"Warehouse sink ({results['cores']} cores, embedded ClickHouse, broker on this machine)"
    )
    table.add_column("setup")
    table.add_column("events/s", justify="right")
    table.add_column("rows/s (all tables)", justify="right")
    bare = results["bare_insert_rows_per_s"]
    table.add_row(
        "bare clickhouse-connect insert loop, 10k rows/insert (baseline)",
        f"{bare:,.0f}",
        f"{bare:,.0f}",
    )
    label = (
        "sink: consume, decode, insert events" + (" + layout tables" if layout else "") + ", commit"
    )
    table.add_row(
        label, f"{results['sink_events_per_s']:,.0f}", f"{results['sink_rows_per_s']:,.0f}"
    )
    report(table, results, json_out)
