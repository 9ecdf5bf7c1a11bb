"""Due-time lanes: records handed out in order, each once due; a lane that waits pauses."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from confluent_kafka import Message

from core.due import DueLanes, DueRule, Lane, clamp_due, header_text

DUE = "sluice.retry.due"
T0_MS = 1_700_000_000_000


def _msg(
    offset: int,
    due_ms: int | None = None,
    topic: str = "jobs.delay",
    partition: int = 0,
    written_ms: int = T0_MS,
) -> Message:
    headers: list[tuple[str, str | bytes | None]] = []
    if due_ms is not None:
        headers.append((DUE, str(due_ms).encode()))
    return Message(
        topic=topic,
        partition=partition,
        offset=offset,
        value=b"v%d" % offset,
        headers=headers,
        timestamp=(1, written_ms),
    )


@dataclass
class Clock:
    """A wall clock the test moves by hand (seconds since the epoch)."""

    now_s: float = T0_MS / 1000

    def __call__(self) -> float:
        return self.now_s


@dataclass
class Job:
    """A record that is not a Kafka message: the lanes need only `DueRecord`'s methods."""

    at: int
    run_at: str

    def topic(self) -> str:
        return "jobs.delay"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.at

    def headers(self) -> dict[str, str | bytes | None]:
        return {"run.at": self.run_at}

    def timestamp(self) -> tuple[int, int]:
        return (1, T0_MS)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_due_time_is_read_from_the_header_and_capped_after_writing() -> None:
    rule = DueRule(DUE, max_wait_ms=60_000)
    assert rule.due_ms(_msg(0, T0_MS + 5_000), T0_MS) == T0_MS + 5_000
    assert rule.due_in(_msg(0, T0_MS + 5_000), T0_MS) == 5.0
    # Further out than the cap allows after the record was written: brought in.
    assert rule.due_ms(_msg(0, T0_MS + 10**9), T0_MS) == T0_MS + 60_000
    # Written "in the future" (a producer's clock ahead): the cap counts from now.
    future = _msg(0, T0_MS + 10**9, written_ms=T0_MS + 10**6)
    assert rule.due_ms(future, T0_MS) == T0_MS + 60_000
    # No header, or junk in it: due now.
    assert rule.due_in(_msg(0), T0_MS) <= 0
    junk = Message(topic="t", offset=0, headers=[(DUE, b"soon")], timestamp=(1, T0_MS))
    assert rule.due_in(junk, T0_MS) <= 0
    assert DueRule(DUE).due_ms(_msg(0, T0_MS + 10**9), T0_MS) == T0_MS + 10**9
    assert clamp_due(None, T0_MS, T0_MS, None) == 0


def test_headers_are_read_as_pairs_or_a_mapping_the_last_of_a_name_winning() -> None:
    assert header_text([("a", b"1"), ("b", "x"), ("a", b"2")], "a") == "2"
    assert header_text({"a": "3"}, "a") == "3"
    assert header_text([("a", None)], "a") == ""
    assert header_text(None, "a") is None
    assert header_text([("b", b"1")], "a") is None
    rule = DueRule("run.at")
    assert rule.due_ms(Job(0, str(T0_MS + 7_000)), T0_MS) == T0_MS + 7_000


async def test_a_lane_waits_for_its_head_with_its_partition_paused_the_others_go_on() -> None:
    clock = Clock()
    lanes: DueLanes[Message] = DueLanes({"jobs.delay": DueRule(DUE)}, clock=clock)
    waiting = lanes.add("jobs.delay", 0)
    waiting.pending.append(_msg(0, T0_MS + 3_600_000))
    ready = lanes.add("jobs.delay", 1)
    ready.pending.append(_msg(0, T0_MS - 1, partition=1))
    plain = lanes.add("jobs.now", 0)
    plain.pending.append(_msg(0, T0_MS + 3_600_000, topic="jobs.now"))

    assert await ready.until_due() == T0_MS - 1
    assert await plain.until_due() == T0_MS  # a topic without a rule: due on reading
    waiter = asyncio.create_task(waiting.until_due())
    await _settle()
    assert waiting.waiting
    assert lanes.flow() == ({("jobs.delay", 0)}, set())
    assert lanes.ready_count() == 2  # the waiting lane's head is not counted

    # Woken before the head is due (a new record's wake, say): not handed out.
    waiting.wake.set()
    assert await waiter is None
    assert not waiting.waiting

    # Once the clock passes the due time, a wake hands it out and the partition resumes.
    waiter = asyncio.create_task(waiting.until_due())
    await _settle()
    clock.now_s += 3_600
    waiting.wake.set()
    assert await waiter == T0_MS + 3_600_000
    assert lanes.flow() == (set(), {("jobs.delay", 0)})
    assert lanes.paused == set()


