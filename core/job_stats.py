"""Figures of a queue's jobs over time, kept from the status table as statuses change.

`QueueFigures` watches a `StatusTable` (`table.watch`): each status put brings the
transitions its history has that the status before it had not, and those are counted
where they happened (their `at_ms`), so a request never scans the table:

- rates: per queue, the jobs submitted (a job's first status, at its `submitted_at_ms`),
  attempts started (ACTIVE), failed (FAILED), and jobs completed, dead and cancelled, in
  one-second buckets of the last `RATE_WINDOW_S` seconds (a ring of them);
- latencies: per queue, the attempts that ended (COMPLETED, FAILED, DEAD after their
  ACTIVE) in the last `LATENCY_WINDOW_S` seconds, at most `MAX_SAMPLES` of them: each one's
  wait (started - the later of due and submitted) and run time (ended - started). An
  attempt given up on because its lease expired has no run time of its own and is left out.

Transitions older than the windows when they are seen (a gateway reading the topic from
its beginning) are not kept. A status forgotten (its tombstone) takes nothing back: what
happened in the window still happened.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from core.jobs import ACTIVE, CANCELLED, COMPLETED, DEAD, FAILED, JobStatus

RATE_WINDOW_S: Final = 60
LATENCY_WINDOW_S: Final = 300
MAX_SAMPLES: Final = 1000
PERCENTILES: Final = (50, 90, 99)
RATES: Final = ("submitted", "started", "completed", "failed", "dead", "cancelled")
_RATE_OF_STATE: Final = {
    ACTIVE: "started",
    COMPLETED: "completed",
    FAILED: "failed",
    DEAD: "dead",
    CANCELLED: "cancelled",
}
_ENDS: Final = frozenset({COMPLETED, FAILED, DEAD})
# Slots of the ring of one-second buckets: more than the window, so a whole window fits.
_SLOTS: Final = 64


class Ring:
    """Counts per second of the last `_SLOTS` seconds; older seconds are dropped."""

    def __init__(self) -> None:
        self._seconds = [-1] * _SLOTS
        self._counts = [0] * _SLOTS

    def add(self, second: int, n: int = 1) -> None:
        """Count `n` at `second` (nothing when the ring has moved past it)."""
        slot = second % _SLOTS
        held = self._seconds[slot]
        if held > second:
            return
        if held != second:
            self._seconds[slot] = second
            self._counts[slot] = 0
        self._counts[slot] += n

    def total(self, now_s: int, window_s: int) -> int:
        """What was counted in the seconds (now_s - window_s, now_s]."""
        low = now_s - window_s
        return sum(n for s, n in zip(self._seconds, self._counts, strict=True) if low < s <= now_s)


@dataclass
class _Queue:
    rates: dict[str, Ring] = field(default_factory=lambda: {name: Ring() for name in RATES})
    # (ended at ms, wait ms, run ms), in the order they were seen.
    samples: deque[tuple[int, int, int]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))


def first_new(old: JobStatus | None, new: JobStatus) -> int:
    """Where the transitions in `new`'s history that `old` (the status it replaces) had not
    begin: `new.history[first_new(old, new):]` are the new ones."""
    history = new.history
    if old is None or not old.history:
        return 0
    last = old.history[-1]
    for i in range(len(history) - 1, -1, -1):
        if history[i] == last:
            return i + 1
    # Not a later state of the same history (an older record): what happened after the
    # old status.
    for i, entry in enumerate(history):
        if int(entry.get("at_ms") or 0) > old.updated_at_ms:
            return i
    return len(history)


def attempt_times(status: JobStatus, end: int) -> tuple[int, int] | None:
    """(wait ms, run ms) of the attempt that `status.history[end]` ended, if it ran."""
    history = status.history
    ended = history[end]
    if ended.get("note") == "lease expired":
        return None
    for i in range(end - 1, -1, -1):
        entry = history[i]
        if entry.get("state") == ACTIVE and entry.get("attempt") == ended.get("attempt"):
            started = int(entry["at_ms"])
            due = status.submitted_at_ms
            if i > 0 and (before := history[i - 1].get("due_ms")) is not None:
                due = max(due, int(before))
            return max(0, started - due), max(0, int(ended["at_ms"]) - started)
    return None


def percentiles(values: list[int]) -> dict[str, int | None]:
    """p50, p90, p99 of `values` (nearest rank); None for each when there are none."""
    ordered = sorted(values)
    out: dict[str, int | None] = {}
    for p in PERCENTILES:
        out[f"p{p}"] = ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else None
    return out


class QueueFigures:
    """Rates and latency percentiles per queue, from a status table's changes (thread-safe)."""

    def __init__(self, clock_ms: Callable[[], int] | None = None) -> None:
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._queues: dict[str, _Queue] = {}
        self._lock = threading.Lock()

    def changed(self, old: JobStatus | None, new: JobStatus | None) -> None:
        """A status put (or, `new` None, forgotten): count its new transitions."""
        if new is None:
            return
        first = first_new(old, new)
        if first == len(new.history) and old is not None:
            return
        now_ms = self._clock_ms()
        rate_from = now_ms - RATE_WINDOW_S * 1000
        samples_from = now_ms - LATENCY_WINDOW_S * 1000
        with self._lock:
            figures = self._queues.get(new.queue)
            if figures is None:
                figures = self._queues[new.queue] = _Queue()
            if old is None and new.submitted_at_ms > rate_from:
                figures.rates["submitted"].add(new.submitted_at_ms // 1000)
            for offset, entry in enumerate(new.history[first:]):
                at_ms = int(entry.get("at_ms") or 0)
                state = entry.get("state")
                rate = _RATE_OF_STATE.get(str(state))
                if rate is not None and at_ms > rate_from:
                    figures.rates[rate].add(at_ms // 1000)
                if state in _ENDS and at_ms > samples_from:
                    times = attempt_times(new, first + offset)
                    if times is not None:
                        figures.samples.append((at_ms, *times))

    def queues(self) -> list[str]:
        """The queues that statuses were seen of, by name."""
        with self._lock:
            return sorted(self._queues)

    def summary(self, queue: str, now_ms: int | None = None) -> dict[str, Any]:
        """The queue's rates (per second over the last minute) and latency percentiles."""
        now_ms = self._clock_ms() if now_ms is None else now_ms
        with self._lock:
            figures = self._queues.get(queue) or _Queue()
            now_s = now_ms // 1000
            totals = {
                name: ring.total(now_s, RATE_WINDOW_S) for name, ring in figures.rates.items()
            }
            since = now_ms - LATENCY_WINDOW_S * 1000
            recent = [(w, r) for at, w, r in figures.samples if at > since]
        return {
            "rates": {"window_s": RATE_WINDOW_S}
            | {name: round(n / RATE_WINDOW_S, 4) for name, n in totals.items()},
            "latency": {
                "window_s": LATENCY_WINDOW_S,
                "attempts": len(recent),
                "wait_ms": percentiles([w for w, _ in recent]),
                "run_ms": percentiles([r for _, r in recent]),
            },
        }
