"""Least-privilege Kafka ACLs: what each of Sluice's roles may do, derived from the config.

Each service logs in as the user of its role (`SLUICE_KAFKA_SASL_USERNAME`) and gets exactly
the topics, consumer groups and transactional ids it uses; the admin role is a super user
(topics, ACLs, users, and the only writer of `<prefix>.config`). Grants follow the pipeline
config: a new destination or queue needs `sluice kafka acls apply` again, like its topics
need `sluice topics apply`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialUpsertion,
)

from core.admin import admin_client
from core.config import PipelineConfig
from core.errors import TopicError
from core.settings import (
    DeliverySettings,
    JobSettings,
    KafkaSettings,
    KafkaUsersSettings,
    WarehouseSettings,
    WorkerSettings,
    WorkflowSettings,
)
from core.topics import Topics

Resource = Literal["topic", "group", "transactional-id"]
Operation = Literal["read", "write"]


@dataclass(frozen=True)
class Grant:
    """One permission: an operation on a resource, by exact name or by name prefix."""

    resource: Resource
    name: str
    operation: Operation
    prefixed: bool = False

    def binding(self, user: str) -> AclBinding:
        """The Kafka ACL that allows it to `user` from any host."""
        return AclBinding(
            _RESOURCE[self.resource],
            self.name,
            ResourcePatternType.PREFIXED if self.prefixed else ResourcePatternType.LITERAL,
            f"User:{user}",
            "*",
            # Write on a transactional id covers Describe; Read and Write on a topic do too.
            AclOperation.READ if self.operation == "read" else AclOperation.WRITE,
            AclPermissionType.ALLOW,
        )

    def shown(self) -> str:
        """`topic sluice.events.ingest`, `group sluice-config-*`: how the README lists it."""
        return f"{self.resource} {self.name}{'*' if self.prefixed else ''}"


_RESOURCE = {
    "topic": ResourceType.TOPIC,
    "group": ResourceType.GROUP,
    "transactional-id": ResourceType.TRANSACTIONAL_ID,
}


@dataclass(frozen=True)
class Names:
    """The group and transactional-id names the services use (from their settings)."""

    processor: str = WorkerSettings.model_fields["app_id"].default
    sink_group: str = WarehouseSettings.model_fields["consumer_group"].default
    delivery_group: str = DeliverySettings.model_fields["consumer_group"].default
    jobs_group: str = JobSettings.model_fields["consumer_group"].default
    workflows_group: str = WorkflowSettings.model_fields["consumer_group"].default

    @classmethod
    def from_env(cls) -> Names:
        """The names as the services read them from `SLUICE_*` settings."""
        return cls(
            processor=WorkerSettings().app_id,
            sink_group=WarehouseSettings().consumer_group,
            delivery_group=DeliverySettings().consumer_group,
            jobs_group=JobSettings().consumer_group,
            workflows_group=WorkflowSettings().consumer_group,
        )


def _read(*topics: str) -> list[Grant]:
    return [Grant("topic", t, "read") for t in topics]


def _write(*topics: str) -> list[Grant]:
    return [Grant("topic", t, "write") for t in topics]


def _followers(*names: str) -> list[Grant]:
    # A follower (core/follower.py) reads by assignment under `sluice-<name>-<random>`,
    # committing nothing; librdkafka still looks its group up.
    return [Grant("group", f"sluice-{name}-", "read", prefixed=True) for name in names]


@dataclass(frozen=True)
class _Pipeline:
    cfg: PipelineConfig
    prefix: str
    names: Names

    @property
    def t(self) -> Topics:
        return Topics(self.prefix)

    def queue_prefixes(self, operation: Operation) -> list[Grant]:
        """Every queue's priority topics, one prefix per queue: `<prefix>.jobs.<queue>.p`."""
        return [
            Grant("topic", self.t.queue(q.name).priority(0)[:-1], operation, prefixed=True)
            for q in self.cfg.queues
        ]


def _gateway(p: _Pipeline) -> list[Grant]:
    t = p.t
    return [
        *_write(t.ingest, t.rejected, t.workflows_events),
        *p.queue_prefixes("write"),  # submissions and cancel markers
        *_read(t.config, t.jobs_status, t.workflows_catalog, t.workflows_runs),
        *_followers("config", "gateway-jobs", "gateway-catalog", "gateway-runs"),
    ]


def _worker(p: _Pipeline) -> list[Grant]:
    t = p.t
    routed = [t.destination(d.id) for d in p.cfg.destinations]
    return [
        *_read(t.ingest, t.config),
        *_write(t.rejected, *(d.main for d in routed), *(d.dlq for d in routed)),
        Grant("group", p.names.processor, "read"),
        # Exactly-once mode: one transactional producer per input partition.
        Grant("transactional-id", f"{p.names.processor}-", "write", prefixed=True),
        *_followers("config"),
    ]


def _sink(p: _Pipeline) -> list[Grant]:
    dests = [p.t.destination(d.id) for d in p.cfg.destinations if d.type == "clickhouse"]
    return [
        *_read(p.t.config, *(d.main for d in dests)),
        *_write(*(d.dlq for d in dests)),
        Grant("group", p.names.sink_group, "read"),
        *_followers("config"),
    ]


