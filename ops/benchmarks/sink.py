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
    copy_window: Annotated[
        int | None,
        typer.Option(help="The sink's copy window (default: SLUICE_WAREHOUSE_COPY_WINDOW's)."),
    ] = None,
    compare: Annotated[
        bool, typer.Option(help="Also run the sink with the copy window off (0), for its cost.")
    ] = True,
    bootstrap: Bootstrap = None,
    json_out: JsonOut = None,
) -> None:
    """Warehouse sink rows/s (Kafka to embedded ClickHouse) next to a bare insert loop.

    The sink runs with its copy window and, with `--compare`, again without it on the same
    records (fresh tables and consumer group).
    """

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
    settings = WarehouseSettings(dsn=f"chdb://{workdir}")
    warehouse = Warehouse(settings)
    if copy_window is None:
        copy_window = settings.copy_window
    windows = [copy_window, 0] if compare and copy_window else [copy_window]
    results: dict[str, Any] = {"events": events, "layout": layout, "cores": os.cpu_count()}
    runs: list[dict[str, Any]] = []
    try:
        codec = event_codec(logical_types=False)
        decoded = [codec.decode(v) for _, v in records]
        for i, e in enumerate(decoded):
            e["_topic"], e["_partition"], e["_offset"] = topic, 0, i
        columns = [[e[name] for e in decoded] for name in COLUMN_NAMES]
        with console.status("baseline: bare clickhouse-connect inserts, 10,000 rows each ..."):
            results["bare_insert_rows_per_s"] = bare_insert_rate(warehouse, columns, events)
        for window in windows:
            for (name,) in warehouse.query(
                "SELECT name FROM system.tables WHERE database = currentDatabase()"
                " AND name != 'bare'"
            ).rows:
                warehouse.command(f"DROP TABLE `{name}`")
            run_settings = settings.model_copy(
                update={
                    "copy_window": window,
                    "consumer_group": f"{kafka.topic_prefix}-sink-w{window}",
                }
            )
            sink = WarehouseSink(
                warehouse,
                [SinkTarget("warehouse", topic, "events", layout)],
                kafka,
                run_settings,
                codec,
            )
            with console.status(
                f"sink, copy window {window:,}: Kafka -> decode -> "
                f"{'layout + ' if layout else ''}insert -> commit ..."
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
            table_rows = int(
                warehouse.query(
                    "SELECT sum(total_rows) FROM system.tables WHERE database = currentDatabase()"
                    " AND name NOT IN ('bare', '_sluice_offsets')"
                ).rows[0][0]
            )
            runs.append(
                {
                    "copy_window": window,
                    "sink_events_per_s": events / elapsed,
                    "sink_table_rows": table_rows,
                    "sink_rows_per_s": table_rows / elapsed,
                }
            )
    finally:
        warehouse.close()
        shutil.rmtree(workdir, ignore_errors=True)
    # The first run's figures stay at the top level, as before the comparison existed.
    results.update({k: v for k, v in runs[0].items() if k != "copy_window"})
    results["copy_window"] = copy_window
    results["runs"] = runs
    table = Table(
        title=f"Warehouse sink ({results['cores']} cores, embedded ClickHouse, broker on this machine)"
    )
    table.add_column("setup")
    table.add_column("events/s", justify="right")
    table.add_column("rows/s (all tables)", justify="right")
    table.add_column("events / baseline rows", justify="right")
    bare = results["bare_insert_rows_per_s"]
    table.add_row(
        "bare clickhouse-connect insert loop, 10k rows/insert (baseline)",
        f"{bare:,.0f}",
        f"{bare:,.0f}",
        "1",
    )
    for run in runs:
        label = (
            "sink: consume, decode, insert events"
            + (" + layout tables" if layout else "")
            + f", commit; copy window {run['copy_window']:,}"
        )
        table.add_row(
            label,
            f"{run['sink_events_per_s']:,.0f}",
            f"{run['sink_rows_per_s']:,.0f}",
            f"{run['sink_events_per_s'] / bare:.3f}",
        )
    if len(runs) == 2:
        cost = 1 - runs[0]["sink_events_per_s"] / runs[1]["sink_events_per_s"]
        results["copy_window_cost"] = cost
        table.caption = f"the copy window costs {cost:.1%} of the sink's rate in this run"
    report(table, results, json_out)
