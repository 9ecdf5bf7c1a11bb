"""Redriving dead jobs, the pure pieces: how a status starts over from a redrive marker,
which records are leftovers, the status record's bytes, and the redriven headers."""

from __future__ import annotations

import orjson

from core.follower import Entry
from core.jobs import ACTIVE, COMPLETED, DEAD, FAILED, PENDING, JobStatus, StatusTable, redrive_step
from core.settings import KafkaSettings
from ops.dlq.jobs import DeadJob, redrive_headers
from ops.dlq.letters import DeadLetter, dlq_topic, job_queue


def _dead(**changes: object) -> JobStatus:
    status = JobStatus("j1", "work", PENDING, 1, 2, 0, "sluice.jobs.work.p0", 1, 1, 1)
    status = status.moved(ACTIVE, 2, worker="w")
    status = status.moved(FAILED, 3, error="boom", due_ms=10)
    status = status.moved(ACTIVE, 11, attempt=2, worker="w")
    return status.moved(DEAD, 12, attempt=2, error="boom", **changes)


def test_a_new_marker_starts_a_dead_job_over_and_keeps_its_history() -> None:
    dead = _dead()
    again, leftover = redrive_step(dead, "0:5", "w2", 100)
    assert again is not None
    assert not leftover
    assert (again.state, again.attempt, again.error, again.redrives) == (PENDING, 1, None, ("0:5",))
    assert again.history[:-1] == dead.history
    assert again.history[-1] == {
        "state": PENDING,
        "at_ms": 100,
        "attempt": 1,
        "worker": "w2",
        "note": "redriven from the DLQ record 0:5",
    }


def test_records_of_another_run_are_leftovers() -> None:
    dead = _dead()
    # A record without a marker, or the original's copies: a dead job stays dead.
    assert redrive_step(dead, None, "w", 100) == (dead, False)
    again, _ = redrive_step(dead, "0:5", "w", 100)
    # The same marker again (a copy of the redriven record): not a new run, not a leftover.
    assert again is not None
    assert redrive_step(again, "0:5", "w", 200) == (again, False)
    # Records of the run before the redrive (no marker, or an older one): leftovers.
    assert redrive_step(again, None, "w", 200) == (again, True)
    done = again.moved(COMPLETED, 300)
    assert redrive_step(done, "0:5", "w", 400) == (done, False)
    # A marker for a job that is not DEAD does not start it over.
    assert redrive_step(done, "0:9", "w", 400) == (done, True)
    # A second redrive after a second death is another run.
    twice = again.moved(DEAD, 500)
    third, leftover = redrive_step(twice, "1:2", "w", 600)
    assert third is not None
    assert (third.state, third.redrives, leftover) == (PENDING, ("0:5", "1:2"), False)
    assert redrive_step(third, "0:5", "w", 700) == (third, True)
    assert redrive_step(None, "0:5", "w", 700) == (None, False)


def test_a_status_never_redriven_is_the_record_it_always_was() -> None:
    dead = _dead()
    assert "redrives" not in orjson.loads(dead.to_bytes())
    assert JobStatus.from_bytes(dead.to_bytes()) == dead
    again, _ = redrive_step(dead, "0:5", "w", 100)
    assert again is not None
    assert orjson.loads(again.to_bytes())["redrives"] == ["0:5"]
    assert JobStatus.from_bytes(again.to_bytes()) == again


def test_the_run_after_a_redrive_is_later_than_the_dead_attempts_before_it() -> None:
    dead = _dead()
    again, _ = redrive_step(dead, "0:5", "w", 100)
    assert again is not None
    table = StatusTable()
    for status in (dead, again):
        table.apply(Entry(b"j1", status.to_bytes(), 0, 0))
    assert table.get("j1") == again
    # The dead status read back late does not win over the new run (attempt 1 < 2).
    table.apply(Entry(b"j1", dead.to_bytes(), 0, 1))
    assert table.get("j1") == again
    assert table.counts("work")[PENDING] == 1
    assert table.counts("work")[DEAD] == 0


def test_a_redriven_job_leaves_its_failure_and_attempt_behind() -> None:
    headers = {
        "sluice.original.topic": "sluice.jobs.work.p2",
        "sluice.original.partition": "1",
        "sluice.stage": "job",
        "sluice.error.class": "RuntimeError",
        "sluice.error.message": "boom",
        "sluice.reason": "boom",
        "sluice.attempts": "3",
        "sluice.first.failure": "1",
        "sluice.last.failure": "2",
        "sluice.job.attempt": "3",
        "sluice.job.due": "5",
        "sluice.job.redrive": "0:1",
        "sluice.redrive.count": "1",
        "traceparent": "00-abc",
    }
    out = dict(redrive_headers(headers, "sluice.jobs.work.dlq", "1:7", "run-1"))
    assert out == {
        "sluice.original.topic": b"sluice.jobs.work.p2",
        "sluice.original.partition": b"1",
        "traceparent": b"00-abc",
        "sluice.job.redrive": b"1:7",
        "sluice.redrive.count": b"2",
        "sluice.redrive.from": b"sluice.jobs.work.dlq:1:7",
        "sluice.redrive.id": b"run-1",
    }


def test_dlq_names() -> None:
    kafka = KafkaSettings(topic_prefix="sluice")
    assert job_queue("jobs.mail") == "mail"
    assert job_queue("crm") is None
    assert dlq_topic(kafka, "jobs.mail") == "sluice.jobs.mail.dlq"
    assert dlq_topic(kafka, "crm") == "sluice.dest.crm.dlq"
    letter = DeadLetter(0, 4, 0, b"k", b"junk", {"sluice.original.topic": "sluice.jobs.q.p3"})
    dead = DeadJob(letter, {"job_id": "j", "payload": '{"a": 1}', "priority": 1})
    assert (dead.id, dead.priority, dead.payload(), dead.preview(5)) == ("j", 3, {"a": 1}, '{"a"…')
