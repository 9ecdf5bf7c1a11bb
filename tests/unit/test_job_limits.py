"""A process's share of a queue's rate limit and concurrency cap."""

from __future__ import annotations

from connectors.jobs.limits import Limits
from core.config import Queue


def _queue(**fields: object) -> Queue:
    return Queue.model_validate({"name": "q", "submit_keys": ["k"], **fields})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_slots_of_the_cap_are_split_exactly_by_the_partitions_owned() -> None:
    queue = _queue(concurrency=10, max_concurrency=5)
    owners = [{0, 1}, {2, 3}, {4, 5}]
    caps = []
    for owned in owners:
        limits = Limits(queue)
        limits.share(owned, 6)
        caps.append(limits.cap)
    assert caps == [2, 2, 1]
    assert sum(caps) == 5
    # The process's own concurrency still bounds it; without a cap it is all there is.
    alone = Limits(queue)
    alone.share(set(range(6)), 6)
    assert alone.cap == 5
    free = Limits(_queue(concurrency=7))
    free.share({0}, 6)
    assert free.cap == 7


def test_a_share_of_the_rate_admits_its_part_per_second_after_its_part_of_the_burst() -> None:
    clock = Clock()
    limits = Limits(_queue(rate_limit={"jobs_per_s": 60, "burst": 30}), clock)
    limits.share({0, 1}, 6)  # a third: 20 per second, up to 10 at once
    assert limits.wait() > 0  # it starts empty
    clock.now += 0.5  # 10 tokens
    assert sum(limits.take() for _ in range(50)) == 10
    assert not limits.take()
    assert 0.04 < limits.wait() <= 0.05
    clock.now += 10.0  # full again: never more than the burst share
    assert sum(limits.take() for _ in range(50)) == 10
    clock.now += 1.0
    assert sum(limits.take() for _ in range(50)) == 10  # capped at the burst share


def test_without_a_rate_limit_every_start_may_go() -> None:
    limits = Limits(_queue())
    limits.share({0}, 4)
    assert all(limits.take() for _ in range(1000))
    assert limits.wait() == 0
