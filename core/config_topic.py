"""Live configuration: `sluice config apply` writes the pipeline to the compacted
`sluice.config` topic; every gateway, worker and sink follows that topic.

A service starts from its local file, then switches to the newest config on the topic
and to every later one, without a restart. Only configs that validated are ever
written; a record that does not validate (written by something else, or naming a
transform module outside `SLUICE_TRANSFORM_MODULES`) is refused, reported and skipped.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from prometheus_client import CollectorRegistry, Counter

from core.admin import apply_topics
from core.config import PipelineConfig, validate_config
from core.errors import ConfigError
from core.kafka import Headers
from core.settings import KafkaSettings, TransformSettings
from core.topics import Topics, required_topics

log = structlog.get_logger("sluice.config")
KEY = b"pipeline"
# The reasons a config record is refused, labels of `sluice_config_refused_total`.
REFUSALS = ("json", "invalid", "apply")


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
    """Calls `on_change` with each new valid config from the config topic, in a thread.

    A record is refused, logged (with its offset and the reason) and counted in
    `sluice_config_refused_total{reason}` when it is not JSON (`json`), not a valid config
    or names a transform module `transforms` does not allow (`invalid`), or when
    `on_change` raises anything, `SystemExit` included (`apply`). The config in use
    stays as it was, and later records still apply. Validating imports nothing. The
    thread itself survives any error (logged, counted in
    `sluice_config_follower_errors_total`, retried after a second).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        current: PipelineConfig,
        on_change: Callable[[PipelineConfig], object],
        transforms: TransformSettings | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.current = current
        self.on_change = on_change
        # None: no transform module is allowed at all.
        self.transforms = transforms if transforms is not None else TransformSettings(modules=())
        self.topic = Topics(kafka.topic_prefix).config
        registry = registry if registry is not None else CollectorRegistry()
        self.refused = Counter(
            "sluice_config_refused_total",
            "Config records refused: json (not JSON), invalid (not a valid config, or a"
            " transform module that is not allowed), apply (the service could not switch).",
            ["reason"],
            registry=registry,
        )
        for reason in REFUSALS:
            self.refused.labels(reason)
        self.errors = Counter(
            "sluice_config_follower_errors_total",
            "Errors of the config follower itself (it logs them and goes on).",
            registry=registry,
        )
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

    def alive(self) -> bool:
        """Whether the following thread runs (it only ends after `stop`)."""
        return self._thread.is_alive()

    def _run(self) -> None:
        tp = TopicPartition(self.topic, 0)
        try:
            while not self._stop.is_set():
                try:
                    self._step(tp)
                except BaseException as exc:  # the thread must not die: log, count, go on
                    self.errors.inc()
                    log.exception("config follower error; going on", error=repr(exc))
                    self._stop.wait(1.0)
        finally:
            try:
                self._consumer.close()
            except Exception as exc:  # closing at exit: nothing is left to save
                log.warning("closing the config consumer failed", error=str(exc))

    def _step(self, tp: TopicPartition) -> None:
        """Read what is there, apply the newest valid config, wake callers that are current."""
        waiting = list(self._waiting)
        end = None
        if waiting:
            try:
                end = self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)[1]
            except KafkaException as exc:
                log.warning("config topic end unknown", error=str(exc))
        msgs = self._consumer.consume(100, timeout=0.05 if waiting else 0.2)
        newest: tuple[PipelineConfig, int] | None = None
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("config topic error", error=err.str())
                continue
            if msg.key() != KEY:
                continue
            offset = msg.offset() or 0
            cfg = self._validate(msg.value(), offset)
            if cfg is not None:
                newest = (cfg, offset)
        if newest is not None and newest[0] != self.current:
            self._apply(*newest)
        if end is not None and self._read_up_to(tp) >= end:
            for done in waiting:
                self._waiting.remove(done)
                done.set()

    def _validate(self, value: bytes | None, offset: int) -> PipelineConfig | None:
        """The config a record holds; None (refused and reported) when it holds none."""
        try:
            data = orjson.loads(value or b"")
        except orjson.JSONDecodeError as exc:
            self._refuse("json", offset, f"not JSON: {exc}")
            return None
        try:
            return validate_config(data, f"config record at offset {offset}", self.transforms)
        except Exception as exc:  # any failure to validate refuses the record
            self._refuse("invalid", offset, str(exc))
            return None

    def _apply(self, cfg: PipelineConfig, offset: int) -> None:
        try:
            self.on_change(cfg)
        except BaseException as exc:  # SystemExit included: the old config stays in use
            self._refuse("apply", offset, f"{type(exc).__name__}: {exc}")
            return
        self.current = cfg
        log.info(
            "config changed",
            offset=offset,
            sources=len(cfg.sources),
            destinations=len(cfg.destinations),
        )

    def _refuse(self, reason: str, offset: int, why: str) -> None:
        self.refused.labels(reason).inc()
        log.error(
            "config record refused; the config in use stays",
            topic=self.topic,
            offset=offset,
            reason=reason,
            error=why,
        )

    def _read_up_to(self, tp: TopicPartition) -> int:
        """The offset after the last record read (the low watermark before any)."""
        offset: int = self._consumer.position([tp])[0].offset
        if offset < 0:
            offset = self._consumer.get_watermark_offsets(tp, timeout=5, cached=False)[0]
        return offset
