"""Exactly-once processing: a worker SIGKILLed mid-transaction leaves no duplicate on a
read_committed read of the output topic, and loses nothing."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from core.settings import KafkaSettings
from ops.processes import BackgroundProcess
from ops.traffic import sample_events, send_batches
from schemas.codec import event_codec
from tests.conftest import scaled
from tests.pipeline import free_port, pipeline_with_topics, until, worker_routed

pytestmark = pytest.mark.integration
CODEC = event_codec(logical_types=False)


def _event_ids(kafka: KafkaSettings, topic: str, isolation: str) -> Counter[str]:
    """How often each event id is on `topic`, read with the given isolation level."""
    consumer = Consumer(
        kafka.client_config()
        | {
            "group.id": f"check-{time.monotonic_ns()}",
            "isolation.level": isolation,
            "enable.partition.eof": True,
        }
    )
    seen: Counter[str] = Counter()
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        open_parts = set(parts)
        deadline = time.monotonic() + 30
        while open_parts and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is not None:
                    open_parts.discard(msg.partition())
                    continue
                seen[CODEC.decode(msg.value() or b"")["event_id"]] += 1
    finally:
        consumer.close()
    return seen


class _Watermarks:
    """A topic's high watermarks next to its last stable offsets (what read_committed sees)."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.topic = topic
        self.consumers = [
            Consumer(
                kafka.client_config()
                | {"group.id": f"marks-{time.monotonic_ns()}", "isolation.level": level}
            )
            for level in ("read_uncommitted", "read_committed")
        ]
        meta = self.consumers[0].list_topics(topic, timeout=10).topics[topic]
        self.partitions = [TopicPartition(topic, p) for p in meta.partitions]

    def __enter__(self) -> _Watermarks:
        return self

    def __exit__(self, *_exc: object) -> None:
        for consumer in self.consumers:
            consumer.close()

    def unstable(self) -> bool:
        """Whether some partition has records past its last stable offset right now."""
        written, stable = (
            [c.get_watermark_offsets(tp, timeout=5, cached=False)[1] for tp in self.partitions]
            for c in self.consumers
        )
        return any(w > s for w, s in zip(written, stable, strict=True))


