"""Offset ranges: merged, and asked whether an offset is in them."""

from __future__ import annotations

from core.ranges import in_ranges, merge_ranges


def test_overlapping_and_adjacent_ranges_are_joined_and_sorted() -> None:
    assert merge_ranges([(10, 12), (0, 3), (4, 5), (2, 2), (20, 20), (13, 13)]) == [
        (0, 5),
        (10, 13),
        (20, 20),
    ]
    assert merge_ranges([]) == []


def test_an_offset_is_in_the_ranges_at_both_ends_and_nowhere_between() -> None:
    merged = merge_ranges([(0, 5), (10, 13)])
    assert [o for o in range(-1, 16) if in_ranges(merged, o)] == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13]
    assert not in_ranges([], 0)
