"""Shared fixtures. Integration tests need the real broker and fail (never skip) without it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from core.settings import KafkaSettings
from tests.configs import Configs
from tests.pipeline import LIVE, Pipeline, pipeline_with_topics

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
def prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A topic prefix of this test's own, so tests never see each other's data.

    The test's topics are deleted afterwards: a broker keeps files open for every
    partition, and a whole suite's worth of them would outgrow its open-file limit.
    """
    name = f"t{uuid.uuid4().hex[:10]}"
    made = len(LIVE)
    yield name
    # Services a test left running would go on against deleted topics (and recreate
    # them), and would load the machine for the rest of the suite.
    for pipe in LIVE[made:]:
        if pipe.prefix == name:
            pipe.stop()
    if "broker" in request.fixturenames:
        _delete_topics(name)


def _delete_topics(prefix: str) -> None:
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP, "log_level": 0})
    try:
        topics = [t for t in admin.list_topics(timeout=5).topics if t.startswith(prefix)]
        if topics:
            for future in admin.delete_topics(topics, operation_timeout=30).values():
                with contextlib.suppress(Exception):
                    future.result(30)
    except Exception as exc:
        # The broker went away (a test that stops it): its next start has more to load.
        print(f"topics of {prefix} not deleted: {exc}")


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


@pytest.fixture
def configs() -> Configs:
    """Pipeline configs from parts (tests/configs.py) instead of pasted YAML."""
    return Configs()
