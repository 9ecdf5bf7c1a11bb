"""A follower of a compacted topic: its records applied, in log order, to a caller's state.

Sluice keeps several states in compacted topics and reads each of them this way: the live
pipeline config (`sluice.config`), the built-in schema registry's log (`sluice.schemas`),
the parked keys of a destination partition (`sluice.dest.<d>.parked`), and the job status
table next. A follower reads the topic (every partition, or one) from its beginning and
hands each record to `apply` as an `Entry`: key, value (None is a tombstone), partition
and offset. A record `apply` cannot take (it raises) goes to `on_bad`, which by default
logs it, and is skipped: a record something else wrote must not keep the rest from being
read.

"Caught up" is well defined: the end offsets of the partitions are captured when the read
begins, and the follower is caught up once it has read everything before them. There are
two ways to run one:

- `start()`: a thread reads to those ends and then keeps following new records until
  `stop()`. `wait_caught_up(timeout)` waits for the first catch-up, `sync(timeout)` for
  everything on the topic at the time of the call (a write just confirmed, say), and
  `problem()` says why the follower is not ready (for `/ready`), `failure()` why its
  thread ended before `stop()` (for `/health`). The thread survives any error: it logs
  it, keeps it in `last_error`, calls `on_error` and goes on a second later.
- `read_to_end()`: the caller's own thread reads up to the ends captured when it began and
  no further, for a state restored once (the parked keys of a partition just assigned); it
  gives up when its `cancelled` flag is set. `open`, `poll` and `close` are its steps.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from core.settings import KafkaSettings

log = structlog.get_logger("sluice.follower")

BEGINNING = -2  # librdkafka's OFFSET_BEGINNING
LATEST = -1  # as a time for offsets_for_times: the partition's next offset
# How long one broker request of the follower (metadata, watermarks) may take.
REQUEST_TIMEOUT_S = 5.0


class Entry(NamedTuple):
    """One record of a compacted topic."""

    key: bytes | None
    value: bytes | None  # None: a tombstone, the key is gone
    partition: int
    offset: int


class KafkaConsumer(Protocol):
    """What a follower uses of `confluent_kafka.Consumer` (a test may hand in its own)."""

    def assign(self, partitions: list[TopicPartition]) -> None:
        """Read these partitions from the offsets they carry."""

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        """The next records (and error events), at most `num_messages`."""

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        """The first and the next offset of a partition."""

    def offsets_for_times(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]:
        """Offsets by time; a time of -1 asks for each partition's next offset (one request)."""

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        """Cluster metadata, here of one topic."""

    def close(self) -> None:
        """Leave, releasing the connections."""


class Followed(Protocol):
    """What a process's `/ready` and `/health` ask of a follower (this one, or one built on it)."""

    def problem(self) -> str | None:
        """Why it is not ready: failing, or not read to its end yet; None when it is."""

    def failure(self) -> str | None:
        """Why its thread ended before `stop()`; None while it runs."""


def log_skipped(topic: str) -> Callable[[Entry, Exception], None]:
    """The default `on_bad`: log a record that could not be applied (it is skipped)."""

    def skipped(entry: Entry, exc: Exception) -> None:
        log.error(
            "compacted topic record skipped",
            topic=topic,
            partition=entry.partition,
            offset=entry.offset,
            error=f"{type(exc).__name__}: {exc}",
        )

    return skipped


