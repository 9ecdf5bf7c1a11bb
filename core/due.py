"""Due-time lanes: records of a partition handed out in order, each when it comes due.

A consumer that reads delay topics (retry tiers, a queue of delayed jobs with a run-at
time) cannot sleep on a record: the other partitions must go on, and the group must
keep polling. So each partition it owns is a `Lane`: its records in order, handled by
one task. The head's due time, read from a header (`DueRule`), decides when the task
may take it; while the task waits for it, the lane wants its partition paused, so the
consumer fetches nothing more for it and the other lanes go on. A lane that holds too
many records (the high-water mark) wants its partition paused too, until it is down
to half of that (hysteresis, so a busy lane does not pause and resume on every poll).

`DueLanes` is the set of lanes of one consumer, with the bookkeeping around them: which
partitions are paused (what to pause and resume after each poll), and the offset up to
which each partition is done (what to commit). It holds no Kafka client and knows
nothing of what a record is for: the consumer loop calls the broker, the lane's task
decides what to do with a record. Records only need the few methods of `DueRecord`,
which a `confluent_kafka.Message` has.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

# A lane holding this many records wants its partition paused until it is down to half.
HIGH_WATER = 2000

# (topic, partition)
TP = tuple[str, int]
RawHeaders = Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None


class DueRecord(Protocol):
    """What a lane needs of a record: where it is, its headers and when it was written."""

    def topic(self) -> str | None:
        """The topic it was read from."""

    def partition(self) -> int | None:
        """The partition it was read from."""

    def offset(self) -> int | None:
        """Its offset in that partition."""

    def headers(self) -> RawHeaders:
        """Its headers, as pairs or as a mapping."""

    def timestamp(self) -> tuple[int, int]:
        """(timestamp type, milliseconds): when it was written."""


M = TypeVar("M", bound=DueRecord)


def header_text(headers: RawHeaders, name: str) -> str | None:
    """The header `name` as text (the last one of a repeated name), or None."""
    if headers is None:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    found: str | None = None
    for key, value in pairs:
        if key == name:
            found = value.decode("utf-8", "replace") if isinstance(value, bytes) else value or ""
    return found


def clamp_due(due_ms: int | None, written_ms: int, now_ms: int, max_wait_ms: int | None) -> int:
    """A due time (0 when there is none), never later than `max_wait_ms` after writing.

    The cap is counted from when the record was written, or from now for a record
    written "in the future" (a producer's clock ahead): a due time from an older version
    or a hand-written record cannot keep a partition paused for longer than the policy
    that reads it allows.
    """
    due = due_ms or 0
    if max_wait_ms is None:
        return due
    return min(due, min(written_ms, now_ms) + max_wait_ms)


@dataclass(frozen=True)
class DueRule:
    """When a record of a delay topic comes due: the header with its time, and a cap.

    `header` holds the due time in milliseconds since the epoch (a missing or unreadable
    one means due now); `max_wait_ms` is the longest a record may wait after it was
    written (None: no cap).
    """

    header: str
    max_wait_ms: int | None = None

    def due_ms(self, record: DueRecord, now_ms: int) -> int:
        """The record's due time in milliseconds since the epoch."""
        text = header_text(record.headers(), self.header)
        try:
            due = None if text is None else int(text)
        except ValueError:
            due = None
        return clamp_due(due, int(record.timestamp()[1]), now_ms, self.max_wait_ms)

    def due_in(self, record: DueRecord, now_ms: int) -> float:
        """Seconds until the record is due (0 or less: it is due)."""
        return (self.due_ms(record, now_ms) - now_ms) / 1000


@dataclass(eq=False)
class Lane(Generic[M]):
    """The records of one partition of one topic, handled in order by one task.

    The consumer loop appends records to `pending` and sets `wake`; the task takes them
    from the head (`chunk`, then `finish`). `due` is None for a topic whose records are
    due as soon as they are read. `waiting` and `blocked` are the two reasons a task
    gives for not taking its head now: the head is not due yet, or the task waits for
    something else (room to hold a record, say); either way the lane wants its
    partition paused.
    """

    topic: str
    partition: int
    due: DueRule | None = None
    high_water: int = HIGH_WATER
    clock: Callable[[], float] = time.time
    pending: deque[M] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: bool = False  # the head is not due yet
    blocked: bool = False  # the task waits for something other than the head's due time
    stopping: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def tp(self) -> TP:
        """(topic, partition)."""
        return (self.topic, self.partition)

    def wants_pause(self, paused: bool) -> bool:
        """Whether the partition should be paused, given whether it is paused now."""
        if self.waiting or self.blocked:
            return True
        # Hysteresis: a paused lane resumes at half the high-water mark.
        return len(self.pending) >= (self.high_water // 2 if paused else self.high_water)

    def stop(self) -> None:
        """Ask the task to stop after the record in hand (and wake it to see that)."""
        self.stopping = True
        self.wake.set()

    def due_in(self, record: M, now_ms: int) -> float:
        """Seconds until `record` is due in this lane (0 or less: it is due)."""
        return 0.0 if self.due is None else self.due.due_in(record, now_ms)

    async def until_due(self) -> int | None:
        """Wait until the head is due: its due time (ms), or None when woken before it is.

        The lane is `waiting` meanwhile (its partition paused). Woken early, by `stop` or
        by whoever sets `wake`, it returns None; the task checks `stopping` and calls again.
        """
        now_ms = int(self.clock() * 1000)
        if self.due is None:
            return now_ms
        due_ms = self.due.due_ms(self.pending[0], now_ms)
        wait = due_ms / 1000 - self.clock()
        if wait > 0:
            self.waiting = True
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait)
            self.waiting = False
            if self.stopping or due_ms / 1000 > self.clock():
                return None
        return due_ms

    def chunk(self, size: int) -> list[M]:
        """Up to `size` records from the head, left in place until `finish`."""
        return [self.pending[i] for i in range(min(size, len(self.pending)))]

    def finish(self, count: int) -> int | None:
        """Take `count` handled records off the head: the offset to commit (None: none)."""
        done = None
        for _ in range(count):
            done = (self.pending.popleft().offset() or 0) + 1
        return done


class Flow(NamedTuple):
    """Partitions to pause and to resume after a poll."""

    pause: set[TP]
    resume: set[TP]


class DueLanes(Generic[M]):
    """The lanes of one consumer, with what is paused and how far each partition is done.

    `rules` maps a topic to the `DueRule` of its records; a topic it does not name is due
    on reading. Lanes are added when a partition's first record arrives and removed when
    the partition is revoked; `done` outlives a lane until its offsets are committed.
    """

    def __init__(
        self,
        rules: Mapping[str, DueRule] | None = None,
        high_water: int = HIGH_WATER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules = dict(rules or {})
        self.high_water = high_water
        self.clock = clock
        self.lanes: dict[TP, Lane[M]] = {}
        self.paused: set[TP] = set()
        self.done: dict[TP, int] = {}
        self.committed: dict[TP, int] = {}

    def __contains__(self, tp: object) -> bool:
        return tp in self.lanes

    def __iter__(self) -> Iterator[Lane[M]]:
        return iter(list(self.lanes.values()))

    def __len__(self) -> int:
        return len(self.lanes)

    def get(self, tp: TP) -> Lane[M] | None:
        """The lane of `tp`, if it has one."""
        return self.lanes.get(tp)

    def add(self, topic: str, partition: int) -> Lane[M]:
        """The lane of (topic, partition), made if it has none."""
        lane = self.lanes.get((topic, partition))
        if lane is None:
            lane = Lane(topic, partition, self.rules.get(topic), self.high_water, self.clock)
            self.lanes[lane.tp] = lane
        return lane

    def remove(self, tp: TP) -> Lane[M] | None:
        """Forget the lane of `tp` (its task stopped); its done offset stays until revoked."""
        return self.lanes.pop(tp, None)

    def due_in(self, record: M, now_ms: int) -> float:
        """Seconds until `record` is due by its topic's rule (0 or less: it is due)."""
        rule = self.rules.get(record.topic() or "")
        return 0.0 if rule is None else rule.due_in(record, now_ms)

    def wake_ready(self) -> None:
        """Wake the task of every lane with records and a head it is not waiting for."""
        for lane in self.lanes.values():
            if lane.pending and not lane.waiting:
                lane.wake.set()

    def ready_count(self) -> int:
        """Records of lanes that could take them now (not waiting for a head, not blocked)."""
        return sum(
            len(lane.pending) for lane in self.lanes.values() if not (lane.waiting or lane.blocked)
        )

    def flow(self, also: Iterable[TP] = ()) -> Flow:
        """What to pause and resume now: lanes that want it, and `also` (the caller's own).

        The caller pauses and resumes those on its consumer; `paused` is the new state.
        """
        want = {tp for tp, lane in self.lanes.items() if lane.wants_pause(tp in self.paused)}
        want |= set(also)
        flow = Flow(want - self.paused, self.paused - want)
        self.paused = want
        return flow

    def mark_paused(self, tps: Iterable[TP]) -> None:
        """Partitions the caller paused on its own (the next `flow` resumes them unless asked)."""
        self.paused |= set(tps)

    def finish(self, lane: Lane[M], count: int) -> None:
        """Take `count` handled records off the head of `lane`, and mark them done."""
        done = lane.finish(count)
        if done is not None:
            self.done[lane.tp] = done

    def uncommitted(self) -> dict[TP, int]:
        """Done offsets not committed yet (a copy: lane tasks go on meanwhile)."""
        done = self.done.copy()
        return {tp: o for tp, o in done.items() if self.committed.get(tp) != o}

    def mark_committed(self, offsets: Mapping[TP, int]) -> None:
        """Offsets the caller committed."""
        self.committed.update(offsets)

    def revoked(self, tps: Iterable[TP]) -> None:
        """Forget what is known of revoked partitions (after their last commit)."""
        for tp in tps:
            self.done.pop(tp, None)
            self.committed.pop(tp, None)
            self.paused.discard(tp)

    def stop_all(self) -> None:
        """Ask every lane's task to stop after the record in hand."""
        for lane in self.lanes.values():
            lane.stop()
