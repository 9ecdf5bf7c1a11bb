"""The roles' ACLs: what each may touch, from the pipeline config (core/acls.py)."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AclOperation, ResourcePatternType, ResourceType

from core.acls import ROLES, Names, bindings, role_grants
from core.settings import KafkaSettings
from tests.configs import Configs

C = Configs()
CFG = C.model(
    C.warehouse(), C.webhook("https://example.com/hook", id="crm", retry={"tiers": ["5s"]})
)
KAFKA = KafkaSettings(topic_prefix="p")


def _covers(grant_name: str, prefixed: bool, topic: str) -> bool:
    return topic.startswith(grant_name) if prefixed else topic == grant_name


def _may(role: str, operation: str, topic: str) -> bool:
    return any(
        g.resource == "topic" and g.operation == operation and _covers(g.name, g.prefixed, topic)
        for g in role_grants(role, CFG, KAFKA, Names())
    )


def test_no_role_but_admin_writes_the_config_and_every_service_reads_it() -> None:
    assert not any(_may(role, "write", "p.config") for role in ROLES)
    for role in ("gateway", "worker", "sink", "delivery", "jobs"):
        assert _may(role, "read", "p.config"), role


def test_destinations_are_read_only_by_the_service_that_delivers_them() -> None:
    readers = {role for role in ROLES if _may(role, "read", "p.dest.warehouse")}
    assert readers == {"sink"}
    assert {role for role in ROLES if _may(role, "read", "p.dest.crm")} == {"delivery"}
    assert {role for role in ROLES if _may(role, "read", "p.dest.crm.retry.5s")} == {"delivery"}
    assert {role for role in ROLES if _may(role, "write", "p.dest.crm")} == {"worker"}
    assert {role for role in ROLES if _may(role, "read", "p.events.ingest")} == {"worker"}
    assert {role for role in ROLES if _may(role, "write", "p.events.ingest")} == {"gateway"}
    assert {role for role in ROLES if _may(role, "write", "p.schemas")} == {"registry"}


def test_bindings_are_literal_or_prefixed_allows_for_each_roles_user() -> None:
    found = bindings(CFG, KAFKA, Names(), users={"gateway": "edge"}, roles=["gateway", "worker"])
    principals = {b.principal for b in found}
    assert principals == {"User:edge", "User:worker"}
    txn = [b for b in found if b.restype == ResourceType.TRANSACTIONAL_ID]
    assert [(b.name, b.resource_pattern_type, b.operation) for b in txn] == [
        ("sluice-processor-", ResourcePatternType.PREFIXED, AclOperation.WRITE)
    ]
    assert len(found) == len(set(found))  # each ACL once


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="no role 'root'"):
        role_grants("root", CFG, KAFKA, Names())
