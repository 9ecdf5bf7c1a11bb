"""Process settings, one frozen object per concern, read from `SLUICE_*` environment variables.

Each process builds the settings it needs in its entry point and passes them down;
nothing here is a module-level global.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseSettings):
    """How clients reach Kafka and how Sluice names and sizes its topics."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_KAFKA_", frozen=True)

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "sluice"
    partitions: int = 4
    replication_factor: int = 1
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    def client_config(self) -> dict[str, str | int | float | bool]:
        """The librdkafka properties every Sluice client shares."""
        conf: dict[str, str | int | float | bool] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        return conf


class BrokerSettings(BaseSettings):
    """The local single-node Apache Kafka broker that `sluice kafka` manages."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_BROKER_", frozen=True)

    version: str = "3.9.1"
    scala_version: str = "2.13"
    cache_dir: Path = Path.home() / ".cache" / "sluice" / "kafka"
    state_dir: Path = Path(".sluice") / "kafka"
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9093
    heap: str = "1g"
    start_timeout_s: float = 60.0


class GatewaySettings(BaseSettings):
    """The HTTP ingestion gateway."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_GATEWAY_", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8080
    max_request_bytes: int = 500 * 1024
    max_event_bytes: int = 32 * 1024
    max_json_depth: int = 32
    produce_timeout_s: float = 5.0
    linger_ms: int = 5


class RegistrySettings(BaseSettings):
    """The built-in schema registry's HTTP API (Confluent Schema Registry compatible)."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_REGISTRY_", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8081


class WorkerSettings(BaseSettings):
    """The Faust stream-processing worker."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_WORKER_", frozen=True)

    app_id: str = "sluice-processor"
    batch_size: int = 1000
    batch_within_s: float = 0.1
    produce_timeout_s: float = 30.0
    data_dir: Path = Path(".sluice") / "worker"
    # Prometheus metrics of the worker at http://<metrics_host>:<port>/metrics (0: off).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    log_level: str = "WARNING"
    # exactly_once: each batch's outputs and input offsets in one Kafka transaction per
    # input partition (streams/transactions.py); slower, no duplicates on read_committed.
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"


class WarehouseSettings(BaseSettings):
    """The ClickHouse warehouse sink and its query endpoint."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_WAREHOUSE_", frozen=True)

    dsn: str = "chdb://.sluice/warehouse"
    username: str | None = None
    password: SecretStr | None = None
    database: str = "default"
    table: str = "events"
    batch_rows: int = 10_000
    batch_seconds: float = 1.0
    query_host: str = "127.0.0.1"
    query_port: int = 8124
    consumer_group: str = "sluice-sink"
    # Static group membership: a restarted sink takes its partitions back at once instead
    # of waiting for the old session to time out. Defaults to one id in embedded mode,
    # where only one sink process can own the warehouse anyway.
    instance_id: str | None = None
    session_timeout_ms: int = 10_000


class DeliverySettings(BaseSettings):
    """The delivery process: webhook destinations with their retry tiers and DLQs."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_DELIVERY_", frozen=True)

    host: str = "127.0.0.1"
    # `/health` and `/metrics` of the delivery process.
    port: int = 8125
    # Each destination is delivered by the consumer group `<consumer_group>-<destination>`.
    consumer_group: str = "sluice-delivery"


class AppSettings(BaseSettings):
    """Where the pipeline configuration file lives."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_", frozen=True)

    config_file: Path = Path("sluice.yaml")
    log_level: str = "INFO"


ALL_SETTINGS: tuple[type[BaseSettings], ...] = (
    KafkaSettings,
    BrokerSettings,
    GatewaySettings,
    WorkerSettings,
    WarehouseSettings,
    DeliverySettings,
    AppSettings,
)


def env_names() -> set[str]:
    """Every environment variable name the settings models read."""
    names: set[str] = set()
    for model in ALL_SETTINGS:
        prefix = str(model.model_config.get("env_prefix", ""))
        names.update((prefix + field).upper() for field in model.model_fields)
    return names
