"""Jobs: their states, the status record on `sluice.jobs.status`, and the table of them.

A job's latest state is one record on the compacted status topic, keyed by its id, with
every transition so far in its `history`. The job worker writes it (the worker that owns
the partition the job is on), the gateway and the CLI read it. States:

- PENDING: on its queue's topic, due now, not started yet (`GET` shows it once a worker
  read it);
- SCHEDULED: waiting for its `run_at` (or `delay_ms`);
- ACTIVE: an attempt runs, under a lease until `lease_until_ms`;
- FAILED: this attempt failed and another is due at `due_ms`;
- COMPLETED, DEAD (attempts spent or a fatal error; the job is in its queue's DLQ) and
  CANCELLED (cancelled before an attempt started) end a job: nothing runs it again.

Records that carry a job (the submission, and the copies a worker appends for retries)
say which attempt they are for and when it is due in headers (`ATTEMPT`, `DUE`), so a
worker that reads a record twice (after a crash, a rebalance, a repeated idempotent
submit) can tell from the status whether it still has to run.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import orjson
from croniter import croniter

from core.follower import Entry

PENDING: Final = "PENDING"
SCHEDULED: Final = "SCHEDULED"
ACTIVE: Final = "ACTIVE"
FAILED: Final = "FAILED"
COMPLETED: Final = "COMPLETED"
DEAD: Final = "DEAD"
CANCELLED: Final = "CANCELLED"
STATES: Final = (PENDING, SCHEDULED, ACTIVE, FAILED, COMPLETED, DEAD, CANCELLED)
# Nothing runs a job in one of these states again.
TERMINAL: Final = frozenset({COMPLETED, DEAD, CANCELLED})

# Headers of a job record: the attempt it is for (1 when absent) and when it is due
# (milliseconds since the epoch; absent: the job's `run_at`, or now).
ATTEMPT: Final = "sluice.job.attempt"
DUE: Final = "sluice.job.due"
# A record with this header (the job id) and no value asks to cancel that job.
CANCEL: Final = "sluice.job.cancel"
# A record with this header (JSON: job_id, lease_id, op ack|nack|extend and its fields)
# and no value carries a lease call that reached a job worker process other than the one
# holding the lease, to the job's partition: its owner, which holds the lease, applies it.
LEASE_CALL: Final = "sluice.job.lease"
# A job record redriven from its queue's DLQ names the DLQ record (`partition:offset`).
# The status keeps the markers it has seen (`redrives`): a DEAD job starts over once per
# marker, and a record of an earlier run (another marker, or none) is a leftover.
REDRIVE: Final = "sluice.job.redrive"

# The namespace of job ids derived from a key: idempotency keys, schedule ticks.
DERIVED_IDS: Final = uuid.UUID("6f3c3b0e-2f55-4d4e-9a57-5c1ab4a1d0f1")
# How far back the owner of a queue's schedules fires ticks when it takes them over
# (without catch-up): a tick its previous owner may not have fired yet. Fired twice, a
# tick is still one job (its id is the tick's).
SCHEDULE_GRACE_MS: Final = 5000

# The history a status record keeps: the first transitions and the latest ones.
MAX_HISTORY = 100
# Results and errors are cut to this many characters in the status record.
MAX_TEXT = 4000


class JobStatus(NamedTuple):
    """The latest state of one job, as the status topic holds it.

    A named tuple: one object a status (a class instance has a `__dict__` beside it), and
    `_replace` is cheaper than `dataclasses.replace`, several times a job.
    """

    id: str
    queue: str
    state: str
    attempt: int
    max_attempts: int
    priority: int
    topic: str
    partition: int
    submitted_at_ms: int
    updated_at_ms: int
    due_ms: int | None = None
    lease_until_ms: int | None = None
    worker: str | None = None
    result: Any = None
    error: str | None = None
    ordering_key: str | None = None
    tags: tuple[str, ...] = ()
    started_at_ms: int | None = None
    history: tuple[dict[str, Any], ...] = ()
    # The redrive markers (`REDRIVE`) this job started over from, oldest first.
    redrives: tuple[str, ...] = ()
    # A job leased over HTTP: the id of its lease (an ack or nack must name it), and what
    # its worker last reported with an extend.
    lease_id: str | None = None
    progress: Any = None

    @property
    def finished(self) -> bool:
        """Whether nothing runs the job again."""
        return self.state in TERMINAL

    def moved(self, state: str, now_ms: int, **changes: Any) -> JobStatus:
        """This job in `state` from `now_ms`, the transition added to its history.

        `note` (a keyword) goes into the history entry only, for a transition that
        needs a word (an attempt given up on because its lease expired, say).
        """
        note = changes.pop("note", None)
        entry: dict[str, Any] = {
            "state": state,
            "at_ms": now_ms,
            "attempt": changes.get("attempt", self.attempt),
        }
        for name in _HISTORY_FIELDS:
            value = changes.get(name)
            if value is not None:
                entry[name] = value
        if note is not None:
            entry["note"] = note
        history = (*self.history, entry)
        if len(history) > MAX_HISTORY:
            history = history[:10] + history[-(MAX_HISTORY - 10) :]
        values = list(self)
        values[_STATE], values[_UPDATED_AT_MS], values[_HISTORY] = state, now_ms, history
        for name, value in changes.items():
            values[_INDEX[name]] = value  # a KeyError for a name that is not a field
        return _new(JobStatus, values)

    def to_bytes(self) -> bytes:
        """The record value on the status topic (`redrives`, `lease_id` and `progress` only
        once they are set: the status of a job that has none is the record it always was)."""
        data = self._asdict()
        if not self.redrives:
            del data["redrives"]
        for name in ("lease_id", "progress"):
            if data[name] is None:
                del data[name]
        return orjson.dumps(data)

    @classmethod
    def from_bytes(cls, value: bytes) -> JobStatus:
        """A status record read back (ValueError or TypeError for one it cannot read)."""
        data = orjson.loads(value)
        if not isinstance(data, dict):
            raise ValueError("a job status is a JSON object")
        data["tags"] = tuple(data.get("tags") or ())
        data["history"] = tuple(data.get("history") or ())
        data["redrives"] = tuple(data.get("redrives") or ())
        return cls(**data)

    def public(self) -> dict[str, Any]:
        """What `GET /v1/jobs/{id}` answers."""
        return self._asdict()


# `moved` sets fields by position (`_replace` pops every field name from a dict).
_INDEX: Final = {name: i for i, name in enumerate(JobStatus._fields)}
_STATE: Final = _INDEX["state"]
_UPDATED_AT_MS: Final = _INDEX["updated_at_ms"]
_HISTORY: Final = _INDEX["history"]
_new: Final = tuple.__new__

# The fields a transition names in its history entry when it sets them.
_HISTORY_FIELDS = ("worker", "error", "due_ms", "lease_until_ms", "lease_id")


def cut(text: str) -> str:
    """`text`, no longer than a status record keeps."""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


# A finished job's status as the table keeps it: queue, state, updated_at_ms and the
# record's bytes. A plain tuple of a string, a number and bytes is one the garbage
# collector stops tracking, so the finished jobs (almost all of the table until their
# retention) are not walked by every full collection; under load those collections took
# a quarter of the job worker's time while the table held objects.
Packed = tuple[str, str, int, bytes]


class StatusTable:
    """The latest status of every job, applied from the status topic (thread-safe).

    The follower thread applies records, the worker's loop and the gateway's handlers
    read; `put` records a status this process just wrote, so that it does not wait for
    its own record to come back. Unfinished jobs are kept as `JobStatus`, finished ones
    packed (`Packed`) and decoded again when asked for.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, JobStatus | Packed] = {}
        self._counts: Counter[tuple[str, str]] = Counter()
        self._watchers: list[Callable[[JobStatus | None, JobStatus | None], None]] = []
        self._lock = threading.Lock()

    def watch(self, changed: Callable[[JobStatus | None, JobStatus | None], None]) -> None:
        """Call `changed(old, new)` on every status put or forgotten (`new` None), under the
        table's lock, in the order of the changes: what keeps figures of the table (counts
        over time, expiry times) without scanning it."""
        with self._lock:
            self._watchers.append(changed)

    def apply(self, entry: Entry) -> None:
        """One record of the status topic (a tombstone forgets the job)."""
        if entry.key is None:
            raise ValueError("a job status without a key")
        job_id = entry.key.decode()
        if entry.value is None:
            self.forget(job_id)
            return
        status = JobStatus.from_bytes(entry.value)
        if status.id != job_id:
            raise ValueError(f"a status of job {status.id} under the key {job_id}")
        self.put(status, only_newer=True, value=entry.value)

    def put(self, status: JobStatus, only_newer: bool = False, value: bytes | None = None) -> None:
        """Record `status`; with `only_newer`, not over a later one this process put.
        `value`: its record's bytes, when the caller has them."""
        kept: JobStatus | Packed = status
        if status.finished:
            raw = value if value is not None else status.to_bytes()
            kept = (status.queue, status.state, status.updated_at_ms, raw)
        with self._lock:
            stored = self._jobs.get(status.id)
            old = None if stored is None else _unpacked(stored)
            if only_newer and old is not None and _later(old, status):
                return
            if old is not None:
                self._counts[(old.queue, old.state)] -= 1
            self._jobs[status.id] = kept
            self._counts[(status.queue, status.state)] += 1
            for changed in self._watchers:
                changed(old, status)

    def forget(self, job_id: str) -> None:
        """Drop a job (its status was deleted)."""
        with self._lock:
            stored = self._jobs.pop(job_id, None)
            if stored is not None:
                old = _unpacked(stored)
                self._counts[(old.queue, old.state)] -= 1
                for changed in self._watchers:
                    changed(old, None)

    def get(self, job_id: str) -> JobStatus | None:
        """The latest status of `job_id`, if any."""
        with self._lock:
            stored = self._jobs.get(job_id)
        return None if stored is None else _unpacked(stored)

    def __contains__(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._jobs

    def counts(self, queue: str) -> dict[str, int]:
        """How many jobs of `queue` are in each state."""
        with self._lock:
            return {state: self._counts[(queue, state)] for state in STATES}

    def select(self, queue: str | None, state: str | None, limit: int) -> list[JobStatus]:
        """Up to `limit` jobs of `queue` in `state` (None: any), the latest updated first."""
        found: list[tuple[int, JobStatus | Packed]] = []
        with self._lock:
            for stored in self._jobs.values():
                if isinstance(stored, JobStatus):
                    of, now, at = stored.queue, stored.state, stored.updated_at_ms
                else:
                    of, now, at = stored[0], stored[1], stored[2]
                if (queue is None or of == queue) and (state is None or now == state):
                    found.append((at, stored))
        found.sort(key=lambda pair: pair[0], reverse=True)
        return [_unpacked(stored) for _, stored in found[:limit]]

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)


