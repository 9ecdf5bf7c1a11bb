"""Process settings, one frozen object per concern, read from `SLUICE_*` environment variables.

Each process builds the settings it needs in its entry point and passes them down;
nothing here is a module-level global.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class KafkaSettings(BaseSettings):
    """How clients reach Kafka and how Sluice names and sizes its topics."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_KAFKA_", frozen=True)

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "sluice"
    partitions: int = 4
    # Replicas of each of Sluice's topics, and how many must have a write before it counts
    # (acks=all). None: from the cluster `sluice topics apply` talks to: 3 and 2 on 3 or
    # more brokers, else one replica per broker and 1.
    replication_factor: int | None = Field(default=None, ge=1)
    min_insync_replicas: int | None = Field(default=None, ge=1)
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


class KafkaUsersSettings(BaseSettings):
    """The SCRAM users of Sluice's roles on a cluster Sluice did not format
    (`sluice kafka users apply`, run as the admin): a role without a password is skipped."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_KAFKA_USERS_", frozen=True)

    mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    gateway_password: SecretStr | None = None
    worker_password: SecretStr | None = None
    sink_password: SecretStr | None = None
    delivery_password: SecretStr | None = None
    jobs_password: SecretStr | None = None
    registry_password: SecretStr | None = None
    workflows_password: SecretStr | None = None

    def passwords(self) -> dict[str, str]:
        """Role -> password, for the roles that have one."""
        found = {
            name.removesuffix("_password"): value
            for name, value in self.__dict__.items()
            if name.endswith("_password") and value is not None
        }
        return {role: secret.get_secret_value() for role, secret in found.items()}


class BrokerSettings(BaseSettings):
    """The local single-node Apache Kafka broker that `sluice kafka` manages."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_BROKER_", frozen=True)

    # The newest Apache Kafka 4.x that resolves from Maven Central; 3.9.x still runs
    # (SLUICE_BROKER_VERSION=3.9.1).
    version: str = "4.4.0"
    scala_version: str = "2.13"
    # Nodes of the local cluster (`sluice kafka start --brokers 3`): node i listens on
    # port + 2(i-1) and controller_port + 2(i-1), its state in state_dir/node-<i>.
    brokers: int = Field(default=1, ge=1, le=9)
    cache_dir: Path = Path.home() / ".cache" / "sluice" / "kafka"
    state_dir: Path = Path(".sluice") / "kafka"
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9093
    heap: str = "1g"
    start_timeout_s: float = 60.0
    # Authenticated mode: clients log in with SASL/SCRAM-SHA-512, one user per role, and the
    # broker authorizes every request by ACLs (`sluice kafka start --sasl`). Decided when the
    # state folder is first formatted; its credentials live there.
    sasl: bool = False


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
    # A request's head must be complete within read_timeout_s of its connection opening
    # or of the previous response (idle keep-alive connections close after it too), and
    # its body within read_timeout_s of the head (else 408): a client sending a byte a
    # second holds a connection for a bounded time.
    read_timeout_s: float = 10.0
    # Connections one process holds at once; one past it gets 503 and is closed.
    max_connections: int = 4096


