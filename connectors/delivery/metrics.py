"""The delivery's Prometheus metrics, one set per process with a `destination` label.

Requests and events by outcome, the breaker's state, retries and dead letters, how late
retries were attempted, parked keys and held records, paused and restoring partitions,
and the seconds since a destination last moved a record on.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class DeliveryMetrics:
    """Requests and events by outcome, retries, dead letters, lateness, parked keys."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "sluice_webhook_requests_total",
            "Webhook requests by outcome (delivered, retriable, fatal).",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.events = Counter(
            "sluice_webhook_events_total",
            "Events by outcome: delivered, retried (to a tier), dead_lettered, held (behind a"
            " parked key), stale (a retry copy whose record was resolved already).",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.breaker = Gauge(
            "sluice_webhook_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["destination"],
            registry=self.registry,
        )
        self.retries = Counter(
            "sluice_retry_records_total",
            "Records sent to a retry tier.",
            ["destination", "tier"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "sluice_dlq_records_total",
            "Records written to the destination's DLQ.",
            ["destination", "stage", "error_class"],
            registry=self.registry,
        )
        self.lateness = Histogram(
            "sluice_retry_lateness_seconds",
            "How long after its due time a retried record was attempted.",
            ["destination", "tier"],
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self.parked = Gauge(
            "sluice_retry_parked_keys",
            "Keys whose later records wait behind a record in a retry tier.",
            ["destination"],
            registry=self.registry,
        )
        self.paused = Gauge(
            "sluice_delivery_paused_partitions",
            "Partitions paused: a retry waiting for its due time, a full lane, the held-records"
            " bound reached, or the parked changelog being restored.",
            ["destination"],
            registry=self.registry,
        )
        self.held = Gauge(
            "sluice_retry_held_records",
            "Records held in memory behind parked keys (at most SLUICE_DELIVERY_MAX_HELD_RECORDS,"
            " plus what a restored changelog brought).",
            ["destination"],
            registry=self.registry,
        )
        self.restoring = Gauge(
            "sluice_retry_restoring_partitions",
            "Partitions whose parked changelog is being read (paused until it is).",
            ["destination"],
            registry=self.registry,
        )
        self.since_progress = Gauge(
            "sluice_delivery_seconds_since_progress",
            "Seconds since the destination last moved a record on while records wait"
            " (0 when none wait).",
            ["destination"],
            registry=self.registry,
        )
