"""Shared fixtures. Integration tests need the real broker and fail (never skip) without it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from ops.settings import KafkaSettings
from tests.pipeline import Pipeline, pipeline_with_topics

BOOTSTRAP = os.environ.get("SLUICE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


def scaled(count: int) -> int:
    """`count` times SLUICE_TEST_SCALE (default 1), to run the heavier tests bigger."""
    return max(1, int(count * float(os.environ.get("SLUICE_TEST_SCALE", "1"))))


@pytest.fixture(scope="session")
def broker() -> str:
    """The bootstrap address of the running broker; a test that needs it fails without it."""
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP, "log_level": 0})
    try:
        admin.list_topics(timeout=15)
    except Exception as exc:
        pytest.fail(f"no Kafka broker at {BOOTSTRAP} ({exc}); start one with `sluice kafka start`")
    return BOOTSTRAP


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests never see each other's data."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def kafka(broker: str, prefix: str) -> KafkaSettings:
    """Kafka settings with this test's own topic prefix."""
    return KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)


@pytest.fixture
def pipeline(broker: str, prefix: str, tmp_path: Path) -> Iterator[Pipeline]:
    """A pipeline with its topics created; the test starts the services it needs."""
    pipe = pipeline_with_topics(tmp_path, broker, prefix)
    yield pipe
    for service in pipe.services.values():
        service.stop(timeout=30)
