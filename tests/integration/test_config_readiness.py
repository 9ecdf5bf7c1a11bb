"""Every process that follows the config topic is ready only once it can read it.

A gateway, worker, sink and delivery process started while their config topic is missing
(not created yet, or deleted) serve, stay healthy, and answer `/ready` 503 naming the
topic, until it exists; then each is ready without a restart.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from core.admin import apply_topics
from core.config import parse_config
from core.settings import KafkaSettings
from core.topics import Topics, required_topics
from tests.configs import KEY, Configs
from tests.pipeline import Pipeline, free_port, pipeline_with_topics, probe, until

pytestmark = pytest.mark.integration


def _delete_topic(kafka: KafkaSettings, topic: str) -> None:
    admin = AdminClient(kafka.client_config())
    admin.delete_topics([topic], operation_timeout=30)[topic].result(30)


def _topic_exists(kafka: KafkaSettings, topic: str) -> bool:
    admin = AdminClient(kafka.client_config())
    return topic in admin.list_topics(timeout=10).topics


def _not_ready_for(port: int, topic: str) -> bool:
    """Whether the process on `port` answers `/ready` 503 as it fails to follow `topic`."""
    answer = probe(port)
    reason = _config_reason(answer, topic) or ""
    return answer[0] == 503 and reason.startswith(f"following {topic}: ")


def _ready(port: int) -> bool:
    return probe(port)[0] == 200


def _config_reason(answer: tuple[int, dict[str, Any]], topic: str) -> str | None:
    """What a `/ready` answer says of the config topic (a reason, or a destination's)."""
    _, body = answer
    reason = body.get("reason")
    if reason is None:
        reason = body.get("problems", {}).get(topic)
    return reason if isinstance(reason, str) and topic in reason else None


async def test_a_process_is_not_ready_while_its_config_topic_cannot_be_read(
    tmp_path: Path, broker: str, prefix: str, configs: Configs
) -> None:
    hook = configs.webhook(f"http://127.0.0.1:{free_port()}/hook")
    text = configs.text(configs.warehouse(), hook)
    pipe: Pipeline = pipeline_with_topics(tmp_path, broker, prefix, text)
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    topic = Topics(prefix).config
    await asyncio.to_thread(_delete_topic, kafka, topic)
    await until(lambda: not _topic_exists(kafka, topic), 30, "the config topic gone")
    ports = {
        "gateway": pipe.gateway_port,
        "worker": pipe.worker_metrics_port,
        "sink": pipe.query_port,
        "deliver": pipe.delivery_port,
    }
    try:
        await asyncio.to_thread(
            partial(pipe.start, "gateway", "worker", "sink", "deliver", wait_ready=False)
        )
        for name, port in ports.items():
            await until(
                partial(_not_ready_for, port, topic), 60, f"the {name}'s /ready 503 naming {topic}"
            )
            status, body = await asyncio.to_thread(probe, port)
            assert status == 503, (name, body)
            assert body["status"] == "not ready"
            assert "no partitions to read" in (_config_reason((status, body), topic) or ""), body
            # Alive, following, only unable to read: no restart wanted.
            assert (await asyncio.to_thread(probe, port, "/health"))[0] == 200, name

        cfg = parse_config(text.replace(KEY, pipe.write_key))
        await asyncio.to_thread(apply_topics, required_topics(cfg, kafka), kafka)
        for name, port in ports.items():
            await until(partial(_ready, port), 60, f"the {name} ready")
            status, body = await asyncio.to_thread(probe, port)
            assert (status, body["status"]) == (200, "ready"), (name, body)
    finally:
        await asyncio.to_thread(pipe.stop)