def _unpacked(stored: JobStatus | Packed) -> JobStatus:
    return stored if isinstance(stored, JobStatus) else JobStatus.from_bytes(stored[3])


def _later(old: JobStatus, new: JobStatus) -> bool:
    """Whether `old` is a later state of the job than `new` (a status read back late)."""
    if len(old.redrives) != len(new.redrives):
        # A redrive starts the attempts over: the run after more redrives is the later one.
        return len(old.redrives) > len(new.redrives)
    if old.attempt != new.attempt:
        return old.attempt > new.attempt
    if old.finished != new.finished:
        return old.finished
    return len(old.history) > len(new.history)


def redrive_step(
    status: JobStatus | None, marker: str | None, worker: str, now_ms: int
) -> tuple[JobStatus | None, bool]:
    """What a job record carrying redrive marker `marker` (None: none) means for the job
    in `status`: the status to go on from, and whether the record is a leftover.

    A marker the DEAD job has not seen starts it over: PENDING, attempt 1, the marker
    added to `redrives`, the attempts before kept in the history (noted `redriven`). A
    record is a leftover when its marker is not the one of the job's latest run: a
    record of a run before a redrive, or a redrive of a job that is not DEAD.
    """
    if status is None:
        return None, False
    if marker is not None and status.state == DEAD and marker not in status.redrives:
        status = status.moved(
            PENDING,
            now_ms,
            attempt=1,
            worker=worker,
            error=None,
            result=None,
            due_ms=None,
            lease_until_ms=None,
            started_at_ms=None,
            lease_id=None,
            progress=None,
            redrives=(*status.redrives, marker),
            note=f"redriven from the DLQ record {marker}",
        )
    latest = status.redrives[-1] if status.redrives else None
    return status, marker != latest


