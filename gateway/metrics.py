"""Prometheus metrics of the gateway, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 524288, 1048576)


class GatewayMetrics:
    """Requests and events by outcome, produce latency, in-flight requests, payload sizes."""

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
