"""Prometheus metrics of the gateway, in a registry of the app's own."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.job_stats import QueueFigures
from core.jobs import DEAD, StatusTable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 524288, 1048576)


class GatewayMetrics:
    """Requests and events by outcome, produce latency, in-flight requests, payload sizes,
    jobs enqueued and DEAD."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "sluice_gateway_requests_total",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.events = Counter(
            "sluice_gateway_events_total",
            "Events by source and outcome (accepted, rejected, failed).",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.produce_seconds = Histogram(
            "sluice_gateway_produce_seconds",
            "Time from produce to the broker's confirmation of a request's events.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "sluice_gateway_in_flight_requests",
            "Requests being handled now.",
            registry=self.registry,
        )
        self.payload_bytes = Histogram(
            "sluice_gateway_payload_bytes",
            "Decoded request body sizes.",
            buckets=SIZE_BUCKETS,
            registry=self.registry,
        )
        self.connections = Gauge(
            "sluice_gateway_open_connections",
            "Client connections open now.",
            registry=self.registry,
        )
        self.refused_connections = Counter(
            "sluice_gateway_refused_connections_total",
            "Connections refused (503, then closed) because max_connections were open.",
            registry=self.registry,
        )
        self.jobs_enqueued = Counter(
            "sluice_gateway_jobs_enqueued_total",
            "Jobs submitted over HTTP and confirmed by Kafka, by queue.",
            ["queue"],
            registry=self.registry,
        )

    def watch_jobs(self, table: StatusTable, figures: QueueFigures) -> None:
        """Gauges read from the job status table when scraped: DEAD jobs per queue."""
        self.registry.register(_JobGauges(table, figures))


class _JobGauges(Collector):
    def __init__(self, table: StatusTable, figures: QueueFigures) -> None:
        self._table = table
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        dead = GaugeMetricFamily(
            "sluice_gateway_jobs_dead",
            "Jobs DEAD now (their statuses in the gateway's table), by queue.",
            labels=["queue"],
        )
        for queue in self._figures.queues():
            dead.add_metric([queue], self._table.counts(queue)[DEAD])
        yield dead
