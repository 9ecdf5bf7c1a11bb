"""The sink's window of recent event ids: what it remembers and what it forgets first."""

from __future__ import annotations

from connectors.warehouse.copies import RecentIds


def test_the_oldest_keys_are_forgotten_first_and_a_key_is_kept_once() -> None:
    recent = RecentIds(3, [("web", "a"), ("web", "b")])
    recent.add(("web", "a"))  # seen already: neither added again nor moved
    recent.add(("web", "c"))
    assert len(recent) == 3
    recent.add(("web", "d"))
    assert ("web", "a") not in recent
    assert all(("web", k) in recent for k in "bcd")


def test_the_source_is_part_of_the_key() -> None:
    recent = RecentIds(10, [("web", "m-1")])
    assert ("app", "m-1") not in recent


def test_a_window_of_zero_remembers_nothing() -> None:
    recent = RecentIds(0, [("web", "a")])
    recent.add(("web", "b"))
    assert len(recent) == 0
    assert ("web", "a") not in recent
