"""The pipeline configuration: sources (write keys), destinations and job queues, from one
YAML file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from croniter import croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import ConfigError
from core.settings import DeliverySettings, TransformSettings
from core.transforms import TRANSFORMS_CONTEXT, Transform, TransformFunction, resolve_function

ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_TIER = re.compile(r"^(\d+)(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# `${NAME}` in a webhook's settings; in a URL's path pydantic keeps it percent-encoded.
SECRET_REF = re.compile(r"\$(?:\{|%7[Bb])([A-Z0-9_]+)(?:\}|%7[Dd])")


def tier_seconds(tier: str) -> float:
    """The delay of a retry tier written like ``5s``, ``1m`` or ``500ms``."""
    match = _TIER.match(tier)
    if not match:
        raise ValueError(f"retry tier {tier!r} is not like 500ms, 5s, 1m or 2h")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Model):
    """A token bucket: `events_per_s` sustained, up to `burst` at once."""

    events_per_s: float = Field(gt=0)
    burst: int = Field(default=0, ge=0)

    @property
    def capacity(self) -> float:
        """The bucket's size: `burst`, or one second's worth of events."""
        return float(self.burst) if self.burst else self.events_per_s


PropertyType = Literal["string", "number", "integer", "boolean", "object", "array", "any"]


class PlannedEvent(_Model):
    """A track event of a tracking plan: its required properties and property types."""

    required: dict[str, PropertyType] = Field(default_factory=dict)
    optional: dict[str, PropertyType] = Field(default_factory=dict)


class TrackingPlan(_Model):
    """Rules per track event name; what happens to an event that breaks them."""

    events: dict[str, PlannedEvent] = Field(default_factory=dict)
    # Track events whose name the plan does not list: allowed, or a violation.
    unplanned: Literal["allow", "violate"] = "allow"
    on_violation: Literal["reject", "flag"] = "flag"


class Source(_Model):
    """Where events come from: one or more write keys that map to a source id."""

    id: Annotated[str, Field(pattern=ID_PATTERN)]
    name: str = ""
    write_keys: Annotated[tuple[str, ...], Field(min_length=1)]
    enabled: bool = True
    rate_limit: RateLimit | None = None
    tracking_plan: TrackingPlan | None = None


class RetryPolicy(_Model):
    """How a destination retries: delay tiers, and when a record is given up to the DLQ.

    The n-th failure of a record waits in tier n (the last tier once they run out), for
    the tier's delay plus up to `jitter` of it. A record is given up only when both
    limits are spent: it has had `max_attempts` attempts and its first failure is
    `max_age_s` old. So a record that keeps failing gets at least `max_attempts` tries,
    and a destination that is down for less than `max_age_s` loses nothing to the DLQ.
    With `preserve_order`, while an event of a key waits in a retry tier, later events
    of that key wait behind it and are delivered after it, in order.
    """

    tiers: Annotated[tuple[str, ...], Field(min_length=1)] = ("5s", "1m", "10m")
    max_attempts: int = Field(default=5, ge=1)
    max_age_s: float = Field(default=0.0, ge=0)
    jitter: float = Field(default=0.1, ge=0, le=1)
    preserve_order: bool = False
    # The longest wait a destination's `Retry-After` is honoured for; longer (or
    # infinite) values are capped to it, unparseable ones ignored, so a header never
    # parks a record for years.
    max_retry_after_s: float = Field(default=3600.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _tiers_parse(self) -> RetryPolicy:
        delays = [tier_seconds(tier) for tier in self.tiers]
        if delays != sorted(delays) or len(set(delays)) != len(delays):
            raise ValueError(f"retry tiers must grow: {list(self.tiers)}")
        return self

    @property
    def delays(self) -> tuple[float, ...]:
        """The tiers' delays in seconds."""
        return tuple(tier_seconds(tier) for tier in self.tiers)


