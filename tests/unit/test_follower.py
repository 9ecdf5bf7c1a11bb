"""The compacted-topic follower against an in-memory log: every record applied in order,
tombstones passed on, bad records handed to the caller and skipped, "caught up" reached at
the ends captured when the read began, a bounded read that stops there or gives up when
cancelled, and a following thread that survives errors and says why it is not ready."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from core.follower import CompactedFollower, Entry
from core.settings import KafkaSettings

TOPIC = "t.state"
KAFKA = KafkaSettings(bootstrap_servers="127.0.0.1:1")


class FakeLog:
    """A topic held in memory: records per partition, and a consumer factory reading them."""

    def __init__(self, partitions: int = 1) -> None:
        self.records: dict[int, list[tuple[bytes | None, bytes | None]]] = {
            p: [] for p in range(partitions)
        }
        self.exists = True
        self.silent = False  # the broker sends no records
        self.errors: list[KafkaError] = []  # error events to hand out next
        self.consumers: list[FakeConsumer] = []
        self.lock = threading.Lock()

    def append(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        with self.lock:
            self.records[partition].append((key, value))

    def consumer(self, config: dict[str, Any]) -> FakeConsumer:
        consumer = FakeConsumer(self, config)
        self.consumers.append(consumer)
        return consumer


class FakeConsumer:
    """The part of `confluent_kafka.Consumer` a follower uses, over a `FakeLog`."""

    def __init__(self, log: FakeLog, config: dict[str, Any]) -> None:
        self.log = log
        self.config = config
        self.positions: dict[int, int] = {}
        self.at_eof: set[int] = set()
        self.closed = False

    def assign(self, partitions: list[TopicPartition]) -> None:
        assert all(tp.offset == -2 for tp in partitions)  # from the beginning
        self.positions = {tp.partition: 0 for tp in partitions}

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        out: list[Message] = []
        with self.log.lock:
            if self.log.errors:
                return [Message(topic=TOPIC, partition=0, error=self.log.errors.pop(0))]
            for p in self.positions if not self.log.silent else ():
                records = self.log.records[p]
                while (pos := self.positions[p]) < len(records) and len(out) < num_messages:
                    key, value = records[pos]
                    out.append(Message(topic=TOPIC, partition=p, offset=pos, key=key, value=value))
                    self.positions[p] = pos + 1
                    self.at_eof.discard(p)
                if pos == len(records) and p not in self.at_eof and len(out) < num_messages:
                    eof = KafkaError(KafkaError._PARTITION_EOF)
                    out.append(Message(topic=TOPIC, partition=p, offset=pos, error=eof))
                    self.at_eof.add(p)
        if not out:
            time.sleep(min(max(timeout, 0), 0.01))
        return out

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        if not self.log.exists:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        with self.log.lock:
            return 0, len(self.log.records[partition.partition])

    def offsets_for_times(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]:
        if not self.log.exists:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        with self.log.lock:
            return [
                TopicPartition(tp.topic, tp.partition, len(self.log.records[tp.partition]))
                for tp in partitions
            ]

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        if not self.log.exists:
            error = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
            meta = SimpleNamespace(error=error, partitions={})
        else:
            meta = SimpleNamespace(error=None, partitions=dict.fromkeys(self.log.records))
        return SimpleNamespace(topics={TOPIC: meta})

    def close(self) -> None:
        self.closed = True


class State:
    """A caller's state: the latest value per key, as a compacted topic means it."""

    def __init__(self) -> None:
        self.values: dict[bytes | None, bytes] = {}
        self.entries: list[Entry] = []
        self.bad: list[tuple[Entry, Exception]] = []
        self.batches = 0

    def apply(self, entry: Entry) -> None:
        if entry.value == b"junk":
            raise ValueError("not a record of ours")
        self.entries.append(entry)
        if entry.value is None:
            self.values.pop(entry.key, None)
        else:
            self.values[entry.key] = entry.value

    def on_bad(self, entry: Entry, exc: Exception) -> None:
        self.bad.append((entry, exc))

    def on_batch(self) -> None:
        self.batches += 1


def _follower(log: FakeLog, state: State, **options: Any) -> CompactedFollower:
    return CompactedFollower(
        KAFKA,
        TOPIC,
        state.apply,
        name="test",
        on_bad=state.on_bad,
        on_batch=state.on_batch,
        consumer=log.consumer,
        **options,
    )


def test_every_partition_is_read_in_order_with_tombstones_and_bad_records_skipped() -> None:
    log = FakeLog(partitions=2)
    for key, value in [(b"a", b"1"), (b"b", b"1"), (b"a", b"2"), (b"b", None)]:
        log.append(0, key, value)
    log.append(1, b"c", b"junk")
    log.append(1, b"c", b"3")
    state = State()
    follower = _follower(log, state)
    assert follower.read_to_end(idle_timeout=5)
    assert state.values == {b"a": b"2", b"c": b"3"}
    assert [(e.partition, e.offset) for e in state.entries] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 1),
    ]
    assert [(e.partition, e.offset, e.value) for e, _ in state.bad] == [(1, 0, b"junk")]
    assert isinstance(state.bad[0][1], ValueError)
    assert state.batches >= 1
    assert follower.caught_up
    assert log.consumers[0].closed
    assert log.consumers[0].config["enable.auto.commit"] is False


