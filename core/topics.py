"""Topic names and specs: topics are data, derived from the prefix and the pipeline config."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.config import PipelineConfig
from core.settings import KafkaSettings

DAY_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """What `sluice topics apply` creates: a name, a partition count and topic configs."""

    name: str
    partitions: int
    # None: what the cluster holds (`core.admin.replication`), decided when it is applied.
    replication_factor: int | None
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DestinationTopics:
    """The main, retry-tier and dead-letter topics of one destination."""

    prefix: str
    destination: str
    tiers: tuple[str, ...] = ()

    @property
    def main(self) -> str:
        """Where the processor routes the destination's events."""
        return f"{self.prefix}.dest.{self.destination}"

    def retry(self, tier: int) -> str:
        """The delay topic of retry tier number `tier` (0 is the shortest)."""
        return f"{self.main}.retry.{self.tiers[tier]}"

    @property
    def dlq(self) -> str:
        """Where records that exhausted their retries or failed fatally go."""
        return f"{self.main}.dlq"

    @property
    def parked(self) -> str:
        """Order-preserving retries: the changelog of keys parked behind a retry (compacted)."""
        return f"{self.main}.parked"


@dataclass(frozen=True)
class QueueTopics:
    """The topics of one job queue: one per priority level, and its dead jobs."""

    prefix: str
    queue: str

    def priority(self, level: int) -> str:
        """Where jobs of priority `level` wait to run."""
        return f"{self.prefix}.jobs.{self.queue}.p{level}"

    @property
    def dlq(self) -> str:
        """Jobs that spent their attempts or failed for good, with failure headers."""
        return f"{self.prefix}.jobs.{self.queue}.dlq"


@dataclass(frozen=True)
class Topics:
    """Every topic name Sluice uses, from one prefix."""

    prefix: str = "sluice"

    @property
    def ingest(self) -> str:
        """Every event the gateway accepted."""
        return f"{self.prefix}.events.ingest"

    @property
    def rejected(self) -> str:
        """Events the gateway or processor refused, with the reason in headers."""
        return f"{self.prefix}.events.rejected"

    @property
    def jobs_status(self) -> str:
        """The latest state of every job (compacted)."""
        return f"{self.prefix}.jobs.status"

    @property
    def config(self) -> str:
        """Applied pipeline configuration (compacted)."""
        return f"{self.prefix}.config"

    @property
    def dlq_audit(self) -> str:
        """One record per DLQ redrive: who, what, when, how many."""
        return f"{self.prefix}.dlq.audit"

    @property
    def schemas(self) -> str:
        """The built-in schema registry's log (compacted)."""
        return f"{self.prefix}.schemas"

    @property
    def workflows_catalog(self) -> str:
        """Applied playbooks, one record per path and version (compacted)."""
        return f"{self.prefix}.workflows.catalog"

    @property
    def workflows_events(self) -> str:
        """Every workflow event, keyed by execution id: runs are rebuilt from it."""
        return f"{self.prefix}.workflows.events"

    @property
    def workflows_runs(self) -> str:
        """The orchestrator's table of runs: each run's latest state (compacted)."""
        return f"{self.prefix}.workflows.runs"

    def queue(self, name: str) -> QueueTopics:
        """The topics of job queue `name`."""
        return QueueTopics(self.prefix, name)

    def destination(self, name: str, tiers: tuple[str, ...] = ()) -> DestinationTopics:
        """The topics of destination `name`."""
        return DestinationTopics(self.prefix, name, tiers)


def required_topics(cfg: PipelineConfig, kafka: KafkaSettings) -> list[TopicSpec]:
    """The topics the pipeline needs, with partitions, replication and cleanup policy."""
    topics = Topics(kafka.topic_prefix)
    parts, rf = kafka.partitions, kafka.replication_factor
    delete_7d = {"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)}
    delete_30d = {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)}
    compact = {"cleanup.policy": "compact"}
    specs = [
        TopicSpec(topics.ingest, parts, rf, delete_7d),
        TopicSpec(topics.rejected, parts, rf, delete_30d),
        TopicSpec(topics.jobs_status, parts, rf, compact),
        TopicSpec(topics.config, 1, rf, compact),
        TopicSpec(topics.schemas, 1, rf, compact),
        TopicSpec(topics.dlq_audit, 1, rf, {"cleanup.policy": "delete", "retention.ms": "-1"}),
        TopicSpec(topics.workflows_catalog, 1, rf, compact),
        TopicSpec(topics.workflows_events, parts, rf, delete_30d),
        TopicSpec(topics.workflows_runs, parts, rf, compact),
    ]
    for dest in cfg.destinations:
        dt = topics.destination(dest.id, dest.retry.tiers)
        specs.append(TopicSpec(dt.main, parts, rf, delete_7d))
        specs.extend(
            TopicSpec(dt.retry(i), parts, rf, delete_7d) for i in range(len(dest.retry.tiers))
        )
        specs.append(TopicSpec(dt.dlq, parts, rf, delete_30d))
        if dest.retry.preserve_order:
            specs.append(TopicSpec(dt.parked, parts, rf, compact))
    for queue in cfg.queues:
        qt = topics.queue(queue.name)
        qparts = queue.partitions or parts
        specs.extend(
            TopicSpec(qt.priority(n), qparts, rf, delete_7d) for n in range(queue.priorities)
        )
        specs.append(TopicSpec(qt.dlq, qparts, rf, delete_30d))
    return specs