class WebhookAuth(_Model):
    """Basic or bearer credentials; values may name allowed environment variables as `${NAME}`."""

    type: Literal["basic", "bearer"]
    username: str = ""
    password: str = ""
    token: str = ""


class WebhookRateLimit(_Model):
    """Requests a second for the whole destination, across all of its delivery processes."""

    requests_per_s: float = Field(gt=0)


class Breaker(_Model):
    """Open after `failures` consecutive failures; probe again after `cooldown_s`."""

    failures: int = Field(default=5, ge=1)
    cooldown_s: float = Field(default=30.0, gt=0)


class WebhookConfig(_Model):
    """The `settings` of a `type: webhook` destination."""

    url: HttpUrl
    headers: dict[str, str] = Field(default_factory=dict)
    auth: WebhookAuth | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    batch_size: int = Field(default=1, ge=1, le=1000)
    rate_limit: WebhookRateLimit | None = None
    breaker: Breaker = Breaker()
    # Environment variables that `${NAME}` may expand besides SLUICE_DELIVERY_SECRET_PREFIX's.
    secrets: tuple[Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")], ...] = ()
    # Off: a 3xx answer is a fatal error. On: redirects within the URL's origin are
    # followed (the POST repeated there); one to another origin is still refused.
    follow_redirects: bool = False

    @model_validator(mode="after")
    def _no_reference_in_the_host(self) -> WebhookConfig:
        if "$" in (self.url.host or ""):
            raise ValueError("url: `${NAME}` may stand in its path or query, not in its host")
        return self

    def secret_references(self) -> list[tuple[str, str]]:
        """Every `${NAME}` the settings use, as (field, NAME), fields like `headers.X-Key`."""
        fields = [("url", str(self.url))]
        fields += [(f"headers.{name}", value) for name, value in self.headers.items()]
        if self.auth is not None:
            fields += [
                (f"auth.{k}", getattr(self.auth, k)) for k in ("username", "password", "token")
            ]
        return [(where, m.group(1)) for where, text in fields for m in SECRET_REF.finditer(text)]


class ClickHouseConfig(_Model):
    """The `settings` of a `type: clickhouse` destination."""

    table: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "events"
    layout: bool = True


class PropertyRule(_Model):
    """A predicate on one property: `{property: plan, op: eq, value: pro}`.

    `property` is a dotted path into the event's properties (or traits for identify
    events); `exists` needs no value, `in` takes a list.
    """

    property: Annotated[str, Field(min_length=1)]
    op: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "exists"]
    value: object = None

    @model_validator(mode="after")
    def _value_fits_the_op(self) -> PropertyRule:
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError(f"rule on {self.property!r}: `in` needs a list value")
        if self.op in ("gt", "gte", "lt", "lte") and (
            isinstance(self.value, bool) or not isinstance(self.value, int | float | str)
        ):
            raise ValueError(f"rule on {self.property!r}: `{self.op}` needs a number or a string")
        return self


class EventFilter(_Model):
    """Which events a destination takes: by type, by name, by property predicates.

    Empty allow-lists allow everything; deny-lists win over allow-lists; every `where`
    rule must hold.
    """

    allow_types: tuple[str, ...] = ()
    deny_types: tuple[str, ...] = ()
    allow_events: tuple[str, ...] = ()
    deny_events: tuple[str, ...] = ()
    where: tuple[PropertyRule, ...] = ()


def resolve_transforms(
    cfg: PipelineConfig, transforms: TransformSettings
) -> dict[str, TransformFunction]:
    """Import the transform of every destination that has one: destination id -> function."""
    return {
        dest.id: resolve_function(dest.transform.function, transforms)
        for dest in cfg.destinations
        if dest.transform is not None
    }


