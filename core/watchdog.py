"""A stall watchdog: readiness that tells the truth about a consuming stage.

A stage (the sink, the worker, the delivery process) reports progress whenever it
moved records on (loaded, produced, delivered, dead-lettered) and how much input is
waiting (its consumer lag). It is stalled when input is waiting and nothing moved for
`stall_after_s`: its `/ready` then fails, so an orchestrator restarts it, and the
gauge `sluice_<component>_seconds_since_progress` shows how long it has been stuck.
A stage whose loop died is not ready either (`fail`), whatever its lag.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge


class StallWatchdog:
    """Tracks a stage's last progress against its waiting input; thread-safe."""

    def __init__(
        self,
        component: str,
        stall_after_s: float,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.component = component
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_progress = clock()
        self._lag = 0
        self._failure: str | None = None
        if registry is not None:
            gauge = Gauge(
                f"sluice_{component}_seconds_since_progress",
                "Seconds since the stage last moved records on (0 while it has no input waiting).",
                registry=registry,
            )
            gauge.set_function(self.seconds_stalled)

    def progress(self) -> None:
        """Records moved on just now."""
        with self._lock:
            self._last_progress = self._clock()

    def lag(self, waiting: int) -> None:
        """How many input records are waiting now; with none waiting the stage is idle, not stalled."""
        with self._lock:
            if waiting <= 0 or self._lag <= 0:
                # Idle until now: the stall clock starts when input starts waiting.
                self._last_progress = self._clock()
            self._lag = max(0, waiting)

    def fail(self, reason: str) -> None:
        """The stage's loop died: never ready again in this process."""
        with self._lock:
            self._failure = reason

    def seconds_stalled(self) -> float:
        """Seconds since the last progress while input waits (0 when idle)."""
        with self._lock:
            if self._lag <= 0:
                return 0.0
            return max(0.0, self._clock() - self._last_progress)

    def problem(self) -> str | None:
        """Why the stage is not ready, or None when it is."""
        with self._lock:
            failure = self._failure
        if failure is not None:
            return failure
        stalled = self.seconds_stalled()
        if stalled > self.stall_after_s:
            return (
                f"{self.component} stalled: {self._lag} records waiting and no progress "
                f"for {stalled:.0f} s"
            )
        return None
