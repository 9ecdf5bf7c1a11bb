"""Batches of messages for an agent, read straight from its channel's queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import faust
from faust.types import ChannelT, EventT, Message


async def take_batches(
    stream: faust.StreamT[bytes], max_events: int, within_s: float
) -> AsyncIterator[list[Message]]:
    """Batches of up to `max_events` messages from the agent's channel, waiting `within_s`.

    Faust's `Stream.take_events` runs every event through the stream's per-event
    machinery (processors, context, a coroutine per ack), which costs the worker more
    than routing the event does (BENCHMARKS.md). This drains the channel queue the
    stream would read, in bulk: lists of messages that `BatchedConsumer` queued for the
    topic (`deliver_in_batches`), or Faust's events.
    Like the stream, it tracks each message as pending until acked (a rebalance waits
    for those) and skips messages fetched before the current rebalance generation
    (the partition is read again from its committed offset). The caller acks each
    message once its outputs are confirmed, and Faust commits acked offsets as usual
    (a crash before the ack means the events are consumed again: at least once).
    """
    channel = stream.channel
    app = stream.app
    add_unacked = cast(Any, app.consumer)._unacked_messages.add
    # The agent's stream reads a channel iterator (a subscriber of the topic) and its queue.
    queue = cast(
        ChannelT[bytes], aiter(channel) if isinstance(channel, ChannelT) else channel
    ).queue
    loop = asyncio.get_running_loop()

    def current(item: list[Message] | EventT[bytes]) -> list[Message]:
        messages = item if isinstance(item, list) else [item.message]
        if not messages or messages[0].generation_id != app.consumer_generation_id:
            return []
        for message in messages:
            if not message.tracked:
                message.tracked = True
                add_unacked(message)
        return messages

    carry: list[Message] = []
    while True:
        if carry and carry[0].generation_id != app.consumer_generation_id:
            carry = []
        batch = carry
        carry = []
        while not batch:
            try:
                batch = list(current(await queue.get()))
            except StopAsyncIteration:
                return  # Faust ends its channels this way when the worker stops
        deadline = loop.time() + within_s
        while len(batch) < max_events:
            while not queue.empty() and len(batch) < max_events:
                batch.extend(current(queue.get_nowait()))
            left = deadline - loop.time()
            if len(batch) >= max_events or left <= 0:
                break
            try:
                batch.extend(current(await asyncio.wait_for(queue.get(), left)))
            except TimeoutError:
                break
        if len(batch) > max_events:
            batch, carry = batch[:max_events], batch[max_events:]
        yield batch