class Destination(_Model):
    """Where events go: a connector type, its settings and the sources routed to it."""

    id: Annotated[str, Field(pattern=ID_PATTERN)]
    type: Literal["clickhouse", "webhook"]
    sources: tuple[str, ...] = ()
    enabled: bool = True
    retry: RetryPolicy = RetryPolicy()
    filter: EventFilter = EventFilter()
    transform: Transform | None = None
    settings: dict[str, object] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _settings_fit_the_type(self) -> Destination:
        connector = self.connector()
        if isinstance(connector, WebhookConfig):
            # Every process validates configs (CLI, gateway, worker, sink and delivery
            # followers), so the rule is read from the environment they are started with.
            delivery = DeliverySettings()
            for where, name in connector.secret_references():
                if reason := delivery.secret_refusal(name, connector.secrets):
                    raise ValueError(
                        f"destination {self.id!r}: settings.{where} names ${{{name}}},"
                        f" which is not expanded: {reason}"
                    )
        return self

    def connector(self) -> ClickHouseConfig | WebhookConfig:
        """The validated settings of this destination's connector type."""
        if self.type == "webhook":
            return WebhookConfig.model_validate(self.settings)
        return ClickHouseConfig.model_validate(self.settings)


# Job priorities: 0 (lowest) to 9 (highest).
MAX_PRIORITY = 9


class JobBackoff(_Model):
    """Retry delays of a job: `min(base_ms * multiplier^(tries-1), max_ms)`, +/- `jitter`."""

    base_ms: int = Field(default=100, ge=1)
    multiplier: float = Field(default=2.0, ge=1)
    max_ms: int = Field(default=60_000, ge=1)
    jitter: float = Field(default=0.1, ge=0, le=1)

    def delay_ms(self, tries: int, spread: float = 0.0) -> int:
        """The wait after the `tries`-th failed attempt; `spread` in [-1, 1] picks the jitter."""
        raw = min(self.base_ms * self.multiplier ** max(tries - 1, 0), float(self.max_ms))
        return max(0, round(raw * (1 + self.jitter * spread)))


class JobRateLimit(_Model):
    """A token bucket for the whole queue: `jobs_per_s` sustained, up to `burst` at once."""

    jobs_per_s: float = Field(gt=0)
    burst: int = Field(default=0, ge=0)


class PythonExecutor(_Model):
    """Runs a job by calling `function` (`module:name`) in the worker process."""

    type: Literal["python"] = "python"
    function: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]


class LeaseExecutor(_Model):
    """Jobs are leased over HTTP by workers in any language (the job worker's lease API:
    `POST /v1/queues/<q>/lease`, then `/v1/jobs/<id>/ack|nack|extend`)."""

    type: Literal["lease"]
    # The longest lease (visibility timeout) one request may ask for, or extend to.
    max_visibility_s: float = Field(default=12 * 3600.0, gt=0)


class CommandLimits(_Model):
    """What one job's processes may use (setrlimit in the job's process; unset: no limit)."""

    # CPU seconds (the process gets SIGXCPU, then SIGKILL), address space in MiB,
    # open files, and processes of the job's user (RLIMIT_NPROC counts every process the
    # user runs, not only the job's).
    cpu_s: int | None = Field(default=None, ge=1)
    memory_mb: int | None = Field(default=None, ge=16)
    open_files: int | None = Field(default=256, ge=8)
    processes: int | None = Field(default=None, ge=1)


class CommandExecutor(_Model):
    """Runs a job as a program: `argv` (never through a shell), the job as JSON on its
    stdin, its result as JSON on its stdout, progress as JSON lines on its stderr."""

    type: Literal["command"]
    # The program and its fixed arguments; the job's payload never becomes an argument.
    argv: Annotated[tuple[str, ...], Field(min_length=1)]
    # Names of the executor's environment variables a job gets (when set); nothing else
    # of the executor's environment (its secrets) reaches a job.
    env: tuple[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], ...] = (
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
    )
    limits: CommandLimits = CommandLimits()
    # Bytes of stdout (the result) and of stderr (progress and log) a job may write: over
    # either, its processes are killed and the job fails.
    max_stdout_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_stderr_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Between SIGTERM and SIGKILL to the job's process group, at its timeout or cancel.
    grace_s: float = Field(default=1.0, ge=0, le=60)
    # Run as this user (the job worker must run as root to switch); unset: its own.
    user: str | None = None


