"""The worker's outputs (at least once): each confirmed by Kafka, or dead-lettered with the reason.

A batch's records are sent together and every delivery report is read, so one record
Kafka will never take does not hold the others back, and records confirmed once are not
sent again:

- a retriable failure (broker away, timeout, not enough replicas) sends that record again
  after a back-off, and only that record;
- a failure the broker gives a whole record batch (too large, invalid record) sends the
  record again alone, through a producer that puts one record in each request, so that the
  verdict is the record's own;
- a record refused for good (alone, or by the producer itself: over `message.max.bytes`;
  or a topic that is not there or not allowed) goes to its destination's DLQ as its input
  event came in, with the reason in the failure headers (`Router.dead_letter`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from confluent_kafka import KafkaError

from core.errors import BrokerUnavailable
from core.kafka import BATCH_ERRORS, TOPIC_ERRORS, delivery_error
from core.producer import EventProducer, Failure
from core.settings import KafkaSettings
from streams.processor import Incoming, OutRecord, Routed, Router

log = structlog.get_logger("sluice.worker")


@dataclass
class _Send:
    """Records for one topic, with the input record of each, and how to send them."""

    topic: str
    records: list[OutRecord]
    origins: list[Incoming]
    alone: bool = False


class _Later:
    """Collects the records of the next round, by topic and way of sending."""

    def __init__(self, sends: dict[tuple[str, bool], _Send]) -> None:
        self.sends = sends

    def __call__(self, topic: str, record: OutRecord, origin: Incoming, alone: bool) -> None:
        send = self.sends.get((topic, alone))
        if send is None:
            send = self.sends[(topic, alone)] = _Send(topic, [], [], alone)
        send.records.append(record)
        send.origins.append(origin)


class Outputs:
    """Sends batches of outputs until every record is confirmed or dead-lettered."""

    def __init__(
        self, kafka: KafkaSettings, timeout_s: float, router: Router, stopping: asyncio.Event
    ) -> None:
        self.kafka = kafka
        self.timeout_s = timeout_s
        self.router = router
        self.stopping = stopping
        self.producer = EventProducer(kafka, timeout_s, linger_ms=5)
        self._alone: EventProducer | None = None

    def _one_each(self) -> EventProducer:
        if self._alone is None:
            # One record per request: a broker's verdict on a record batch is the record's.
            self._alone = EventProducer(
                self.kafka, self.timeout_s, linger_ms=0, **{"batch.num.messages": 1}
            )
        return self._alone

    async def deliver(self, passes: list[Routed]) -> dict[str, int]:
        """Send every output of `passes`; returns the records refused, by destination.

        Returns once every record is confirmed, on its topic or in a DLQ. Raises
        BrokerUnavailable when the worker is stopping while records still wait for Kafka
        (they are not acked, and are processed again).
        """
        work = [
            _Send(topic, records, routed.origins[topic])
            for routed in passes
            for topic, records in routed.outputs.items()
        ]
        refused: dict[str, int] = {}
        delay = 0.5
        while work:
            results = await asyncio.gather(*(self._send(send) for send in work))
            later: dict[tuple[str, bool], _Send] = {}
            waiting: Exception | None = None
            again = _Later(later)

            for send, failures in zip(work, results, strict=True):
                for i, err in failures:
                    record, origin = send.records[i], send.origins[i]
                    error = delivery_error(err, send.topic)
                    if error.retriable:
                        waiting = error
                        again(send.topic, record, origin, send.alone)
                    elif err.code() in BATCH_ERRORS and not send.alone:
                        again(send.topic, record, origin, True)
                    else:
                        dead = self.router.dead_letter(
                            send.topic, record, origin, error, err.code() in TOPIC_ERRORS
                        )
                        if dead is None:
                            # Even the dead letter without its value was refused: keep
                            # trying (the stall shows in `/ready`), never drop it.
                            waiting = error
                            again(send.topic, record, origin, send.alone)
                            continue
                        log.warning(
                            "output refused; dead-lettered",
                            topic=send.topic,
                            to=dead.topic,
                            error=str(error),
                            offset=origin.offset,
                            partition=origin.partition,
                        )
                        if dead.refused_for is not None:
                            refused[dead.refused_for] = refused.get(dead.refused_for, 0) + 1
                        again(dead.topic, dead.record, origin, False)
            work = list(later.values())
            if waiting is not None:
                if self.stopping.is_set():
                    raise BrokerUnavailable(f"outputs not confirmed at shutdown: {waiting}")
                log.warning("outputs not confirmed; retrying", count=len(work), error=str(waiting))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        return refused

    async def _send(self, send: _Send) -> list[Failure]:
        producer = self._one_each() if send.alone else self.producer
        try:
            failures = await producer.send_each(send.topic, send.records)
        except BrokerUnavailable as exc:
            # No report in time: none of the records is known to be confirmed.
            reason = KafkaError(KafkaError._MSG_TIMED_OUT, str(exc))
            return [(i, reason) for i in range(len(send.records))]
        if any(err.code() == KafkaError._FATAL or err.fatal() for _, err in failures):
            self._replace(send.alone)
        return failures

    def _replace(self, alone: bool) -> None:
        """A producer in a fatal state takes no record again: a new one sends them."""
        log.warning("producer in a fatal state; replaced")
        if alone:
            old, self._alone = self._alone, None
        else:
            old = self.producer
            self.producer = EventProducer(self.kafka, self.timeout_s, linger_ms=5)
        if old is not None:
            old.close(0)

    def close(self) -> int:
        """Deliver what is queued (blocking; run in an executor); the records left unsent."""
        left = self.producer.close()
        if self._alone is not None:
            left += self._alone.close()
        return left
