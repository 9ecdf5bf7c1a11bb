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

Blocking calls: run them in an executor thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from ops.producer import Record
from ops.settings import KafkaSettings
from schemas.errors import BrokerUnavailable, SluiceError


class Fenced(SluiceError):
    """Another worker owns the partition now: this worker's outputs for it were aborted."""


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
                self._generation = generation
            if (topic, partition) in self._checked:
                return None
            self._producer(topic, partition)
            (tp,) = self._offsets.committed([TopicPartition(topic, partition)], self.timeout_s)
            self._checked.add((topic, partition))
            return int(tp.offset) if tp.offset >= 0 else None

    def commit(
        self, topic: str, partition: int, outputs: Mapping[str, Sequence[Record]], next_offset: int
    ) -> None:
        """Produce `outputs` and commit `next_offset` for (topic, partition), atomically.

        Raises Fenced when the partition has a new owner, BrokerUnavailable when the
        transaction was aborted and may be tried again with the same outputs.
        """
        producer = self._producer(topic, partition)
        try:
            producer.begin_transaction()
            for out_topic, records in outputs.items():
                for key, value, headers in records:
                    self._produce(producer, out_topic, key, value, headers)
            producer.send_offsets_to_transaction(
                [TopicPartition(topic, partition, next_offset)], self._group, self.timeout_s
            )
            self._commit(producer)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.txn_requires_abort():
                self._abort(producer)
                raise BrokerUnavailable(f"transaction aborted: {error.str()}") from exc
            self._drop(topic, partition)
            if error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED) or error.fatal():
                raise Fenced(f"{topic}[{partition}]: {error.str()}") from exc
            raise BrokerUnavailable(f"transaction failed: {error.str()}") from exc

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

    def _produce(
        self,
        producer: Producer,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, str | bytes | None]] | None,
    ) -> None:
        listed = headers if headers is None or isinstance(headers, list) else list(headers)
        try:
            producer.produce(topic, value, key, headers=listed)
        except BufferError:
            producer.flush(self.timeout_s)  # the local queue is full: let it drain once
            producer.produce(topic, value, key, headers=listed)

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
