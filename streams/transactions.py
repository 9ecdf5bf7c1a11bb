"""Exactly-once processing: outputs and input offsets committed in one Kafka transaction.

The scheme is the one Faust's `exactly_once` guarantee and Kafka Streams' first EOS
version use: one transactional producer per input partition, its `transactional.id`
derived from the consumer group and the partition. A batch's outputs for partition p
and the offset after its last input are committed together (`send_offsets_to_
transaction`), so a read_committed reader sees each output once or not at all. When a
partition moves to another worker, that worker opens a producer with the same
transactional id, which fences the old one and aborts whatever it left open: a worker
killed mid-transaction leaves no visible duplicate. (The worker's outputs go through
confluent-kafka, so the transactions are librdkafka's, not aiokafka's.)

A producer is never reused across an ownership change or a failed transaction: a worker
that gets a partition (back) opens a new one, and a producer that was fenced or had its
transaction aborted is replaced (`renew`) before the batch is tried again. A producer kept
from before a rebalance may have been fenced by the partition's owner in between: its next
transaction fails, and a batch dropped for it would leave a hole that the next batch's
offset commit skips. A record Kafka refuses for good aborts the transaction and comes back
in `Refused`, so the caller can put a dead letter in its place.

Blocking calls: run them in an executor thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from core.errors import BrokerUnavailable
from core.kafka import PERMANENT_ERRORS, Record
from core.producer import failed_records
from core.settings import KafkaSettings
from streams.errors import Fenced, Refused

_FENCED = (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)


class _Failed(Exception):
    """A record sent alone was not delivered: the transaction is aborted."""


class PartitionTransactions:
    """Transactional producers by input partition; `commit` puts a batch in one transaction."""

    def __init__(self, kafka: KafkaSettings, group_id: str, timeout_s: float = 30.0) -> None:
        self.kafka = kafka
        self.group_id = group_id
        self.timeout_s = timeout_s
        self._producers: dict[tuple[str, int], Producer] = {}
        self._lock = threading.Lock()
        # Offsets are committed for the consumer group by id, without its generation: the
        # transactional id, one per partition, is what fences a worker that lost it.
        self._offsets = Consumer(
            kafka.client_config() | {"group.id": group_id, "isolation.level": "read_committed"}
        )
        self._group = self._offsets.consumer_group_metadata()
        self._offsets_lock = threading.Lock()
        self._checked: set[tuple[str, int]] = set()
        # Partitions whose committed offset another owner moved in this generation: this
        # worker commits nothing more for them until the next rebalance.
        self._lost: set[tuple[str, int]] = set()
        self._generation: int | None = None

    def committed_offset(self, topic: str, partition: int, generation: int) -> int | None:
        """Once per partition and rebalance: its committed offset, read after fencing.

        Faust read the committed offsets when the partitions were assigned, possibly while
        the previous owner's last transaction (another worker's, or this worker's own from
        before the rebalance) was still committing. Once this worker's producer for the
        partition is initialised, that transaction is complete, and this is the offset to
        go on from: events below it were processed already. None when already checked.
        """
        with self._offsets_lock:
            if generation != self._generation:
                self._checked.clear()
                self._lost.clear()
                self._generation = generation
            if (topic, partition) in self._checked:
                return None
            # A new producer, even when one is kept from before: the partition may have
            # had another owner in between, which fenced it.
            self._drop(topic, partition)
            self._producer(topic, partition)
            (tp,) = self._offsets.committed([TopicPartition(topic, partition)], self.timeout_s)
            self._checked.add((topic, partition))
            return int(tp.offset) if tp.offset >= 0 else None

    def lose(self, topic: str, partition: int) -> None:
        """Another owner committed the partition: nothing more for it in this generation."""
        with self._offsets_lock:
            self._lost.add((topic, partition))
            self._drop(topic, partition)

    def lost(self, topic: str, partition: int) -> bool:
        """Whether `lose` was called for the partition in this generation."""
        return (topic, partition) in self._lost

    def renew(self, topic: str, partition: int) -> int | None:
        """A new producer for the partition after a failed transaction; its committed offset.

        The new producer's initialisation fences any other producer of the partition and
        completes its open transaction, so the offset read after it is final: a batch
        starting there can be tried again. Raises BrokerUnavailable when Kafka is away.
        """
        with self._offsets_lock:
            self._drop(topic, partition)
            try:
                self._producer(topic, partition)
                (tp,) = self._offsets.committed([TopicPartition(topic, partition)], self.timeout_s)
            except KafkaException as exc:
                self._drop(topic, partition)
                raise BrokerUnavailable(f"transactions of {topic}[{partition}]: {exc}") from exc
            return int(tp.offset) if tp.offset >= 0 else None

    def commit(
        self,
        topic: str,
        partition: int,
        outputs: Mapping[str, Sequence[Record]],
        next_offset: int,
        alone: Mapping[str, Sequence[Record]] | None = None,
    ) -> None:
        """Produce `outputs` and commit `next_offset` for (topic, partition), atomically.

        Records in `alone` are produced first, each in a request of its own, so that a
        broker refusing one refuses only it. Raises Refused (the transaction aborted) when
        Kafka refused records for good, Fenced when the partition has a new owner,
        BrokerUnavailable when the transaction failed and may be tried again. After any of
        them the partition's producer is gone: call `renew` before trying again.
        """
        producer = self._producer(topic, partition)
        # Each produce call's records, and their failures (refused at once or reported).
        sent: list[tuple[str, Sequence[Record], list[tuple[int | Message, KafkaError]]]] = []
        error: KafkaError | None = None
        try:
            producer.begin_transaction()
            for out_topic, records in (alone or {}).items():
                for record in records:
                    sent.append((out_topic, [record], []))
                    self._send(producer, *sent[-1])
                    producer.flush(self.timeout_s)
                    if sent[-1][2]:
                        raise _Failed
            for out_topic, records in outputs.items():
                sent.append((out_topic, records, []))
                self._send(producer, *sent[-1])
            if any(failed for _, _, failed in sent):
                raise _Failed  # refused by the producer itself: no DLQ record for it yet
            producer.send_offsets_to_transaction(
                [TopicPartition(topic, partition, next_offset)], self._group, self.timeout_s
            )
            self._commit(producer)
            return
        except _Failed:
            pass
        except KafkaException as exc:
            error = exc.args[0]
            if error is not None and not error.txn_requires_abort():
                self._drop(topic, partition)
                if error.code() in _FENCED or error.fatal():
                    raise Fenced(f"{topic}[{partition}]: {error.str()}") from exc
                raise BrokerUnavailable(f"transaction failed: {error.str()}") from exc
        # The transaction must be aborted: a record failed, or librdkafka says so.
        producer.flush(self.timeout_s)  # every delivery report in, to name the refused
        self._abort(producer)
        self._drop(topic, partition)
        refused = self._refused(sent)
        if refused:
            raise Refused(refused)
        reason = error.str() if error is not None else "a record was not delivered"
        raise BrokerUnavailable(f"transaction aborted: {reason}")

    def close(self) -> None:
        """Abort what is open and let the producers go."""
        with self._lock:
            producers, self._producers = self._producers, {}
        for producer in producers.values():
            with contextlib.suppress(KafkaException):  # nothing was open
                producer.abort_transaction(5)
        self._offsets.close()

    def _producer(self, topic: str, partition: int) -> Producer:
        with self._lock:
            producer = self._producers.get((topic, partition))
            if producer is None:
                producer = Producer(
                    self.kafka.client_config()
                    | {
                        "transactional.id": f"{self.group_id}-{topic}-{partition}",
                        "enable.idempotence": True,
                        "acks": "all",
                        "linger.ms": 5,
                        "compression.type": "lz4",
                        "transaction.timeout.ms": 60_000,
                        "logger": logging.getLogger("sluice.kafka"),
                    }
                )
                # Fences the partition's previous owner and completes what it left open.
                producer.init_transactions(self.timeout_s)
                self._producers[(topic, partition)] = producer
            return producer

    def _drop(self, topic: str, partition: int) -> None:
        with self._lock:
            self._producers.pop((topic, partition), None)

    def _send(
        self,
        producer: Producer,
        topic: str,
        records: Sequence[Record],
        failed: list[tuple[int | Message, KafkaError]],
    ) -> None:
        """Produce `records`; failures (refused at once, or reported later) go to `failed`."""

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failed.append((msg, err))

        for i, (key, value, headers) in enumerate(records):
            listed = headers if headers is None or isinstance(headers, list) else list(headers)
            try:
                try:
                    producer.produce(topic, value, key, headers=listed, on_delivery=on_delivery)
                except BufferError:
                    producer.flush(self.timeout_s)  # the local queue is full: let it drain once
                    producer.produce(topic, value, key, headers=listed, on_delivery=on_delivery)
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.code() not in PERMANENT_ERRORS:
                    raise
                failed.append((i, error))  # over `message.max.bytes`: never sent

    @staticmethod
    def _refused(
        sent: list[tuple[str, Sequence[Record], list[tuple[int | Message, KafkaError]]]],
    ) -> list[tuple[str, Record, KafkaError]]:
        """The records of the transaction that Kafka refused for good."""
        return [
            (out_topic, records[i], error)
            for out_topic, records, failed in sent
            for i, error in failed_records(records, failed)
            if error.code() in PERMANENT_ERRORS
        ]

    def _commit(self, producer: Producer) -> None:
        for attempt in range(3):
            try:
                producer.commit_transaction(self.timeout_s)
                return
            except KafkaException as exc:
                # A retriable failure leaves the commit to be tried again, as it is.
                if not exc.args[0].retriable() or attempt == 2:
                    raise  # the caller aborts or drops the producer

    def _abort(self, producer: Producer) -> None:
        with contextlib.suppress(KafkaException):  # a fatal state: the next commit drops it
            producer.abort_transaction(self.timeout_s)
