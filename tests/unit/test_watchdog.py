"""The stall watchdog: ready while idle or moving, not ready when input waits and nothing moves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from core.watchdog import StallWatchdog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_idle_stage_is_ready_however_long_it_waits() -> None:
    clock = Clock()
    dog = StallWatchdog("sink", 30, clock=clock)
    clock.now += 3600
    dog.lag(0)
    assert dog.problem() is None
    assert dog.seconds_stalled() == 0.0


def test_waiting_input_without_progress_is_a_stall_and_progress_clears_it() -> None:
    clock = Clock()
    registry = CollectorRegistry()
    dog = StallWatchdog("sink", 30, registry=registry, clock=clock)
    clock.now += 500  # idle for long: the stall clock starts when input starts waiting
    dog.lag(10)
    clock.now += 20
    dog.lag(12)
    assert dog.problem() is None
    clock.now += 15
    problem = dog.problem()
    assert problem is not None
    assert "12 records waiting" in problem
    assert registry.get_sample_value("sluice_sink_seconds_since_progress") == 35.0
    dog.progress()
    assert dog.problem() is None
    assert registry.get_sample_value("sluice_sink_seconds_since_progress") == 0.0


def test_a_dead_loop_is_never_ready_again() -> None:
    dog = StallWatchdog("delivery", 30, clock=Clock())
    dog.fail("delivery loop crm died: RuntimeError('boom')")
    dog.progress()
    dog.lag(0)
    assert dog.problem() == "delivery loop crm died: RuntimeError('boom')"
