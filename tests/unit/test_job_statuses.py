"""Job statuses: the table keeps finished ones packed and gives them back whole; the writer
batches a loop turn's statuses, a job's later one replacing its unsent earlier one; the
follower skips exactly the records this process wrote."""

from __future__ import annotations

import asyncio

import pytest

from connectors.jobs.statuses import Echoes, StatusWriter
from core.errors import BrokerUnavailable
from core.follower import Entry
from core.jobs import ACTIVE, COMPLETED, FAILED, JobStatus, StatusTable

Records = list[tuple[bytes | None, bytes | None, None]]


def submitted(job_id: str, queue: str = "work", at: int = 1) -> JobStatus:
    return JobStatus(job_id, queue, "PENDING", 1, 3, 0, "sluice.jobs.work.p0", 0, at, at)


def done(job_id: str, queue: str = "work", at: int = 10) -> JobStatus:
    active = submitted(job_id, queue).moved(ACTIVE, at - 5, worker="w1", lease_until_ms=at)
    return active.moved(COMPLETED, at, result={"n": job_id}, lease_until_ms=None)


def test_a_finished_status_comes_back_whole_and_unfinished_ones_as_they_were_put() -> None:
    table = StatusTable()
    finished, running = done("a"), submitted("b").moved(ACTIVE, 3, worker="w1")
    table.put(finished)
    table.put(running)
    assert table.get("a") == finished
    assert table.get("b") is running
    assert table.get("c") is None
    assert "a" in table
    assert "c" not in table
    assert table.counts("work")[COMPLETED] == 1
    assert table.counts("work")[ACTIVE] == 1
    # The bytes of a status read from the topic are the ones kept.
    table.apply(Entry(b"d", done("d").to_bytes(), 0, 7))
    assert table.get("d") == done("d")


def test_select_filters_and_orders_packed_and_unpacked_statuses_alike() -> None:
    table = StatusTable()
    table.put(done("old", at=10))
    table.put(submitted("mid", at=20).moved(ACTIVE, 20, worker="w1"))
    table.put(done("new", at=30))
    table.put(done("other-queue", queue="mail", at=40))
    assert [s.id for s in table.select("work", None, 10)] == ["new", "mid", "old"]
    assert [s.id for s in table.select("work", COMPLETED, 10)] == ["new", "old"]
    assert [s.id for s in table.select(None, COMPLETED, 2)] == ["other-queue", "new"]
    assert table.select("work", COMPLETED, 1) == [done("new", at=30)]


def test_watchers_see_a_packed_status_whole_when_it_is_replaced_or_forgotten() -> None:
    table = StatusTable()
    seen: list[tuple[JobStatus | None, JobStatus | None]] = []
    table.watch(lambda old, new: seen.append((old, new)))
    finished = done("a")
    table.put(finished)
    # A late copy of an earlier state read back does not go over the finished one.
    table.apply(Entry(b"a", submitted("a").moved(ACTIVE, 5).to_bytes(), 0, 1))
    assert table.get("a") == finished
    table.forget("a")
    assert seen == [(None, finished), (finished, None)]
    assert table.counts("work")[COMPLETED] == 0


def test_echoes_skip_each_record_this_process_wrote_once_and_nothing_else() -> None:
    echoes = Echoes()
    mine, theirs = done("a").to_bytes(), done("a", at=99).to_bytes()
    echoes.expect(b"a", mine)
    assert not echoes.back(Entry(b"a", theirs, 0, 1))  # another process's status of the job
    assert echoes.back(Entry(b"a", mine, 0, 2))
    assert not echoes.back(Entry(b"a", mine, 0, 3))  # the same bytes again: not one of ours
    assert not echoes.back(Entry(b"a", None, 0, 4))  # a tombstone


def test_the_writer_sends_a_turns_statuses_as_one_batch_with_a_jobs_latest_only() -> None:
    sent: list[Records] = []

    async def send(records: Records) -> None:
        sent.append(records)

    async def main() -> None:
        echoes = Echoes()
        writer = StatusWriter(send, echoes, "work", linger_s=0.001)
        started = submitted("a").moved(ACTIVE, 5, worker="w1")
        first = writer.write(started)
        second = writer.write(done("a"))
        other = writer.write(submitted("b").moved(FAILED, 6))
        assert first is second is other  # one batch
        await second
        later = writer.write(done("b"))
        await writer.drain()
        assert later.done()
        assert [[key for key, _, _ in batch] for batch in sent] == [[b"a", b"b"], [b"b"]]
        assert sent[0][0][1] == done("a").to_bytes()  # ACTIVE was replaced before it went out
        assert echoes.back(Entry(b"a", done("a").to_bytes(), 0, 0))
        assert not echoes.back(Entry(b"a", started.to_bytes(), 0, 1))

    asyncio.run(main())


def test_a_batch_kafka_did_not_take_fails_the_callers_waiting_for_it() -> None:
    async def send(records: Records) -> None:
        raise BrokerUnavailable("no broker")

    async def main() -> None:
        writer = StatusWriter(send, Echoes(), "work", linger_s=0.001)
        with pytest.raises(BrokerUnavailable):
            await writer.write(done("a"))

    asyncio.run(main())
