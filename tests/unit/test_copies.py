"""The sink's window of recent event ids: what it remembers and what it forgets first."""

from __future__ import annotations

from connectors.warehouse.copies import RecentIds, event_key


def test_the_oldest_keys_are_forgotten_first_and_a_key_is_kept_once() -> None:
    recent = RecentIds(3, [event_key("web", "a"), event_key("web", "b")])
    recent.add(event_key("web", "a"))  # seen already: neither added again nor moved
    recent.add(event_key("web", "c"))
    assert len(recent) == 3
    recent.add(event_key("web", "d"))
    assert event_key("web", "a") not in recent
    assert all(event_key("web", k) in recent for k in "bcd")


def test_the_source_is_part_of_the_key() -> None:
    recent = RecentIds(10, [event_key("web", "m-1")])
    assert event_key("app", "m-1") not in recent


def test_a_window_of_zero_remembers_nothing() -> None:
    recent = RecentIds(0, [event_key("web", "a")])
    recent.add(event_key("web", "b"))
    assert len(recent) == 0
    assert event_key("web", "a") not in recent


def test_a_window_kept_full_for_long_holds_exactly_the_last_keys() -> None:
    recent = RecentIds(1000)
    for n in range(5000):
        recent.add(event_key("web", str(n)))
    assert len(recent) == 1000
    assert [n for n in range(5000) if event_key("web", str(n)) in recent] == list(range(4000, 5000))