class CompactedFollower:
    """Applies every record of a compacted topic to a caller's state, then follows it."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        apply: Callable[[Entry], object],
        *,
        name: str,
        partition: int | None = None,
        on_bad: Callable[[Entry, Exception], object] | None = None,
        on_batch: Callable[[], object] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
        batch: int = 100,
        consumer: Callable[[dict[str, Any]], KafkaConsumer] = Consumer,
        committed: bool = False,
    ) -> None:
        """Follow `topic` (only `partition` when given, else every partition it has).

        `apply` is called for each record in log order, from the following thread (or the
        thread that calls `poll`); `on_batch` after each batch of records read; `on_error`
        with each error of the follower itself. `name` names the thread and the consumer.
        `committed`: read only records of committed transactions (a topic written in them).
        """
        self.topic = topic
        self.name = name
        self.partition = partition
        self._apply = apply
        self._on_bad = on_bad if on_bad is not None else log_skipped(topic)
        self._on_batch = on_batch
        self._on_error = on_error
        self._batch = batch
        self._config = kafka.client_config() | {
            "group.id": f"sluice-{name}-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            # A watermark query waits behind the fetch in flight on the connection: a
            # short fetch wait keeps `sync` quick (a few partitions, a few tenths of a second).
            "fetch.wait.max.ms": 100,
        }
        if committed:
            self._config["isolation.level"] = "read_committed"
        self._make_consumer = consumer
        self._consumer: KafkaConsumer | None = None
        # Per partition: the end captured when the read began, and the offset after the
        # last record read (the first offset before any).
        self._ends: dict[int, int] | None = None
        self._next: dict[int, int] = {}
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._waiting: list[threading.Event] = []  # callers of `sync`
        self._failing: str | None = None
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-follower", daemon=True)

    # -- the caller's own thread -------------------------------------------------------

    def open(self, timeout: float = REQUEST_TIMEOUT_S) -> None:
        """Find the partitions, capture their ends and start reading them from the beginning.

        Raises RuntimeError when the topic (or the partition) is not there, and
        KafkaException when the broker did not answer within `timeout`.
        """
        if self._consumer is None:
            self._consumer = self._make_consumer(self._config)
        if self._ends is not None:
            return
        consumer = self._consumer
        if self.partition is not None:
            partitions = [self.partition]
        else:
            meta = consumer.list_topics(self.topic, timeout=timeout).topics.get(self.topic)
            if meta is None or meta.error is not None or not meta.partitions:
                why = meta.error.str() if meta is not None and meta.error is not None else "none"
                raise RuntimeError(f"{self.topic}: no partitions to read ({why})")
            partitions = sorted(meta.partitions)
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=timeout, cached=False
            )
            self._next[p], ends[p] = low, high
        consumer.assign([TopicPartition(self.topic, p, BEGINNING) for p in partitions])
        self._ends = ends
        if self._reached(ends):
            self._caught_up.set()

    def poll(self, timeout: float = 0.2, until_end: bool = False) -> int:
        """Read one batch and apply it; the number of records read (bad ones included).

        With `until_end`, records at or after the ends captured by `open` are not applied.
        Raises RuntimeError for an error the broker reported while reading.
        """
        if self._consumer is None or self._ends is None:
            raise RuntimeError(f"the follower of {self.topic} is not open")
        msgs = self._consumer.consume(self._batch, timeout)
        ends, apply, on_bad = self._ends, self._apply, self._on_bad
        read = 0
        for msg in msgs:
            err = msg.error()
            partition = msg.partition() or 0
            offset = msg.offset() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._next[partition] = max(self._next.get(partition, 0), offset)
                    continue
                raise RuntimeError(f"reading {self.topic}[{partition}]: {err.str()}")
            read += 1
            if not (until_end and offset >= ends.get(partition, 0)):
                entry = Entry(msg.key(), msg.value(), partition, offset)
                try:
                    apply(entry)
                except Exception as exc:  # a record it cannot take: reported, skipped
                    on_bad(entry, exc)
            self._next[partition] = offset + 1
        if read and self._on_batch is not None:
            self._on_batch()
        if not self._caught_up.is_set() and self._reached(ends):
            self._caught_up.set()
        return read

    def read_to_end(
        self,
        cancelled: threading.Event | None = None,
        progress: Callable[[], object] | None = None,
        idle_timeout: float = 30.0,
    ) -> bool:
        """Read everything before the ends the topic has now, then close; False if cancelled.

        Gives up (False) as soon as `cancelled` is set, calls `progress` after each batch,
        and raises TimeoutError when the broker sent nothing for `idle_timeout` s before
        the end was reached.
        """
        try:
            self.open(timeout=idle_timeout)
            last_seen = time.monotonic()
            while not self._caught_up.is_set():
                if cancelled is not None and cancelled.is_set():
                    return False
                if self.poll(0.5, until_end=True):
                    last_seen = time.monotonic()
                elif time.monotonic() - last_seen > idle_timeout:
                    where = (
                        self.topic if self.partition is None else f"{self.topic}[{self.partition}]"
                    )
                    raise TimeoutError(f"reading {where}: nothing read for {idle_timeout:.0f} s")
                if progress is not None:
                    progress()
            return True
        finally:
            self.close()

    def close(self) -> None:
        """Release the consumer (the follower cannot read again)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close()
            except Exception as exc:  # closing at exit: nothing is left to save
                log.warning(
                    "closing a follower's consumer failed", topic=self.topic, error=str(exc)
                )

    # -- following in a thread ---------------------------------------------------------

    def start(self) -> None:
        """Read the topic from its beginning and follow it in a thread (returns at once)."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following; the thread closes the consumer."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def alive(self) -> bool:
        """Whether the following thread runs (it only ends after `stop`)."""
        return self._thread.is_alive()

    @property
    def caught_up(self) -> bool:
        """Whether everything before the ends captured at the start has been read."""
        return self._caught_up.is_set()

    def wait_caught_up(self, timeout: float) -> bool:
        """Block until caught up; False when that did not happen within `timeout`."""
        return self._caught_up.wait(timeout)

    def sync(self, timeout: float) -> bool:
        """Block until every record on the topic now has been read and applied.

        False when that did not happen within `timeout` (the broker is unreachable, say).
        """
        done = threading.Event()
        with self._lock:
            self._waiting.append(done)
        if done.wait(timeout):
            return True
        with self._lock:
            if done in self._waiting:
                self._waiting.remove(done)
        return done.is_set()

    def problem(self) -> str | None:
        """Why the follower is not ready (not caught up yet, or failing); None when it is."""
        if self._failing is not None:
            return f"following {self.topic}: {self._failing}"
        if not self._caught_up.is_set():
            return f"{self.topic} not read to its end yet"
        return None

    def failure(self) -> str | None:
        """Why the following thread ended though nobody stopped it; None while it runs.

        Also None before `start()` and after `stop()`: only a thread that died is a failure.
        """
        if self._thread.ident is None or self._thread.is_alive() or self._stop.is_set():
            return None
        return f"following {self.topic} stopped: {self.last_error or 'its thread ended'}"

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                    self._failing = None
                except BaseException as exc:  # the thread must not die: log, note, go on
                    self._failed(exc)
                    self._stop.wait(1.0)
        finally:
            self.close()

    def _step(self) -> None:
        """Read a batch; wake the `sync` callers that registered before it and are current."""
        self.open()
        with self._lock:
            waiting = list(self._waiting)
        ends = self._now_ends() if waiting else None
        self.poll(0.05 if waiting else 0.2)
        if ends is not None and self._reached(ends):
            with self._lock:
                for done in waiting:
                    if done in self._waiting:
                        self._waiting.remove(done)
                    done.set()

    def _now_ends(self) -> dict[int, int]:
        assert self._consumer is not None, "opened by _step"
        assert self._ends is not None, "opened by _step"
        # Every partition's end in one request: it waits behind the fetch in flight once,
        # not once per partition.
        found = self._consumer.offsets_for_times(
            [TopicPartition(self.topic, p, LATEST) for p in self._ends],
            timeout=REQUEST_TIMEOUT_S,
        )
        ends = {}
        for tp in found:
            if tp.error is not None:
                raise RuntimeError(f"the end of {self.topic}[{tp.partition}]: {tp.error}")
            ends[tp.partition] = tp.offset
        return ends

    def _reached(self, ends: dict[int, int]) -> bool:
        return all(self._next.get(p, 0) >= end for p, end in ends.items())

    def _failed(self, exc: BaseException) -> None:
        self._failing = self.last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, RuntimeError | TimeoutError | KafkaException):
            log.warning("follower error; going on", topic=self.topic, error=self.last_error)
        else:
            log.exception("follower error; going on", topic=self.topic, error=self.last_error)
        if self._on_error is not None:
            try:
                self._on_error(exc)
            except Exception as hook_exc:  # a failing hook must not stop the follower
                log.warning("follower error hook failed", topic=self.topic, error=str(hook_exc))