def _delivery(p: _Pipeline) -> list[Grant]:
    grants = [*_read(p.t.config), *_followers("config", "parked")]
    for d in p.cfg.destinations:
        if d.type != "webhook":
            continue
        dest = p.t.destination(d.id, d.retry.tiers)
        own = [dest.main, *(dest.retry(i) for i in range(len(dest.tiers)))]
        own += [dest.parked] if d.retry.preserve_order else []
        grants += [*_read(*own), *_write(*own[1:], dest.dlq)]
        grants.append(Grant("group", f"{p.names.delivery_group}-{d.id}", "read"))
    return grants


def _jobs(p: _Pipeline) -> list[Grant]:
    t = p.t
    # The step runner (workflow steps) is a job worker too: it reports to the run's events.
    grants = [*_read(t.config, t.jobs_status), *_write(t.jobs_status, t.workflows_events)]
    grants += [*p.queue_prefixes("read"), *p.queue_prefixes("write"), *_followers("config")]
    for q in p.cfg.queues:
        grants += _write(t.queue(q.name).dlq)
        grants.append(Grant("group", f"{p.names.jobs_group}-{q.name}", "read"))
        grants += _followers(f"jobs-{q.name}")
    return grants


def _registry(p: _Pipeline) -> list[Grant]:
    return [*_read(p.t.schemas), *_write(p.t.schemas), *_followers("registry")]


def _workflows(p: _Pipeline) -> list[Grant]:
    t = p.t
    return [
        *_read(t.workflows_events, t.workflows_catalog, t.jobs_status),
        *_write(t.workflows_events, t.workflows_runs),
        *p.queue_prefixes("write"),  # step jobs and cancel markers, in its transaction
        Grant("group", f"{p.prefix}-{p.names.workflows_group}", "read"),
        Grant("transactional-id", f"{p.prefix}-workflows-", "write", prefixed=True),
        *_followers("workflows-catalog", "workflows-statuses"),
    ]


_ROLES = {
    "gateway": _gateway,
    "worker": _worker,
    "sink": _sink,
    "delivery": _delivery,
    "jobs": _jobs,
    "registry": _registry,
    "workflows": _workflows,
}
# The roles that get ACLs; `admin` is a super user of the cluster instead.
ROLES = tuple(_ROLES)


def role_grants(role: str, cfg: PipelineConfig, kafka: KafkaSettings, names: Names) -> list[Grant]:
    """Everything `role` needs, and nothing else, for the pipeline `cfg` (each grant once)."""
    if role not in _ROLES:
        raise ValueError(f"no role {role!r}: one of {', '.join(ROLES)}")
    return list(dict.fromkeys(_ROLES[role](_Pipeline(cfg, kafka.topic_prefix, names))))


def bindings(
    cfg: PipelineConfig,
    kafka: KafkaSettings,
    names: Names,
    users: dict[str, str] | None = None,
    roles: Iterable[str] = ROLES,
) -> list[AclBinding]:
    """The ACLs of `roles`, each for its user (`users[role]`, the role's name by default)."""
    users = users or {}
    found: list[AclBinding] = []
    for role in roles:
        found += [g.binding(users.get(role, role)) for g in role_grants(role, cfg, kafka, names)]
    return found


def apply_acls(kafka: KafkaSettings, found: list[AclBinding], timeout: float = 30.0) -> int:
    """Create the ACLs `found` (as the admin user `kafka` logs in as); those that exist stay.
    Returns how many were asked for."""
    if not found:
        return 0
    admin = admin_client(kafka)
    try:
        for future in admin.create_acls(found, request_timeout=timeout).values():
            future.result(timeout)
        # A broker learns of new ACLs from the metadata log a moment after the controller
        # took them: until it holds all of them its answers would still refuse.
        deadline = time.monotonic() + timeout
        # None: any name, principal and host (the stubs ask for str; librdkafka takes NULL).
        anything: Any = None
        everyone = AclBindingFilter(
            ResourceType.ANY,
            anything,
            ResourcePatternType.ANY,
            anything,
            anything,
            AclOperation.ANY,
            AclPermissionType.ANY,
        )
        while not set(found) <= set(admin.describe_acls(everyone).result(timeout)):
            if time.monotonic() > deadline:
                raise TopicError(f"the ACLs did not reach {kafka.bootstrap_servers} in time")
            time.sleep(0.1)
    except KafkaException as exc:
        raise TopicError(f"creating ACLs at {kafka.bootstrap_servers} failed: {exc}") from exc
    return len(found)


def apply_users(
    kafka: KafkaSettings, users: KafkaUsersSettings, timeout: float = 30.0
) -> list[str]:
    """Create or update the SCRAM user of every role with a password; the roles done."""
    passwords = users.passwords()
    if not passwords:
        return []
    mechanism = (
        ScramMechanism.SCRAM_SHA_512
        if users.mechanism == "SCRAM-SHA-512"
        else ScramMechanism.SCRAM_SHA_256
    )
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(role, ScramCredentialInfo(mechanism, 8192), password.encode())
        for role, password in sorted(passwords.items())
    ]
    admin = admin_client(kafka)
    try:
        for future in admin.alter_user_scram_credentials(upserts, request_timeout=timeout).values():
            future.result(timeout)
    except KafkaException as exc:
        raise TopicError(f"creating users at {kafka.bootstrap_servers} failed: {exc}") from exc
    return sorted(passwords)