class RegistrySettings(BaseSettings):
    """The built-in schema registry's HTTP API (Confluent Schema Registry compatible)."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_REGISTRY_", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8081
    # Writes (register a schema, set a compatibility level, anything that is not a read)
    # need HTTP Basic auth with these; reads stay open, as in Confluent's registry.
    # Without a password no write is accepted at all (403): never anonymous writes.
    write_user: str = "sluice"
    write_password: SecretStr | None = None


class TransformSettings(BaseSettings):
    """Where the destination transforms a config names may be imported from."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_TRANSFORM_", frozen=True)

    # Allowed module prefixes, comma-separated in SLUICE_TRANSFORM_MODULES: `transforms`
    # allows the module `transforms` and everything under it (`transforms.crm`). A config
    # naming any other module is refused; nothing is imported to find that out.
    modules: Annotated[tuple[str, ...], NoDecode] = ("transforms",)

    @field_validator("modules", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def allows(self, module: str) -> bool:
        """Whether `module` is one of the allowed modules or lies under one."""
        for prefix in self.modules:
            base = prefix.rstrip(".")
            if base and (module == base or module.startswith(base + ".")):
                return True
        return False


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
    # `/ready` on the metrics port fails once ingest records wait and no batch's outputs
    # were confirmed for this long (or the agent died), so an orchestrator restarts it.
    stall_after_s: float = 120.0


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
    # `POST /query` needs `Authorization: Bearer <query_token>`. Unset (or empty): the sink
    # generates one into `query_token_file` (mode 0600), where `sluice sql` reads it.
    query_token: SecretStr | None = None
    query_token_file: Path = Path(".sluice") / "query-token"
    # Bounds of one query (ClickHouse's max_execution_time, max_result_rows/bytes with
    # result_overflow_mode=throw, max_memory_usage; the JSON answer is capped at
    # query_max_bytes too); queries run with readonly=1.
    query_timeout_s: float = 30.0
    query_max_rows: int = 100_000
    query_max_bytes: int = 64 * 1024 * 1024
    query_max_memory_bytes: int = 512 * 1024 * 1024
    # A ClickHouse server's user for queries (default: the sink's); best one with only
    # SELECT on the database.
    query_username: str | None = None
    query_password: SecretStr | None = None
    consumer_group: str = "sluice-sink"
    # Static group membership: a restarted sink takes its partitions back at once instead
    # of waiting for the old session to time out. Defaults to one id in embedded mode,
    # where only one sink process can own the warehouse anyway.
    instance_id: str | None = None
    session_timeout_ms: int = 10_000
    # The consumer leaves its group when it does not poll for this long; the sink keeps
    # polling (partitions paused) while it retries an insert, so an outage never does.
    max_poll_interval_ms: int = 300_000
    # `/ready` fails when records wait and no batch was loaded or dead-lettered for this long.
    stall_after_s: float = 120.0
    # Each source writes into at most this many distinct track-event tables; events of
    # further names land in the raw table and `tracks` only, and in `discards`.
    max_event_tables: int = 200
    # A layout table gets at most this many columns; values of further properties go to
    # `discards` (the event itself still lands).
    max_columns: int = 500
    # The last this many event ids of each partition are remembered (and read from the
    # raw table on assignment): a later copy of one of them is dropped. 0 turns it off.
    copy_window: int = 100_000


class DeliverySettings(BaseSettings):
    """The delivery process: webhook destinations with their retry tiers and DLQs."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_DELIVERY_", frozen=True)

    host: str = "127.0.0.1"
    # `/health` and `/metrics` of the delivery process.
    port: int = 8125
    # Each destination is delivered by the consumer group `<consumer_group>-<destination>`.
    consumer_group: str = "sluice-delivery"
    # `/ready` fails when a destination has records waiting but moved none on (delivered,
    # to a retry tier, dead-lettered, held) for this long: a loop stuck in an await.
    stall_after_s: float = 120.0
    # Order-preserving retries: at most this many records of a destination are held in
    # memory behind parked keys; at the bound, a partition whose next record must be held
    # is paused until they drain (records of other partitions go on).
    max_held_records: int = 10_000
    # The consumer's max.poll.interval.ms: the poll loop never blocks (restores of the
    # parked changelog run beside it), so Kafka's default is kept.
    max_poll_interval_ms: int = 300_000
    # `${NAME}` in a webhook's URL, headers and auth expands only names that start with
    # this prefix (empty: none do), or that the destination lists in `secrets`; anything
    # else refuses the config. Every process checks configs: set it alike on all of them.
    secret_prefix: str = "SLUICE_SECRET_"  # noqa: S105 -- a prefix of names, no secret
    # Names a destination's `secrets` may never list (comma-separated prefixes): Sluice's
    # own settings and the usual cloud and platform credentials.
    secret_denied_prefixes: str = (
        "SLUICE_,AWS_,AZURE_,ARM_,GOOGLE_,GCP_,GCLOUD_,CLOUDSDK_,KUBE,DOCKER_,GITHUB_,"  # noqa: S105
        "GITLAB_,CI_,VAULT_,KAFKA_,CLICKHOUSE_,PG,MYSQL_,REDIS_"
    )
    # Refuse webhook targets (the URL's address, every address its name resolves to when
    # connecting, and redirect targets) that are loopback, private, link-local (cloud
    # metadata), multicast, unspecified or reserved. Off by default for the local demo,
    # whose webhooks post to 127.0.0.1; docker-compose turns it on.
    block_private_targets: bool = False

    def secret_refusal(self, name: str, listed: tuple[str, ...]) -> str | None:
        """Why `${name}` may not be expanded for a destination listing `listed` (None: it may)."""
        if name in env_names():
            return "it is a Sluice setting"
        if self.secret_prefix and name.startswith(self.secret_prefix):
            return None
        if name not in listed:
            return (
                f"only names starting with {self.secret_prefix!r} or listed in the"
                " destination's `secrets` are expanded"
            )
        denied = [p.strip() for p in self.secret_denied_prefixes.split(",") if p.strip()]
        if any(name.startswith(prefix) for prefix in denied):
            return "`secrets` may not list it (SLUICE_DELIVERY_SECRET_DENIED_PREFIXES)"
        return None


class JobSettings(BaseSettings):
    """The job worker process: the queues whose executor runs in it."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_JOBS_", frozen=True)

    host: str = "127.0.0.1"
    # `/health`, `/ready` and `/metrics` of the job worker.
    port: int = 8126
    # Each queue is worked by the consumer group `<consumer_group>-<queue>`.
    consumer_group: str = "sluice-jobs"
    # Modules a queue's python executor may name (comma-separated prefixes, as for
    # SLUICE_TRANSFORM_MODULES): `jobs` allows `jobs` and `jobs.billing`.
    modules: Annotated[tuple[str, ...], NoDecode] = (
        "jobs",
        "connectors.jobs.builtin",
        "connectors.workflows.tools",
    )
    # The group's session timeout: how soon a killed worker's partitions go to another.
    session_timeout_ms: int = 10_000
    # Jobs a queue's loop keeps read and due but not started, per priority: at this many
    # the priority's partitions are paused until half of them started.
    max_ready: int = 10_000
    # `/ready` fails when a queue has jobs due but started or finished none for this long.
    stall_after_s: float = 120.0
    # Programs a queue's command executor may run (comma-separated; a directory allows
    # every program under it). None by default: whoever can write the config topic must
    # not be able to run what they like on the workers.
    commands: Annotated[tuple[str, ...], NoDecode] = ()
    # Where each command job gets its working directory (removed after the attempt);
    # unset: `sluice-jobs` in the system's temporary directory.
    work_dir: Path | None = None
    # An http executor connects to public addresses only (as webhooks do with
    # SLUICE_DELIVERY_BLOCK_PRIVATE_TARGETS): no loopback, private or link-local ones.
    block_private_targets: bool = False

    @field_validator("modules", "commands", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def allows(self, module: str) -> bool:
        """Whether `module` is one of the allowed modules or lies under one."""
        return TransformSettings(modules=self.modules).allows(module)

    def allows_command(self, program: Path) -> bool:
        """Whether the program (an absolute, resolved path) is allowed or lies under an
        allowed directory."""
        for allowed in self.commands:
            root = Path(allowed).resolve()
            if program == root or program.is_relative_to(root):
                return True
        return False


class WorkflowSettings(BaseSettings):
    """The workflow orchestrator and the tools its steps run (README, "Workflows")."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_WORKFLOWS_", frozen=True)

    host: str = "127.0.0.1"
    # `/health`, `/ready` and `/metrics` of the orchestrator.
    port: int = 8127
    consumer_group: str = "sluice-workflows"
    # Names this orchestrator's transactional producer (`sluice-workflows-<instance>`): one
    # per orchestrator process, the same across its restarts, so that a restarted one fences
    # the writes its killed predecessor left open.
    instance: str = "0"
    # The job queue whose jobs run the python, http, postgres, duckdb and warehouse steps
    # (its executor: `connectors.workflows.tools:run_step`).
    queue: str = "workflows"
    # A parallel loop without `max_in_flight` runs at most this many items at once.
    max_in_flight: int = 1000
    # A step's tool runs at most this long unless it says otherwise (`timeout`).
    timeout_s: float = 300.0
    # A step result over this many bytes (JSON) fails its step: events must fit a record.
    max_result_bytes: int = 512 * 1024
    # Results over this many bytes are shown in a run's status as a reference to the
    # event that holds them.
    status_result_bytes: int = 4096
    # Named credentials (`auth:` of a step): a file of that name here, or the variable
    # SLUICE_CREDENTIAL_<NAME> (upper case, `-` and `.` as `_`). Read by the tool runner
    # only, when a step runs; never written to a topic.
    credentials_dir: Path | None = None
    # Environment variables a python step's process gets (beside PATH and HOME).
    python_env: Annotated[tuple[str, ...], NoDecode] = ("LANG", "LC_ALL", "TZ")

    @field_validator("python_env", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value


class AppSettings(BaseSettings):
    """Where the pipeline configuration file lives."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_", frozen=True)

    config_file: Path = Path("sluice.yaml")
    log_level: str = "INFO"


ALL_SETTINGS: tuple[type[BaseSettings], ...] = (
    KafkaSettings,
    KafkaUsersSettings,
    BrokerSettings,
    GatewaySettings,
    RegistrySettings,
    TransformSettings,
    WorkerSettings,
    WarehouseSettings,
    DeliverySettings,
    JobSettings,
    WorkflowSettings,
    AppSettings,
)


def env_names() -> set[str]:
    """Every environment variable name the settings models read."""
    names: set[str] = set()
    for model in ALL_SETTINGS:
        prefix = str(model.model_config.get("env_prefix", ""))
        names.update((prefix + field).upper() for field in model.model_fields)
    return names
