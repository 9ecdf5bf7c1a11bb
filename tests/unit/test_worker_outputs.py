"""The worker's outputs that Kafka refuses, and its readiness, through real worker processes.

An output Kafka refuses for good (over a topic's `max.message.bytes`, or over the
producer's `message.max.bytes`) sends its event to the destination's DLQ with the reason,
and everything else of the batch is confirmed once. A worker with input waiting that
completes no batch stops being ready once its stall limit passed, and is ready again once
it moves.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from core.watchdog import StallWatchdog
from streams.health import serve
from tests.pipeline import (
    free_port,
    http_text,
    probe,
)


@dataclass
class ConfigFollowing:
    """What the worker's probes ask of its config follower, set by the test."""

    not_ready: str | None = None
    died: str | None = None

    def problem(self) -> str | None:
        return self.not_ready

    def failure(self) -> str | None:
        return self.died


def test_the_worker_endpoint_fails_health_and_readiness_once_its_agent_died() -> None:
    registry = CollectorRegistry()
    watchdog = StallWatchdog("processor", 120, registry=registry)
    died: list[str] = []
    port = free_port()
    server = serve(
        "127.0.0.1", port, registry, watchdog, lambda: died[0] if died else None, ConfigFollowing()
    )
    try:
        assert probe(port) == (200, {"status": "ready", "seconds_since_progress": 0.0})
        assert "sluice_processor_seconds_since_progress" in http_text(
            f"http://127.0.0.1:{port}/metrics"
        )
        died.append("processor agent died: RuntimeError: boom")
        watchdog.fail(died[0])
        status, body = probe(port)
        assert (status, body["reason"]) == (503, "processor agent died: RuntimeError: boom")
        assert probe(port, "/health")[0] == 503
    finally:
        server.shutdown()
        server.server_close()


def test_the_worker_endpoint_is_not_ready_while_its_config_topic_is_not_read() -> None:
    registry = CollectorRegistry()
    watchdog = StallWatchdog("processor", 120, registry=registry)
    config = ConfigFollowing(not_ready="t.config not read to its end yet")
    port = free_port()
    server = serve("127.0.0.1", port, registry, watchdog, lambda: None, config)
    try:
        status, body = probe(port)
        assert (status, body["reason"]) == (503, "t.config not read to its end yet")
        assert probe(port, "/health")[0] == 200  # following, only not there yet
        config.not_ready = None
        assert probe(port)[0] == 200
        # Stalled and failing to read the config: both reasons, in one answer.
        watchdog.fail("processor stalled")
        config.not_ready = "following t.config: RuntimeError: no partitions to read"
        status, body = probe(port)
        assert (status, body["reason"]) == (
            503,
            "processor stalled; following t.config: RuntimeError: no partitions to read",
        )
        config.died = "following t.config stopped: SystemExit: 1"
        status, body = probe(port, "/health")
        assert (status, body["reason"]) == (503, "following t.config stopped: SystemExit: 1")
    finally:
        server.shutdown()
        server.server_close()
