"""Topic provisioning against the broker: create what is missing, align what drifted."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from core.errors import TopicError
from core.settings import KafkaSettings
from core.topics import TopicSpec


@dataclass(frozen=True)
class TopicChange:
    """What `apply_topics` did to one topic."""

    topic: str
    action: str  # created | updated | unchanged
    detail: str = ""


# librdkafka logs every failed connection attempt; an admin call that cannot reach the
# broker raises, and the caller names the failure in one line instead.
_QUIET = logging.getLogger("sluice.admin.librdkafka")
_QUIET.setLevel(logging.CRITICAL)
_QUIET.propagate = False


def admin_client(kafka: KafkaSettings) -> AdminClient:
    """An admin client for the configured cluster."""
    config: dict[str, Any] = {**kafka.client_config(), "logger": _QUIET}
    return AdminClient(config)


def apply_topics(
    specs: list[TopicSpec],
    kafka: KafkaSettings,
    timeout: float = 30.0,
    on_change: Callable[[TopicChange], None] | None = None,
) -> list[TopicChange]:
    """Make the cluster hold every topic in `specs`; safe to run again and again."""
    admin = admin_client(kafka)
    try:
        cluster = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise TopicError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from exc
    existing = cluster.topics
    changes: list[TopicChange] = []
    rf, isr = replication(kafka, len(cluster.brokers))
    specs = [
        replace(
            s,
            replication_factor=s.replication_factor or rf,
            config={"min.insync.replicas": str(isr), **s.config},
        )
        for s in specs
    ]
    missing = [s for s in specs if s.name not in existing]
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(s.name, s.partitions, s.replication_factor or rf, config=s.config)
                for s in missing
            ],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        created: list[str] = []
        raced: list[str] = []
        for name, fut in futures.items():
            try:
                fut.result()
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise TopicError(f"cannot create topic {name}: {exc}") from exc
                raced.append(name)  # made by someone else meanwhile: aligned below
                continue
            created.append(name)
            changes.append(TopicChange(name, "created"))
        existing = _wait_usable(admin, [*created, *raced], timeout)
    done = {c.topic for c in changes}
    for spec in specs:
        if spec.name in existing and spec.name not in done:
            changes.append(_align(admin, spec, len(existing[spec.name].partitions), timeout))
    if on_change:
        for change in changes:
            on_change(change)
    return changes


def replication(kafka: KafkaSettings, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of Sluice's topics on `brokers` brokers:
    the settings where given, else 3 and 2 on three or more brokers, `brokers` and 1 below."""
    rf = kafka.replication_factor or min(3, max(1, brokers))
    isr = kafka.min_insync_replicas or (2 if rf >= 3 else 1)
    if isr > rf:
        raise TopicError(
            f"min.insync.replicas {isr} is more than the replication factor {rf}:"
            " no write could ever be acknowledged (SLUICE_KAFKA_MIN_INSYNC_REPLICAS)"
        )
    if rf > brokers:
        raise TopicError(
            f"replication factor {rf} needs {rf} brokers; the cluster has {brokers}"
            " (SLUICE_KAFKA_REPLICATION_FACTOR)"
        )
    return rf, isr


def _wait_usable(admin: AdminClient, names: list[str], timeout: float) -> dict[str, Any]:
    """The cluster's topics once every one of `names` has a leader for each partition.

    A created topic is in the controller's metadata before every broker serves it: until
    then its clients see "unknown topic" or "not leader" for a moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            topics = admin.list_topics(timeout=max(1.0, deadline - time.monotonic())).topics
        except KafkaException as exc:
            raise TopicError(f"cannot read the topics back: {exc}") from exc
        waiting = [
            name
            for name in names
            if name not in topics
            or topics[name].error is not None
            or not topics[name].partitions
            or any(p.leader < 0 or p.error is not None for p in topics[name].partitions.values())
        ]
        if not waiting:
            return topics
        if time.monotonic() > deadline:
            raise TopicError(f"topics without a leader after {timeout:.0f} s: {', '.join(waiting)}")
        time.sleep(0.1)


def _align(admin: AdminClient, spec: TopicSpec, partitions: int, timeout: float) -> TopicChange:
    details: list[str] = []
    if partitions < spec.partitions:
        fut = admin.create_partitions([NewPartitions(spec.name, spec.partitions)])[spec.name]
        fut.result(timeout)
        details.append(f"partitions {partitions} -> {spec.partitions}")
    resource = ConfigResource(ConfigResource.Type.TOPIC, spec.name)
    current = admin.describe_configs([resource])[resource].result(timeout)
    drift = {k: v for k, v in spec.config.items() if k not in current or current[k].value != v}
    if drift:
        resource = ConfigResource(
            ConfigResource.Type.TOPIC,
            spec.name,
            incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                for k, v in drift.items()
            ],
        )
        admin.incremental_alter_configs([resource])[resource].result(timeout)
        details.append(", ".join(f"{k}={v}" for k, v in drift.items()))
    if details:
        return TopicChange(spec.name, "updated", "; ".join(details))
    return TopicChange(spec.name, "unchanged")
