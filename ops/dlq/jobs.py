"""Dead jobs: the records of a job queue's DLQ (`jobs.<queue>`), and how a redrive puts
them back to run.

A dead job's DLQ record is its job record (the Avro `dev.sluice.Job`) with the failure
headers of event DLQs. A redrive writes it back to the job's priority topic and
partition (its key unchanged, so next to the job's other records) with the failure
headers, `sluice.job.attempt` and `sluice.job.due` taken off and `sluice.job.redrive`
naming the DLQ record: the job worker starts the job over (PENDING, attempt 1, same id)
when its status is DEAD and has not seen that marker, and skips it otherwise. Only jobs
whose status is DEAD now are redriven; a job COMPLETED or CANCELLED since is named and
left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from core.follower import Entry
from core.headers import (
    ATTEMPTS,
    ERROR_CLASS,
    ERROR_MESSAGE,
    FAILURE_HEADERS,
    FIRST_FAILURE,
    LAST_FAILURE,
    ORIGINAL_TOPIC,
    REDRIVE_COUNT,
    REDRIVE_FROM,
    REDRIVE_ID,
    REDRIVE_PREFIX,
    int_header,
)
from core.jobs import ATTEMPT, DEAD, DUE, REDRIVE, JobStatus, StatusTable
from core.kafka import Headers
from core.settings import KafkaSettings
from core.topics import Topics
from ops.dlq.letters import DeadLetter, read_topic
from schemas.codec import job_codec

# Headers a redriven job leaves behind: the failure it died of, and where its last
# attempt stood. `sluice.original.*` (where it was first submitted) travels on.
_DROPPED = FAILURE_HEADERS | {ATTEMPT, DUE, REDRIVE}
PREVIEW_CHARS = 60


@dataclass(frozen=True)
class DeadJob:
    """One record of a job queue's DLQ, read as a job."""

    letter: DeadLetter
    job: dict[str, Any] | None  # None: the record holds no job (it did not decode)

    @property
    def id(self) -> str:
        """The job's id ("" for a record that holds no job)."""
        return str((self.job or {}).get("job_id") or "")

    @property
    def priority(self) -> int | None:
        """The priority of the topic it died on (or of its record)."""
        topic = self.letter.headers.get(ORIGINAL_TOPIC, "")
        level = topic.rpartition(".p")[2]
        if level.isdigit():
            return int(level)
        value = (self.job or {}).get("priority")
        return int(value) if isinstance(value, int) else None

    def payload(self) -> Any:
        """The payload (JSON), or its text when it is not JSON."""
        text = (self.job or {}).get("payload")
        if text is None:
            return None
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text

    def preview(self, chars: int = PREVIEW_CHARS) -> str:
        """The payload as JSON, cut to `chars` characters."""
        text = str((self.job or {}).get("payload") or "")
        return text if len(text) <= chars else text[: chars - 1] + "…"

    def describe(self) -> dict[str, Any]:
        """What `sluice dlq show jobs.<queue> <ref>` prints."""
        h = self.letter.headers
        return {
            "ref": self.letter.ref,
            "job_id": self.id or None,
            "queue": (self.job or {}).get("queue"),
            "priority": self.priority,
            "attempts": int_header(h, ATTEMPTS),
            "error_class": h.get(ERROR_CLASS),
            "error_message": h.get(ERROR_MESSAGE),
            "first_failure_ms": int_header(h, FIRST_FAILURE),
            "last_failure_ms": int_header(h, LAST_FAILURE),
            "dead_lettered_ms": self.letter.timestamp_ms,
            "key": (self.letter.key or b"").decode("utf-8", "replace"),
            "payload": self.payload(),
            "job": self.job,
            "headers": h,
        }


def dead_jobs(letters: list[DeadLetter]) -> list[DeadJob]:
    """The DLQ records as jobs (a record that does not decode has `job` None)."""
    codec = job_codec(logical_types=False)
    out = []
    for rec in letters:
        try:
            job = codec.decode(rec.value)
        except Exception:
            job = None
        out.append(DeadJob(rec, job if isinstance(job, dict) and job.get("job_id") else None))
    return out