def test_a_bounded_read_stops_at_the_ends_captured_when_it_began() -> None:
    log = FakeLog()
    log.append(0, b"a", b"1")
    log.append(0, b"a", b"2")
    state = State()
    follower = _follower(log, state, partition=0)
    follower.open()
    log.append(0, b"a", b"written-later")
    while not follower.caught_up:
        follower.poll(0.01, until_end=True)
    assert state.values == {b"a": b"2"}
    assert [e.offset for e in state.entries] == [0, 1]
    follower.close()
    assert log.consumers[0].closed


def test_an_empty_topic_is_caught_up_at_once() -> None:
    log = FakeLog()
    state = State()
    follower = _follower(log, state)
    follower.open()
    assert follower.caught_up
    assert follower.poll(0.01) == 0
    assert state.batches == 0  # no records, no batch


def test_a_bounded_read_gives_up_when_cancelled() -> None:
    log = FakeLog()
    log.append(0, b"a", b"1")
    log.silent = True
    cancelled = threading.Event()
    cancelled.set()
    state = State()
    follower = _follower(log, state, partition=0)
    assert follower.read_to_end(cancelled, idle_timeout=5) is False
    assert state.entries == []
    assert log.consumers[0].closed


def test_a_bounded_read_raises_when_the_broker_sends_nothing_or_an_error() -> None:
    log = FakeLog()
    log.append(0, b"a", b"1")
    log.silent = True
    follower = _follower(log, State(), partition=0)
    progress: list[int] = []
    with pytest.raises(TimeoutError, match="nothing read"):
        follower.read_to_end(progress=lambda: progress.append(1), idle_timeout=0.05)
    assert progress  # called after each batch, empty ones too

    log = FakeLog()
    log.append(0, b"a", b"1")
    log.errors.append(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
    with pytest.raises(RuntimeError, match="Unknown topic"):
        _follower(log, State(), partition=0).read_to_end(idle_timeout=5)


def test_the_thread_follows_new_records_and_sync_waits_for_them() -> None:
    log = FakeLog()
    log.append(0, b"a", b"1")
    state = State()
    follower = _follower(log, state)
    follower.start()
    try:
        assert follower.wait_caught_up(10)
        assert follower.problem() is None
        assert state.values == {b"a": b"1"}
        log.append(0, b"b", b"2")
        log.append(0, b"a", None)
        assert follower.sync(10)
        assert state.values == {b"b": b"2"}
        assert follower.alive()
    finally:
        follower.stop()
    assert not follower.alive()
    assert log.consumers[0].closed


def test_the_thread_survives_errors_and_says_why_it_is_not_ready() -> None:
    log = FakeLog()
    log.exists = False
    log.append(0, b"a", b"1")
    errors: list[BaseException] = []
    state = State()
    follower = _follower(log, state, on_error=errors.append)
    follower.start()
    try:
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(errors[0], RuntimeError)
        problem = follower.problem()
        assert problem is not None
        assert "no partitions" in problem
        assert follower.last_error is not None
        assert not follower.caught_up
        assert follower.sync(0.05) is False  # the topic cannot be read: not current
        log.exists = True  # the topic appears: the follower reads it and is ready
        assert follower.wait_caught_up(10)
        assert follower.sync(10)
        assert follower.problem() is None
        assert state.values == {b"a": b"1"}
        assert follower.alive()
    finally:
        follower.stop()


def test_a_bad_record_goes_to_the_default_handler_and_is_skipped() -> None:
    log = FakeLog()
    log.append(0, b"a", b"junk")
    log.append(0, b"b", b"1")
    state = State()
    follower = CompactedFollower(KAFKA, TOPIC, state.apply, name="test", consumer=log.consumer)
    assert follower.read_to_end(idle_timeout=5)
    assert state.values == {b"b": b"1"}


# The thread ending with an exception is what the test is about: pytest reports it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_only_a_thread_that_ended_without_stop_is_a_failure() -> None:
    log = FakeLog()
    log.exists = False

    def give_up(_exc: BaseException) -> None:
        raise SystemExit(1)  # escapes the thread's guard: the thread ends

    dying = _follower(log, State(), on_error=give_up)
    assert dying.failure() is None  # not started yet
    dying.start()
    deadline = time.monotonic() + 10
    while dying.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    failure = dying.failure()
    assert failure is not None
    assert failure.startswith(f"following {TOPIC} stopped: RuntimeError: ")
    assert "no partitions" in failure

    stopped = _follower(FakeLog(), State())
    stopped.start()
    assert stopped.wait_caught_up(10)
    assert stopped.failure() is None
    stopped.stop()
    assert not stopped.alive()
    assert stopped.failure() is None  # stopped on purpose