async def test_a_worker_killed_mid_transaction_leaves_no_duplicate(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    pipe = pipeline_with_topics(tmp_path, broker, prefix)
    pipe.env["SLUICE_WORKER_PROCESSING_GUARANTEE"] = "exactly_once"
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    ingest, topic = f"{prefix}.events.ingest", f"{prefix}.dest.warehouse"
    count = scaled(6000)
    # More than the load needs: it goes on until the worker was caught and replaced.
    events = sample_events(10 * count, users=200, seed=41)
    await asyncio.to_thread(pipe.start, "gateway", "worker")
    sent = 0
    enough = asyncio.Event()

    async def load() -> None:
        # A steady stream for as long as the worker is watched, so that it is in the
        # middle of a transaction much of the time, however slow the machine.
        nonlocal sent
        while sent < len(events) and not (enough.is_set() and sent >= count):
            part = events[sent : sent + 25]
            report = await send_batches(pipe.gateway_url, pipe.write_key, part, 25)
            assert report.accepted == len(part)
            sent += len(part)
            await asyncio.sleep(0.05)

    def open_records() -> int:
        """Records on the output topic that a read_committed reader does not see (yet)."""
        written = _event_ids(kafka, topic, "read_uncommitted")
        visible = _event_ids(kafka, topic, "read_committed")
        return sum(written.values()) - sum(visible.values())

    try:
        loader = asyncio.create_task(load())
        await until(lambda: worker_routed(pipe.worker_metrics_port) > 100, 90, "the worker routing")
        # Freeze the worker at any moment and look at the output topic: records past its
        # last stable offset that stay there while it is frozen (a commit it had sent
        # completes meanwhile) belong to a transaction it left open: kill it there.
        # Otherwise let it go on for a moment (a random one, not in step with the load) and
        # freeze it again, until a time bound. A frozen worker cannot end its transaction,
        # so the look is never too late; watching for an open transaction first and
        # freezing the worker once one showed was, on a busy machine: a transaction is open
        # for milliseconds, and the commit was through before the freeze.
        victim, left_open, tries = pipe.pid("worker"), 0, 0
        deadline = time.monotonic() + 120
        with _Watermarks(kafka, topic) as marks:
            while time.monotonic() < deadline and not loader.done():
                tries += 1
                os.kill(victim, signal.SIGSTOP)
                try:
                    if await asyncio.to_thread(marks.unstable):
                        await asyncio.sleep(0.5)
                        if await asyncio.to_thread(marks.unstable):
                            left_open = await asyncio.to_thread(open_records)
                finally:
                    os.kill(victim, signal.SIGKILL if left_open else signal.SIGCONT)
                if left_open:
                    break
                await asyncio.sleep(random.uniform(0.01, 0.1))
        if not left_open and loader.done():
            await loader  # the load failed: that is the error to see
        assert left_open, f"the worker was never caught with a transaction open ({tries} tries)"
        # A new worker takes the partitions over (once the dead one's session expires),
        # fencing the killed worker's transactional producers.
        await asyncio.to_thread(pipe.services["worker"].stop)
        await asyncio.to_thread(pipe.start, "worker")
        enough.set()
        await loader
        source = await asyncio.to_thread(_event_ids, kafka, ingest, "read_committed")
        assert sum(source.values()) >= sent
        await until(
            lambda: _event_ids(kafka, topic, "read_committed") == source,
            120,
            "every ingested event on the output topic",
        )
        committed = await asyncio.to_thread(_event_ids, kafka, topic, "read_committed")
        everything = await asyncio.to_thread(_event_ids, kafka, topic, "read_uncommitted")
    finally:
        await asyncio.to_thread(pipe.stop)
    assert set(committed) == {e["messageId"] for e in events[:sent]}
    # Each ingested record once on the output (a client retry after a lost answer can
    # put an event on the ingest topic twice; then it is there twice, not more).
    assert committed == source
    # The killed worker's open transaction was aborted: its records are on the topic and
    # a read_uncommitted reader sees them too; a read_committed one does not.
    assert sum(everything.values()) - sum(committed.values()) >= left_open


async def test_a_worker_that_gets_its_partitions_back_loses_no_batch(
    broker: str, prefix: str, tmp_path: Path
) -> None:
    """Worker A loses partitions to B, then gets them back when B stops: nothing lost.

    A's producers for those partitions were fenced by B's in between; a fenced producer
    kept and used again fails its first transaction, and the batch after it committed
    its offset past that batch's events.
    """
    pipe = pipeline_with_topics(tmp_path, broker, prefix)
    pipe.env["SLUICE_WORKER_PROCESSING_GUARANTEE"] = "exactly_once"
    kafka = KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix)
    ingest, topic = f"{prefix}.events.ingest", f"{prefix}.dest.warehouse"
    events = sample_events(scaled(1800), users=200, seed=43)
    second_port = free_port()
    second = BackgroundProcess("worker-2", pipe.root / "run")
    sent = 0

    async def send(upto: int) -> None:
        nonlocal sent
        report = await send_batches(pipe.gateway_url, pipe.write_key, events[sent:upto], 25)
        assert report.accepted == upto - sent
        sent = upto

    def caught_up() -> bool:
        source = _event_ids(kafka, ingest, "read_committed")
        return sum(source.values()) >= sent and _event_ids(kafka, topic, "read_committed") == source

    await asyncio.to_thread(pipe.start, "gateway", "worker")
    try:
        # A alone: it opens a transactional producer for every ingest partition.
        await send(len(events) // 3)
        await until(caught_up, 120, "worker A routing every partition")
        # B joins and takes partitions over, fencing A's producers for them.
        second.start(
            ["worker"],
            {
                **pipe.env,
                "SLUICE_WORKER_METRICS_PORT": str(second_port),
                "SLUICE_WORKER_DATA_DIR": str(pipe.root / "worker-2"),
            },
        )
        deadline = time.monotonic() + 120
        while worker_routed(second_port) == 0 and sent < 2 * len(events) // 3:
            assert time.monotonic() < deadline, "worker B never routed"
            await send(min(sent + 25, 2 * len(events) // 3))
            await asyncio.sleep(0.5)
        await send(2 * len(events) // 3)
        await until(caught_up, 120, "both workers routing")
        # B stops: A gets every partition back, and routes what comes next.
        await asyncio.to_thread(second.stop, 60)
        for upto in range(sent + 50, len(events) + 1, 50):
            await send(upto)
            await asyncio.sleep(0.2)
        await send(len(events))
        await until(caught_up, 120, "every event on the output topic once")
        source = await asyncio.to_thread(_event_ids, kafka, ingest, "read_committed")
        committed = await asyncio.to_thread(_event_ids, kafka, topic, "read_committed")
    finally:
        second.stop(timeout=60)
        await asyncio.to_thread(pipe.stop)
    assert set(committed) == {e["messageId"] for e in events}
    assert committed == source