def job_statuses(kafka: KafkaSettings, ids: set[str]) -> dict[str, JobStatus]:
    """The latest status of each job of `ids`, read from the status topic to its end."""
    table = StatusTable()
    wanted = {i.encode() for i in ids}
    for msg in read_topic(kafka, Topics(kafka.topic_prefix).jobs_status):
        if msg.key() in wanted:
            try:
                table.apply(Entry(msg.key(), msg.value(), msg.partition(), msg.offset()))
            except (ValueError, TypeError):
                continue
    return {i: s for i in ids if (s := table.get(i)) is not None}


def redrive_headers(headers: dict[str, str], dlq: str, ref: str, run: str) -> Headers:
    """A dead job's headers for its redrive: the failure and attempt off, the redrive
    marker (`ref`, the DLQ record) and the redrive history on."""
    try:
        count = int(headers.get(REDRIVE_COUNT, "0")) + 1
    except ValueError:
        count = 1
    out: Headers = [
        (k, v.encode())
        for k, v in headers.items()
        if k not in _DROPPED and not k.startswith(REDRIVE_PREFIX)
    ]
    out += [
        (REDRIVE, ref.encode()),
        (REDRIVE_COUNT, str(count).encode()),
        (REDRIVE_FROM, f"{dlq}:{ref}".encode()),
        (REDRIVE_ID, run.encode()),
    ]
    return out


@dataclass(frozen=True)
class Outgoing:
    """One record a redrive produces: from which DLQ record, to where, with what."""

    rec: DeadLetter
    topic: str
    partition: int | None
    key: bytes | None
    value: bytes
    headers: Headers


@dataclass
class JobSkips:
    """Dead-letter records of a job queue that a redrive leaves where they are."""

    # (job id, its state now): jobs that are no longer DEAD, or have no status.
    not_dead: list[tuple[str, str]] = field(default_factory=list)
    # Records that hold no job (they did not decode).
    not_jobs: list[str] = field(default_factory=list)
    # Older records of a job that a later record of it redrives now.
    older: list[str] = field(default_factory=list)


def plan_job_redrive(
    kafka: KafkaSettings, queue: str, records: list[DeadLetter], dlq: str, run: str
) -> tuple[list[Outgoing], JobSkips]:
    """What redriving `records` of `queue`'s DLQ sends: one record per DEAD job (its
    latest DLQ record), to the priority topic and partition its status names."""
    skips = JobSkips()
    latest: dict[str, DeadJob] = {}
    for dead in dead_jobs(records):
        if dead.job is None:
            skips.not_jobs.append(dead.letter.ref)
            continue
        before = latest.get(dead.id)
        if before is not None and _age(before) > _age(dead):
            skips.older.append(dead.letter.ref)
            continue
        if before is not None:
            skips.older.append(before.letter.ref)
        latest[dead.id] = dead
    statuses = job_statuses(kafka, set(latest)) if latest else {}
    topics = Topics(kafka.topic_prefix).queue(queue)
    out: list[Outgoing] = []
    part: int | None
    for job_id, dead in latest.items():
        status = statuses.get(job_id)
        if status is None or status.state != DEAD:
            skips.not_dead.append((job_id, "unknown" if status is None else status.state))
            continue
        topic, part = status.topic, status.partition
        if not topic.startswith(f"{topics.prefix}.jobs.{queue}.p"):
            topic, part = topics.priority(dead.priority or 0), None
        rec = dead.letter
        out.append(
            Outgoing(
                rec,
                topic,
                part,
                rec.key,
                rec.value,
                redrive_headers(rec.headers, dlq, rec.ref, run),
            )
        )
    return out, skips


def _age(dead: DeadJob) -> tuple[int, int]:
    return dead.letter.timestamp_ms, dead.letter.offset