async def test_a_stopping_lane_gives_up_waiting_for_its_head() -> None:
    lane: Lane[Message] = Lane("jobs.delay", 0, DueRule(DUE), clock=Clock())
    lane.pending.append(_msg(0, T0_MS + 60_000))
    waiter = asyncio.create_task(lane.until_due())
    await _settle()
    assert lane.wants_pause(paused=False)
    lane.stop()
    assert await waiter is None
    assert lane.stopping
    assert not lane.waiting


def test_a_full_lane_pauses_at_the_high_water_mark_and_resumes_at_half() -> None:
    lanes: DueLanes[Message] = DueLanes(high_water=10)
    lane = lanes.add("jobs.delay", 0)
    lane.pending.extend(_msg(i) for i in range(9))
    assert lanes.flow() == (set(), set())
    lane.pending.append(_msg(9))
    assert lanes.flow() == ({("jobs.delay", 0)}, set())
    lanes.finish(lane, 5)
    assert len(lane.pending) == 5
    assert lanes.flow() == (set(), set())  # still paused at half
    lanes.finish(lane, 1)
    assert lanes.flow() == (set(), {("jobs.delay", 0)})


def test_a_blocked_lane_pauses_and_the_callers_own_pauses_hold_until_released() -> None:
    lanes: DueLanes[Message] = DueLanes()
    lane = lanes.add("jobs.delay", 0)
    lane.pending.append(_msg(0))
    lane.blocked = True
    assert lanes.ready_count() == 0
    assert lanes.flow() == ({("jobs.delay", 0)}, set())
    lane.blocked = False
    restoring = ("jobs.delay", 3)
    lanes.mark_paused([restoring])
    assert lanes.flow(also=[restoring]) == (set(), {("jobs.delay", 0)})
    assert lanes.flow() == (set(), {restoring})


def test_records_are_handed_out_in_order_and_done_offsets_committed_once() -> None:
    lanes: DueLanes[Message] = DueLanes()
    lane = lanes.add("jobs.delay", 0)
    assert lanes.add("jobs.delay", 0) is lane
    assert ("jobs.delay", 0) in lanes
    lane.pending.extend(_msg(i) for i in range(5))
    chunk = lane.chunk(3)
    assert [m.offset() for m in chunk] == [0, 1, 2]
    assert len(lane.pending) == 5  # left in place until handled
    lanes.finish(lane, len(chunk))
    assert [m.offset() for m in lane.chunk(10)] == [3, 4]
    assert lanes.uncommitted() == {("jobs.delay", 0): 3}
    lanes.mark_committed(lanes.uncommitted())
    assert lanes.uncommitted() == {}
    lanes.finish(lane, 2)
    assert lanes.uncommitted() == {("jobs.delay", 0): 5}

    # Removing the lane keeps its done offset for the last commit; revoking forgets it.
    assert lanes.remove(("jobs.delay", 0)) is lane
    assert len(lanes) == 0
    assert lanes.uncommitted() == {("jobs.delay", 0): 5}
    lanes.revoked([("jobs.delay", 0)])
    assert lanes.uncommitted() == {}


def test_due_in_follows_the_rule_of_the_records_topic() -> None:
    lanes: DueLanes[Message] = DueLanes({"jobs.delay": DueRule(DUE)})
    assert lanes.due_in(_msg(0, T0_MS + 2_000), T0_MS) == 2.0
    assert lanes.due_in(_msg(0, T0_MS + 2_000, topic="jobs.now"), T0_MS) == 0.0
    lane = lanes.add("jobs.delay", 0)
    assert lane.due_in(_msg(0, T0_MS + 2_000), T0_MS) == 2.0


@pytest.mark.parametrize("count", [1, 3])
async def test_a_lane_task_takes_records_in_order_each_when_due(count: int) -> None:
    clock = Clock()
    lanes: DueLanes[Message] = DueLanes({"jobs.delay": DueRule(DUE)}, clock=clock)
    lane = lanes.add("jobs.delay", 0)
    lane.pending.extend(_msg(i, T0_MS + 1_000 * i) for i in range(count))
    taken: list[int] = []

    async def work() -> None:
        while not lane.stopping and lane.pending:
            if await lane.until_due() is None:
                continue
            taken.extend(m.offset() or 0 for m in lane.chunk(1))
            lanes.finish(lane, 1)

    task = asyncio.create_task(work())
    await _settle()
    assert taken == [0]
    for i in range(1, count):
        assert lane.waiting
        clock.now_s += 1
        lane.wake.set()
        await _settle()
        assert taken == list(range(i + 1))
    await task
    assert lanes.uncommitted() == {("jobs.delay", 0): count}