def idempotent_id(queue: str, key: str) -> str:
    """The one job id of idempotency key `key` on `queue`, the same from every gateway."""
    return str(uuid.uuid5(DERIVED_IDS, f"{queue}\x00{key}"))


def derived_id(job_id: str) -> bool:
    """Whether `job_id` was derived from a key (`idempotent_id`, `tick_id`: a uuid5), not
    drawn at random: the id a later submit of the same key gets again."""
    if len(job_id) != 36 or job_id[14] != "5":
        return False  # not a uuid5 in its usual form (a random id, most often)
    try:
        return uuid.UUID(job_id).version == 5
    except ValueError:
        return False


def tick_id(queue: str, schedule: str, tick_ms: int) -> str:
    """The one job id of one tick of a schedule, the same from every worker."""
    return str(uuid.uuid5(DERIVED_IDS, f"{queue}\x00schedule\x00{schedule}\x00{tick_ms}"))


def ticks(cron: str, after_ms: int, until_ms: int, limit: int) -> list[int]:
    """The ticks of `cron` in (after_ms, until_ms], in ms; the latest `limit` of them."""
    it = croniter(cron, after_ms / 1000)
    found: list[int] = []
    while True:
        seconds: float = it.get_next(float)
        tick = round(seconds * 1000)
        if tick > until_ms:
            return found[-limit:]
        found.append(tick)
        if len(found) > 2 * limit:
            del found[:limit]


def next_tick(cron: str, after_ms: int) -> int:
    """The first tick of `cron` after `after_ms`, in ms."""
    seconds: float = croniter(cron, after_ms / 1000).get_next(float)
    return round(seconds * 1000)
