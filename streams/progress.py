"""Where the processor agent is per partition: the lag gauge and the stall watchdog."""

from __future__ import annotations

from typing import Any, cast

import faust
from faust.types import TP, Message

from core.watchdog import StallWatchdog
from streams.metrics import ProcessorMetrics


class Progress:
    """Where the agent is per partition, for the lag gauge and the stall watchdog."""

    def __init__(self, app: faust.App, metrics: ProcessorMetrics, watchdog: StallWatchdog) -> None:
        self.app = app
        self.metrics = metrics
        self.watchdog = watchdog
        # Per ingest partition, the offset after the last event processed (acked) here.
        self.next_offsets: dict[TP, int] = {}
        self.died: str | None = None

    def moved(self, acked: list[Message]) -> None:
        """A batch's outputs are confirmed and these messages acked."""
        if not acked:
            return
        next_offsets = self.next_offsets
        for message in acked:
            tp = message.tp
            if message.offset >= next_offsets.get(tp, -1):
                next_offsets[tp] = message.offset + 1
        self.watchdog.progress()
        self.refresh()

    def refresh(self) -> None:
        """Lag of each assigned partition: what the broker has past what was processed."""
        consumer = self.app.consumer
        committed = cast(Any, consumer)._committed_offset
        total = 0
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            position = self.next_offsets.get(tp)
            if position is None:
                position = committed.get(tp) or 0
            if highwater is None:
                continue
            waiting = max(0, highwater - position)
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(waiting)
            total += waiting
        self.watchdog.lag(total)
