"""What a lane's task does with its records (lanes themselves: `core/due.py`).

A lane of the destination topic takes up to `batch_size` records at a time: each is
held behind its parked key (order-preserving mode), or goes out in one request; those
that failed go to a tier or the DLQ. A lane of a retry tier takes its head once it is
due (the tier's `DueRule`: `sluice.retry.due`, capped by the policy), tries it again,
and moves it on to the next tier or the DLQ. Only after that is done (confirmed by
Kafka) are the records marked done, so their offsets may be committed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka import Message

from connectors.delivery.metrics import DeliveryMetrics
from connectors.delivery.ordering import Ordering
from connectors.delivery.pacing import Sender
from connectors.delivery.routing import Routing, now_ms, record_ref, written_ms
from core.config import WebhookConfig
from core.due import DueLanes, Lane
from core.headers import (
    FIRST_FAILURE,
    RETRY_REF,
    Origin,
    attempts_so_far,
    header_map,
    int_header,
    message_headers,
    origin_of,
)
from core.topics import DestinationTopics
from core.watchdog import StallWatchdog


class LaneWork:
    """The task of each lane of one destination: deliver, retry, hold, move on."""

    def __init__(
        self,
        destination: str,
        topics: DestinationTopics,
        cfg: WebhookConfig,
        metrics: DeliveryMetrics,
        lanes: DueLanes[Message],
        routing: Routing,
        sender: Sender,
        watchdog: StallWatchdog,
        tier_of: Mapping[str, int],
    ) -> None:
        self.destination = destination
        self.topics = topics
        self.cfg = cfg
        self.metrics = metrics
        self.lanes = lanes
        self.routing = routing
        self.sender = sender
        self.watchdog = watchdog
        self.tier_of = tier_of
        self.ordering: Ordering | None = None  # set in order-preserving mode when running

    async def run(self, lane: Lane[Message]) -> None:
        """Handle the lane's records in order until it stops."""
        tier = self.tier_of.get(lane.topic)  # None: the destination topic itself
        size = self.cfg.batch_size if tier is None else 1
        while not lane.stopping:
            if not lane.pending:
                lane.wake.clear()
                await lane.wake.wait()
                continue
            if tier is not None and not await self._until_due(lane, tier):
                continue
            chunk = lane.chunk(size)
            if tier is None:
                if not await self._handle_new(lane, chunk):
                    continue  # stopping at the held-records bound: nothing of it done
            else:
                await self._handle_retry(lane, chunk[0])
            self.lanes.finish(lane, len(chunk))
            self.watchdog.progress()

    async def _until_due(self, lane: Lane[Message], tier: int) -> bool:
        """Wait until the head of a tier lane is due; False when woken before (or stopping)."""
        due_ms = await lane.until_due()
        if due_ms is None:
            return False
        self.metrics.lateness.labels(self.destination, self.topics.tiers[tier]).observe(
            max(0.0, lane.clock() - due_ms / 1000)
        )
        return True

    async def _handle_new(self, lane: Lane[Message], chunk: list[Message]) -> bool:
        """Records of the destination topic: deliver, or hold behind their parked key.

        False (nothing done) when the lane stops while it waits for room to hold a record.
        """
        ordering = self.ordering
        if ordering is not None and not await ordering.room_to_hold(lane, chunk):
            return False
        ready: list[tuple[Message, dict[str, Any]]] = []
        for msg in chunk:
            key = msg.key()
            if ordering is not None and key is not None and ordering.parked(lane.partition, key):
                await ordering.hold(lane.partition, key, msg)
                self.metrics.events.labels(self.destination, "held").inc()
                ordering.count()
                continue
            event = await self.routing.decode(msg)
            if event is not None:
                ready.append((msg, event))
        if not ready:
            return True
        error = await self.sender.attempt([event for _, event in ready])
        now = now_ms()
        for msg, _ in ready:
            if error is None:
                continue
            key = msg.key()
            if ordering is not None and key is not None and ordering.parked(lane.partition, key):
                # An earlier record of this key in the same request went to a tier.
                await ordering.hold(lane.partition, key, msg)
                continue
            origin = Origin(msg.topic() or "", lane.partition, msg.offset() or 0, written_ms(msg))
            moved = await self.routing.failed(
                lane.partition,
                key,
                msg.value() or b"",
                message_headers(msg),
                origin,
                error,
                1,
                now,
                record_ref(msg),
            )
            if moved and ordering is not None and key is not None:
                await ordering.park(lane.partition, key, record_ref(msg), 1)
                ordering.count()
        return True

    async def _handle_retry(self, lane: Lane[Message], msg: Message) -> None:
        """A due record of a retry tier: try again; on to the next tier, or the DLQ."""
        headers = header_map(message_headers(msg))
        ref = headers.get(RETRY_REF)
        attempts = attempts_so_far(headers)
        key = msg.key()
        ordering = self.ordering
        state = ordering.parked(lane.partition, key) if ordering is not None else None
        if state is not None and (state.head != ref or attempts < state.attempts):
            # A copy of a record that was resolved (or moved on) already: delivering it
            # would break the key's order.
            self.metrics.events.labels(self.destination, "stale").inc()
            return
        event = await self.routing.decode(msg)
        if event is None:
            if ordering is not None and state is not None and key is not None:
                await ordering.resolved(lane.partition, key)
            return
        error = await self.sender.attempt([event], attempts + 1)
        own = Origin(msg.topic() or "", lane.partition, msg.offset() or 0, written_ms(msg))
        if error is not None:
            first = int_header(headers, FIRST_FAILURE) or now_ms()
            moved = await self.routing.failed(
                lane.partition,
                key,
                msg.value() or b"",
                message_headers(msg),
                origin_of(headers, own),
                error,
                attempts + 1,
                first,
                ref,
            )
            if moved:
                if ordering is not None and state is not None and key is not None and ref:
                    await ordering.park(lane.partition, key, ref, attempts + 1)
                return
        if ordering is not None and state is not None and key is not None:
            await ordering.resolved(lane.partition, key)
