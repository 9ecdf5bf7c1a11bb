"""The 3.9 release line stays selectable: `SLUICE_BROKER_VERSION=3.9.1` runs that broker, and
what Sluice needs of Kafka (its topics, idempotent and transactional writes, read_committed
reads) works on it. The rest of the suite runs on the default, 4.x."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from core.admin import apply_topics
from core.config import parse_config
from core.settings import BrokerSettings, KafkaSettings
from core.topics import required_topics
from ops.baseline_services import BASE_DIR
from ops.kafka_broker import bootstrap, start_broker, stop_broker
from tests.configs import KEY, Configs
from tests.pipeline import free_ports

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kafka_39() -> Iterator[BrokerSettings]:
    base = free_ports(2)
    state = (BASE_DIR / f"kafka39-{uuid.uuid4().hex[:8]}").resolve()
    settings = BrokerSettings(
        version="3.9.1", port=base, controller_port=base + 1, state_dir=state, heap="384m"
    )
    start_broker(settings)
    try:
        yield settings
    finally:
        stop_broker(settings)
        shutil.rmtree(state, ignore_errors=True)


def test_a_391_broker_runs_and_takes_sluices_topics_and_transactions(
    kafka_39: BrokerSettings,
) -> None:
    logs = [p.read_text(errors="replace") for p in kafka_39.state_dir.rglob("broker.log")]
    assert any("Kafka version: 3.9.1" in text for text in logs)
    prefix = f"v{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings(bootstrap_servers=bootstrap(kafka_39), topic_prefix=prefix)
    configs = Configs()
    cfg = parse_config(configs.text(configs.warehouse()).replace(KEY, "k" * 24))
    apply_topics(required_topics(cfg, kafka), kafka)
    topics = AdminClient(kafka.client_config()).list_topics(timeout=10).topics
    assert {t.name for t in required_topics(cfg, kafka)} <= set(topics)
    topic = f"{prefix}.events.ingest"
    producer = Producer(kafka.client_config() | {"transactional.id": f"{prefix}-tx"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, b"aborted", key=b"a")
    producer.abort_transaction(30)
    producer.begin_transaction()
    for i in range(10):
        producer.produce(topic, str(i).encode(), key=str(i).encode())
    producer.commit_transaction(30)
    consumer = Consumer(
        kafka.client_config()
        | {
            "group.id": f"{prefix}-read",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    seen: list[bytes] = []
    try:
        for _ in range(120):
            msg = consumer.poll(0.25)
            if msg is not None and msg.error() is None:
                seen.append(msg.value() or b"")
            if len(seen) >= 10:
                break
    finally:
        consumer.close()
    assert sorted(seen) == sorted(str(i).encode() for i in range(10))
