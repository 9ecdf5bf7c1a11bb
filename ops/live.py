"""Live configuration: `sluice config apply` writes the pipeline to the compacted
`sluice.config` topic; every gateway, worker and sink follows that topic.

A service starts from its local file, then switches to the newest config on the topic
and to every later one, without a restart. Only configs that validated are ever
written; a record that does not validate (written by something else) is ignored.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from pydantic import ValidationError

from ops.admin import apply_topics
from ops.config import PipelineConfig
from ops.producer import Headers
from ops.settings import KafkaSettings
from ops.topics import Topics, required_topics
from schemas.errors import ConfigError

log = structlog.get_logger("sluice.config")
KEY = b"pipeline"


def apply_config(cfg: PipelineConfig, kafka: KafkaSettings, timeout: float = 30.0) -> None:
    """Create the topics `cfg` needs, then publish it; returns once Kafka confirmed it."""
    apply_topics(required_topics(cfg, kafka), kafka)
    producer = Producer(kafka.client_config() | {"enable.idempotence": True, "acks": "all"})
    errors: list[str] = []
    headers: Headers = [("sluice.applied.at", datetime.now(UTC).isoformat().encode())]
    producer.produce(
        Topics(kafka.topic_prefix).config,
        cfg.model_dump_json().encode(),
        KEY,
        headers=headers,
        on_delivery=lambda err, _m: errors.append(err.str()) if err else None,
    )
    if producer.flush(timeout) or errors:
        raise ConfigError(f"the config was not confirmed by Kafka: {errors[:1] or 'timeout'}")


class ConfigFollower:
    """Calls `on_change` with each new valid config from the config topic, in a thread."""

    def __init__(
        self,
        kafka: KafkaSettings,
        current: PipelineConfig,
        on_change: Callable[[PipelineConfig], object],
    ) -> None:
        self.current = current
        self.on_change = on_change
        self.topic = Topics(kafka.topic_prefix).config
        self._stop = threading.Event()
        # Callers waiting until the follower has read everything on the topic.
        self._waiting: list[threading.Event] = []
        self._consumer = Consumer(
            kafka.client_config()
            | {
                "group.id": f"sluice-config-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self._thread = threading.Thread(target=self._run, name="config-follower", daemon=True)

    def start(self) -> None:
        """Follow the topic from its beginning (the newest record wins)."""
        self._consumer.assign([TopicPartition(self.topic, 0, -2)])  # -2: the beginning
        self._thread.start()

    def wait_current(self, timeout: float = 10.0) -> bool:
        """Block until every config record on the topic now has been read and applied.

        False when that did not happen within `timeout` (the broker is unreachable, say).
        """
        done = threading.Event()
        self._waiting.append(done)
        return done.wait(timeout)

    def stop(self) -> None:
        """Stop following."""
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        tp = TopicPartition(self.topic, 0)
        try:
            while not self._stop.is_set():
                waiting = list(self._waiting)
                end = None
                if waiting:
                    try:
                        end = self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)[1]
                    except KafkaException as exc:
                        log.warning("config topic end unknown", error=str(exc))
                msgs = self._consumer.consume(100, timeout=0.05 if waiting else 0.2)
                newest = None
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("config topic error", error=err.str())
                        continue
                    if msg.key() != KEY:
                        continue
                    try:
                        newest = PipelineConfig.model_validate(orjson.loads(msg.value() or b""))
                    except (ValidationError, orjson.JSONDecodeError) as exc:
                        log.error(
                            "ignoring an invalid config record", offset=msg.offset(), error=str(exc)
                        )
                if newest is not None and newest != self.current:
                    self.current = newest
                    try:
                        self.on_change(newest)
                    except Exception:
                        log.exception("applying the new config failed")
                    else:
                        log.info(
                            "config changed",
                            sources=len(newest.sources),
                            destinations=len(newest.destinations),
                        )
                if end is not None and self._read_up_to(tp) >= end:
                    for done in waiting:
                        self._waiting.remove(done)
                        done.set()
        finally:
            self._consumer.close()

    def _read_up_to(self, tp: TopicPartition) -> int:
        """The offset after the last record read (the low watermark before any)."""
        offset: int = self._consumer.position([tp])[0].offset
        if offset < 0:
            offset = self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)[0]
        return offset
