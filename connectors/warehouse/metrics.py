"""The warehouse sink's Prometheus metrics, by destination (`sluice_sink_*`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SinkMetrics:
    """Rows written, batches, flush latency and errors, by destination."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rows = Counter(
            "sluice_sink_rows_total", "Rows inserted.", ["destination"], registry=self.registry
        )
        self.batches = Counter(
            "sluice_sink_batches_total",
            "Batches inserted.",
            ["destination"],
            registry=self.registry,
        )
        self.errors = Counter(
            "sluice_sink_errors_total",
            "Failures by class.",
            ["destination", "error"],
            registry=self.registry,
        )
        self.deduplicated = Counter(
            "sluice_sink_deduplicated_records_total",
            "Records skipped because their offsets are loaded already (replays, redeliveries)"
            " or their event is (copies within the copy window).",
            ["destination"],
            registry=self.registry,
        )
        self.new_columns = Counter(
            "sluice_sink_new_columns_total",
            "Columns added for new properties.",
            ["destination"],
            registry=self.registry,
        )
        self.discarded = Counter(
            "sluice_sink_discarded_values_total",
            "Values that did not fit their column's type (recorded in `discards`).",
            ["destination"],
            registry=self.registry,
        )
        self.overflow = Counter(
            "sluice_sink_overflow_total",
            "What a table limit kept out (recorded in `discards`): track events past a "
            "source's SLUICE_WAREHOUSE_MAX_EVENT_TABLES (limit=event_tables), property "
            "values past a table's SLUICE_WAREHOUSE_MAX_COLUMNS (limit=columns).",
            ["destination", "limit"],
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "sluice_sink_dead_lettered_records_total",
            "Records sent to the destination's DLQ: undecodable, or refused by the warehouse.",
            ["destination", "error"],
            registry=self.registry,
        )
        self.rebalances = Counter(
            "sluice_sink_partitions_total",
            "Partitions assigned to or revoked from this sink.",
            ["event"],
            registry=self.registry,
        )
        self.flush_seconds = Histogram(
            "sluice_sink_flush_seconds",
            "Time to insert a batch and commit it.",
            ["destination"],
            buckets=FLUSH_BUCKETS,
            registry=self.registry,
        )
