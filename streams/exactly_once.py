"""Exactly-once routing: each input partition's outputs and next offset in one transaction.

A batch is split by input partition; each partition's events are routed and committed
with the partition's own transactional producer (`PartitionTransactions`), so a
partition that moves to another worker fences this one and its offsets are final. An
output Kafka refuses for good is replaced by its dead letter inside the transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

import faust
import structlog
from confluent_kafka import KafkaError
from faust.types import TP, Message

from core.errors import BrokerUnavailable
from core.kafka import BATCH_ERRORS, TOPIC_ERRORS, Record, delivery_error
from streams.errors import Fenced, Refused
from streams.processor import Incoming, OutRecord, Routed, Router
from streams.transactions import PartitionTransactions

log = structlog.get_logger("sluice.worker")


async def route_in_transactions(
    app: faust.App,
    transactions: PartitionTransactions,
    router: Router,
    route: Callable[[list[Incoming]], Awaitable[list[Routed]]],
    messages: list[Message],
    batch: list[Incoming],
    stopping: asyncio.Event,
) -> tuple[list[Routed], list[Message], dict[str, int]]:
    """Exactly-once: each input partition's outputs and next offset in one transaction.

    Returns what was routed, the messages to ack (those of partitions whose transaction
    committed; a partition that moved belongs to another worker now, which reads it
    again) and the outputs Kafka refused, by destination (in DLQs instead).
    """
    loop = asyncio.get_running_loop()
    parts: dict[tuple[str, int], list[int]] = {}
    for i, rec in enumerate(batch):
        parts.setdefault((rec.topic, rec.partition), []).append(i)

    async def one(
        tp: tuple[str, int], indexes: list[int]
    ) -> tuple[list[Routed], list[int], dict[str, int]]:
        start = await loop.run_in_executor(
            None, transactions.committed_offset, tp[0], tp[1], app.consumer_generation_id
        )
        # Events below the committed offset were processed (their outputs committed) by a
        # transaction that was still completing when Faust read the offsets: ack them.
        done = [i for i in indexes if start is not None and batch[i].offset < start]
        todo = [i for i in indexes if start is None or batch[i].offset >= start]
        if not todo or transactions.lost(*tp):
            return [], done, {}
        passes = await route([batch[i] for i in todo])
        outputs: dict[str, list[OutRecord]] = {}
        origins: dict[str, list[Incoming]] = {}
        for routed in passes:
            for topic, records in routed.outputs.items():
                outputs.setdefault(topic, []).extend(records)
                origins.setdefault(topic, []).extend(routed.origins[topic])
        first, next_offset = batch[todo[0]].offset, batch[todo[-1]].offset + 1
        alone: dict[str, list[OutRecord]] = {}
        origin_of: dict[int, Incoming] = {}
        refused: dict[str, int] = {}
        renew, delay = False, 0.5
        while True:
            if TP(*tp) not in app.consumer.assignment():
                # Revoked meanwhile: opening its producer again would fence the new owner.
                return [], [], {}
            try:
                if renew:
                    # A failed transaction's producer is never used again. The new one
                    # fences any other, and then the committed offset is final.
                    committed = await loop.run_in_executor(None, transactions.renew, *tp)
                    renew = False
                    if committed is not None and committed >= next_offset:
                        return [], done + todo, {}  # committed meanwhile, by another owner
                    if committed is not None and committed != first:
                        log.warning(
                            "partition committed by another owner; leaving it",
                            topic=tp[0],
                            partition=tp[1],
                            committed=committed,
                        )
                        transactions.lose(*tp)
                        return [], [], {}
                await loop.run_in_executor(
                    None, transactions.commit, tp[0], tp[1], outputs, next_offset, alone
                )
                return passes, done + todo, refused
            except Refused as exc:
                renew = True
                if not origin_of:
                    origin_of = {
                        id(record): origin
                        for topic, listed in outputs.items()
                        for record, origin in zip(listed, origins[topic], strict=True)
                    }
                if not replace_refused(router, exc.records, outputs, alone, origin_of, refused):
                    if stopping.is_set():
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
            except Fenced as exc:
                renew = True
                log.warning("transactional producer fenced; replacing it", error=str(exc))
            except BrokerUnavailable as exc:
                renew = True
                if stopping.is_set():
                    raise
                log.warning("transaction not committed; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    results = await asyncio.gather(*(one(tp, idx) for tp, idx in parts.items()))
    routed = [r for passes, _, _ in results for r in passes]
    acked = [messages[i] for _, indexes, _ in results for i in indexes]
    refused: dict[str, int] = {}
    for _, _, counts in results:
        for dest, count in counts.items():
            refused[dest] = refused.get(dest, 0) + count
    return routed, acked, refused


def replace_refused(
    router: Router,
    records: list[tuple[str, Record, KafkaError]],
    outputs: dict[str, list[OutRecord]],
    alone: dict[str, list[OutRecord]],
    origin_of: dict[int, Incoming],
    refused: dict[str, int],
) -> bool:
    """Change a transaction's outputs after Kafka refused some of them for good.

    A record refused together with others (a record batch's error) is sent alone next
    time, for its own verdict; one refused alone (or by the producer itself, or for its
    topic) is replaced by its dead letter (`Router.dead_letter`). Records are found by
    identity; `origin_of` maps each to its input record. False when a record could not be
    dead-lettered either: the caller waits before it tries again.
    """
    replaced = True
    for topic, refused_record, err in records:
        record = cast(OutRecord, refused_record)  # one of `outputs`' own records
        origin = origin_of[id(record)]
        if any(r is record for r in alone.get(topic, ())):
            alone[topic] = [r for r in alone[topic] if r is not record]
        else:
            outputs[topic] = [r for r in outputs[topic] if r is not record]
            if err.code() in BATCH_ERRORS:
                alone.setdefault(topic, []).append(record)
                continue
        error = delivery_error(err, topic)
        dead = router.dead_letter(topic, record, origin, error, err.code() in TOPIC_ERRORS)
        if dead is None:
            # Even the dead letter without its value was refused: keep trying (the stall
            # shows in `/ready`), never drop it.
            outputs[topic].append(record)
            replaced = False
            continue
        log.warning(
            "output refused; dead-lettered",
            topic=topic,
            to=dead.topic,
            error=str(error),
            offset=origin.offset,
            partition=origin.partition,
        )
        outputs.setdefault(dead.topic, []).append(dead.record)
        origin_of[id(dead.record)] = origin
        if dead.refused_for is not None:
            refused[dead.refused_for] = refused.get(dead.refused_for, 0) + 1
    return replaced
