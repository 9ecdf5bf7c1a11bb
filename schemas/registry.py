"""The built-in schema registry: Avro schemas by subject and version, with compatibility.

The registry's log is the compacted `sluice.schemas` topic: one record a registered
version (key `schema/<subject>/<version>`) and one a compatibility setting (key
`config/<subject>`, or `config/` for the default). Every registry process reads the log
from the start and follows it; a registration is written to the log first, confirmed by
Kafka, and applied from there. Ids are global: the same schema text has the same id in
every subject, as in Confluent's registry. The event envelope is always id 1
(`EVENT_SCHEMA_ID`), registered under `<prefix>.events.ingest-value` when the log is
empty, so records framed before the registry existed decode through it; the job
submission is id 2 (`JOB_SCHEMA_ID`) under `<prefix>.jobs-value`.

`RegistryState` is the pure part (no Kafka); `SchemaRegistry` keeps it in the topic.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import avro.errors
import avro.schema
import structlog
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from core.follower import CompactedFollower, Entry
from core.kafka import idempotent_producer
from core.settings import KafkaSettings
from core.topics import Topics
from schemas.codec import EVENT_SCHEMA_ID, JOB_SCHEMA_ID, load_schema
from schemas.errors import RegistryError

log = structlog.get_logger("sluice.registry")

LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)
DEFAULT_LEVEL = "BACKWARD"


def subject_not_found(subject: str) -> RegistryError:
    """The Confluent error for an unknown subject."""
    return RegistryError(404, 40401, f"Subject '{subject}' not found.")


@dataclass(frozen=True)
class Version:
    """One registered version of a subject."""

    subject: str
    version: int
    id: int
    schema: str

    def as_json(self) -> dict[str, Any]:
        """The REST API's form."""
        return {
            "subject": self.subject,
            "version": self.version,
            "id": self.id,
            "schema": self.schema,
        }


def normalise(text: str) -> tuple[str, avro.schema.Schema]:
    """A schema's compact JSON text and its parsed form; 422 when it is not valid Avro."""
    try:
        parsed_json = json.loads(text)
        parsed = avro.schema.parse(text)
    except (ValueError, avro.errors.AvroException) as exc:
        raise RegistryError(422, 42201, f"Invalid schema: {exc}") from None
    return json.dumps(parsed_json, separators=(",", ":")), parsed


def incompatibilities(reader: avro.schema.Schema, writer: avro.schema.Schema) -> list[str]:
    """Why `reader` cannot read what `writer` wrote; empty when it can."""
    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]  # avro: no hints
    result = checker.get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    kinds = ", ".join(sorted(kind.name.lower() for kind in result.incompatibilities))
    where = ", ".join(sorted(result.locations))
    what = ", ".join(sorted(str(m) for m in result.messages))
    return [f"{kinds} at {where}: {what}"]


@dataclass
class RegistryState:
    """Subjects, versions, ids and compatibility levels, as the log describes them."""

    subjects: dict[str, list[Version]] = field(default_factory=dict)
    by_id: dict[int, str] = field(default_factory=dict)
    levels: dict[str, str] = field(default_factory=dict)

    def apply(self, key: str, value: dict[str, Any]) -> None:
        """Apply one log record (records are applied in log order)."""
        if key.startswith("config/"):
            self.levels[key.removeprefix("config/")] = value["compatibilityLevel"]
            return
        version = Version(value["subject"], value["version"], value["id"], value["schema"])
        versions = self.subjects.setdefault(version.subject, [])
        if all(v.version != version.version for v in versions):
            versions.append(version)
            versions.sort(key=lambda v: v.version)
        self.by_id.setdefault(version.id, version.schema)

    def level(self, subject: str | None) -> str:
        """The compatibility level of `subject` (its own, else the default)."""
        if subject is not None and subject in self.levels:
            return self.levels[subject]
        return self.levels.get("", DEFAULT_LEVEL)

    def versions(self, subject: str) -> list[Version]:
        """The versions of `subject`, oldest first; 404 when there are none."""
        versions = self.subjects.get(subject)
        if not versions:
            raise subject_not_found(subject)
        return versions

    def version(self, subject: str, version: str) -> Version:
        """`latest` or a version number of `subject`."""
        versions = self.versions(subject)
        if version in ("latest", "-1"):
            return versions[-1]
        try:
            number = int(version)
        except ValueError:
            raise RegistryError(422, 42202, f"Invalid version: {version!r}") from None
        for v in versions:
            if v.version == number:
                return v
        raise RegistryError(404, 40402, f"Version {number} not found.")

    def lookup(self, subject: str, text: str) -> Version:
        """The version of `subject` that has exactly this schema; 404 when none has."""
        schema, _ = normalise(text)
        for v in self.versions(subject):
            if v.schema == schema:
                return v
        raise RegistryError(404, 40403, "Schema not found.")

    def check(self, subject: str, text: str, against: str = "latest") -> list[str]:
        """Why `text` may not follow `subject`'s `against` version(s); empty when it may."""
        _, candidate = normalise(text)
        level = self.level(subject)
        if level == "NONE" or subject not in self.subjects:
            return []
        if level.endswith("_TRANSITIVE"):
            targets = self.versions(subject)
        else:
            targets = [self.version(subject, against)]
        problems: list[str] = []
        for target in targets:
            existing = avro.schema.parse(target.schema)
            if level.startswith(("BACKWARD", "FULL")):
                problems += [
                    f"version {target.version} (backward): {m}"
                    for m in incompatibilities(candidate, existing)
                ]
            if level.startswith(("FORWARD", "FULL")):
                problems += [
                    f"version {target.version} (forward): {m}"
                    for m in incompatibilities(existing, candidate)
                ]
        return problems

    def plan(self, subject: str, text: str, wanted_id: int | None = None) -> Version | None:
        """The version registering `text` under `subject` would create; None if it exists.

        409 when the subject's compatibility level refuses it.
        """
        schema, _ = normalise(text)
        for v in self.subjects.get(subject, []):
            if v.schema == schema:
                return None
        problems = self.check(subject, text)
        if problems:
            level = self.level(subject)
            raise RegistryError(
                409,
                40901,
                f"Schema being registered is incompatible ({level}): {'; '.join(problems)}",
            )
        existing_id = next((i for i, s in self.by_id.items() if s == schema), None)
        schema_id = existing_id or wanted_id or max(self.by_id, default=0) + 1
        latest = self.subjects.get(subject, [])
        number = latest[-1].version + 1 if latest else 1
        return Version(subject, number, schema_id, schema)


