"""An asyncio-friendly Kafka producer: batches of records confirmed together, one future a batch.

librdkafka is polled on the event loop of the caller (a timer, every millisecond while
records are in flight), so delivery callbacks run on the loop's thread: no lock, no
thread hand-off and no GIL contention with a polling thread. A batch's callbacks count
it down and resolve its asyncio future once; the per-event path creates no task and no
future.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from core.errors import BrokerUnavailable, TopicError
from core.kafka import Record, producer_config
from core.settings import KafkaSettings

_BUSY_POLL_S = 0.001
_IDLE_POLL_S = 0.1

# A record's failed delivery: its index in the records sent, and the error.
Failure = tuple[int, KafkaError]


class _Batch:
    """Counts the delivery reports of one batch; resolves the future when the last arrives."""

    __slots__ = ("error", "failed", "future", "loop", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, track: bool = False) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        # A caller that gave up waiting (timeout) never reads the outcome: read it here so
        # asyncio does not report an unretrieved exception.
        self.future.add_done_callback(_consume_outcome)
        self.remaining = count
        self.error: str | None = None
        # With `track`: each failed record (its index when known at once, else its
        # message) with its error, and the batch resolves without an exception.
        self.failed: list[tuple[int | Message, KafkaError]] | None = [] if track else None

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        # Runs inside Producer.poll/flush: on the loop's thread, or on the thread that
        # flushes at shutdown (then the future is resolved through the loop).
        if err is not None:
            if self.failed is not None:
                self.failed.append((msg, err))
            elif self.error is None:
                self.error = err.str()
        self.remaining -= 1
        if self.remaining == 0:
            self._done()

    def refuse(self, index: int, err: KafkaError) -> None:
        """Record `index` was refused before it was sent (only with `track`)."""
        assert self.failed is not None
        self.failed.append((index, err))
        self.remaining -= 1
        if self.remaining == 0:
            self._done()

    def cancel_unsent(self, count: int, reason: str) -> None:
        self.error = self.error or reason
        self.remaining -= count
        if self.remaining == 0:
            self._done()

    def expire(self) -> None:
        if not self.future.done():
            self.future.set_exception(BrokerUnavailable("Kafka did not confirm the write in time"))

    def _done(self) -> None:
        if threading.get_ident() == _loop_thread(self.loop):
            self._resolve()
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future.done():
            return
        if self.error is None or self.failed is not None:
            self.future.set_result(None)
        else:
            self.future.set_exception(BrokerUnavailable(self.error))


_THREADS: dict[int, int] = {}


def _loop_thread(loop: asyncio.AbstractEventLoop) -> int:
    return _THREADS.get(id(loop), -1)


def _error_of(exc: BaseException) -> KafkaError:
    """The KafkaError a produce call raised (a full local queue for a BufferError)."""
    if isinstance(exc, KafkaException) and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return KafkaError(KafkaError._QUEUE_FULL, str(exc))


def failed_records(
    records: Sequence[Record], failed: list[tuple[int | Message, KafkaError]]
) -> list[Failure]:
    """Failures by index: a delivery report names its message, found again by key and value.

    Records with the same key and value are interchangeable here; each index is used once.
    """
    out: list[Failure] = []
    refused = {who for who, _ in failed if isinstance(who, int)}
    by_content: dict[tuple[bytes | None, bytes | None], list[int]] | None = None
    for who, err in failed:
        if isinstance(who, int):
            out.append((who, err))
            continue
        if by_content is None:
            by_content = {}
            for i, (key, value, _) in enumerate(records):
                if i not in refused:
                    by_content.setdefault((key, value), []).append(i)
        candidates = by_content.get((who.key(), who.value()))
        if candidates:
            out.append((candidates.pop(), err))
    return out


def _consume_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class EventProducer:
    """An idempotent, acks=all producer whose `send_batch` returns once Kafka confirmed it."""

    def __init__(
        self, kafka: KafkaSettings, timeout_s: float, linger_ms: int = 5, **extra: Any
    ) -> None:
        conf = producer_config(
            kafka,
            **{
                "linger.ms": linger_ms,
                "message.timeout.ms": int(timeout_s * 1000),
                "queue.buffering.max.messages": 500_000,
                "compression.type": "lz4",
                "socket.connection.setup.timeout.ms": max(1000, int(timeout_s * 1000)),
            },
        )
        conf.update(extra)
        self.timeout_s = timeout_s
        self._producer = Producer(conf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._busy = False
        self._closed = False

    def _poll_on(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
            _THREADS[id(loop)] = threading.get_ident()
        if self._closed or self._busy:
            return
        # Records are now in flight: poll at the busy rate from the next loop iteration.
        if self._timer is not None:
            self._timer.cancel()
        self._busy = True
        self._timer = loop.call_soon(self._tick)

    def _tick(self) -> None:
        self._producer.poll(0)
        assert self._loop is not None
        if self._closed:
            self._timer = None
            return
        # Every millisecond while records are queued or in flight; slowly when idle (logs).
        self._busy = len(self._producer) > 0
        self._timer = self._loop.call_later(
            _BUSY_POLL_S if self._busy else _IDLE_POLL_S, self._tick
        )

    async def send_batch(
        self, topic: str, records: Sequence[Record], partition: int | None = None
    ) -> None:
        """Produce every record (to `partition`, or by key) and wait for all delivery reports.

        Raises BrokerUnavailable when any record was not confirmed: the caller must not
        acknowledge the batch (some records may still have landed; consumers dedupe).
        """
        if not records:
            return
        loop = asyncio.get_running_loop()
        batch = _Batch(loop, len(records))
        if all(headers is None for _, _, headers in records):
            self._produce_many(topic, records, batch, -1 if partition is None else partition)
        else:
            self._produce_each(topic, records, batch, -1 if partition is None else partition)
        self._poll_on(loop)
        timeout = loop.call_later(self.timeout_s + 2.0, batch.expire)
        try:
            await batch.future
        finally:
            timeout.cancel()

    async def send_each(
        self, topic: str, records: Sequence[Record], partition: int | None = None
    ) -> list[Failure]:
        """Produce every record and wait for every delivery report; returns the failed ones.

        Unlike `send_batch`, one record's failure does not fail the rest: each failed record
        comes back with its index in `records` and its error (`delivery_error` says whether
        to send it again); every other record was confirmed. Raises BrokerUnavailable only
        when the reports did not come in time: then no record is known to be confirmed.
        """
        if not records:
            return []
        loop = asyncio.get_running_loop()
        batch = _Batch(loop, len(records), track=True)
        part = -1 if partition is None else partition
        if all(headers is None for _, _, headers in records):
            self._produce_many_tracked(topic, records, batch, part)
        else:
            self._produce_each_tracked(topic, records, batch, part)
        self._poll_on(loop)
        timeout = loop.call_later(self.timeout_s + 2.0, batch.expire)
        try:
            await batch.future
        finally:
            timeout.cancel()
        assert batch.failed is not None
        return failed_records(records, batch.failed)

    def _produce_many_tracked(
        self, topic: str, records: Sequence[Record], batch: _Batch, partition: int
    ) -> None:
        messages: list[dict[str, Any]] = [{"key": key, "value": value} for key, value, _ in records]
        indexes = list(range(len(records)))
        for attempt in range(2):
            try:
                queued = self._producer.produce_batch(
                    topic, messages, partition=partition, on_delivery=batch.on_delivery
                )
            except (BufferError, KafkaException) as exc:
                err = _error_of(exc)
                for i in indexes:
                    batch.refuse(i, err)
                return
            if queued == len(messages):
                return
            # Refused by the producer itself: over `message.max.bytes` is final; a full
            # local queue is offered once more after serving delivery reports.
            again: list[tuple[int, dict[str, Any]]] = []
            for i, message in zip(indexes, messages, strict=True):
                refusal: KafkaError | None = message.get("_error")
                if refusal is None:
                    continue
                if attempt == 0 and refusal.code() == KafkaError._QUEUE_FULL:
                    again.append((i, message))
                else:
                    batch.refuse(i, refusal)
            if not again:
                return
            self._producer.poll(0)
            indexes = [i for i, _ in again]
            messages = [{"key": m["key"], "value": m["value"]} for _, m in again]

    def _produce_each_tracked(
        self, topic: str, records: Sequence[Record], batch: _Batch, partition: int
    ) -> None:
        produce = self._producer.produce
        on_delivery = batch.on_delivery
        for i, (key, value, given) in enumerate(records):
            headers = given if given is None or isinstance(given, list) else list(given)
            for attempt in range(2):
                try:
                    produce(
                        topic,
                        value,
                        key,
                        partition=partition,
                        on_delivery=on_delivery,
                        headers=headers,
                    )
                    break
                except BufferError as exc:
                    if attempt == 1:
                        batch.refuse(i, _error_of(exc))
                    else:
                        self._producer.poll(0)  # the local queue is full: serve reports
                except KafkaException as exc:
                    batch.refuse(i, _error_of(exc))
                    break

    def _produce_many(
        self, topic: str, records: Sequence[Record], batch: _Batch, partition: int
    ) -> None:
        # One call for the whole batch (librdkafka's batch API; it carries no headers).
        # Records the local queue refused come back marked: serve delivery reports to
        # make room, then offer those once more.
        messages: list[dict[str, Any]] = [{"key": key, "value": value} for key, value, _ in records]
        for attempt in range(2):
            try:
                queued = self._producer.produce_batch(
                    topic, messages, partition=partition, on_delivery=batch.on_delivery
                )
            except (BufferError, KafkaException) as exc:
                batch.cancel_unsent(len(messages), f"producer refused the records: {exc}")
                return
            if queued == len(messages):
                return
            refused = [m for m in messages if "_error" in m]
            if attempt == 0:
                self._producer.poll(0)
                messages = [{"key": m["key"], "value": m["value"]} for m in refused]
            else:
                reason = f"producer refused the record: {refused[0]['_error']}"
                batch.cancel_unsent(len(refused), reason)

    def _produce_each(
        self, topic: str, records: Sequence[Record], batch: _Batch, partition: int
    ) -> None:
        produce = self._producer.produce
        on_delivery = batch.on_delivery
        for i, (key, value, given) in enumerate(records):
            headers = given if given is None or isinstance(given, list) else list(given)
            try:
                produce(
                    topic, value, key, partition=partition, on_delivery=on_delivery, headers=headers
                )
            except BufferError:
                # The local queue is full: serve delivery reports, then try once more.
                self._producer.poll(0)
                try:
                    produce(
                        topic,
                        value,
                        key,
                        partition=partition,
                        on_delivery=on_delivery,
                        headers=headers,
                    )
                except (BufferError, KafkaException) as exc:
                    batch.cancel_unsent(len(records) - i, f"producer refused the record: {exc}")
                    return
            except KafkaException as exc:
                batch.cancel_unsent(len(records) - i, f"producer refused the record: {exc}")
                return

    def reachable(self, timeout: float = 2.0) -> bool:
        """Whether the cluster answers a metadata request (blocking; run in an executor)."""
        try:
            self._producer.list_topics(timeout=timeout)
        except KafkaException:
            return False
        return True

    def partitions(self, topic: str, timeout: float = 5.0) -> list[int]:
        """The partitions of `topic` (blocking; run in an executor); raises TopicError."""
        try:
            meta = self._producer.list_topics(topic, timeout=timeout).topics.get(topic)
        except KafkaException as exc:
            raise BrokerUnavailable(f"no metadata for {topic}: {exc}") from exc
        if meta is None or meta.error is not None or not meta.partitions:
            raise TopicError(f"{topic} has no partitions")
        return sorted(meta.partitions)

    def close(self, timeout: float = 10.0) -> int:
        """Deliver what is queued (up to `timeout`), stop polling; returns records left unsent.

        Safe to call from an executor thread while the loop runs: delivery reports served
        here resolve their batches through the loop.
        """
        self._closed = True
        left: int = self._producer.flush(timeout)
        return left