class HttpExecutor(_Model):
    """Runs a job by POSTing it (the same JSON a command gets on stdin) to `url`; the
    response's JSON body is the result."""

    type: Literal["http"]
    url: HttpUrl
    # Fixed request headers (for example an Authorization the endpoint wants).
    headers: dict[str, str] = Field(default_factory=dict)


# `type: python` may be left out (a `function` says it); the other types may not.
Executor = PythonExecutor | CommandExecutor | HttpExecutor | LeaseExecutor


class Schedule(_Model):
    """A job the queue gets on every tick of `cron` (5 fields, or 6 with seconds last)."""

    name: Annotated[str, Field(pattern=ID_PATTERN)]
    cron: str
    payload: Any = None
    priority: int = Field(default=0, ge=0, le=MAX_PRIORITY)
    # After the queue was not worked for a while: fire the ticks missed (at most
    # `max_catch_up` of them, the latest), or skip them and go on from now.
    catch_up: bool = False
    max_catch_up: int = Field(default=100, ge=1, le=10_000)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a cron expression")
        return value


# The job function of the workflow queue (the tool runner of workflow steps).
WORKFLOW_RUNNER = "connectors.workflows.tools:run_step"


class Queue(_Model):
    """A job queue: who may submit to it, how its jobs are ordered, limited and retried.

    Its jobs are records on one topic per priority (`sluice.jobs.<name>.p<n>`, n from 0
    to `priorities - 1`); dead jobs go to `sluice.jobs.<name>.dlq`.
    """

    name: Annotated[str, Field(pattern=ID_PATTERN)]
    # Bearer tokens that may submit jobs to this queue (never an event write key). None:
    # only Sluice itself submits (the orchestrator, to the workflow queue).
    submit_keys: tuple[str, ...] = ()
    enabled: bool = True
    partitions: int | None = Field(default=None, ge=1, le=1000)
    # How many priority levels the queue has: a job's priority is 0 to priorities - 1.
    priorities: int = Field(default=MAX_PRIORITY + 1, ge=1, le=MAX_PRIORITY + 1)
    # Jobs one worker process runs at once, and (unset: no cap) the whole queue at once.
    concurrency: int = Field(default=10, ge=1, le=10_000)
    max_concurrency: int | None = Field(default=None, ge=1)
    rate_limit: JobRateLimit | None = None
    backoff: JobBackoff = JobBackoff()
    max_attempts: int = Field(default=3, ge=1, le=1000)
    timeout_s: float = Field(default=300.0, gt=0)
    # How long a worker holds a job before it is given to another (unless extended).
    lease_s: float = Field(default=30.0, gt=0)
    # How long finished jobs stay visible in their status, and an idempotency key binds.
    retention_s: float = Field(default=7 * 86400.0, gt=0)
    idempotency_s: float = Field(default=86400.0, gt=0)
    max_payload_bytes: int = Field(default=256 * 1024, ge=1, le=8 * 1024 * 1024)
    executor: Executor | None = None
    schedules: tuple[Schedule, ...] = ()

    @model_validator(mode="after")
    def _schedules_fit(self) -> Queue:
        runner = isinstance(self.executor, PythonExecutor) and self.executor.function
        if runner == WORKFLOW_RUNNER and self.submit_keys:
            # Its jobs carry the code of python steps: a submit key would run any code.
            raise ValueError(
                f"queue {self.name!r} runs workflow steps ({WORKFLOW_RUNNER}): only the"
                " orchestrator submits to it, so it takes no submit_keys"
            )
        _unique(f"schedule of queue {self.name!r}", [s.name for s in self.schedules])
        for schedule in self.schedules:
            if schedule.priority >= self.priorities:
                raise ValueError(
                    f"schedule {schedule.name!r}: priority {schedule.priority} is out of range"
                    f" (0 to {self.priorities - 1})"
                )
        return self