def _key(version: Version) -> str:
    return f"schema/{version.subject}/{version.version}"


class SchemaRegistry:
    """`RegistryState` kept in the compacted schemas topic, followed in a thread.

    A log record the state cannot take (not JSON, fields missing) is logged and skipped.
    """

    def __init__(self, kafka: KafkaSettings, timeout_s: float = 10.0) -> None:
        self.state = RegistryState()
        self.topics = Topics(kafka.topic_prefix)
        self.topic = self.topics.schemas
        self.timeout_s = timeout_s
        # Held while the state changes: planning a registration sees no half-applied record.
        self._lock = threading.Lock()
        self._producer = idempotent_producer(kafka)
        self.follower = CompactedFollower(
            kafka, self.topic, self._apply, name="registry", on_bad=_bad_record
        )

    def start(self) -> None:
        """Read the log to its end, register the event envelope if the log is empty, follow."""
        self.follower.start()
        self._catch_up()
        builtin = (
            (f"{self.topics.ingest}-value", "event", EVENT_SCHEMA_ID),
            (f"{self.topics.prefix}.jobs-value", "job", JOB_SCHEMA_ID),
        )
        for subject, name, schema_id in builtin:
            text = json.dumps(load_schema(name))
            if self.state.by_id.get(schema_id) is None:
                self.register(subject, text, wanted_id=schema_id)
            elif self.state.by_id[schema_id] != normalise(text)[0]:
                log.warning(
                    "a built-in schema id holds another schema in this registry's log",
                    schema=name,
                    id=schema_id,
                )

    def stop(self) -> None:
        """Stop following the log."""
        self.follower.stop()
        self._producer.flush(5)

    def register(self, subject: str, text: str, wanted_id: int | None = None) -> Version:
        """Register `text` under `subject` (or find it there); returns its version."""
        with self._lock:
            planned = self.state.plan(subject, text, wanted_id)
            if planned is None:
                return self.state.lookup(subject, text)
            self._write(_key(planned), planned.as_json())
        self._catch_up()
        return self.state.lookup(subject, text)

    def set_level(self, subject: str | None, level: str) -> str:
        """Set the compatibility level of `subject` (None: the default)."""
        if level not in LEVELS:
            raise RegistryError(422, 42203, f"Invalid compatibility level: {level!r}")
        with self._lock:
            self._write(f"config/{subject or ''}", {"compatibilityLevel": level})
        self._catch_up()
        return level

    def _write(self, key: str, value: dict[str, Any]) -> None:
        errors: list[str] = []
        self._producer.produce(
            self.topic,
            json.dumps(value).encode(),
            key.encode(),
            on_delivery=lambda err, _m: errors.append(err.str()) if err else None,
        )
        if self._producer.flush(self.timeout_s) or errors:
            raise RegistryError(
                500, 50001, f"the schema log did not confirm the write: {errors[:1] or 'timeout'}"
            )

    def _catch_up(self) -> None:
        """Wait until the follower applied everything the log holds now."""
        if not self.follower.sync(self.timeout_s):
            raise RegistryError(500, 50002, "the schema log could not be read in time")

    def _apply(self, entry: Entry) -> None:
        if entry.value is None:
            return  # a tombstone: the registry never writes one, and keeps what it has
        key = (entry.key or b"").decode()
        value = json.loads(entry.value)
        with self._lock:
            self.state.apply(key, value)


def _bad_record(entry: Entry, exc: Exception) -> None:
    key = (entry.key or b"").decode(errors="replace")
    log.error("ignoring a bad schema log record", key=key, offset=entry.offset, error=str(exc))
