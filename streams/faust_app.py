"""The worker's Faust app: raw bytes in and out, topics never declared, batched delivery."""

from __future__ import annotations

import ssl

import faust

from core.errors import ConfigError
from core.settings import KafkaSettings, WorkerSettings
from streams.transport import BatchedTransport, TransactionalTransport


def faust_brokers(bootstrap_servers: str) -> list[str]:
    """Faust's broker URLs for a librdkafka-style `host:port,host:port` list."""
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server]


def _credentials(kafka: KafkaSettings) -> faust.SASLCredentials | None:
    """The SASL login of `SLUICE_KAFKA_*` for Faust's aiokafka clients (None: no login)."""
    if not kafka.security_protocol.startswith("SASL_"):
        return None
    if kafka.sasl_mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        raise ConfigError(
            f"the worker logs in with PLAIN or SCRAM, not {kafka.sasl_mechanism or 'no mechanism'}"
            " (SLUICE_KAFKA_SASL_MECHANISM)"
        )
    password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=password,
        mechanism=kafka.sasl_mechanism,
        ssl_context=ssl.create_default_context() if kafka.security_protocol == "SASL_SSL" else None,
    )


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
        broker_credentials=_credentials(kafka),
    )
    # Fetched batches reach the agents under one flow-control check (streams/transport.py).
    transport = (
        TransactionalTransport
        if settings.processing_guarantee == "exactly_once"
        else BatchedTransport
    )
    app.transport = transport(app.conf.broker_consumer, app)
    return app
