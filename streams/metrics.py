"""The processor's metrics: events by destination and outcome, batch latency, lag."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streams.processor import Routed

BATCH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ProcessorMetrics:
    """Events processed by destination and outcome, and batch latency."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.events = Counter(
            "sluice_processor_events_total",
            "Events by destination and outcome: routed (records written), filtered,"
            " transformed (a transform returned), dropped (by a transform), failed (to the DLQ);"
            " rejected, unrouted and flagged (by a tracking plan) have no destination.",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "sluice_processor_batch_seconds",
            "Time to route a batch and have its output confirmed.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.lag = Gauge(
            "sluice_processor_consumer_lag",
            "Records of an ingest partition not processed yet, as of this worker's last batch"
            " from it.",
            ["topic", "partition"],
            registry=self.registry,
        )


def count_outcomes(
    metrics: ProcessorMetrics, passes: list[Routed], refused: dict[str, int]
) -> None:
    """Count a batch's outcomes; outputs Kafka refused count as refused, not routed."""
    delivered: dict[str, int] = {}
    for routed in passes:
        for dest, count in routed.delivered.items():
            delivered[dest] = delivered.get(dest, 0) + count
    for dest, count in refused.items():
        delivered[dest] = max(0, delivered.get(dest, 0) - count)
    for dest, count in delivered.items():
        if count:
            metrics.events.labels(dest, "routed").inc(count)
    for dest, count in refused.items():
        metrics.events.labels(dest, "refused").inc(count)
    for routed in passes:
        for outcome, counts in (
            ("filtered", routed.filtered),
            ("transformed", routed.transformed),
            ("dropped", routed.dropped),
            ("failed", routed.failed),
        ):
            for dest, count in counts.items():
                metrics.events.labels(dest, outcome).inc(count)
        for outcome, count in (
            ("rejected", routed.rejected),
            ("unrouted", routed.unrouted),
            ("flagged", routed.flagged),
        ):
            if count:
                metrics.events.labels("", outcome).inc(count)
