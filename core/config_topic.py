"""Live configuration: `sluice config apply` writes the pipeline to the compacted
`sluice.config` topic; every gateway, worker and sink follows that topic.

A service starts from its local file, then switches to the newest config on the topic
and to every later one, without a restart. Only configs that validated are ever
written; a record that does not validate (written by something else, or naming a
transform module outside `SLUICE_TRANSFORM_MODULES`) is refused, reported and skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter

from core.admin import apply_topics
from core.config import PipelineConfig, validate_config
from core.errors import ConfigError
from core.follower import CompactedFollower, Entry
from core.kafka import Headers, idempotent_producer
from core.settings import KafkaSettings, TransformSettings
from core.topics import Topics, required_topics

log = structlog.get_logger("sluice.config")
KEY = b"pipeline"
# The reasons a config record is refused, labels of `sluice_config_refused_total`.
REFUSALS = ("json", "invalid", "apply")


def apply_config(cfg: PipelineConfig, kafka: KafkaSettings, timeout: float = 30.0) -> None:
    """Create the topics `cfg` needs, then publish it; returns once Kafka confirmed it."""
    apply_topics(required_topics(cfg, kafka), kafka)
    producer = idempotent_producer(kafka)
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
    stays as it was, and later records still apply. Validating imports nothing. Of the
    valid configs read in one batch only the newest is switched to. The thread itself
    survives any error (logged, counted in `sluice_config_follower_errors_total`, retried
    after a second): it is a `core.follower.CompactedFollower`.
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
        # The newest valid config of the batch being read, and its offset.
        self._newest: tuple[PipelineConfig, int] | None = None
        self.follower = CompactedFollower(
            kafka,
            self.topic,
            self._read,
            name="config",
            on_bad=self._unreadable,
            on_batch=self._batch_read,
            on_error=lambda _exc: self.errors.inc(),
        )

    def start(self) -> None:
        """Follow the topic from its beginning (the newest record wins)."""
        self.follower.start()

    def wait_current(self, timeout: float = 10.0) -> bool:
        """Block until every config record on the topic now has been read and applied.

        False when that did not happen within `timeout` (the broker is unreachable, say).
        """
        return self.follower.sync(timeout)

    def stop(self) -> None:
        """Stop following."""
        self.follower.stop()

    def alive(self) -> bool:
        """Whether the following thread runs (it only ends after `stop`)."""
        return self.follower.alive()

    def problem(self) -> str | None:
        """Why this process is not ready as far as its config goes: the config topic cannot
        be read, or has not been read to its end yet; None once it has (for `/ready`)."""
        return self.follower.problem()

    def failure(self) -> str | None:
        """Why the following thread ended before `stop()`; None while it runs (for `/health`)."""
        return self.follower.failure()

    def _read(self, entry: Entry) -> None:
        """Validate a config record; raises (to `_unreadable`) when it holds no valid config."""
        if entry.key != KEY:
            return
        data = orjson.loads(entry.value or b"")
        where = f"config record at offset {entry.offset}"
        self._newest = (validate_config(data, where, self.transforms), entry.offset)

    def _unreadable(self, entry: Entry, exc: Exception) -> None:
        if isinstance(exc, orjson.JSONDecodeError):
            self._refuse("json", entry.offset, f"not JSON: {exc}")
        else:  # any failure to validate refuses the record
            self._refuse("invalid", entry.offset, str(exc))

    def _batch_read(self) -> None:
        """Switch to the newest valid config of the batch, if it differs from the current one."""
        newest, self._newest = self._newest, None
        if newest is not None and newest[0] != self.current:
            self._apply(*newest)

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
