"""The worker's Faust app: raw bytes in and out, topics never declared, batched delivery."""

from __future__ import annotations

import faust

from core.settings import KafkaSettings, WorkerSettings
from streams.transport import BatchedTransport, TransactionalTransport


def faust_brokers(bootstrap_servers: str) -> list[str]:
    """Faust's broker URLs for a librdkafka-style `host:port,host:port` list."""
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server]


def create_app(settings: WorkerSettings, kafka: KafkaSettings) -> faust.App:
    """A Faust app that only consumes the topics `sluice topics apply` created."""
    app = faust.App(
        settings.app_id,
        broker=faust_brokers(kafka.bootstrap_servers),
        key_serializer="raw",
        value_serializer="raw",
        datadir=str(settings.data_dir),
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # A worker that died is noticed in 10 s, not Faust's default 60 s, so its
        # partitions move to the others quickly.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        producer_acks=-1,
    )
    # Fetched batches reach the agents under one flow-control check (streams/transport.py).
    transport = (
        TransactionalTransport
        if settings.processing_guarantee == "exactly_once"
        else BatchedTransport
    )
    app.transport = transport(app.conf.broker_consumer, app)
    return app
