"""An asyncio-friendly Kafka producer: batches of records confirmed together, one future a batch.

librdkafka is polled in a thread of its own; delivery callbacks count down a batch and
resolve its asyncio future once, so the per-event path creates no task and no future.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from ops.settings import KafkaSettings
from schemas.errors import BrokerUnavailable

Headers = list[tuple[str, str | bytes | None]]
Record = tuple[bytes | None, bytes, Headers | None]


class _Batch:
    """Counts the delivery reports of one batch; resolves the future on the event loop."""

    __slots__ = ("error", "future", "lock", "loop", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        # A caller that gave up waiting (timeout) never reads the outcome: read it here so
        # asyncio does not report an unretrieved exception.
        self.future.add_done_callback(_consume_outcome)
        self.remaining = count
        self.error: str | None = None
        self.lock = threading.Lock()

    def on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        with self.lock:
            if err is not None and self.error is None:
                self.error = err.str()
            self.remaining -= 1
            done = self.remaining == 0
        if done:
            self.loop.call_soon_threadsafe(self._resolve)

    def cancel_unsent(self, count: int, reason: str) -> None:
        with self.lock:
            self.error = self.error or reason
            self.remaining -= count
            done = self.remaining == 0
        if done:
            self._resolve()

    def _resolve(self) -> None:
        if self.future.done():
            return
        if self.error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(BrokerUnavailable(self.error))


def _consume_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class EventProducer:
    """An idempotent, acks=all producer whose `send_batch` returns once Kafka confirmed it."""

    def __init__(
        self, kafka: KafkaSettings, timeout_s: float, linger_ms: int = 5, **extra: Any
    ) -> None:
        conf: dict[str, Any] = kafka.client_config() | {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": linger_ms,
            "message.timeout.ms": int(timeout_s * 1000),
            "queue.buffering.max.messages": 500_000,
            "compression.type": "lz4",
            "socket.connection.setup.timeout.ms": max(1000, int(timeout_s * 1000)),
            # librdkafka's own log lines go through Python logging, not straight to stderr.
            "logger": logging.getLogger("sluice.kafka"),
        }
        conf.update(extra)
        self.timeout_s = timeout_s
        self._producer = Producer(conf)
        self._running = True
        self._poller = threading.Thread(target=self._poll, name="kafka-producer-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while self._running:
            self._producer.poll(0.05)

    async def send_batch(self, topic: str, records: Sequence[Record]) -> None:
        """Produce every record and wait for all delivery reports.

        Raises BrokerUnavailable when any record was not confirmed: the caller must not
        acknowledge the batch (some records may still have landed; consumers dedupe).
        """
        if not records:
            return
        batch = _Batch(asyncio.get_running_loop(), len(records))
        produce = self._producer.produce
        on_delivery = batch.on_delivery
        for i, (key, value, headers) in enumerate(records):
            try:
                produce(topic, value, key, headers=headers, on_delivery=on_delivery)
            except (BufferError, KafkaException) as exc:
                batch.cancel_unsent(len(records) - i, f"producer refused the record: {exc}")
                break
        try:
            await asyncio.wait_for(asyncio.shield(batch.future), self.timeout_s + 2.0)
        except TimeoutError as exc:
            raise BrokerUnavailable("Kafka did not confirm the write in time") from exc

    def reachable(self, timeout: float = 2.0) -> bool:
        """Whether the cluster answers a metadata request (blocking; run in an executor)."""
        try:
            self._producer.list_topics(timeout=timeout)
        except KafkaException:
            return False
        return True

    def close(self, timeout: float = 10.0) -> int:
        """Deliver what is queued (up to `timeout`), stop polling; returns records left unsent."""
        left: int = self._producer.flush(timeout)
        self._running = False
        self._poller.join(timeout=1.0)
        return left