class Workflows(_Model):
    """Who may use the workflow runs API (`/v1/workflows/...`)."""

    # Bearer tokens that may start, read and cancel workflow runs (never an event write
    # key: those are public). None: the runs API answers 401 to everyone.
    run_keys: tuple[str, ...] = ()
    # The largest `workload` a run request may carry (JSON bytes).
    max_workload_bytes: int = Field(default=256 * 1024, ge=1, le=4 * 1024 * 1024)


class PipelineConfig(_Model):
    """The whole pipeline: every source, destination and job queue."""

    sources: tuple[Source, ...] = ()
    destinations: tuple[Destination, ...] = ()
    queues: tuple[Queue, ...] = ()
    workflows: Workflows = Workflows()

    @model_validator(mode="after")
    def _references(self) -> PipelineConfig:
        source_ids = [s.id for s in self.sources]
        _unique("source", source_ids)
        _unique("destination", [d.id for d in self.destinations])
        _unique("write key", [k for s in self.sources for k in s.write_keys])
        _unique("queue", [q.name for q in self.queues])
        shared = {k for q in self.queues for k in q.submit_keys} & {
            k for s in self.sources for k in s.write_keys
        }
        if shared:
            # A write key is public (browser SDKs carry it): it must not submit jobs.
            raise ValueError("a submit key of a queue is also a write key of a source")
        if set(self.workflows.run_keys) & {k for s in self.sources for k in s.write_keys}:
            raise ValueError("a workflow run key is also a write key of a source")
        for dest in self.destinations:
            unknown = sorted(set(dest.sources) - set(source_ids))
            if unknown:
                raise ValueError(f"destination {dest.id!r} names unknown sources {unknown}")
        return self

    def write_keys(self) -> dict[str, Source]:
        """Every write key of an enabled source, mapped to its source."""
        return {k: s for s in self.sources if s.enabled for k in s.write_keys}

    def routes(self) -> dict[str, tuple[str, ...]]:
        """Source id -> ids of the enabled destinations it feeds."""
        table: dict[str, list[str]] = {s.id: [] for s in self.sources}
        for dest in self.destinations:
            if dest.enabled:
                for src in dest.sources:
                    table[src].append(dest.id)
        return {k: tuple(v) for k, v in table.items()}

    def queue(self, name: str) -> Queue | None:
        """The enabled queue called `name`, or None."""
        for queue in self.queues:
            if queue.name == name and queue.enabled:
                return queue
        return None

    def destination(self, dest_id: str) -> Destination:
        """The destination named `dest_id`; ConfigError when there is none."""
        for dest in self.destinations:
            if dest.id == dest_id:
                return dest
        raise ConfigError(f"no destination {dest_id!r} in the config")


def _unique(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


def parse_config(
    text: str, origin: str = "<config>", transforms: TransformSettings | None = None
) -> PipelineConfig:
    """Parse and validate YAML text; ConfigError with a readable reason when it is invalid.

    With `transforms`, a transform from a module they do not allow is invalid too.
    """
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping")
    return validate_config(data, origin, transforms)


def validate_config(
    data: object, origin: str = "<config>", transforms: TransformSettings | None = None
) -> PipelineConfig:
    """Validate parsed config data (a dict); ConfigError with the reasons when it is invalid.

    Nothing is imported: with `transforms`, transform modules are checked by name only.
    """
    context = {TRANSFORMS_CONTEXT: transforms} if transforms is not None else None
    try:
        return PipelineConfig.model_validate(data, context=context)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{origin}: {reasons}") from exc


def load_config(path: Path, transforms: TransformSettings | None = None) -> PipelineConfig:
    """Read and validate the YAML file at `path` (see `parse_config`)."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    return parse_config(text, str(path), transforms)
